"""One description of a method: what export metadata, batch manifests, evaluation results and
state files, and ``--save-logits`` files record is ``Method.describe()``; an option a method
does not have is refused alike in the command line, the API and the demo."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

import gem_jax
from gem_jax import batch, export
from gem_jax.engine.methods import builtin_names, get_method
from gem_jax.eval import datasets, runner
from gem_jax.progress import Progress
from tiny import save_tiny


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("m") / "tiny"
    save_tiny(d, seed=6)
    return d


@pytest.fixture(scope="module")
def voc(tmp_path_factory):
    """Two images in the VOC layout."""
    root = tmp_path_factory.mktemp("voc") / "VOC2012"
    for sub in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation"):
        (root / sub).mkdir(parents=True)
    rng = np.random.default_rng(0)
    palette = datasets.voc_palette().reshape(-1).tolist()
    for i in range(2):
        Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(root / "JPEGImages" / f"im{i}.jpg")
        label = Image.fromarray(rng.integers(0, 3, (40, 48), dtype=np.uint8), mode="P")
        label.putpalette(palette)
        label.save(root / "SegmentationClass" / f"im{i}.png")
    (root / "ImageSets/Segmentation/val.txt").write_text("im0\nim1\n")
    return root


def _options(name):
    return {"layers": 2} if "layers" in get_method(name).options else {}


@pytest.mark.parametrize("name", builtin_names())
def test_every_result_file_records_the_method_description(name, model_dir, voc, tmp_path):
    model = gem_jax.load(str(model_dir))
    gem = gem_jax.GEM(model, method=name, size=32, text_cache=False, **_options(name))
    want = get_method(name, **_options(name)).describe()
    assert gem.describe()["method"] == want

    export.write(gem, tmp_path / "prog", batch=1, prompts=2, platforms=["cpu"])
    meta = export.read_meta(tmp_path / "prog")
    assert meta["method"] == want and meta["model"]["random_weights"] is False and meta["feature_surgery"] is False

    images = tmp_path / "imgs"
    images.mkdir()
    Image.fromarray(np.zeros((30, 30, 3), np.uint8)).save(images / "a.png")
    batch.run(gem, batch.expand_inputs([str(images)]), tmp_path / "job", batch.BatchOptions(["cat"], shard=(0, 1)),
              progress=Progress("batch", quiet=True))
    manifest = json.loads((tmp_path / "job" / "manifest.json").read_text())
    assert manifest["spec"]["gem"]["method"] == want

    result = runner.evaluate(gem, datasets.voc(voc), "gem", state_file=tmp_path / "state.npz", progress=False)
    assert result["gem"]["method"] == want and result["method"] == name
    with np.load(tmp_path / "state.npz") as z:
        assert json.loads(str(z["fingerprint"]))["gem"]["method"] == want


def test_the_description_says_what_each_method_has():
    sclip = get_method("sclip").describe()
    assert sclip["layers"] == 1 and sclip["mlp"] is True and "temperature" not in json.dumps(sclip)
    naclip = get_method("naclip", sigma=3.0).describe()
    assert naclip["attention"]["sigma"] == 3.0 and naclip["residual"] is False
    gem = get_method("gem", temperature=0.5, iterations=2).describe()
    assert gem["attention"]["temperature"] == 0.5 and gem["attention"]["iterations"] == 2
    assert get_method("clip").describe() == {"name": "clip", "layers": 0, "posemb": "bicubic_aa"}


def test_feature_surgery_is_recorded(model_dir, tmp_path):
    gem = gem_jax.GEM(gem_jax.load(str(model_dir)), method="naclip", sigma=3.0, feature_surgery=True, size=32,
                      text_cache=False)
    export.write(gem, tmp_path / "prog", batch=1, prompts=2, platforms=["cpu"])
    meta = export.read_meta(tmp_path / "prog")
    assert meta["feature_surgery"] is True and meta["method"]["attention"]["sigma"] == 3.0


def _cli(capsys, *args):
    from gem_jax import cli

    code = cli.main([str(a) for a in args])
    return code, capsys.readouterr().err


@pytest.mark.parametrize("method,flag,value", [("sclip", "--temperature", "0.5"), ("gem", "--sigma", "3"),
                                               ("clip", "--iterations", "5"), ("clearclip", "--gem-layers", "2")])
@pytest.mark.parametrize("command", ["segment", "batch", "export", "eval"])
def test_an_option_the_method_lacks_is_refused_before_the_model_loads(capsys, monkeypatch, tmp_path, method, flag,
                                                                      value, command, model_dir, voc):
    from gem_jax import loading

    monkeypatch.setattr(loading, "open_model", lambda name: pytest.fail("the model was loaded"))
    args = {"segment": ["segment", "--example", "-p", "cat", "--out", tmp_path / "o"],
            "batch": ["batch", tmp_path, "-p", "cat", "--out", tmp_path / "o"],
            "export": ["export", "--out", tmp_path / "o"],
            "eval": ["eval", "--dataset", "voc", "--root", voc]}[command]
    code, err = _cli(capsys, *args, "--model", model_dir, "--method", method, flag, value)
    assert code == 2, err
    assert f"method {method} has no option {flag}" in err and "Traceback" not in err


def test_the_api_refuses_alike(model_dir):
    model = gem_jax.load(str(model_dir))
    with pytest.raises(ValueError, match="method sclip has no option temperature"):
        gem_jax.GEM(model, method="sclip", temperature=0.5)
    with pytest.raises(ValueError, match="method gem has no option sigma"):
        gem_jax.GEM(model, method="gem", sigma=3.0)


def test_the_demo_refuses_alike(model_dir):
    pytest.importorskip("gradio")
    from gem_jax.demo import Demo

    demo = Demo(str(model_dir), text_cache=False)
    try:
        image = np.zeros((32, 32, 3), np.uint8)
        (*_, status, _), = demo.run(image, "cat", "sclip", temperature=0.5, size="32")
        assert "Method sclip has no option temperature" in status and "defaults" in status
        (*_, status, _), = demo.run(image, "cat", "gem", sigma=3.0, size="32")
        assert "Method gem has no option sigma" in status
    finally:
        demo.close()
