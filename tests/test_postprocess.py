"""PAMR against a PyTorch port of the official code; synonym merging; SCLIP's area threshold."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gem_jax import postprocess

torch = pytest.importorskip("torch")
F = torch.nn.functional


# ---------------------------------------------------------------- PyTorch port of the official PAMR
# Ported for this test from pamr.py of sinahmr/NACLIP (identical in wangf3014/SCLIP up to
# formatting; originally visinf/1-stage-wseg): shift kernels applied by a dilated conv2d on a
# replicate-padded input, one kernel bank per dilation.

def _kernels(kind: str) -> "torch.Tensor":
    positions = [(0, 0), (0, 1), (0, 2), (1, 0), (1, 2), (2, 0), (2, 1), (2, 2)]
    if kind == "std":  # all 9 positions, centre included
        w = torch.zeros(9, 1, 3, 3)
        for i in range(9):
            w[i, 0, i // 3, i % 3] = 1
        return w
    w = torch.zeros(8, 1, 3, 3)
    for i, (r, c) in enumerate(positions):
        if kind == "affinity":  # centre minus neighbour
            w[i, 0, 1, 1] = 1
            w[i, 0, r, c] = -1
        else:  # "copy": the neighbour
            w[i, 0, r, c] = 1
    return w


def _local(x, kernel, dilations):
    b, k, h, w = x.shape
    x = x.reshape(b * k, 1, h, w)
    out = [F.conv2d(F.pad(x, [d] * 4, mode="replicate"), kernel, dilation=d) for d in dilations]
    return torch.cat(out, 1).reshape(b, k, -1, h, w)


def torch_pamr(image, mask, iterations, dilations):
    mask = F.interpolate(mask, size=image.shape[-2:], mode="bilinear", align_corners=True)
    std = _local(image, _kernels("std"), dilations).std(2, keepdim=True)
    aff = -torch.abs(_local(image, _kernels("affinity"), dilations)) / (1e-8 + 0.1 * std)
    aff = F.softmax(aff.mean(1, keepdim=True), 2)
    copy = _kernels("copy")
    for _ in range(iterations):
        mask = (_local(mask, copy, dilations) * aff).sum(2)
    return mask


@pytest.mark.parametrize("shape,iterations,dilations", [
    ((2, 3, 37, 45), 10, (8, 16)),   # NACLIP's default; dilations reach past the borders
    ((1, 3, 20, 23), 3, (1, 2, 4)),
    ((1, 1, 9, 12), 1, (1,)),
])
def test_pamr_matches_official_code(shape, iterations, dilations):
    rng = np.random.default_rng(sum(shape) + iterations)
    b, k, h, w = shape
    image = rng.normal(size=shape).astype(np.float32)
    mask = rng.normal(size=(b, 5, h, w)).astype(np.float32) * 0.3
    want = torch_pamr(torch.from_numpy(image), torch.from_numpy(mask), iterations, list(dilations)).numpy()
    got = np.asarray(postprocess.pamr(image, mask, iterations=iterations, dilations=dilations))
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)
    # It did something: the refined maps differ from the input.
    assert np.abs(got - mask).max() > 1e-2


def test_pamr_on_padded_arrays_equals_unpadded():
    rng = np.random.default_rng(0)
    image = rng.normal(size=(3, 21, 30)).astype(np.float32)
    mask = rng.normal(size=(4, 21, 30)).astype(np.float32)
    want = np.asarray(postprocess.pamr(image, mask))
    pad = lambda a: np.pad(a, ((0, 0), (0, 11), (0, 2)), constant_values=7.0)
    got = np.asarray(postprocess.pamr(pad(image), pad(mask), valid_hw=(21, 30)))[:, :21, :30]
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)


def test_pamr_rejects_bad_input():
    x = np.zeros((3, 8, 8), np.float32)
    with pytest.raises(ValueError, match="share"):
        postprocess.pamr(x, np.zeros((2, 8, 9), np.float32))
    with pytest.raises(ValueError, match="dilations"):
        postprocess.pamr(x, x, dilations=(0,))
    np.testing.assert_array_equal(np.asarray(postprocess.pamr(x + 1, x + 2, iterations=0)), x + 2)


# ---------------------------------------------------------------- synonyms and area threshold

def test_merge_synonyms_takes_the_max_after_the_softmax():
    rng = np.random.default_rng(1)
    logits = rng.normal(size=(6, 4, 5)).astype(np.float32)
    query_class = np.array([0, 0, 1, 2, 2, 2])
    probs = jax.nn.softmax(40.0 * jnp.asarray(logits), axis=0)
    got = np.asarray(postprocess.merge_synonyms(probs, query_class, 4))
    p = np.asarray(probs)
    np.testing.assert_allclose(got[0], np.maximum(p[0], p[1]))
    np.testing.assert_allclose(got[1], p[2])
    np.testing.assert_allclose(got[2], p[3:].max(axis=0))
    np.testing.assert_array_equal(got[3], 0.0)  # no prompt for class 3


def test_area_threshold_drops_small_classes_only():
    # Classes: 0 background, 1 on 12 pixels, 2 on 3 pixels, 3 on 1 pixel; 4x5 image.
    top = np.zeros((4, 5), int)
    top[:3, :4] = 1
    top[3, :3] = 2
    top[3, 3] = 3
    probs = np.eye(4, dtype=np.float32)[top].transpose(2, 0, 1) * 0.6 + 0.1
    out = np.asarray(postprocess.suppress_small_areas(jnp.asarray(probs), 0.1, 0))
    # 16 non-background pixels: class 2 (3/16 > 0.1) stays, class 3 (1/16) is dropped.
    np.testing.assert_array_equal(out[3], 0.0)
    np.testing.assert_array_equal(out[:3], probs[:3])
    # The background is never dropped, even when small.
    out = np.asarray(postprocess.suppress_small_areas(jnp.asarray(probs), 0.9, 0))
    np.testing.assert_array_equal(out[0], probs[0])
    assert (out[1:] == 0).all()
    # Pixels outside the valid region do not count: only class 3's pixel is left valid.
    valid = top == 3
    out = np.asarray(postprocess.suppress_small_areas(jnp.asarray(probs), 0.5, 0, valid=jnp.asarray(valid)))
    np.testing.assert_array_equal(out[3], probs[3])
    assert (out[1:3] == 0).all()
