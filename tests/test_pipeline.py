"""The user-facing API: shapes, batching buckets, caching, templates, segmentation, bad input."""

from __future__ import annotations

import logging

import jax
import numpy as np
import pytest

from gem_jax import preprocess
from gem_jax.models import init_params
from gem_jax.loading import Model
from gem_jax.pipeline import GEM
from gem_jax.postprocess import labels_from_logits
from gem_jax.text import imagenet_templates
from gem_jax.tokenizer import Tokenizer
from tiny import TINY


@pytest.fixture(scope="module")
def model():
    return Model(TINY, init_params(TINY, seed=1), Tokenizer.default(), "tiny")


def image(h=40, w=56, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def test_uniform_prompts_give_stacked_arrays(model):
    out = GEM(model, layers=2, size=32).heatmaps([image(), image(seed=1)], ["cat", "dog", "car"])
    assert out.logits.shape == out.heatmaps.shape == (2, 3, 32, 32)
    assert out.sizes == [(32, 32), (32, 32)]
    assert np.all(np.abs(out.logits) <= 1 + 1e-5)  # cosines
    hm = out.heatmaps.reshape(6, -1)
    np.testing.assert_allclose(hm.min(1), 0, atol=1e-6)
    np.testing.assert_allclose(hm.max(1), 1, atol=1e-6)


def test_ragged_prompts_equal_separate_calls(model):
    g = GEM(model, layers=2, size=(32, 48))
    sets = [["cat"], ["dog", "car", "tree"]]
    out = g.heatmaps([image(), image(seed=1)], sets)
    assert [x.shape for x in out.logits] == [(1, 32, 48), (3, 32, 48)]
    for i, s in enumerate(sets):
        alone = g.heatmaps(image(seed=i), s)
        np.testing.assert_allclose(out.logits[i], alone.logits[0], atol=1e-6)


def test_batch_padding_does_not_change_results(model):
    g = GEM(model, layers=2, size=32, batch_size=4)
    imgs = [image(seed=s) for s in range(3)]  # padded to a batch of 4
    batched = g.heatmaps(imgs, ["cat", "dog"]).logits
    for i, im in enumerate(imgs):
        np.testing.assert_allclose(batched[i], g.heatmaps(im, ["cat", "dog"]).logits[0], atol=1e-5)


def test_short_side_keeps_aspect_and_snaps(model):
    out = GEM(model, layers=1, short_side=40).heatmaps(image(30, 60), ["cat"])
    assert out.sizes == [(40, 80)]
    out = GEM(model, layers=1, size=(33, 70)).heatmaps(image(), ["cat"])
    assert out.sizes == [(32, 72)]


def test_mixed_sizes_return_lists(model):
    out = GEM(model, layers=1, short_side=32).heatmaps([image(32, 32), image(32, 64)], ["cat"])
    assert [x.shape for x in out.logits] == [(1, 32, 32), (1, 32, 64)]


def test_prompt_counts_share_one_compilation(model, caplog):
    """New prompt counts and image counts inside a bucket do not recompile."""
    g = GEM(model, layers=2, size=32, batch_size=4)
    g.heatmaps(image(), ["warm", "up"])  # compile the shapes of bucket (1 image, 8 prompts)
    caplog.set_level(logging.WARNING)
    with jax.log_compiles(True):
        for prompts in (["a"], ["a", "b", "c"], ["a", "b", "c", "d", "e", "f", "g"]):
            g.heatmaps(image(seed=len(prompts)), prompts)
        g.heatmaps([image(), image(seed=1), image(seed=2)], [["a"], ["b", "c"], ["d", "e", "f"]])
    compiles = [r.getMessage() for r in caplog.records if "Compiling" in r.getMessage()]
    # 1 image x 8 prompts was warm; the 3-image call pads to a batch of 4: one new tower
    # program and one new logits program, nothing for the prompt counts.
    assert len([m for m in compiles if "_token_grid" in m]) == 1, compiles
    assert len([m for m in compiles if "_maps_of_tokens" in m]) == 1, compiles


def test_text_embeddings_cached(model, monkeypatch):
    g = GEM(model, layers=1, size=32, text_cache=False)
    calls = []
    from gem_jax.text import TextEncoder

    encode = TextEncoder.encode
    monkeypatch.setattr(TextEncoder, "encode", lambda self, texts: calls.append(list(texts)) or encode(self, texts))
    first = g.embed_text(["cat", "dog"])
    second = g.embed_text(["dog", "cat", "cat"])
    assert calls == [["a photo of a cat.", "a photo of a dog."]]
    np.testing.assert_array_equal(second[0], first[1])
    np.testing.assert_allclose(np.linalg.norm(first, axis=-1), 1, atol=1e-5)


def test_template_ensemble_is_normalised_mean(model):
    templates = ("a photo of a {}.", "a drawing of a {}.", "itap of a {}.")
    ens = GEM(model, layers=1, size=32, template=templates).embed_text(["cat"])[0]
    singles = np.stack([GEM(model, layers=1, size=32, template=t).embed_text(["cat"])[0] for t in templates])
    mean = singles.mean(0)
    np.testing.assert_allclose(ens, mean / np.linalg.norm(mean), atol=1e-5)
    assert len(imagenet_templates()) == 80 and all("{}" in t for t in imagenet_templates())
    assert GEM(model, layers=1, size=32, template="imagenet").templates == imagenet_templates()


def test_segment_labels_follow_softmax_threshold(model):
    g = GEM(model, layers=2, size=32)
    classes = ["cat", "dog", "car"]
    logits = g.heatmaps(image(), classes).logits[0]
    probs = np.exp(100 * logits) / np.exp(100 * logits).sum(0)
    labels = g.segment(image(), classes, background_threshold=0.6)
    want = np.where(probs.max(0) < 0.6, 0, probs.argmax(0) + 1)
    np.testing.assert_array_equal(labels, want)
    assert labels.shape == (32, 32) and labels.dtype == np.int32
    assert (g.segment(image(), classes, background_threshold=None) > 0).all()
    assert (g.segment(image(), classes, background_threshold=1.0) == 0).all()


def test_labels_from_logits_hand_case():
    logits = np.zeros((2, 1, 3), np.float32)
    logits[0, 0] = [0.10, 0.0, 0.0]
    logits[1, 0] = [0.0, 0.10, 0.001]
    # 100 * 0.1 = 10 nats apart: p ~ 0.99995; 0.1 nat apart: p ~ 0.525 -> background at 0.85
    np.testing.assert_array_equal(labels_from_logits(logits, 0.85), [[1, 2, 0]])
    np.testing.assert_array_equal(labels_from_logits(logits, None), [[1, 2, 2]])


def test_plain_clip_method_differs_from_gem(model):
    a = GEM(model, layers=2, size=32).heatmaps(image(), ["cat"]).logits
    b = GEM(model, method="clip", size=32).heatmaps(image(), ["cat"]).logits
    assert np.abs(a - b).max() > 1e-3


def test_bfloat16_close_to_float32(model):
    a = GEM(model, layers=2, size=32).heatmaps(image(), ["cat", "dog"]).logits
    b = GEM(model, layers=2, size=32, dtype="bfloat16").heatmaps(image(), ["cat", "dog"]).logits
    assert b.dtype == np.float32
    assert np.abs(a - b).max() < 0.05


@pytest.mark.parametrize("kwargs", [dict(method="surgery"), dict(dtype="int8"), dict(layers=4),
                                    dict(layers=0), dict(temperature=-1.0), dict(size=0),
                                    dict(size=32, short_side=32), dict(template="no placeholder"),
                                    dict(template=[]), dict(projections=("x",)), dict(batch_size=0)])
def test_bad_options_raise_value_error(model, kwargs):
    with pytest.raises(ValueError):
        GEM(model, **kwargs)


@pytest.mark.parametrize("prompts", [[], [""], ["  "], [["cat"], ["dog"], ["car"]], [["cat"], []], [1, 2],
                                     ["cat", ["dog"]]])
def test_bad_prompts_raise_value_error(model, prompts):
    with pytest.raises(ValueError):
        GEM(model, layers=1, size=32).heatmaps([image(), image(seed=1)], prompts)


def test_bad_images_raise_image_error(model, tmp_path):
    g = GEM(model, layers=1, size=32)
    with pytest.raises(preprocess.ImageError, match="missing.png"):
        g.heatmaps(tmp_path / "missing.png", ["cat"])
    with pytest.raises(preprocess.ImageError):
        g.heatmaps(np.full((8, 8, 3), 7.5, np.float32), ["cat"])
    with pytest.raises(preprocess.ImageError):
        g.heatmaps(np.zeros((8, 8, 5), np.uint8), ["cat"])
    with pytest.raises(ValueError, match="one image"):
        g.segment([image(), image()], ["cat"])


def test_heatmaps_at_the_original_image_size(model):
    g = GEM(model, layers=2, size=32)
    imgs = [image(40, 56), image(24, 30, seed=1)]
    base = g.heatmaps(imgs, ["cat", "dog"])
    big = g.heatmaps(imgs, ["cat", "dog"], output_size="original")
    assert [x.shape for x in big.logits] == [(2, 40, 56), (2, 24, 30)]  # ragged sizes: a list
    assert big.sizes == base.sizes == [(32, 32), (32, 32)]  # the model input sizes, as before
    for i, (h, w) in enumerate([(40, 56), (24, 30)]):
        # bilinear with half-pixel centres: each output pixel is a convex mix of its input neighbours
        ys, xs = (np.arange(h) + 0.5) * 32 / h - 0.5, (np.arange(w) + 0.5) * 32 / w - 0.5
        y0, x0 = np.clip(np.floor(ys), 0, 31).astype(int), np.clip(np.floor(xs), 0, 31).astype(int)
        ty, tx = np.clip(ys - y0, 0, 1)[:, None], np.clip(xs - x0, 0, 1)[None]
        y1, x1 = np.minimum(y0 + 1, 31), np.minimum(x0 + 1, 31)
        src = np.asarray(base.logits[i], np.float64)
        want = ((1 - ty) * (1 - tx) * src[:, y0][:, :, x0] + (1 - ty) * tx * src[:, y0][:, :, x1]
                + ty * (1 - tx) * src[:, y1][:, :, x0] + ty * tx * src[:, y1][:, :, x1])
        np.testing.assert_allclose(big.logits[i], want, atol=1e-5)
        assert 0 <= big.heatmaps[i].min() and big.heatmaps[i].max() <= 1
    same = g.heatmaps([image(40, 56), image(40, 56, seed=2)], ["cat"], output_size="original")
    assert same.logits.shape == (2, 1, 40, 56)  # one size: stacked
    with pytest.raises(ValueError, match="output_size"):
        g.heatmaps(image(), ["cat"], output_size="native")


def test_grid_logits_upsample_to_the_heatmaps(model):
    from gem_jax.models.layers import resize_matrix

    g = GEM(model, layers=2, size=(32, 48))
    images, prompts = [image(), image(seed=1)], ["cat", "dog", "car"]
    with jax.default_matmul_precision("highest"):
        full = g.heatmaps(images, prompts)
        grid = g.heatmaps(images, prompts, grid=True)
    assert grid.logits.shape == (2, 3, 4, 6) and grid.heatmaps is None and grid.sizes == full.sizes
    up = np.einsum("Hh,bphw,Ww->bpHW", resize_matrix(4, 32, "bilinear").astype(np.float64),
                   grid.logits.astype(np.float64), resize_matrix(6, 48, "bilinear").astype(np.float64))
    np.testing.assert_allclose(up, full.logits, atol=1e-5)
    lo, hi = up.min(axis=(2, 3), keepdims=True), up.max(axis=(2, 3), keepdims=True)
    np.testing.assert_allclose((up - lo) / (hi - lo), full.heatmaps, atol=1e-5)
    ragged = g.heatmaps(images, [["cat"], ["dog", "car"]], grid=True)
    assert [lg.shape for lg in ragged.logits] == [(1, 4, 6), (2, 4, 6)] and ragged.heatmaps is None
    np.testing.assert_allclose(ragged.logits[1], grid.logits[1, 1:], atol=1e-6)
