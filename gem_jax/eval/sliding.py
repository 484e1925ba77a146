"""Sliding-window inference: cosine logits of overlapping crops averaged into one map, as mmseg's slide mode."""

from __future__ import annotations

import functools
from typing import Sequence

import numpy as np

from gem_jax import preprocess
from gem_jax.models.layers import resize_2d, resize_matrix


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


#: How a window whose sides are not multiples of the patch size goes through the model:
#: ``"resize"`` resized to the nearest multiple (gem-jax's default), ``"truncate"`` only its
#: whole patches seen and their patch-grid logits stretched over it (SCLIP, NACLIP: the
#: patch convolution drops the remainder), ``"pad_center"`` padded on every side to the next
#: multiple and the logits cut back (ClearCLIP), ``"pad_corner"`` padded at the bottom and
#: right and the patch-grid logits of the padded input stretched over it (MaskCLIP's mmseg
#: ViT). The stretches go from the patch grid to the window in one bilinear step
#: (:func:`regrid_matrix`), as the official code does.
BORDERS = ("resize", "truncate", "pad_center", "pad_corner")
#: The padding colour: the CLIP mean, i.e. zero after normalisation (to uint8 rounding).
PAD_RGB = tuple(int(round(255 * m)) for m in preprocess.OPENAI_MEAN)


@functools.lru_cache(maxsize=256)
def regrid_matrix(size: int, patch: int, out: int) -> np.ndarray:
    """The (out, size) matrix that maps logits bilinearly upsampled from a patch grid of
    ``size // patch`` cells to ``size`` pixels onto the same grid bilinearly stretched to
    ``out`` pixels in one step (as the official code stretches its patch-grid logits).

    The upsampling is undone exactly with its pseudo-inverse (it has full column rank), so
    the result equals resizing the grid itself, to float rounding."""
    grid = size // patch
    up = resize_matrix(grid, size, "bilinear")  # (size, grid)
    return (resize_matrix(grid, out, "bilinear") @ np.linalg.pinv(up)).astype(np.float32)


def _model_input(window: np.ndarray, patch: int, border: str):
    """(input image, its model size, how to turn its logits into the window's) for one window."""
    h, w = window.shape[:2]
    if border == "resize":
        return window, (h, w), ("resize",)
    if border == "truncate":
        th, tw = h // patch * patch, w // patch * patch
        if th == 0 or tw == 0:
            raise ValueError(f"a {h}x{w} window holds no whole {patch}-pixel patch (border='truncate')")
        return window[:th, :tw], (th, tw), ("regrid",)
    ph, pw = -(-h // patch) * patch, -(-w // patch) * patch
    if border == "pad_center":
        top, left = (ph - h) // 2, (pw - w) // 2
    else:
        top, left = 0, 0
    padded = np.empty((ph, pw, 3), np.uint8)
    padded[:] = np.asarray(PAD_RGB, np.uint8)
    padded[top:top + h, left:left + w] = window
    return padded, (ph, pw), ("cut", top, left) if border == "pad_center" else ("regrid",)


def _to_window(logits: np.ndarray, back: tuple, window: tuple[int, int], patch: int) -> np.ndarray:
    """A window's logits (P, h, w) from the model's logits at its input size."""
    size = logits.shape[-2:]
    if back[0] == "cut":
        return logits[:, back[1]:back[1] + window[0], back[2]:back[2] + window[1]]
    if tuple(size) == tuple(window):
        return logits
    if back[0] == "regrid":
        rows = regrid_matrix(size[0], patch, window[0])
        cols = regrid_matrix(size[1], patch, window[1])
        return np.einsum("Hh,phw,Ww->pHW", rows, logits, cols, optimize=True).astype(np.float32)
    # "resize": a window resized to the nearest patch multiple, its logits resized back.
    return np.asarray(resize_2d(logits, window, "bilinear", axes=(-2, -1)))


def sliding_logits(gem, image, prompts: Sequence[str], crop: int | None = 224, stride: int | None = 112,
                   short_side: int = 336, max_long_side: int | None = 2048, border: str = "resize") -> np.ndarray:
    """Cosine logits (P, H, W) of one image by sliding-window inference.

    The image is resized (keeping the aspect, :func:`rescaled_size`) to (H, W); every
    window of :func:`window_boxes` goes through :meth:`gem_jax.GEM.heatmaps`
    (windows of one size in shared batches), and overlapping window logits are averaged,
    as mmseg's ``slide_inference`` does. A window whose sides are not patch multiples is
    handled by ``border`` (:data:`BORDERS`); its logits always end up at the window's size.

    Args:
      gem: a :class:`gem_jax.GEM`.
      image: a path, PIL image or (H, W, 3) array.
      prompts: the prompts (one list).
      crop, stride: window side and step in pixels of the resized image; ``crop=None``
        is one window over the whole resized image (the official whole-image modes).
      short_side, max_long_side: the resize.
      border: ``"resize"``, ``"truncate"``, ``"pad_center"`` or ``"pad_corner"``.
    Returns:
      float32 (P, H, W) at the resized image size.
    """
    images = preprocess.as_image_list(image)
    if len(images) != 1:
        raise ValueError(f"sliding_logits takes one image, got {len(images)}")
    if isinstance(prompts, str):
        prompts = [prompts]
    prompts = list(prompts)
    if border not in BORDERS:
        raise ValueError(f"border must be one of {BORDERS}, got {border!r}")
    if crop is not None and stride is not None and stride > crop:
        raise ValueError(f"stride {stride} > crop {crop} would leave pixels unseen")
    if (crop is None) != (stride is None):
        raise ValueError("crop and stride go together (both None for the whole image)")
    img = images[0]
    hw = rescaled_size(img.shape[0], img.shape[1], short_side, max_long_side)
    resized = preprocess.resize(img, hw)
    boxes = [(0, hw[0], 0, hw[1])] if crop is None else window_boxes(*hw, crop, stride)
    patch = gem.model.config.vision.patch_size
    by_shape: dict[tuple[int, int], list] = {}
    for y1, y2, x1, x2 in boxes:
        inp, size, back = _model_input(resized[y1:y2, x1:x2], patch, border)
        by_shape.setdefault(size, []).append(((y1, y2, x1, x2), inp, back))

    total = np.zeros((len(prompts), *hw), np.float32)
    count = np.zeros(hw, np.float32)
    for shape, group in by_shape.items():
        out = gem.heatmaps([inp for _, inp, _ in group], prompts, size=shape)
        for ((y1, y2, x1, x2), _, back), logits in zip(group, out.logits):
            total[:, y1:y2, x1:x2] += _to_window(np.asarray(logits), back, (y2 - y1, x2 - x1), patch)
            count[y1:y2, x1:x2] += 1
    return total / count
