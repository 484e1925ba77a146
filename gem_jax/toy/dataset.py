"""Toy scenes as a segmentation benchmark in PASCAL VOC's on-disk layout, and its reader.

:func:`write` makes ``JPEGImages/<id>.jpg`` (quality 95, no chroma subsampling),
``SegmentationClass/<id>.png`` (palette PNGs in VOC's colour map) and
``ImageSets/Segmentation/<split>.txt``, plus ``classes.txt``. The label of a pixel is
the index, in :func:`gem_jax.toy.scenes.class_names`, of what is visible there: one of
the five backgrounds (0-4) or one of the 30 object phrases (5-34). Every pixel has a
class (no background-by-threshold): the benchmark asks which named thing each pixel
shows. :func:`gem_jax.eval.datasets.toy` reads it (``gem-jax eval --dataset toy``).
"""

from __future__ import annotations

import pathlib
from typing import Sequence

import numpy as np
from PIL import Image

from gem_jax import files
from gem_jax.eval.datasets import voc_palette
from gem_jax.toy import scenes as scenes_lib

IMAGES, LABELS, SPLITS = "JPEGImages", "SegmentationClass", "ImageSets/Segmentation"


def write(root, seeds: Sequence[int], split: str = "val", size: int = scenes_lib.SIZE) -> pathlib.Path:
    """Writes the scenes of ``seeds`` under ``root`` (created if needed) as split ``split``; returns ``root``.

    Image ids are ``toy_<seed>``. Files are written whole and recorded as gem-jax's; one
    already there is replaced only if gem-jax wrote it (else :class:`gem_jax.files.OutputError`).
    """

    root = pathlib.Path(root)
    for d in (IMAGES, LABELS, SPLITS):
        (root / d).mkdir(parents=True, exist_ok=True)
    palette = voc_palette().reshape(-1).tolist()
    ids = []
    for seed in seeds:
        sc = scenes_lib.scene(int(seed), size)
        ident = f"toy_{int(seed)}"
        image = Image.fromarray(sc.image)
        files.write_owned(root / IMAGES / f"{ident}.jpg",
                          lambda f, im=image: im.save(f, format="JPEG", quality=95, subsampling=0), force=True)
        label = Image.fromarray(sc.label_map().astype(np.uint8), mode="P")
        label.putpalette(palette)
        files.write_owned(root / LABELS / f"{ident}.png", lambda f, im=label: im.save(f, format="PNG"), force=True)
        ids.append(ident)
    files.write_owned(root / SPLITS / f"{split}.txt", lambda f: f.write("".join(i + "\n" for i in ids).encode()),
                      force=True)
    names = scenes_lib.class_names()
    files.write_owned(root / "classes.txt", lambda f: f.write("".join(n + "\n" for n in names).encode()), force=True)
    return root

