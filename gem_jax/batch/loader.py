"""The streaming input pipeline: images decoded, resized and normalised on host worker
threads while the device computes, through a bounded, ordered prefetch queue.

Two interchangeable back ends give the same items in the same order: a plain thread
pool (:func:`stream_threads`, the default) and grain (:func:`stream_grain`). Both run
:func:`decode` on threads: Pillow's decoders and resizers release the GIL, so threads
overlap with each other and with XLA, and no pixels are copied between processes.
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import itertools
import os
import re
from typing import Callable, Iterable, Iterator, Sequence

import numpy as np
from PIL import Image, UnidentifiedImageError

from gem_jax import preprocess
from gem_jax.batch.inputs import Item

LOADERS = ("thread", "grain")


@dataclasses.dataclass
class Decoded:
    """One input after decoding.

    Attributes:
      index: its position in the job's sorted input list.
      item: the input.
      pixels: normalised float32 (H, W, 3) at the model input size; ``None`` on error.
      original_hw: the image's own (height, width) after EXIF orientation.
      input_hw: the model input (height, width).
      error: why the image could not be used, or ``None``.
      image: the decoded uint8 (H, W, 3) image itself, with ``Sizing(keep_image=True)``
        (for callers that draw on it, such as overlays).
    """

    index: int
    item: Item
    pixels: np.ndarray | None = None
    original_hw: tuple[int, int] | None = None
    input_hw: tuple[int, int] | None = None
    error: str | None = None
    image: np.ndarray | None = None


@dataclasses.dataclass(frozen=True)
class Sizing:
    """How images are sized for the model (see :func:`gem_jax.preprocess.target_size`).

    Attributes:
      size: int or (H, W), or ``None``.
      short_side: int or ``None``.
      patch_size: the model's patch size.
      max_pixels: images with more pixels than this are refused before decoding
        (decompression bombs).
      keep_image: also hand over the decoded uint8 image (:attr:`Decoded.image`).
      max_long_side: with ``short_side``, the long side's cap (as :class:`gem_jax.GEM`'s).
    """

    size: int | tuple[int, int] | None
    short_side: int | None
    patch_size: int
    max_pixels: int = Image.MAX_IMAGE_PIXELS or 89_478_485
    keep_image: bool = False
    max_long_side: int | None = None


def decode(item: Item, index: int, sizing: Sizing) -> Decoded:
    """Reads, decodes, resizes and normalises one image exactly as :meth:`GEM.heatmaps` does.

    Never raises for a bad image: the reason is in ``error``.
    """
    if item.error is not None:
        return Decoded(index, item, error=item.error)
    try:
        if item.size == 0 or (item.offset is None and os.path.getsize(item.file) == 0):
            raise preprocess.ImageError("the file is empty (0 bytes)")
        with item.open() as f, Image.open(f) as im:
            w, h = im.size
            if w * h > sizing.max_pixels:
                raise preprocess.ImageError(f"{w}x{h} is {w * h:,} pixels, more than the limit of "
                                            f"{sizing.max_pixels:,} (--max-pixels)")
            rgb = preprocess.load_image(im)
        hw = preprocess.target_size(*rgb.shape[:2], size=sizing.size, short_side=sizing.short_side,
                                    patch_size=sizing.patch_size,
                                    max_long_side=sizing.max_long_side if sizing.short_side is not None else None)
        pixels = preprocess.normalize(preprocess.resize(rgb, hw))
        return Decoded(index, item, pixels, tuple(rgb.shape[:2]), hw, image=rgb if sizing.keep_image else None)
    except preprocess.ImageError as e:
        return Decoded(index, item, error=str(e).replace("PIL image", "image"))
    except Image.DecompressionBombError as e:  # Pillow refuses at open, before our own check
        found = re.search(r"\((\d+) pixels\)", str(e))
        size = f"{int(found.group(1)):,} pixels" if found else "too many pixels"
        return Decoded(index, item, error=f"{size}, more than the limit of {sizing.max_pixels:,} (--max-pixels)")
    except UnidentifiedImageError:
        return Decoded(index, item, error="not an image Pillow can read (unknown format or corrupt header)")
    except Exception as e:  # unreadable file, corrupt data, Pillow's own bomb error, ...
        text = " ".join(str(e).split()) or type(e).__name__
        return Decoded(index, item, error=f"cannot read: {text}")


def stream_threads(fn: Callable, inputs: Iterable, workers: int, prefetch: int) -> Iterator:
    """``map(fn, inputs)`` on ``workers`` threads, in order, at most ``prefetch`` results ahead."""
    pool = concurrent.futures.ThreadPoolExecutor(max_workers=workers, thread_name_prefix="gem-decode")
    pending: collections.deque = collections.deque()
    it = iter(inputs)
    try:
        for x in itertools.islice(it, max(prefetch, 1)):
            pending.append(pool.submit(fn, x))
        while pending:
            result = pending.popleft().result()
            for x in itertools.islice(it, 1):
                pending.append(pool.submit(fn, x))
            yield result
    finally:
        for f in pending:
            f.cancel()
        pool.shutdown(wait=False, cancel_futures=True)


def stream_grain(fn: Callable, inputs: Sequence, workers: int, prefetch: int) -> Iterator:
    """The same through grain: a ``MapDataset`` over ``inputs``, mapped on ``workers`` threads
    with a ``prefetch``-deep buffer."""
    import grain

    ds = grain.MapDataset.source(list(inputs)).map(fn)
    return iter(ds.to_iter_dataset(grain.ReadOptions(num_threads=workers, prefetch_buffer_size=max(prefetch, 1))))


def stream(items: Iterable[tuple[int, Item]], sizing: Sizing, *, workers: int, prefetch: int,
           loader: str = "thread") -> Iterator[Decoded]:
    """:class:`Decoded` images of ``items`` ((index, item) pairs), in order, decoded ahead
    (``items`` may be a generator for ``"thread"``; grain needs a sequence)."""
    fn = _Decode(sizing)
    if loader == "thread":
        return stream_threads(fn, items, workers, prefetch)
    if loader == "grain":
        return stream_grain(fn, items, workers, prefetch)
    raise ValueError(f"loader must be one of {LOADERS}, got {loader!r}")


@dataclasses.dataclass(frozen=True)
class _Decode:
    sizing: Sizing

    def __call__(self, pair):
        index, item = pair
        return decode(item, index, self.sizing)
