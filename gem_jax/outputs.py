"""What segment and the demo write: output names, the ``--save-logits`` ``.npz``, and maps
resized for display."""

from __future__ import annotations

import hashlib
import json
import pathlib
import re
import shutil
import zipfile
from typing import Sequence

import numpy as np
from PIL import Image

from gem_jax import files

#: Pictures are drawn at the image's own size up to this many pixels on the long side
#: (larger images are shown scaled down, keeping the aspect): an 8000 x 8000 photograph
#: would otherwise need gigabytes per overlay.
MAX_DISPLAY_SIDE = 2048


def slug(text: str) -> str:
    """``text`` as a file-name part: runs of other characters become ``_``, at most 60 characters."""
    return re.sub(r"[^A-Za-z0-9]+", "_", text).strip("_")[:60]


def prompt_name(prompt: str) -> str:
    """The file-name part of a prompt: its slug when that keeps everything (lower case, words
    joined by ``_``), else the slug plus a short hash, so names never collide, even on
    case-insensitive file systems, and do not depend on the other prompts."""
    s = slug(prompt).lower()
    if s and s not in ("grid", "labels") and s.replace("_", " ") == prompt:
        return s
    return f"{s or 'prompt'}-{hashlib.sha1(prompt.encode('utf-8', 'surrogatepass')).hexdigest()[:8]}"


def plan_outputs(paths, prompts, classes, out_dir: pathlib.Path, method: str):
    """Per image: (overlay paths per prompt, grid path, label path | None), all names distinct.

    Names are ``<image>__<method>__<prompt>.png``, ``<image>__<method>__grid.png`` and
    ``<image>__<method>__labels.png``: two methods can share an output directory."""
    plans, used = [], set()
    tag = slug(method).lower() or "method"
    for path in paths:
        base = slug(pathlib.Path(path).stem) or "image"
        stem, n = base, 0
        while stem.lower() in used:  # images of the same name from different folders
            n += 1
            stem = f"{base}_{n}"
        used.add(stem.lower())
        overlays = [out_dir / f"{stem}__{tag}__{prompt_name(p)}.png" for p in prompts]
        grid = out_dir / f"{stem}__{tag}__grid.png" if prompts else None
        labels = out_dir / f"{stem}__{tag}__labels.png" if classes else None
        plans.append((overlays, grid, labels))
    names = [str(p).lower() for plan in plans for p in (*plan[0], *plan[1:]) if p is not None]
    assert len(set(names)) == len(names), "output names collide"
    return plans


def display_size(hw: tuple[int, int], max_side: int | None = MAX_DISPLAY_SIDE) -> tuple[int, int]:
    """The size pictures of an image of size ``hw`` are drawn at: its own, or scaled down to
    ``max_side`` on the long side (aspect kept)."""
    h, w = int(hw[0]), int(hw[1])
    if max_side is None or max(h, w) <= max_side:
        return h, w
    scale = max_side / max(h, w)
    return max(1, round(h * scale)), max(1, round(w * scale))


def resize_image(image: np.ndarray, hw: tuple[int, int]) -> np.ndarray:
    """A uint8 (H, W, 3) image resized to ``hw`` for display (bilinear; unchanged at its size)."""
    if image.shape[:2] == tuple(hw):
        return image
    return np.asarray(Image.fromarray(image).resize(hw[::-1], Image.BILINEAR))


def to_display(maps, hw, nearest: bool = False):
    """(..., h, w) maps resized to (H, W) = ``hw`` for display (bilinear, or nearest for labels)."""
    maps = np.asarray(maps)
    if maps.shape[-2:] == tuple(hw):
        return maps
    resample = Image.NEAREST if nearest else Image.BILINEAR
    flat = maps.reshape(-1, *maps.shape[-2:])
    out = [np.asarray(Image.fromarray(m.astype(np.float32), mode="F").resize(hw[::-1], resample)) for m in flat]
    out = np.stack(out).reshape(*maps.shape[:-2], *hw)
    return out.astype(maps.dtype) if nearest else out


class LogitsWriter:
    """Writes the ``--save-logits`` ``.npz`` without holding every image's arrays: each image's
    logits and heatmaps go to ``.npy`` files in a temporary directory beside the target as
    they come, and :meth:`commit` streams them into the ``.npz``, atomically, through the one
    writer (the file is then recorded as gem-jax's). :meth:`abort` removes what is left.

    Schema: ``logits``/``heatmaps`` (N, P, H, W) when all inputs share a size, otherwise
    ``logits_<i>``/``heatmaps_<i>`` per image; plus ``prompts``, ``images``, ``sizes`` and
    ``description`` (a JSON string: :meth:`gem_jax.GEM.describe`, the model and the method
    with its options).
    """

    def __init__(self, path: pathlib.Path, prompts: Sequence[str], force: bool, description: dict | None = None):
        self.path, self.prompts, self.force = pathlib.Path(path), list(prompts), force
        self.description = description
        self.made = files.make_dirs(self.path.parent)
        files.remove_stale(self.path.parent)
        self.temp = files.make_temp_dir(self.path)
        self.images: list[str] = []
        self.sizes: list[tuple[int, int]] = []
        self.shapes: list = []

    def add(self, logits, heatmaps, image_path, size) -> None:
        """Stores one image's (P, H, W) logits and heatmaps."""
        i = len(self.images)
        np.save(self.temp / f"logits_{i}.npy", np.ascontiguousarray(logits))
        np.save(self.temp / f"heatmaps_{i}.npy", np.ascontiguousarray(heatmaps))
        self.images.append(str(image_path))
        self.sizes.append(tuple(size))
        self.shapes.append((logits.shape, logits.dtype, heatmaps.shape, heatmaps.dtype))

    def commit(self) -> None:
        """Assembles the ``.npz`` from the stored arrays and renames it into place."""
        files.check_writable(self.path, force=self.force)
        small = {"prompts": np.array(self.prompts), "images": np.array(self.images),
                 "sizes": np.array(self.sizes, dtype=np.int32).reshape(-1, 2),
                 "description": np.array(json.dumps(self.description or {}))}
        n = len(self.images)
        stacked = len(set(self.sizes)) == 1 and len(set(self.shapes)) == 1

        def copy_body(dst, name):  # an .npy file's data, without its header
            with open(self.temp / name, "rb") as src:
                if np.lib.format.read_magic(src) == (1, 0):
                    np.lib.format.read_array_header_1_0(src)
                else:
                    np.lib.format.read_array_header_2_0(src)
                while chunk := src.read(1 << 20):
                    dst.write(chunk)

        def write(f):
            with zipfile.ZipFile(f, mode="w", compression=zipfile.ZIP_STORED, allowZip64=True) as zf:
                for key, value in small.items():
                    with zf.open(f"{key}.npy", "w", force_zip64=True) as dst:
                        np.lib.format.write_array(dst, value, allow_pickle=False)
                if stacked:
                    for key, which in (("logits", 0), ("heatmaps", 2)):
                        shape, dtype = self.shapes[0][which], self.shapes[0][which + 1]
                        with zf.open(f"{key}.npy", "w", force_zip64=True) as dst:
                            header = {"descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": False,
                                      "shape": (n, *shape)}
                            np.lib.format.write_array_header_1_0(dst, header)
                            for i in range(n):
                                copy_body(dst, f"{key}_{i}.npy")
                else:
                    for i in range(n):
                        for key in ("logits", "heatmaps"):
                            with zf.open(f"{key}_{i}.npy", "w", force_zip64=True) as dst, \
                                    open(self.temp / f"{key}_{i}.npy", "rb") as src:
                                while chunk := src.read(1 << 20):
                                    dst.write(chunk)

        files.atomic_write(self.path, write, record=True)

    def abort(self) -> None:
        """Removes the temporary directory (and directories made for nothing)."""
        shutil.rmtree(self.temp, ignore_errors=True)
        files.remove_empty(self.made)


def save_logits(path, logits, heatmaps, prompts, paths, sizes, force: bool,
                description: dict | None = None) -> pathlib.Path:
    """Writes the ``--save-logits`` ``.npz`` (:class:`LogitsWriter`'s schema) of arrays already
    in memory."""
    path = pathlib.Path(path)
    files.check_writable(path, force=force)
    writer = LogitsWriter(path, prompts, force, description)
    try:
        for lg, hm, image_path, size in zip(logits, heatmaps, paths, sizes):
            writer.add(lg, hm, image_path, size)
        writer.commit()
    finally:
        writer.abort()
    return path
