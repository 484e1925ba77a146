"""The evaluation runner and command end to end on synthetic datasets and a tiny random CLIP."""

from __future__ import annotations

import argparse
import dataclasses
import json

import numpy as np
import pytest
from PIL import Image

from gem_jax import preprocess
from gem_jax.cli import eval as command
from gem_jax.eval import runner
from gem_jax.eval import datasets as D
from gem_jax.eval.protocols import GEM_PROTOCOL, PROTOCOLS, SCLIP_PROTOCOL
from gem_jax.models import init_params
from gem_jax.loading import Model
from gem_jax.pipeline import GEM
from gem_jax.postprocess import labels_from_logits
from gem_jax.eval.sliding import sliding_logits, window_boxes
from gem_jax.tokenizer import Tokenizer
from gem_jax.cli import main as cli_main
from tiny import TINY
from test_eval_datasets import VOC_SPECS, make_context, make_openimages, make_voc

# The protocols at sizes a CPU test affords (the tiny model has 8-pixel patches).
SMALL_GEM = dataclasses.replace(GEM_PROTOCOL, short_side=32)
SMALL_SCLIP = dataclasses.replace(SCLIP_PROTOCOL, short_side=40, crop=32, stride=16, template="a photo of a {}.")


@pytest.fixture(scope="module")
def model():
    return Model(TINY, init_params(TINY, seed=1), Tokenizer.default(), "tiny")


@pytest.fixture(scope="module")
def gem(model):
    # One GEM for the module: its jitted callables (and their compilations) are shared.
    return GEM(model, layers=2, batch_size=1)


def np_bilinear(x, out_hw):
    """(..., h, w) -> (..., H, W): half-pixel centres, no antialias, edges clamped (torch's
    ``interpolate(mode="bilinear", align_corners=False)``), written out in NumPy."""
    x = np.asarray(x, np.float64)

    def axis_weights(n_in, n_out):
        src = np.maximum((np.arange(n_out) + 0.5) * n_in / n_out - 0.5, 0)
        lo = np.minimum(np.floor(src).astype(int), n_in - 1)
        return lo, np.minimum(lo + 1, n_in - 1), src - lo

    lo, hi, t = axis_weights(x.shape[-2], out_hw[0])
    x = x[..., lo, :] * (1 - t)[:, None] + x[..., hi, :] * t[:, None]
    lo, hi, t = axis_weights(x.shape[-1], out_hw[1])
    return x[..., lo] * (1 - t) + x[..., hi] * t


def confusion_np(pairs, num_classes):
    conf = np.zeros((num_classes, num_classes), np.int64)
    for pred, label in pairs:
        m = label != 255
        np.add.at(conf, (label[m], pred[m]), 1)
    return conf


def miou_np(conf):
    tp = np.diag(conf).astype(float)
    with np.errstate(invalid="ignore", divide="ignore"):
        iou = tp / (conf.sum(0) + conf.sum(1) - tp)
    return iou, np.nanmean(iou), tp.sum() / conf.sum()


def read_png(path):
    with Image.open(path) as im:
        assert im.mode == "P"
        return np.asarray(im).astype(np.int64)


def check_json_against_predictions(result, ds, pred_dir):
    """The saved label maps, scored by NumPy against the annotations, give the JSON's numbers."""
    pairs = []
    for s in ds.samples[:result["num_images"]]:
        if s.id in {x["id"] for x in result["skipped"]}:
            assert not runner.prediction_path(pred_dir, s.id).exists()
            continue
        label = ds.load_label(s)
        pred = read_png(runner.prediction_path(pred_dir, s.id))
        assert pred.shape == label.shape
        pairs.append((pred, label))
    conf = confusion_np(pairs, ds.num_classes)
    iou, miou, aacc = miou_np(conf)
    assert result["mIoU"] == pytest.approx(100 * miou, abs=1e-6)
    assert result["aAcc"] == pytest.approx(100 * aacc, abs=1e-6)
    for name, v in zip(ds.classes, iou):
        got = result["per_class_iou"][name]
        assert (got is None) if np.isnan(v) else got == pytest.approx(100 * v, abs=1e-6)
    assert result["pixels"] == conf.sum()
    return pairs


# ---- semantic segmentation ---------------------------------------------------------


def test_voc_gem_protocol_end_to_end(tmp_path, gem):
    make_voc(tmp_path / "voc")
    ds = D.voc(tmp_path / "voc")
    result = runner.evaluate(gem, ds, SMALL_GEM, save_predictions=tmp_path / "pred", progress=False)
    json.dumps(result)
    assert result["num_images"] == result["evaluated"] == 3 and result["complete"]
    assert result["num_skipped"] == 0 and result["skipped"] == []
    assert result["metric"] == "mIoU" and result["protocol"] == "gem"
    assert result["prompts"]["tvmonitor"] == ["tv monitor"] and "background" not in result["prompts"]
    pairs = check_json_against_predictions(result, ds, tmp_path / "pred")

    # The predictions themselves, recomputed independently: GEM's logits at the model size,
    # bilinear to the annotation size, softmax of 100 * cos in float64, background below 0.85.
    names = [p[0] for p in ds.prompts[1:]]
    agree = total = 0
    seen = set()
    for s, (pred, label) in zip(ds.samples, pairs):
        logits = gem.heatmaps(preprocess.load_image(s.image), names, short_side=32).logits[0]
        want = labels_from_logits(np_bilinear(logits, label.shape), 0.85)
        agree += (want == pred).sum()
        total += pred.size
        seen |= set(np.unique(pred).tolist())
    assert agree / total > 0.995  # float32 vs float64 near the threshold
    assert 0 in seen and len(seen) > 2  # both background and classes predicted


def test_runner_postprocessing_matches_pipeline_labels_and_synonyms():
    rng = np.random.default_rng(0)
    logits = rng.normal(0, 0.02, (3, 8, 8)).astype(np.float32)
    proto = dataclasses.replace(SMALL_GEM, background_threshold=0.6)
    got = runner.labels_at(logits, (8, 8), np.array([1, 2, 3]), 4, 0, proto)
    np.testing.assert_array_equal(got, labels_from_logits(logits, 0.6))
    # Synonyms: prompts 0 and 1 both vote for class 1 by max; class 2 has prompt 2.
    x = np.zeros((3, 1, 3), np.float32)
    x[:, 0, 0] = [0.05, 0.04, 0.0]  # p = (.66, .24, .09): class 1 by max .66
    x[:, 0, 1] = [0.0, 0.0, 0.02]   # p = (.10, .10, .79): class 2
    x[:, 0, 2] = [0.0, 0.0, 0.0]    # p = 1/3 each: below 0.5 -> background 0
    proto = dataclasses.replace(SMALL_GEM, background_threshold=0.5)
    np.testing.assert_array_equal(runner.labels_at(x, (1, 3), np.array([1, 1, 2]), 3, 0, proto), [[1, 2, 0]])
    # SCLIP's area threshold: a class on under 30% of the non-background pixels is dropped.
    x = np.zeros((3, 1, 10), np.float32)
    x[0, 0, :] = 0.1   # background prompt wins everywhere ...
    x[1, 0, 2:8] = 0.2  # ... except class 1 on 6 pixels
    x[2, 0, 8:] = 0.2   # and class 2 on 2 pixels (25% of the 8 non-background pixels)
    proto = dataclasses.replace(SMALL_GEM, background_threshold=None, area_threshold=0.3)
    got = runner.labels_at(x, (1, 10), np.array([0, 1, 2]), 3, 0, proto)
    np.testing.assert_array_equal(got, [[0, 0, 1, 1, 1, 1, 1, 1, 0, 0]])


def test_sclip_protocol_sliding_with_background_prompts(tmp_path, gem):
    make_context(tmp_path / "ctx")
    ds = D.context60(tmp_path / "ctx")
    result = runner.evaluate(gem, ds, SMALL_SCLIP, save_predictions=tmp_path / "pred", progress=False)
    assert result["evaluated"] == 2 and result["protocol_settings"]["crop"] == 32
    assert result["protocol_settings"]["logit_scale"] == 50.0  # the context60 override
    assert result["prompts"]["background"] == ["background"]
    # SCLIP's own Context-60 names (configs/cls_context60.txt): plain "person", no synonyms.
    assert result["prompts"]["person"] == ["person"] and result["protocol_settings"]["class_names"] == "sclip"
    check_json_against_predictions(result, ds, tmp_path / "pred")


def test_sliding_logits_average_the_crops(gem):
    assert window_boxes(40, 56, 32, 16) == [(0, 32, 0, 32), (0, 32, 16, 48), (0, 32, 24, 56),
                                            (8, 40, 0, 32), (8, 40, 16, 48), (8, 40, 24, 56)]
    assert window_boxes(20, 20, 32, 16) == [(0, 20, 0, 20)]
    img = np.random.default_rng(0).integers(0, 256, (40, 56, 3), dtype=np.uint8)
    prompts = ["cat", "dog"]
    got = sliding_logits(gem, img, prompts, crop=32, stride=16, short_side=40)
    assert got.shape == (2, 40, 56) and got.dtype == np.float32
    total = np.zeros((2, 40, 56))
    count = np.zeros((40, 56))
    for y1, y2, x1, x2 in window_boxes(40, 56, 32, 16):
        total[:, y1:y2, x1:x2] += gem.heatmaps(img[y1:y2, x1:x2], prompts, size=(32, 32)).logits[0]
        count[y1:y2, x1:x2] += 1
    np.testing.assert_allclose(got, total / count, atol=1e-5)
    # A crop larger than the resized image: one window, clipped, whose side is not a patch multiple.
    one = sliding_logits(gem, img, prompts, crop=64, stride=32, short_side=32)
    resized = preprocess.resize(img, (32, 45))
    whole = gem.heatmaps(resized, prompts, size=(32, 48)).logits[0]
    assert one.shape == (2, 32, 45)
    np.testing.assert_allclose(one, np_bilinear(whole, (32, 45)), atol=1e-5)
    with pytest.raises(ValueError, match="stride"):
        sliding_logits(gem, img, prompts, crop=16, stride=32)


# ---- points ------------------------------------------------------------------------


def test_openimages_p_miou_end_to_end(tmp_path, gem):
    make_openimages(tmp_path)
    ds = D.openimages(tmp_path)
    result = runner.evaluate(gem, ds, SMALL_GEM, progress=False)
    assert result["metric"] == "p-mIoU" and result["evaluated"] == 2
    counts = {c: [0, 0, 0] for c in ds.classes}
    for s in ds:
        present = np.unique(s.points.classes)
        heat = gem.heatmaps(preprocess.load_image(s.image), [ds.prompts[c][0] for c in present],
                            short_side=32).heatmaps[0]
        h, w = heat.shape[1:]
        for c, x, y, pos in zip(s.points.classes, s.points.x, s.points.y, s.points.positive):
            k = int(np.where(present == c)[0][0])
            on = heat[k, min(int(y * h), h - 1), min(int(x * w), w - 1)] >= 0.5
            if pos or on:
                counts[ds.classes[c]][0 if (pos and on) else 1 if on else 2] += 1
    ious = {c: tp / (tp + fp + fn) for c, (tp, fp, fn) in counts.items() if tp + fp + fn}
    assert result["p-mIoU"] == pytest.approx(100 * np.mean(list(ious.values())), abs=1e-6)
    for c, v in ious.items():
        assert result["per_class_iou"][c] == pytest.approx(100 * v, abs=1e-6)
    assert result["display_names"]["/m/01g317"] == "Person"
    with pytest.raises(ValueError, match="point labels"):
        runner.evaluate(gem, ds, SMALL_GEM, save_predictions=tmp_path / "p", progress=False)


# ---- bad input mid-run -------------------------------------------------------------


def test_image_that_fails_to_decode_mid_run(tmp_path, gem):
    make_voc(tmp_path / "voc")
    ds = D.voc(tmp_path / "voc")
    bad = ds.samples[1]
    bad.image.write_bytes(b"\xff\xd8\xff\xe0 truncated jpeg")
    with pytest.raises(runner.EvaluationError, match="2007_000039"):
        runner.evaluate(gem, ds, SMALL_GEM, on_error="fail", progress=False)
    result = runner.evaluate(gem, ds, SMALL_GEM, on_error="skip", save_predictions=tmp_path / "pred",
                             progress=False)
    assert result["num_images"] == 3 and result["evaluated"] == 2 and result["num_skipped"] == 1
    assert not result["complete"]
    assert result["skipped"][0]["id"] == bad.id and "ImageError" in result["skipped"][0]["reason"]
    check_json_against_predictions(result, ds, tmp_path / "pred")
    # The same numbers as a dataset without the bad image.
    without = dataclasses.replace(ds, samples=(ds.samples[0], ds.samples[2]))
    clean = runner.evaluate(gem, without, SMALL_GEM, progress=False)
    assert clean["mIoU"] == pytest.approx(result["mIoU"], abs=1e-9)
    assert clean["per_class_iou"] == result["per_class_iou"]


def test_annotation_of_wrong_size_mid_run_is_reported(tmp_path, gem):
    make_voc(tmp_path / "voc")
    ds = D.voc(tmp_path / "voc")
    s = ds.samples[2]
    im = Image.fromarray(np.zeros((40, 50), np.uint8), mode="P")
    im.putpalette(D.voc_palette().reshape(-1).tolist())
    im.save(s.label)
    with pytest.raises(runner.EvaluationError, match="50x40"):
        runner.evaluate(gem, ds, SMALL_GEM, progress=False)
    result = runner.evaluate(gem, ds, SMALL_GEM, on_error="skip", progress=False)
    assert [x["id"] for x in result["skipped"]] == [s.id] and "DatasetError" in result["skipped"][0]["reason"]
    assert result["evaluated"] == 2


# ---- resume ------------------------------------------------------------------------


def test_resume_after_interrupt_equals_uninterrupted_run(tmp_path, gem, monkeypatch):
    make_voc(tmp_path / "voc")
    ds = D.voc(tmp_path / "voc")
    full = runner.evaluate(gem, ds, SMALL_GEM, progress=False)

    state = tmp_path / "state.npz"
    calls = []
    real = runner._Run.score_labels

    def interrupted(self, sample, label, logits, image=None):
        calls.append(sample.id)
        if len(calls) == 2:
            raise KeyboardInterrupt  # as if the user pressed Ctrl-C on the second image
        real(self, sample, label, logits, image)

    monkeypatch.setattr(runner._Run, "score_labels", interrupted)
    with pytest.raises(KeyboardInterrupt):
        runner.evaluate(gem, ds, SMALL_GEM, state_file=state, progress=False)  # saved when stopping
    with np.load(state) as z:
        assert list(z["done"]) == [VOC_SPECS[0][0]]

    calls.clear()
    monkeypatch.setattr(runner._Run, "score_labels", lambda self, *a: (calls.append(a[0].id), real(self, *a)))
    resumed = runner.evaluate(gem, ds, SMALL_GEM, state_file=state, progress=False)
    assert calls == [VOC_SPECS[1][0], VOC_SPECS[2][0]]  # only the images not done
    for key in ("mIoU", "aAcc", "mAcc", "per_class_iou", "pixels", "evaluated", "num_images", "complete"):
        assert resumed[key] == full[key], key
    # Periodic saves (for a run that is killed outright): the file lists the images done so far.
    periodic = tmp_path / "periodic.npz"
    seen = []

    def peek(self, sample, label, logits, image=None):
        if periodic.exists():
            with np.load(periodic) as z:
                seen.append(list(z["done"]))
        real(self, sample, label, logits, image)

    monkeypatch.setattr(runner._Run, "score_labels", peek)
    runner.evaluate(gem, ds, SMALL_GEM, state_file=periodic, save_every=1, progress=False)
    assert seen == [[VOC_SPECS[0][0]], [VOC_SPECS[0][0], VOC_SPECS[1][0]]]
    monkeypatch.setattr(runner._Run, "score_labels", lambda self, *a: (calls.append(a[0].id), real(self, *a)))
    # A finished state: a rerun does nothing and reports the same.
    calls.clear()
    again = runner.evaluate(gem, ds, SMALL_GEM, state_file=state, progress=False)
    assert calls == [] and again["mIoU"] == full["mIoU"]
    # A state file of another evaluation is refused.
    with pytest.raises(runner.EvaluationError, match="another evaluation.*protocol"):
        runner.evaluate(gem, ds, dataclasses.replace(SMALL_GEM, background_threshold=0.5), state_file=state,
                        progress=False)


# ---- the command -------------------------------------------------------------------


def parse(argv):
    parser = argparse.ArgumentParser(prog="gem-jax")
    sub = parser.add_subparsers(dest="command")
    command.add_parser(sub)
    return parser.parse_args(argv)


def test_command_end_to_end_and_exit_codes(tmp_path, model, monkeypatch, capsys):
    from gem_jax import loading

    make_voc(tmp_path / "voc")
    monkeypatch.setattr(loading, "load", lambda name=None, **kw: model)
    monkeypatch.setitem(PROTOCOLS, "gem", SMALL_GEM)
    out = tmp_path / "res" / "voc.json"
    base = ["eval", "--dataset", "voc", "--root", str(tmp_path / "voc"), "--gem-layers", "2", "--no-progress"]
    assert cli_main(base + ["--limit", "1", "--out", str(out), "--batch-size", "1"]) == 0
    result = json.loads(out.read_text())
    assert result["num_images"] == 1 and result["evaluated"] == 1 and result["model"] == "tiny"
    assert result["gem"]["method"]["layers"] == 2
    assert (tmp_path / "res" / "voc.json.state.npz").exists()
    assert "voc mIoU" in capsys.readouterr().err

    # Runtime errors: exit 1 with one line.
    assert cli_main(["eval", "--dataset", "ade20k", "--root", str(tmp_path / "nowhere")]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("gem-jax eval: error:") and "nowhere" in err and "\n" not in err
    first = D.voc(tmp_path / "voc").samples[0]
    first.image.write_bytes(b"garbage")
    assert cli_main(base + ["--on-error", "fail", "--restart", "--out", str(out), "--force"]) == 1
    err = capsys.readouterr().err.strip()
    assert first.id in err and "\n" not in err
    assert cli_main(base + ["--on-error", "skip", "--limit", "1", "--restart", "--out", str(out),
                                     "--force"]) == 3  # done, with images skipped: exit status 3
    assert json.loads(out.read_text())["skipped"][0]["id"] == first.id

    # Usage errors: exit 2.
    make_openimages(tmp_path / "oi")
    assert cli_main(["eval", "--dataset", "openimages", "--root", str(tmp_path / "oi"),
                              "--save-predictions", str(tmp_path / "p")]) == 2
    assert cli_main(base + ["--gem-layers", "9"]) == 2
    for bad in (["--limit", "0"], ["--protocol", "mine"], ["--projections", "qx"], ["--dataset", "pascal"]):
        with pytest.raises(SystemExit) as e:
            parse(base + bad)
        assert e.value.code == 2
