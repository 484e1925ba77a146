"""The shipped toy CLIP (gem_jax/data/toy): it loads offline, is small, and its maps land on the named
objects of held-out scenes, above random weights, as docs/TOY_MODEL.md says."""

from __future__ import annotations

import json
import pathlib

import numpy as np
import pytest

from gem_jax import toy
from gem_jax.toy import measures, report

#: Held-out scenes the tests use: the first 40 of the model card's 200 (the card's figures are on 200).
SEEDS = range(40)
#: Methods whose maps the model card finds on the objects, above random weights (pointing and AUROC).
ABOVE_RANDOM = ("gem", "clipsurgery", "clearclip", "naclip")


@pytest.fixture(scope="module")
def model():
    return toy.load()


@pytest.fixture(scope="module")
def defaults():
    return measures.stored_defaults(toy.model_path())


@pytest.fixture(scope="module")
def random_model(model):
    return report.random_model(model)


@pytest.fixture(scope="module")
def held_out(defaults):
    return toy.scenes.scenes(SEEDS, defaults["size"])


def test_shipped_files_are_small_native_and_offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    path = toy.model_path()
    files = {p.name: p.stat().st_size for p in path.iterdir()}
    assert {"model.safetensors", "config.json", "vocab.json", "merges.txt", "tokenizer_config.json"} <= set(files)
    assert sum(files.values()) <= 10 * 2 ** 20, files
    doc = json.loads((path / "config.json").read_text())
    assert doc["format"] == "gem-jax" and doc["toy"]["card"] == "docs/TOY_MODEL.md"
    d = doc["defaults"]
    assert d["method"] == "gem" and d["layers"] <= doc["clip"]["vision"]["layers"]
    assert set(d) <= {"method", "layers", "iterations", "temperature", "size", "template"}
    m = toy.load()
    assert m.tokenizer.vocab_size == m.config.text.vocab_size < 1000
    assert m.tokenizer.eot_token_id == m.config.text.vocab_size - 1
    assert not m.random_weights
    # the package data declaration ships it in the wheel
    pyproject = (pathlib.Path(__file__).resolve().parents[1] / "pyproject.toml").read_text()
    assert '"data/toy/*"' in pyproject


def test_shipped_model_is_the_recipe_and_seed_it_records(model):
    from gem_jax.toy import train

    doc = json.loads((toy.model_path() / "config.json").read_text())
    recipe = train.Recipe.from_dict(doc["toy"]["recipe"])
    assert recipe.config() == model.config
    assert doc["defaults"] == train.default_gem_settings(recipe)


@pytest.fixture(scope="module")
def measured(model, random_model, held_out, defaults):
    """Each (weights, method) measured once for the module: ``measured(which, method)``."""
    cache = {}

    def get(which, method):
        if (which, method) not in cache:
            m = model if which == "trained" else random_model
            opts = report.method_options(method, defaults, model.config.vision.layers)
            cache[which, method] = measures.evaluate(m, method=method, scenes=held_out,
                                                     retrieval_too=(method == "gem"), **opts)
        return cache[which, method]

    return get


def test_gem_maps_land_on_the_named_objects(measured, held_out):
    gem, rnd = measured("trained", "gem"), measured("random", "gem")
    assert gem["objects"] == sum(len(s.objects) for s in held_out)
    # the model card's bar (on its 200 scenes) holds on this subset too, well above random weights
    assert gem["pointing"] >= 0.45 and gem["auroc"] >= 0.75, gem
    assert gem["pointing"] > rnd["pointing"] + 0.2 and gem["auroc"] > rnd["auroc"] + 0.2, (gem, rnd)
    assert gem["text_to_image_top1"] >= 0.5 and rnd["text_to_image_top1"] < 0.1


@pytest.mark.parametrize("method", [m for m in ABOVE_RANDOM if m != "gem"])
def test_siblings_land_on_objects_where_the_card_says(measured, method):
    r, z = measured("trained", method), measured("random", method)
    assert r["pointing"] > z["pointing"] + 0.1 and r["auroc"] > z["auroc"] + 0.1, (method, r, z)


def test_gem_repairs_the_inverted_plain_clip_map(measured):
    clip, gem = measured("trained", "clip"), measured("trained", "gem")
    assert clip["auroc"] < 0.5, clip  # plain CLIP's map lights up the background more than the object
    assert gem["pointing"] > clip["pointing"] + 0.15 and gem["auroc"] > clip["auroc"] + 0.15, (clip, gem)


def test_measures_are_exact_on_known_maps():
    mask = np.zeros((4, 4), bool)
    mask[1:3, 1:3] = True
    perfect = np.where(mask, 1.0, 0.0)
    assert measures.auroc(perfect, mask) == 1.0 and measures.auroc(-perfect, mask) == 0.0
    assert measures.auroc(np.zeros((4, 4)), mask) == 0.5
    # two prompts: the object's map wins on the object, the background's elsewhere
    logits = np.stack([perfect * 0.3, 0.3 - perfect * 0.3])
    hits, aucs = measures.localisation(logits, [mask])
    assert hits == [True] and aucs == [1.0]
    hits, aucs = measures.localisation(logits[::-1], [mask])
    assert hits == [False] and aucs == [0.0]
    # retrieval counts a hit when the retrieved item has the same content
    emb = np.eye(3)
    assert measures.retrieval(emb, emb, ["a", "b", "c"])["text_to_image_top1"] == 1.0
    assert measures.retrieval(emb, emb[[1, 0, 2]], ["a", "b", "c"])["text_to_image_top1"] == pytest.approx(1 / 3)
    assert measures.retrieval(emb, emb[[1, 0, 2]], ["a", "a", "c"])["text_to_image_top1"] == 1.0


def test_eval_command_on_a_toy_dataset_beats_random_weights(tmp_path, model, defaults, capsys):
    from gem_jax import cli
    from gem_jax.checkpoints import save_native
    from gem_jax.models import init_params
    from gem_jax.toy import dataset

    root = dataset.write(tmp_path / "toyvoc", range(200, 224))
    rnd = save_native(tmp_path / "random", model.config, init_params(model.config, seed=0),
                      tokenizer_dir=toy.model_path(), metadata={"random_weights": True})
    scores = {}
    for name, path in (("trained", toy.model_path()), ("random", rnd)):
        out = tmp_path / f"{name}.json"
        code = cli.main(["eval", "--dataset", "toy", "--root", str(root), "--model", str(path), "--out", str(out),
                         "--gem-layers", str(defaults["layers"]), "--temperature", str(defaults["temperature"]),
                         "--quiet"])
        assert code == 0, capsys.readouterr().err
        result = json.loads(out.read_text())
        assert result["evaluated"] == 24 and len(result["per_class_iou"]) == 35
        scores[name] = result["mIoU"]
    assert scores["trained"] > 2 * scores["random"] and scores["trained"] > 10, scores


# ----------------------------------------------------------------------------- the commands, offline

#: The held-out scene of ``gem_jax/data/toy/example.png`` (``--example`` with ``--model toy``),
#: rendered at 256 x 256: a green triangle, a yellow circle and a red star on sand.
EXAMPLE_SEED, EXAMPLE_SIZE = 120, 256


@pytest.fixture(scope="module")
def example():
    return toy.scenes.scene(EXAMPLE_SEED, EXAMPLE_SIZE)


def _pointing(logits, sc) -> list[bool]:
    from gem_jax.postprocess import resize_maps

    logits = resize_maps(np.asarray(logits, np.float32), sc.image.shape[:2])
    hits, _ = measures.localisation(logits, [m for _, m in sc.objects])
    return hits


def test_the_toy_example_image_is_its_recorded_scene(example):
    from PIL import Image

    from gem_jax.loading import example_image_path

    path = example_image_path("toy")
    assert path.parent == toy.model_path() and example_image_path().name == "example.jpg"
    assert np.array_equal(np.asarray(Image.open(path).convert("RGB")), example.image)
    assert example.phrases == ["green triangle", "yellow circle", "red star"] and example.background == "sand"


def test_segment_and_batch_run_with_the_toy_model_offline(tmp_path, example, capsys, monkeypatch):
    from PIL import Image

    from gem_jax import cli, load_results

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("GEM_JAX_CACHE", str(tmp_path / "cache"))
    prompts = [*example.phrases, example.background]
    seg = tmp_path / "seg"
    code = cli.main(["segment", "--model", "toy", "--example", "-p", *prompts, "--classes", *prompts,
                     "--out", str(seg), "--save-logits", str(tmp_path / "logits.npz"), "--quiet"])
    assert code == 0, capsys.readouterr().err
    names = sorted(p.name for p in seg.iterdir() if not p.name.startswith("."))
    assert names == sorted(["example__gem__green_triangle.png", "example__gem__yellow_circle.png",
                            "example__gem__red_star.png", "example__gem__sand.png", "example__gem__grid.png",
                            "example__gem__labels.png"])
    with np.load(tmp_path / "logits.npz") as z:
        logits = z["logits"][0]
    assert all(_pointing(logits, example)), "the maps of the example scene no longer land on its objects"

    # batch over two held-out scenes saved as files, with the toy's whole vocabulary as prompts
    images = tmp_path / "images"
    images.mkdir()
    for seed in (3, 4):
        Image.fromarray(toy.scenes.scene(seed, 64).image).save(images / f"scene{seed}.png")
    out = tmp_path / "batch"
    code = cli.main(["batch", str(images), "--model", "toy", "--classes", *toy.class_names(), "--out", str(out),
                     "--quiet"])
    assert code == 0, capsys.readouterr().err
    results = load_results(out)
    assert len(results) == 2
    for record in results:
        assert record.logits().shape[0] == len(toy.class_names())


def test_the_demo_serves_the_toy_model(example):
    from gem_jax.demo import Demo

    demo = Demo("toy")
    try:
        assert demo.startup_error is None and "toy" in demo.model_choices()
        assert demo.default_layers() == json.loads((toy.model_path() / "config.json").read_text())["defaults"]["layers"]
        *_, (overlays, label_map, npz, timing, status, result) = demo.run(example.image, ", ".join(
            [*example.phrases, example.background]), "gem")
        assert status.startswith("Done"), status
        assert [c for _, c in overlays] == [*example.phrases, example.background]
        assert all(_pointing(result.logits, example))
    finally:
        demo.close()
