"""From cosine logits to decisions, shared by every command: the one label rule, PAMR,
synonym merging, area filtering, and resizing of maps.

The label rule (:func:`label_rule`) is what segment, batch, eval, the demo and the
calibration tool all apply: class probabilities are the softmax over prompts of
``logit_scale * cosine`` (CLIP's logit scale 100 by default), a class's probability is the
max over its prompts (synonyms), optionally classes winning at most a fraction of the
pixels are dropped (SCLIP's area threshold), and pixels whose top probability is below the
background threshold are background. The refinements the official pipelines of GEM's
siblings apply (PAMR, synonyms, areas) are never applied silently: the evaluation
protocols (:mod:`gem_jax.eval.protocols`) and the options of ``segment`` switch them on.
"""

from __future__ import annotations

import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from gem_jax.models.layers import resize_matrix

#: CLIP's logit scale: class probabilities are ``softmax(LOGIT_SCALE * cosine)``.
LOGIT_SCALE = 100.0
#: GEM's (and the paper's VOC protocol's) background threshold.
BACKGROUND_THRESHOLD = 0.85

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


def class_probabilities(logits, *, logit_scale: float = LOGIT_SCALE, query_class=None, num_classes=None):
    """(..., P, H, W) cosine logits -> (..., C, H, W) class probabilities: the softmax over
    prompts of ``logit_scale * logits`` (float32), then, with ``query_class`` (the class of
    each prompt), the max over each class's prompts (``num_classes`` classes; default the
    largest class + 1; a class without prompts gets 0)."""
    probs = jax.nn.softmax(logit_scale * jnp.asarray(logits, jnp.float32), axis=-3)
    if query_class is None:
        return probs
    query_class = jnp.asarray(query_class)
    if num_classes is None:
        num_classes = int(np.max(np.asarray(query_class))) + 1
    moved = jnp.moveaxis(probs, -3, 0)
    merged = jnp.moveaxis(merge_synonyms(moved, query_class, num_classes), 0, -3)
    return merged


def decide(probs, background_threshold: float | None, *, area_threshold: float | None = None,
           background: int | None = None, valid=None):
    """(C, H, W) class probabilities -> (H, W) int32 labels.

    Without ``background``: 0 is background, ``k + 1`` class k (:meth:`GEM.segment`'s
    convention). With ``background`` (the index of the background class among the C, an
    evaluation's convention): labels are class indices and the background class is never
    dropped by the area threshold. ``valid`` (H, W) marks the pixels that count for areas.
    """
    if area_threshold is not None:
        if background is None:
            num = probs.shape[0]
            top = jnp.argmax(probs, axis=0)
            if valid is not None:
                top = jnp.where(valid, top, num)
            area = jnp.bincount(top.reshape(-1), length=num + 1)[:num]
            probs = probs * (area > area_threshold * area.sum())[:, None, None]
        else:
            probs = suppress_small_areas(probs, area_threshold, background, valid)
    top = jnp.argmax(probs, axis=0).astype(jnp.int32)
    if background is None:
        top = top + 1
    if background_threshold is None:
        return top
    fill = 0 if background is None else background
    below = jnp.max(probs, axis=0) < background_threshold
    if probs.shape[0] > 1:
        # Softmax probabilities of several prompts are below 1 in exact arithmetic, but float32
        # rounds a dominant one to 1.0: a threshold of 1 still makes every pixel background.
        below = below | (background_threshold >= 1.0)
    return jnp.where(below, fill, top)


@functools.partial(jax.jit, static_argnames=("logit_scale", "num_classes", "area_threshold", "background"))
def _label_rule(logits, threshold, query_class, *, logit_scale, num_classes, area_threshold, background):
    probs = class_probabilities(logits, logit_scale=logit_scale, query_class=query_class, num_classes=num_classes)
    decide_one = functools.partial(decide, area_threshold=area_threshold, background=background)
    flat = probs.reshape(-1, *probs.shape[-3:])
    labels = jax.vmap(lambda p: decide_one(p, threshold))(flat)
    return labels.reshape(*probs.shape[:-3], *probs.shape[-2:])


def label_rule(logits, background_threshold: float | None = BACKGROUND_THRESHOLD, *,
               logit_scale: float = LOGIT_SCALE, query_class=None, num_classes: int | None = None,
               area_threshold: float | None = None, background: int | None = None):
    """The label rule (see the module doc): (..., P, H, W) cosine logits -> (..., H, W) int32
    labels, on the device (jitted; leading dimensions are images).

    Args:
      logits: cosine similarities, prompts on axis -3.
      background_threshold: pixels whose top class probability is below it are background
        (``None``: never).
      logit_scale: multiplies the cosines before the softmax over prompts.
      query_class: (P,) the class of each prompt (synonyms); default one class per prompt.
      num_classes: classes with ``query_class`` (default the largest + 1).
      area_threshold: drop classes winning at most this fraction of the pixels (``None``: off).
      background: see :func:`decide` (default: 0 is background, ``k + 1`` class k).
    """
    if not logit_scale > 0:
        raise ValueError(f"logit_scale must be positive, got {logit_scale!r}")
    if background_threshold is not None and not 0.0 <= background_threshold <= 1.0:
        raise ValueError(f"background_threshold must be in [0, 1], got {background_threshold!r}")
    if area_threshold is not None and not 0.0 <= area_threshold <= 1.0:
        raise ValueError(f"area_threshold must be in [0, 1], got {area_threshold!r}")
    if query_class is not None:
        query_class = np.asarray(query_class, np.int32)
        num_classes = int(query_class.max()) + 1 if num_classes is None else num_classes
    threshold = jnp.float32(-1.0 if background_threshold is None else background_threshold)
    return _label_rule(logits, threshold, query_class, logit_scale=float(logit_scale), num_classes=num_classes,
                       area_threshold=area_threshold, background=background)


def labels_from_logits(logits, background_threshold: float | None = BACKGROUND_THRESHOLD, *,
                       logit_scale: float = LOGIT_SCALE, area_threshold: float | None = None,
                       query_class=None) -> np.ndarray:
    """:func:`label_rule` on host arrays: (P, H, W) cosine logits -> (H, W) int32 NumPy labels,
    0 background, ``k + 1`` class k."""
    return np.asarray(label_rule(np.asarray(logits, np.float32), background_threshold, logit_scale=logit_scale,
                                 query_class=query_class, area_threshold=area_threshold))


def label_map(image: np.ndarray, logits: np.ndarray, background_threshold: float | None = BACKGROUND_THRESHOLD, *,
              logit_scale: float = LOGIT_SCALE, area_threshold: float | None = None, pamr_iterations: int = 0,
              pamr_dilations: Sequence[int] = PAMR_DILATIONS, query_class=None) -> np.ndarray:
    """The label map of :meth:`GEM.segment` from logits already computed: ``image`` the
    decoded image (H0, W0, 3), ``logits`` (P, H, W) at the model input size; PAMR (if
    asked) is guided by the image resized to (H, W), then :func:`labels_from_logits`."""
    if pamr_iterations:
        from gem_jax import preprocess

        guide = preprocess.normalize(preprocess.resize(image, logits.shape[-2:])).transpose(2, 0, 1)
        logits = np.asarray(pamr(guide, logits, iterations=pamr_iterations, dilations=pamr_dilations))
    return labels_from_logits(logits, background_threshold, logit_scale=logit_scale, area_threshold=area_threshold,
                              query_class=query_class)


def resize_maps(maps, hw: tuple[int, int]) -> np.ndarray:
    """(..., h, w) maps resized bilinearly to ``hw`` (half-pixel centres, as the upsampling
    of the patch logits), as two matrix products (rows, then columns) in float32; a heatmap
    in [0, 1] stays in [0, 1]."""
    maps = np.asarray(maps, np.float32)
    if maps.shape[-2:] == tuple(hw):
        return maps
    my = resize_matrix(maps.shape[-2], hw[0], "bilinear")
    mx = resize_matrix(maps.shape[-1], hw[1], "bilinear")
    rows = np.matmul(my, maps)  # (..., H, w)
    return np.matmul(rows, mx.T).astype(np.float32)
