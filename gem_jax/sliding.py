"""Sliding-window inference: cosine logits of overlapping crops averaged into one map, as mmseg's slide mode."""

from __future__ import annotations

from typing import Sequence

import numpy as np

from gem_jax import preprocess
from gem_jax.models.layers import resize_2d


def rescaled_size(h: int, w: int, short_side: int, max_long_side: int | None = None) -> tuple[int, int]:
    """(H, W) after mmseg's keep-ratio ``Resize(scale=(max_long_side, short_side))``: one
    scale factor, the largest that keeps the shorter side <= ``short_side`` and the longer
    side <= ``max_long_side``; sides rounded half up. Not snapped to the patch size (the
    crops are)."""
    if short_side < 1 or h < 1 or w < 1:
        raise ValueError(f"sizes must be positive, got image {h}x{w}, short_side {short_side}")
    scale = short_side / min(h, w)
    if max_long_side is not None:
        scale = min(scale, max_long_side / max(h, w))
    return max(int(h * scale + 0.5), 1), max(int(w * scale + 0.5), 1)


def window_boxes(h: int, w: int, crop: int | tuple[int, int], stride: int | tuple[int, int]):
    """The crop boxes ``(y1, y2, x1, x2)`` of mmseg's slide inference over an (h, w) image.

    A grid of ``ceil((size - crop) / stride) + 1`` windows per axis; the last window is
    moved back to end at the border, and a crop larger than the image is clipped to it.
    """
    ch, cw = (crop, crop) if isinstance(crop, int) else crop
    sh, sw = (stride, stride) if isinstance(stride, int) else stride
    if min(ch, cw, sh, sw) < 1:
        raise ValueError(f"crop and stride must be positive, got crop={crop}, stride={stride}")
    rows = max(h - ch + sh - 1, 0) // sh + 1
    cols = max(w - cw + sw - 1, 0) // sw + 1
    boxes = []
    for i in range(rows):
        for j in range(cols):
            y2, x2 = min(i * sh + ch, h), min(j * sw + cw, w)
            boxes.append((max(y2 - ch, 0), y2, max(x2 - cw, 0), x2))
    return boxes


def sliding_logits(gem, image, prompts: Sequence[str], crop: int = 224, stride: int = 112,
                   short_side: int = 336, max_long_side: int | None = 2048) -> np.ndarray:
    """Cosine logits (P, H, W) of one image by sliding-window inference.

    The image is resized (keeping the aspect, :func:`rescaled_size`) to (H, W); every
    window of :func:`window_boxes` goes through :meth:`gem_jax.pipeline.GEM.heatmaps` at its
    own size (crops of one size in shared batches), and overlapping crop logits are
    averaged, as mmseg's ``slide_inference`` does.

    Args:
      gem: a :class:`gem_jax.pipeline.GEM`.
      image: a path, PIL image or (H, W, 3) array.
      prompts: the prompts (one list).
      crop, stride: window side and step in pixels of the resized image.
      short_side, max_long_side: the resize.
    Returns:
      float32 (P, H, W) at the resized image size.
    """
    images = preprocess.as_image_list(image)
    if len(images) != 1:
        raise ValueError(f"sliding_logits takes one image, got {len(images)}")
    if isinstance(prompts, str):
        prompts = [prompts]
    prompts = list(prompts)
    if stride > crop:
        raise ValueError(f"stride {stride} > crop {crop} would leave pixels unseen")
    img = images[0]
    hw = rescaled_size(img.shape[0], img.shape[1], short_side, max_long_side)
    resized = preprocess.resize(img, hw)
    boxes = window_boxes(*hw, crop, stride)
    by_shape: dict[tuple[int, int], list[tuple[int, int, int, int]]] = {}
    for b in boxes:
        by_shape.setdefault((b[1] - b[0], b[3] - b[2]), []).append(b)

    total = np.zeros((len(prompts), *hw), np.float32)
    count = np.zeros(hw, np.float32)
    for shape, group in by_shape.items():
        crops = [resized[y1:y2, x1:x2] for y1, y2, x1, x2 in group]
        out = gem.heatmaps(crops, prompts, size=shape)
        for (y1, y2, x1, x2), logits, size in zip(group, out.logits, out.sizes):
            if tuple(size) != shape:  # a crop clipped to an image side that is not a patch multiple
                logits = np.asarray(resize_2d(logits, shape, "bilinear", axes=(-2, -1)))
            total[:, y1:y2, x1:x2] += logits
            count[y1:y2, x1:x2] += 1
    return total / count
