"""Post-processing of cosine logits shared by every method: PAMR, synonym merging, area filtering.

These are the refinements the official pipelines of the training-free segmenters apply
after the model (SCLIP, ClearCLIP, NACLIP, ...). None of them is ever applied silently:
the evaluation protocols (:mod:`gem_jax.eval.protocols`) switch them on by name.
"""

from __future__ import annotations

import functools
from typing import Sequence

import jax
import jax.numpy as jnp

#: NACLIP's PAMR defaults: 10 iterations over neighbours at dilations 8 and 16.
PAMR_ITERATIONS = 10
PAMR_DILATIONS = (8, 16)

# The 8 neighbours of a pixel in the order of PAMR's shift kernels (row-major over a 3x3
# window, the centre left out); multiplied by the dilation.
_NEIGHBOURS = ((-1, -1), (-1, 0), (-1, 1), (0, -1), (0, 1), (1, -1), (1, 0), (1, 1))


def _shifted(x, dy: int, dx: int, hw):
    """``x[..., clamp(i + dy), clamp(j + dx)]``: the value at offset (dy, dx) with edge
    replication at the borders of the valid (h, w) region (``hw``, possibly traced)."""
    rows = jnp.clip(jnp.arange(x.shape[-2]) + dy, 0, hw[0] - 1)
    cols = jnp.clip(jnp.arange(x.shape[-1]) + dx, 0, hw[1] - 1)
    return jnp.take(jnp.take(x, rows, axis=-2), cols, axis=-1)


def _offsets(dilations: Sequence[int]) -> list[tuple[int, int]]:
    return [(dy * d, dx * d) for d in dilations for dy, dx in _NEIGHBOURS]


@functools.partial(jax.jit, static_argnames=("iterations", "dilations"))
def _pamr(image, mask, hw, *, iterations: int, dilations: tuple[int, ...]):
    image = image.astype(jnp.float32)
    mask = mask.astype(jnp.float32)
    offsets = _offsets(dilations)
    # Local spread of the image: standard deviation (unbiased) over the 3x3 window at every
    # dilation, the centre counted once per dilation.
    window = jnp.stack([_shifted(image, dy, dx, hw) for d in dilations
                        for dy, dx in [(-d, -d), (-d, 0), (-d, d), (0, -d), (0, 0), (0, d), (d, -d), (d, 0), (d, d)]],
                       axis=-3)  # (..., K, 9 * len(dilations), H, W)
    std = jnp.std(window, axis=-3, ddof=1)  # (..., K, H, W)
    diff = jnp.stack([jnp.abs(image - _shifted(image, dy, dx, hw)) for dy, dx in offsets], axis=-3)
    affinity = -diff / (1e-8 + 0.1 * std[..., None, :, :])
    weights = jax.nn.softmax(jnp.mean(affinity, axis=-4), axis=-3)  # (..., P, H, W): over neighbours

    def step(_, m):
        out = jnp.zeros_like(m)
        for p, (dy, dx) in enumerate(offsets):
            out = out + _shifted(m, dy, dx, hw) * weights[..., p:p + 1, :, :]
        return out

    return jax.lax.fori_loop(0, iterations, step, mask)


def pamr(image, mask, *, iterations: int = PAMR_ITERATIONS, dilations: Sequence[int] = PAMR_DILATIONS,
         valid_hw=None):
    """Pixel-adaptive mask refinement (PAMR, Araslanov & Roth 2020), as NACLIP and SCLIP run it.

    Each step replaces every pixel of ``mask`` by a weighted mean of its 8 neighbours at each
    dilation (edges replicated); the weights are a softmax over the neighbours of the
    image's negative absolute differences to the centre, each divided by 0.1 times the local
    standard deviation and averaged over image channels. The weights depend only on the
    image; the steps are repeated ``iterations`` times.

    Args:
      image: (..., K, H, W) guidance image (channels first), e.g. the normalised input.
      mask: (..., C, H, W) maps to refine (NACLIP refines the cosine logits of every prompt),
        at the image's size; leading dimensions broadcast with the image's.
      iterations: refinement steps (NACLIP 10; 0 returns ``mask`` unchanged).
      dilations: neighbour distances in pixels (NACLIP (8, 16)).
      valid_hw: (h, w), for arrays padded beyond their true size: borders are replicated
        at row h - 1 and column w - 1 (values past them are left meaningless). Default the
        full size.
    Returns:
      float32 refined maps, the shape of ``mask``. Jitted (one compilation per shape).
    """
    image, mask = jnp.asarray(image), jnp.asarray(mask)
    if image.ndim < 3 or mask.ndim < 3:
        raise ValueError(f"image and mask must be (..., K, H, W) and (..., C, H, W), got {image.shape} and "
                         f"{mask.shape}")
    if image.shape[-2:] != mask.shape[-2:]:
        raise ValueError(f"image {image.shape[-2:]} and mask {mask.shape[-2:]} must share (H, W)")
    if not isinstance(iterations, int) or iterations < 0:
        raise ValueError(f"iterations must be a non-negative int, got {iterations!r}")
    dilations = tuple(int(d) for d in dilations)
    if not dilations or min(dilations) < 1:
        raise ValueError(f"dilations must be positive ints, got {dilations!r}")
    if iterations == 0:
        return mask.astype(jnp.float32)
    hw = jnp.asarray(mask.shape[-2:] if valid_hw is None else valid_hw, jnp.int32)
    return _pamr(image, mask, hw, iterations=iterations, dilations=dilations)


def merge_synonyms(probs, query_class, num_classes: int):
    """Class probabilities from per-prompt probabilities: the max over each class's prompts.

    Args:
      probs: (P, ...) probabilities of the P prompts (after the softmax over all prompts).
      query_class: (P,) int class of each prompt.
      num_classes: number of classes; a class with no prompt gets probability 0.
    Returns:
      (num_classes, ...) array.
    """
    merged = jax.ops.segment_max(probs, jnp.asarray(query_class), num_segments=num_classes)
    return jnp.maximum(merged, 0.0)  # segment_max gives -inf to empty classes


def suppress_small_areas(probs, area_threshold: float, background: int, valid=None):
    """SCLIP's area threshold: classes that win at most ``area_threshold`` of the image's
    non-background pixels get probability 0 (the background class is never suppressed).

    Args:
      probs: (C, H, W) class probabilities.
      area_threshold: fraction in [0, 1].
      background: index of the background class.
      valid: optional (H, W) bool mask of the pixels that count (padding left out).
    Returns:
      (C, H, W) probabilities with the small classes zeroed.
    """
    num_classes = probs.shape[0]
    top = jnp.argmax(probs, axis=0)
    if valid is not None:
        top = jnp.where(valid, top, num_classes)
    area = jnp.bincount(top.reshape(-1), length=num_classes + 1)[:num_classes].at[background].set(0)
    keep = (area > area_threshold * area.sum()).at[background].set(True)
    return probs * keep[:, None, None]
