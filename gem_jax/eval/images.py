"""How each evaluation protocol reads, resizes and normalises an image, as its source code does.

GEM's protocol uses gem-jax's own steps (Pillow decoding, Pillow bicubic resizing, CLIP's
normalisation). The official pipelines of SCLIP, NACLIP, ClearCLIP and MaskCLIP are mmseg
pipelines, whose image steps are OpenCV's: mmcv's ``LoadImageFromFile`` decodes with
``cv2.imdecode`` (BGR, EXIF orientation applied by OpenCV), and mmseg's keep-ratio
``Resize`` calls mmcv's ``imrescale``, i.e. ``cv2.resize(..., INTER_LINEAR)`` on the uint8
image. OpenCV computes 8-bit linear resizing in fixed point, and its vectorised rows and
their scalar tails round differently, so no other implementation gives the same pixels:
these steps call OpenCV itself (``pip install 'gem-jax[eval]'`` installs it).
"""

from __future__ import annotations

import dataclasses
import os
import pathlib

import numpy as np

from gem_jax import preprocess
from gem_jax.preprocess import ImageError

#: The data preprocessor of SCLIP, NACLIP and ClearCLIP (``SegDataPreProcessor(mean=[122.771,
#: 116.746, 104.094], std=[68.501, 66.632, 70.323], ...)`` in SCLIP ``clip_segmentor.py``,
#: NACLIP ``naclip.py``, ClearCLIP ``clearclip_segmentor.py``): CLIP's mean and std in 0..255, RGB.
MMSEG_CLIP_MEAN = (122.771, 116.746, 104.094)
MMSEG_CLIP_STD = (68.501, 66.632, 70.323)
#: MaskCLIP's ``img_norm_cfg`` (``configs/_base_/datasets/*.py``): ImageNet's mean and std, RGB.
IMAGENET_MEAN = (123.675, 116.28, 103.53)
IMAGENET_STD = (58.395, 57.12, 57.375)

DECODERS = ("pillow", "opencv")
RESIZES = ("pillow_bicubic", "opencv_linear")
NORMALIZATIONS = ("clip", "divide", "reciprocal")


def require_opencv():
    """The ``cv2`` module; ImportError saying how to install it if it is missing."""
    try:
        import cv2
    except ImportError as e:
        raise ImportError("this evaluation protocol reads and resizes images with OpenCV, as its official "
                          "pipeline does: pip install 'gem-jax[eval]' (or any OpenCV build, e.g. "
                          "opencv-python)") from e
    return cv2


@dataclasses.dataclass(frozen=True)
class ImageSteps:
    """How images are decoded, resized and normalised.

    Attributes:
      name: registry name (:data:`IMAGE_STEPS`).
      description: one line, with the source.
      decoder: ``"pillow"`` (:func:`gem_jax.preprocess.load_image`) or ``"opencv"``
        (``cv2.imdecode(..., IMREAD_COLOR)``, as mmcv's ``imfrombytes``).
      resize: ``"pillow_bicubic"`` or ``"opencv_linear"`` (``cv2.resize`` with
        ``INTER_LINEAR`` on the uint8 image, as mmcv's ``imresize``).
      normalization: ``"clip"``, ``(x / 255 - mean) / std`` with CLIP's mean and std in
        [0, 1] (:func:`gem_jax.preprocess.normalize`); ``"divide"``, ``(x - mean) / std`` in
        float32 with ``mean``, ``std`` in 0..255 (mmseg's ``SegDataPreProcessor``);
        ``"reciprocal"``, ``(x - mean) * (1 / std)`` in float32, the reciprocal taken in
        float64 (mmcv's ``imnormalize``).
      mean, std: RGB, 0..255 (unused with ``"clip"``).
    """

    name: str
    description: str
    decoder: str
    resize: str
    normalization: str
    mean: tuple[float, float, float] | None = None
    std: tuple[float, float, float] | None = None

    def __post_init__(self):
        for field, allowed in (("decoder", DECODERS), ("resize", RESIZES), ("normalization", NORMALIZATIONS)):
            if getattr(self, field) not in allowed:
                raise ValueError(f"{field} must be one of {allowed}, got {getattr(self, field)!r}")
        if self.normalization != "clip" and (self.mean is None or self.std is None):
            raise ValueError(f"normalization {self.normalization!r} needs mean and std")

    @property
    def needs_opencv(self) -> bool:
        return self.decoder == "opencv" or self.resize == "opencv_linear"

    def read(self, src) -> np.ndarray:
        """uint8 (H, W, 3) RGB from a path, PIL image or array. Only paths are decoded with
        the ``decoder``; images already in memory go through :func:`gem_jax.preprocess.load_image`."""
        if self.decoder == "opencv" and isinstance(src, (str, os.PathLike)):
            return read_opencv(src)
        return preprocess.load_image(src)

    def resize_to(self, image: np.ndarray, hw: tuple[int, int]) -> np.ndarray:
        """A uint8 (H, W, 3) image resized to ``hw``; returned as is when it has that size
        already (both libraries copy it unchanged)."""
        image = np.asarray(image)
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[-1] != 3:
            raise ImageError(f"resize expects a uint8 (H, W, 3) image, got {image.dtype} {image.shape}")
        if tuple(image.shape[:2]) == tuple(hw):
            return image
        if self.resize == "opencv_linear":
            return resize_opencv_linear(image, hw)
        return preprocess.resize(image, hw)

    def normalize(self, image: np.ndarray) -> np.ndarray:
        """float32 (..., 3) model input from uint8 RGB (..., 3)."""
        if self.normalization == "clip":
            return preprocess.normalize(image)
        x = np.asarray(image)
        if x.dtype != np.uint8 or x.shape[-1:] != (3,):
            raise ImageError(f"normalize expects uint8 (..., 3) RGB, got {x.dtype} {x.shape}")
        x = x.astype(np.float32)
        mean = np.asarray(self.mean, np.float32)
        if self.normalization == "divide":
            # mmseg SegDataPreProcessor.forward: (_input.float() - self.mean) / self.std, float32 buffers.
            return (x - mean) / np.asarray(self.std, np.float32)
        # mmcv imnormalize_: cv2.subtract(img, mean) then cv2.multiply(img, 1 / np.float64(std)),
        # both on float32 images (OpenCV casts the float64 scalars to float32).
        return (x - mean) * (1.0 / np.asarray(self.std, np.float64)).astype(np.float32)

    def settings(self) -> dict:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}


def read_opencv(path) -> np.ndarray:
    """Decode an image file as mmcv's ``LoadImageFromFile`` does (``imfrombytes`` with the
    default ``flag='color'``, backend cv2): ``cv2.imdecode(bytes, IMREAD_COLOR)``, which gives
    8-bit BGR (grey replicated, alpha dropped, 16 bits scaled down) with the EXIF orientation
    applied; returned as RGB (the data preprocessors flip BGR to RGB before normalising).
    Raises :class:`~gem_jax.preprocess.ImageError`."""
    cv2 = require_opencv()
    path = pathlib.Path(os.fspath(path))
    if not path.exists():
        raise ImageError(f"image file not found: {path}")
    if path.is_dir():
        raise ImageError(f"{path} is a directory, not an image file")
    # The same size limit as Pillow's decoder (read from the header, nothing decoded yet).
    _check_pixels(path)
    try:
        data = np.fromfile(path, np.uint8)
    except OSError as e:
        raise ImageError(f"cannot read image {path}: {e}") from e
    try:
        bgr = cv2.imdecode(data, cv2.IMREAD_COLOR) if data.size else None
    except cv2.error as e:
        raise ImageError(f"cannot decode image {path}: {' '.join(str(e).split())}") from e
    if bgr is None or bgr.size == 0:
        raise ImageError(f"cannot decode image {path} (OpenCV read no image)")
    return np.ascontiguousarray(bgr[..., ::-1])


def _check_pixels(path: pathlib.Path) -> None:
    from PIL import Image

    try:
        with Image.open(path):  # reads the header only
            pass
    except Image.DecompressionBombError as e:  # what the Pillow decoder refuses, this one does too
        raise ImageError(f"cannot read image {path}: {' '.join(str(e).split())}") from e
    except Exception:  # a file Pillow cannot identify: OpenCV decides
        return


def resize_opencv_linear(image: np.ndarray, hw: tuple[int, int]) -> np.ndarray:
    """``cv2.resize(image, (W, H), interpolation=INTER_LINEAR)`` on a uint8 image, as mmcv's
    ``imresize`` with ``interpolation='bilinear'`` and the cv2 backend (mmcv
    ``image/geometric.py``: ``cv2.resize(img, size, dst=out, interpolation=cv2_interp_codes[...])``).
    The channel order does not matter: every channel is resized alike."""
    cv2 = require_opencv()
    h, w = int(hw[0]), int(hw[1])
    if h < 1 or w < 1:
        raise ValueError(f"size must be positive, got {hw}")
    return cv2.resize(np.ascontiguousarray(image), (w, h), interpolation=cv2.INTER_LINEAR)


#: gem-jax's own steps, used by GEM's protocol (GEM's demo resizes with Pillow bicubic).
GEM_STEPS = ImageSteps(
    name="gem",
    description="Pillow decoding (EXIF orientation applied), Pillow bicubic resize, CLIP's normalisation",
    decoder="pillow", resize="pillow_bicubic", normalization="clip")
#: mmseg 1.x pipelines with SCLIP's, NACLIP's and ClearCLIP's data preprocessor.
MMSEG_STEPS = ImageSteps(
    name="mmseg",
    description="mmseg 1.x: OpenCV decoding (mmcv LoadImageFromFile), OpenCV bilinear on uint8 (mmcv imrescale), "
                "(x - mean) / std with mean (122.771, 116.746, 104.094), std (68.501, 66.632, 70.323) "
                "(SegDataPreProcessor)",
    decoder="opencv", resize="opencv_linear", normalization="divide", mean=MMSEG_CLIP_MEAN, std=MMSEG_CLIP_STD)
#: MaskCLIP's mmseg 0.x test pipeline: ImageNet normalisation (its ``img_norm_cfg``).
MMSEG_IMAGENET_STEPS = ImageSteps(
    name="mmseg_imagenet",
    description="mmseg 0.x (MaskCLIP): OpenCV decoding, OpenCV bilinear on uint8 (mmcv imrescale), "
                "mmcv imnormalize with ImageNet's mean (123.675, 116.28, 103.53) and std (58.395, 57.12, 57.375)",
    decoder="opencv", resize="opencv_linear", normalization="reciprocal", mean=IMAGENET_MEAN, std=IMAGENET_STD)

#: Image steps by name.
IMAGE_STEPS: dict[str, ImageSteps] = {s.name: s for s in (GEM_STEPS, MMSEG_STEPS, MMSEG_IMAGENET_STEPS)}


def get_image_steps(name_or_steps) -> ImageSteps:
    """:class:`ImageSteps` by name (``"gem"``, ``"mmseg"``, ``"mmseg_imagenet"``), or the one given."""
    if isinstance(name_or_steps, ImageSteps):
        return name_or_steps
    if name_or_steps not in IMAGE_STEPS:
        raise ValueError(f"unknown image steps {name_or_steps!r}; choose one of {', '.join(IMAGE_STEPS)}")
    return IMAGE_STEPS[name_or_steps]
