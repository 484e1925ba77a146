"""Image decoding, sizing and CLIP normalisation in NumPy + Pillow (no JAX, no torch)."""

from __future__ import annotations

import glob
import numbers
import os
import pathlib
import re
from typing import Sequence

import numpy as np
from PIL import Image, ImageOps

__all__ = [
    "OPENAI_MEAN", "OPENAI_STD", "IMAGE_EXTENSIONS", "ImageError", "load_image", "as_image_list",
    "target_size", "resize", "normalize", "prepare", "denormalize", "expand_image_paths",
]

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp")

_MEAN32 = np.asarray(OPENAI_MEAN, np.float32)
_STD32 = np.asarray(OPENAI_STD, np.float32)
_ALPHA_MODES = ("RGBA", "RGBa", "LA", "La", "PA")


class ImageError(ValueError):
    """An image could not be read or has an unusable type, shape, dtype or value range."""


def _one_line(err: BaseException) -> str:
    text = " ".join(str(err).split())
    return text or type(err).__name__


def _composite_over_white(rgba: np.ndarray) -> np.ndarray:
    """uint8 (H, W, 4) -> uint8 (H, W, 3), alpha-blended over a white background (exact rounding)."""
    rgb = rgba[..., :3].astype(np.uint32)
    a = rgba[..., 3:4].astype(np.uint32)
    return ((rgb * a + 255 * (255 - a) + 127) // 255).astype(np.uint8)


def _gray_to_rgb(gray: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(np.repeat(gray[..., None], 3, axis=-1))


def _sixteen_to_eight(values: np.ndarray) -> np.ndarray:
    """Integers in [0, 65535] -> uint8, ``round(v / 257)`` so 65535 maps to 255 (scaled, not clipped)."""
    return ((values.astype(np.uint32) + 128) // 257).astype(np.uint8)


def _pil_to_rgb(im: Image.Image, name: str) -> np.ndarray:
    """A loaded PIL image of any common mode -> uint8 (H, W, 3)."""
    mode = im.mode
    transparent = "transparency" in im.info
    if mode == "RGB" and not transparent:
        return np.array(im, dtype=np.uint8)
    if mode == "1":
        return _gray_to_rgb(np.array(im.convert("L"), dtype=np.uint8))
    if mode == "L" and not transparent:
        return _gray_to_rgb(np.array(im, dtype=np.uint8))
    if mode.startswith("I;16"):
        return _gray_to_rgb(_sixteen_to_eight(np.array(im)))
    if mode == "I":
        values = np.array(im, dtype=np.int64)
        if values.min() < 0 or values.max() > 65535:
            raise ImageError(f"{name}: 32-bit integer image with values in [{values.min()}, {values.max()}] "
                             "is outside the 16-bit range; convert it to 8-bit first")
        return _gray_to_rgb(_sixteen_to_eight(values))
    if mode == "F":
        values = np.array(im, dtype=np.float32)
        return _gray_to_rgb(_float_to_uint8(values, name))
    if mode in _ALPHA_MODES or transparent:
        if mode == "La":
            im = im.convert("LA")
        return _composite_over_white(np.array(im.convert("RGBA"), dtype=np.uint8))
    try:
        return np.array(im.convert("RGB"), dtype=np.uint8)
    except ValueError as e:
        raise ImageError(f"{name}: unsupported image mode {mode!r} ({_one_line(e)})") from e


def _from_pil(im: Image.Image, name: str) -> np.ndarray:
    try:
        im.load()  # lazy decoders (truncated PNG/JPEG) only fail here
        if im.width == 0 or im.height == 0:
            raise ImageError(f"{name}: image is empty ({im.width}x{im.height})")
        try:
            oriented = ImageOps.exif_transpose(im)
        except Exception:  # a corrupt EXIF block should not make a decodable image unreadable
            oriented = im
        return _pil_to_rgb(oriented if oriented is not None else im, name)
    except ImageError:
        raise
    except Exception as e:  # Pillow raises OSError, SyntaxError, struct.error, ... on corrupt data
        raise ImageError(f"cannot decode {name}: {_one_line(e)}") from e


def _load_path(src) -> np.ndarray:
    path = pathlib.Path(os.fspath(src))
    if not path.exists():
        raise ImageError(f"image file not found: {path}")
    if path.is_dir():
        raise ImageError(f"{path} is a directory, not an image file")
    try:
        with Image.open(path) as im:
            return _from_pil(im, f"image {path}")
    except ImageError:
        raise
    except Exception as e:  # UnidentifiedImageError, PermissionError, DecompressionBombError, ...
        raise ImageError(f"cannot read image {path}: {_one_line(e)}") from e


def _float_to_uint8(arr: np.ndarray, name: str) -> np.ndarray:
    arr = arr.astype(np.float32) if arr.dtype.itemsize < 4 else arr
    if np.isnan(arr).any():
        raise ImageError(f"{name}: float image contains NaN")
    lo, hi = float(arr.min()), float(arr.max())
    if lo < 0.0 or hi > 1.0:
        raise ImageError(f"{name}: float image values must be in [0, 1], got [{lo:g}, {hi:g}]; "
                         "scale it to [0, 1] or pass uint8")
    return np.rint(arr * 255.0).astype(np.uint8)


def _from_array(arr: np.ndarray, name: str) -> np.ndarray:
    kind = arr.dtype.kind
    if kind == "b":
        raise ImageError(f"{name}: boolean arrays are not images; convert to uint8 (e.g. mask * 255)")
    if kind not in "uif":
        raise ImageError(f"{name}: unsupported dtype {arr.dtype}; pass uint8 or float in [0, 1]")
    if arr.ndim == 3 and arr.shape[-1] not in (1, 3, 4):
        hint = " (channels-first? transpose to (H, W, C))" if arr.shape[0] in (1, 3, 4) else ""
        raise ImageError(f"{name}: expected 1, 3 or 4 channels in the last axis, got shape {arr.shape}{hint}")
    if arr.ndim not in (2, 3):
        raise ImageError(f"{name}: expected an array (H, W), (H, W, 3) or (H, W, 4), got shape {arr.shape}")
    if arr.size == 0:
        raise ImageError(f"{name}: image is empty (shape {arr.shape})")
    if kind == "f":
        out = _float_to_uint8(arr, name)
    elif arr.dtype == np.uint8:
        out = arr
    else:
        lo, hi = int(arr.min()), int(arr.max())
        if lo < 0 or hi > 255:
            raise ImageError(f"{name}: integer image values must be in [0, 255], got [{lo}, {hi}]; "
                             "pass uint8 or float in [0, 1]")
        out = arr.astype(np.uint8)
    if out.ndim == 2:
        return _gray_to_rgb(out)
    if out.shape[-1] == 1:
        return _gray_to_rgb(out[..., 0])
    if out.shape[-1] == 4:
        return _composite_over_white(out)
    return np.array(out, dtype=np.uint8, order="C", copy=True)


def _is_arraylike(src) -> bool:
    if isinstance(src, np.ndarray):
        return True
    return hasattr(src, "__array__") and not isinstance(src, (list, tuple, str, bytes, Image.Image))


def load_image(src) -> np.ndarray:
    """Decode one image to a uint8 (H, W, 3) RGB array.

    ``src`` is a path (str / os.PathLike), a ``PIL.Image`` or an array (H, W, 3),
    (H, W) or (H, W, 4), uint8 or float in [0, 1]. Transparency is composited over
    white, 16-bit grayscale is scaled to 8-bit, EXIF orientation is applied and
    multi-frame files give their first frame. Raises :class:`ImageError`.
    """
    if isinstance(src, (str, os.PathLike)):
        return _load_path(src)
    if isinstance(src, Image.Image):
        return _from_pil(src, "PIL image")
    if _is_arraylike(src):
        try:
            arr = np.asarray(src)
        except Exception as e:
            raise ImageError(f"cannot convert {type(src).__name__} to an array: {_one_line(e)}") from e
        return _from_array(arr, "image array")
    raise ImageError(f"unsupported image type {type(src).__name__}; "
                     "pass a file path, a PIL.Image or a numpy array")


def as_image_list(images) -> list[np.ndarray]:
    """Normalise the accepted image inputs to a list of uint8 (H, W, 3) arrays.

    Accepts one image (path, PIL image, array (H, W[, C])), a batch array
    (B, H, W, C), or a list/tuple of single images. Errors name the image index.
    """
    if isinstance(images, (list, tuple)):
        if not images:
            raise ImageError("no images given (empty list)")
        out = []
        for i, item in enumerate(images):
            if _is_arraylike(item) and np.ndim(item) == 4:
                raise ImageError(f"image {i}: a batch array (B, H, W, C) inside a list; "
                                 "pass the batch itself or a list of single images")
            try:
                out.append(load_image(item))
            except ImageError as e:
                raise ImageError(f"image {i}: {e}") from e
        return out
    if _is_arraylike(images):
        arr = np.asarray(images)
        if arr.ndim == 4:
            if arr.shape[0] == 0:
                raise ImageError(f"empty batch of images (shape {arr.shape})")
            return [_from_array(arr[i], f"image {i}") for i in range(arr.shape[0])]
    return [load_image(images)]


def _positive_int(value, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value <= 0:
        raise ValueError(f"{what} must be a positive int, got {value!r}")
    return int(value)


def _snap(side: int, patch: int) -> int:
    """Nearest multiple of ``patch`` (halves round up), at least one patch."""
    return max(patch, (2 * side + patch) // (2 * patch) * patch)


def target_size(height, width, *, size=None, short_side=None, patch_size=16,
                max_long_side=None) -> tuple[int, int]:
    """Model input (H, W) for an image of ``height`` x ``width``.

    ``size=int`` gives a square, ``size=(H, W)`` that shape; ``short_side=int``
    scales the shorter side to that value keeping the aspect (long side rounded to
    the nearest int), and with ``max_long_side`` the long side is capped at that
    (the aspect still kept, so a very elongated image stays affordable). Give at
    most one of ``size`` and ``short_side``; with neither, ``size=448``. Each side
    is then snapped to the nearest multiple of ``patch_size`` (at least one patch).
    Raises ValueError on bad arguments.
    """
    height = _positive_int(height, "height")
    width = _positive_int(width, "width")
    patch = _positive_int(patch_size, "patch_size")
    if size is not None and short_side is not None:
        raise ValueError(f"give size or short_side, not both (got size={size!r}, short_side={short_side!r})")
    if short_side is not None:
        s = _positive_int(short_side, "short_side")
        if height <= width:
            h, w = s, (2 * s * width + height) // (2 * height)
        else:
            h, w = (2 * s * height + width) // (2 * width), s
        if max_long_side is not None and max(h, w) > _positive_int(max_long_side, "max_long_side"):
            long = max(h, w)
            h, w = (max(1, (2 * v * max_long_side + long) // (2 * long)) for v in (h, w))
    else:
        if size is None:
            size = 448
        if isinstance(size, (tuple, list)):
            if len(size) != 2:
                raise ValueError(f"size must be an int or a pair (H, W), got {size!r}")
            h = _positive_int(size[0], "size[0] (height)")
            w = _positive_int(size[1], "size[1] (width)")
        elif isinstance(size, numbers.Integral) and not isinstance(size, bool):
            h = w = _positive_int(size, "size")
        else:
            raise ValueError(f"size must be a positive int or a pair (H, W), got {size!r}")
    return _snap(h, patch), _snap(w, patch)


def parse_size(text: str):
    """A size as users type it: ``N`` (a square) or ``HxW``; ValueError otherwise."""
    m = re.fullmatch(r"\s*(\d+)\s*(?:[xX]\s*(\d+)\s*)?", str(text))
    if not m:
        raise ValueError(f"expected N or HxW (e.g. 448 or 320x480), got {text!r}")
    h = int(m.group(1))
    if h < 1 or (m.group(2) is not None and int(m.group(2)) < 1):
        raise ValueError(f"sizes must be at least 1, got {text!r}")
    return h if m.group(2) is None else (h, int(m.group(2)))


def _check_uint8_rgb(image, what: str) -> np.ndarray:
    arr = np.asarray(image)
    if arr.dtype != np.uint8 or arr.ndim < 3 or arr.shape[-1] != 3:
        raise ImageError(f"{what} expects a uint8 (H, W, 3) RGB image, got {arr.dtype} {arr.shape}; "
                         "use load_image first")
    return arr


def resize(image_uint8, hw) -> np.ndarray:
    """Resize a uint8 (H, W, 3) RGB image to ``hw = (H, W)`` with PIL bicubic; returns uint8."""
    arr = _check_uint8_rgb(image_uint8, "resize")
    if arr.ndim != 3:
        raise ImageError(f"resize expects a single (H, W, 3) image, got shape {arr.shape}")
    if not isinstance(hw, (tuple, list)) or len(hw) != 2:
        raise ValueError(f"hw must be a pair (H, W), got {hw!r}")
    h, w = _positive_int(hw[0], "hw[0] (height)"), _positive_int(hw[1], "hw[1] (width)")
    im = Image.fromarray(np.ascontiguousarray(arr))
    return np.array(im.resize((w, h), Image.Resampling.BICUBIC), dtype=np.uint8)


def normalize(image_uint8) -> np.ndarray:
    """uint8 RGB (..., 3) -> float32 CLIP input: ``(x / 255 - OPENAI_MEAN) / OPENAI_STD``."""
    arr = _check_uint8_rgb(image_uint8, "normalize")
    x = arr.astype(np.float32) / np.float32(255.0)
    return (x - _MEAN32) / _STD32


def denormalize(pixels) -> np.ndarray:
    """Inverse of :func:`normalize`: float (..., 3) CLIP pixels -> uint8 RGB (rounded, clipped)."""
    x = np.asarray(pixels, dtype=np.float32)
    if x.ndim < 1 or x.shape[-1] != 3:
        raise ImageError(f"denormalize expects pixels (..., 3), got shape {x.shape}")
    rgb = (x * _STD32 + _MEAN32) * np.float32(255.0)
    return np.clip(np.rint(rgb), 0, 255).astype(np.uint8)


def prepare(src, *, size=None, short_side=None, patch_size=16) -> np.ndarray:
    """Decode, resize (see :func:`target_size`) and normalise one image: float32 (H, W, 3), channels last."""
    target_size(1, 1, size=size, short_side=short_side, patch_size=patch_size)  # fail before decoding
    image = load_image(src)
    hw = target_size(*image.shape[:2], size=size, short_side=short_side, patch_size=patch_size)
    return normalize(resize(image, hw))


def _has_magic(text: str) -> bool:
    return any(c in text for c in "*?[")


def _is_image_file(p: pathlib.Path) -> bool:
    return p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS


def expand_image_paths(items: Sequence[str]) -> list[pathlib.Path]:
    """Expand CLI image arguments into paths, keeping the argument order.

    Each item is an existing file (taken as is), a directory (its files with an
    extension in IMAGE_EXTENSIONS, sorted, not recursive) or a glob pattern (its
    matching image files, sorted; ``**`` recurses). A file reached twice (named twice,
    through a symlink or a symlink loop) is kept once, at its first place. Raises
    :class:`ImageError` for a missing file, a directory without images or a pattern
    matching no image.
    """
    if isinstance(items, (str, os.PathLike)):
        items = [items]
    out = _Unique()
    for item in items:
        text = os.fspath(item)
        path = pathlib.Path(text)
        if path.is_dir():
            found = sorted(p for p in path.iterdir() if _is_image_file(p))
            if not found:
                raise ImageError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) in directory: {path}")
            out.extend(found)
        elif path.exists():
            out.append(path)
        elif _has_magic(text):
            found = sorted(pathlib.Path(p) for p in glob.glob(text, recursive=True))
            found = [p for p in found if _is_image_file(p)]
            if not found:
                raise ImageError(f"no image files match the pattern: {text}")
            out.extend(found)
        else:
            raise ImageError(f"image file not found: {text}")
    return list(out)


class _Unique(list):
    """A list of paths that ignores a path whose real file it already holds."""

    def __init__(self):
        super().__init__()
        self._real = set()

    def append(self, path):
        real = os.path.realpath(path)
        if real not in self._real:
            self._real.add(real)
            super().append(path)

    def extend(self, paths):
        for p in paths:
            self.append(p)


def probe_image(path) -> tuple[int, int]:
    """The (height, width) an image file's header gives, checked without decoding its pixels:
    Pillow opens it and verifies its structure (a PNG's chunks and their checksums, so a
    truncated one is caught; a JPEG's damage is only found when decoded). The size is for the
    memory check, which does not depend on the orientation. Raises :class:`ImageError` in
    :func:`load_image`'s words."""
    path = pathlib.Path(path)
    if not path.exists():
        raise ImageError(f"image file not found: {path}")
    if path.is_dir():
        raise ImageError(f"{path} is a directory, not an image file")
    try:
        im = Image.open(path)
    except Exception as e:  # UnidentifiedImageError, PermissionError, an empty file, ...
        raise ImageError(f"cannot read image {path}: {_one_line(e)}") from e
    try:
        with im:
            w, h = im.size
            im.verify()
    except Exception as e:  # damaged data past the header
        raise ImageError(f"cannot decode image {path}: {_one_line(e)}") from e
    return h, w


def decode_error_message(path, reason: str) -> str:
    """The message for an image a loader thread could not decode: :func:`load_image`'s own
    words for it, read again for this rare case."""
    try:
        load_image(path)
    except ImageError as e:
        return str(e)
    return f"cannot read image {path}: {reason}"
