"""The shipped toy CLIP (gem_jax/data/toy): it loads offline, is small, and its maps land on the named
objects of held-out scenes, above random weights, as docs/TOY_MODEL.md says."""

from __future__ import annotations

import argparse
import json
import pathlib

import numpy as np
import pytest

from gem_jax import toy
from gem_jax.toy import measures, report

#: Held-out scenes the tests use: the first 40 of the model card's 200 (the card's figures are on 200).
SEEDS = range(40)
#: Methods whose maps the model card finds on the objects, above random weights (pointing and AUROC).
ABOVE_RANDOM = ("gem", "clipsurgery")


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


def test_gem_improves_on_plain_clip(measured):
    clip, gem = measured("trained", "clip"), measured("trained", "gem")
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
    from gem_jax.checkpoints import save_native
    from gem_jax.eval import command
    from gem_jax.models import init_params
    from gem_jax.toy import dataset

    root = dataset.write(tmp_path / "toyvoc", range(200, 224))
    rnd = save_native(tmp_path / "random", model.config, init_params(model.config, seed=0),
                      tokenizer_dir=toy.model_path(), metadata={"random_weights": True})
    parser = argparse.ArgumentParser()
    command.add_parser(parser.add_subparsers(dest="cmd"))
    scores = {}
    for name, path in (("trained", toy.model_path()), ("random", rnd)):
        out = tmp_path / f"{name}.json"
        args = parser.parse_args(["eval", "--dataset", "toy", "--root", str(root), "--model", str(path),
                                  "--gem-layers", str(defaults["layers"]), "--temperature",
                                  str(defaults["temperature"]), "--out", str(out), "--no-progress"])
        assert command.run(args) == 0, capsys.readouterr().err
        result = json.loads(out.read_text())
        assert result["evaluated"] == 24 and len(result["per_class_iou"]) == 35
        scores[name] = result["mIoU"]
    assert scores["trained"] > 2 * scores["random"] and scores["trained"] > 10, scores
