"""Sliding-window inference: cosine logits of overlapping crops averaged into one map, as mmseg's slide mode."""

from __future__ import annotations

import functools
import os
from typing import Sequence

import numpy as np

from gem_jax import preprocess
from gem_jax.eval.images import ImageSteps, get_image_steps


def rescaled_size(h: int, w: int, short_side: int, max_long_side: int | None = None) -> tuple[int, int]:
    """(H, W) after mmseg's keep-ratio ``Resize(scale=(max_long_side, short_side))``: one
    scale factor, the largest that keeps the shorter side <= ``short_side`` and the longer
    side <= ``max_long_side``; sides rounded half up. Not snapped to the patch size (the
    crops are).

    The same float operations as mmcv ``image/geometric.py``: ``rescale_size`` takes
    ``min(max_long_edge / max(h, w), max_short_edge / min(h, w))`` with the edges the max and
    min of the scale pair, and ``_scale_size`` rounds ``int(w * float(scale) + 0.5)`` (here
    at least 1)."""
    if short_side < 1 or h < 1 or w < 1:
        raise ValueError(f"sizes must be positive, got image {h}x{w}, short_side {short_side}")
    if max_long_side is None:
        scale = short_side / min(h, w)
    else:  # mmcv takes the larger of the pair as the long edge, whichever order it is given in
        long_edge, short_edge = max(max_long_side, short_side), min(max_long_side, short_side)
        scale = min(long_edge / max(h, w), short_edge / min(h, w))
    return max(int(h * float(scale) + 0.5), 1), max(int(w * float(scale) + 0.5), 1)


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
#: ViT). The stretches go from the patch grid to the window in one bilinear step, as the
#: official code does; the padding is zero after normalisation, as the official code pads
#: its normalised tensors.
BORDERS = ("resize", "truncate", "pad_center", "pad_corner")


@functools.lru_cache(maxsize=512)
def bilinear_matrix(in_size: int, out_size: int) -> np.ndarray:
    """The (out_size, in_size) float32 matrix of torch's ``interpolate(mode="bilinear",
    align_corners=False)`` along one axis, with torch's float32 coordinates.

    ATen ``UpSample.h``: ``scale = float(in) / out``; the source coordinate
    ``scale * (i + 0.5) - 0.5`` clamped at 0, rounded once (a fused multiply-add, as torch's
    compiled CPU kernels give it); the lower index ``min(floor(src), in - 1)`` with weight
    ``1 - lambda``, the next (clamped at the edge) with ``lambda = src - index``. With float64
    coordinates instead, the logits of a 2048 to 437 resize (the long side of an image the
    official pipelines cap at 2048) moved by 2.6e-5, more than the model's own rounding.
    Read-only (cached)."""
    if in_size < 1 or out_size < 1:
        raise ValueError(f"sizes must be positive, got {in_size} -> {out_size}")
    scale = np.float32(in_size) / np.float32(out_size)
    half = (np.arange(out_size, dtype=np.float32) + np.float32(0.5)).astype(np.float64)
    # float32 x float32 is exact in float64, and so is the sum with 0.5 here: one rounding, as fma.
    src = np.maximum((np.float64(scale) * half - 0.5).astype(np.float32), np.float32(0))
    lo = np.minimum(np.floor(src).astype(np.int64), in_size - 1)
    lam = np.clip(src - lo.astype(np.float32), np.float32(0), np.float32(1))
    hi = np.where(lo < in_size - 1, lo + 1, lo)
    m = np.zeros((out_size, in_size), np.float32)
    rows = np.arange(out_size)
    np.add.at(m, (rows, lo), np.float32(1) - lam)
    np.add.at(m, (rows, hi), lam)
    m.setflags(write=False)
    return m


def _bilinear(grid: np.ndarray, out_hw: tuple[int, int]) -> np.ndarray:
    """(P, h, w) -> (P, H, W), torch's ``interpolate(mode="bilinear", align_corners=False)``."""
    if tuple(grid.shape[-2:]) == tuple(out_hw):
        return grid
    rows = bilinear_matrix(grid.shape[-2], out_hw[0])
    cols = bilinear_matrix(grid.shape[-1], out_hw[1])
    return np.einsum("Hh,phw,Ww->pHW", rows, grid, cols, optimize=True).astype(np.float32, copy=False)


def _model_input(window: np.ndarray, pixels: np.ndarray, patch: int, border: str, steps: ImageSteps):
    """(normalised model input, how its patch-grid logits become the window's) for one window:
    ``window`` the uint8 crop, ``pixels`` the same crop normalised."""
    h, w = window.shape[:2]
    if border == "resize":
        snapped = preprocess.target_size(h, w, size=(h, w), patch_size=patch)
        return steps.normalize(steps.resize_to(window, snapped)), ("resize",)
    if border == "truncate":
        th, tw = h // patch * patch, w // patch * patch
        if th == 0 or tw == 0:
            raise ValueError(f"a {h}x{w} window holds no whole {patch}-pixel patch (border='truncate')")
        # SCLIP, NACLIP forward_feature: the patch conv drops the remainder, and the logits of
        # the (h // patch, w // patch) grid are interpolated to the crop's full size.
        return pixels[:th, :tw], ("stretch",)
    ph, pw = -(-h // patch) * patch, -(-w // patch) * patch
    # ClearCLIP forward_slide: compute_padsize then nn.functional.pad(crop_img, pad) (zeros), the
    # left/top share being the smaller half; MaskCLIP AdaptivePadding(padding='corner'):
    # F.pad(x, [0, pad_w, 0, pad_h]) (zeros).
    top, left = ((ph - h) // 2, (pw - w) // 2) if border == "pad_center" else (0, 0)
    padded = np.zeros((ph, pw, 3), np.float32)
    padded[top:top + h, left:left + w] = pixels
    if border == "pad_center":
        # ClearCLIP: logits interpolated to the padded size, then cut back to the crop.
        return padded, ("cut", top, left)
    # MaskCLIP EncoderDecoder.encode_decode: the head's grid resized to img.shape[2:], the unpadded size.
    return padded, ("stretch",)


def _to_window(grid: np.ndarray, back: tuple, window: tuple[int, int], input_hw: tuple[int, int]) -> np.ndarray:
    """A window's logits (P, h, w) from the patch-grid logits of its model input."""
    if back[0] == "stretch":
        return _bilinear(grid, window)
    full = _bilinear(grid, input_hw)
    if back[0] == "cut":
        return full[:, back[1]:back[1] + window[0], back[2]:back[2] + window[1]]
    # "resize": a window resized to the nearest patch multiple, its logits resized back.
    return _bilinear(full, window)


def window_logits(gem, resized: np.ndarray, prompts: Sequence[str], crop: int | None = 224,
                  stride: int | None = 112, border: str = "resize", steps="gem") -> np.ndarray:
    """Cosine logits (P, H, W) of an image already resized to (H, W), by sliding windows.

    Every window of :func:`window_boxes` is normalised with ``steps``, made a model input
    by ``border`` (:data:`BORDERS`), and goes through :meth:`gem_jax.GEM.pixel_logits`
    (windows of one size in shared batches); each window's patch-grid logits are resized to
    the window, and overlapping windows are averaged, as mmseg's slide inference does.

    Args:
      gem: a :class:`gem_jax.GEM`.
      resized: uint8 (H, W, 3) RGB, the image at the protocol's size.
      prompts: the prompts (one list).
      crop, stride: window side and step in pixels; ``crop=None`` is one window over the
        whole image (the official whole-image modes).
      border: ``"resize"``, ``"truncate"``, ``"pad_center"`` or ``"pad_corner"``.
      steps: the :class:`gem_jax.eval.images.ImageSteps` (or its name) whose normalisation
        (and, for ``border="resize"``, resize) is used.
    Returns:
      float32 (P, H, W).
    """
    steps = get_image_steps(steps)
    resized = np.asarray(resized)
    if resized.dtype != np.uint8 or resized.ndim != 3 or resized.shape[-1] != 3:
        raise ValueError(f"resized must be a uint8 (H, W, 3) image, got {resized.dtype} {resized.shape}")
    if isinstance(prompts, str):
        prompts = [prompts]
    prompts = list(prompts)
    if border not in BORDERS:
        raise ValueError(f"border must be one of {BORDERS}, got {border!r}")
    if crop is not None and stride is not None and stride > crop:
        raise ValueError(f"stride {stride} > crop {crop} would leave pixels unseen")
    if (crop is None) != (stride is None):
        raise ValueError("crop and stride go together (both None for the whole image)")
    hw = resized.shape[:2]
    pixels = steps.normalize(resized)
    boxes = [(0, hw[0], 0, hw[1])] if crop is None else window_boxes(*hw, crop, stride)
    patch = gem.model.config.vision.patch_size
    by_shape: dict[tuple[int, int], list] = {}
    for y1, y2, x1, x2 in boxes:
        inp, back = _model_input(resized[y1:y2, x1:x2], pixels[y1:y2, x1:x2], patch, border, steps)
        by_shape.setdefault(inp.shape[:2], []).append(((y1, y2, x1, x2), inp, back))

    total = np.zeros((len(prompts), *hw), np.float32)
    count = np.zeros(hw, np.float32)
    for shape, group in by_shape.items():
        grids = gem.pixel_logits(np.stack([inp for _, inp, _ in group]), prompts, grid=True)
        for ((y1, y2, x1, x2), _, back), grid in zip(group, grids):
            total[:, y1:y2, x1:x2] += _to_window(grid, back, (y2 - y1, x2 - x1), shape)
            count[y1:y2, x1:x2] += 1
    # mmseg slide inference: preds / count_mat.
    return total / count


def sliding_logits(gem, image, prompts: Sequence[str], crop: int | None = 224, stride: int | None = 112,
                   short_side: int = 336, max_long_side: int | None = 2048, border: str = "resize",
                   steps="gem") -> np.ndarray:
    """Cosine logits (P, H, W) of one image by sliding-window inference.

    The image is read and resized (keeping the aspect, :func:`rescaled_size`) to (H, W)
    with ``steps`` (:data:`gem_jax.eval.images.IMAGE_STEPS`: ``"gem"`` Pillow bicubic,
    ``"mmseg"`` OpenCV bilinear as mmseg's ``Resize``), then :func:`window_logits`.

    Args:
      gem: a :class:`gem_jax.pipeline.GEM`.
      image: a path, PIL image or (H, W, 3) array.
      prompts: the prompts (one list).
      crop, stride: window side and step in pixels of the resized image; ``crop=None``
        is one window over the whole resized image (the official whole-image modes).
      short_side, max_long_side: the resize.
      border: ``"resize"``, ``"truncate"``, ``"pad_center"`` or ``"pad_corner"``.
      steps: image steps, by name or :class:`gem_jax.eval.images.ImageSteps`.
    Returns:
      float32 (P, H, W) at the resized image size.
    """
    steps = get_image_steps(steps)
    if isinstance(image, (str, os.PathLike)):
        img = steps.read(image)
    else:
        images = preprocess.as_image_list(image)
        if len(images) != 1:
            raise ValueError(f"sliding_logits takes one image, got {len(images)}")
        img = images[0]
    resized = steps.resize_to(img, rescaled_size(img.shape[0], img.shape[1], short_side, max_long_side))
    return window_logits(gem, resized, prompts, crop=crop, stride=stride, border=border, steps=steps)
