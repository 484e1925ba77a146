"""The batch job's output: Parquet part files, the JSON manifest, and :func:`load_results`.

Layout of an output directory::

    DIR/manifest.json        what was run (model, method, options, templates, prompts, version, counts)
    DIR/parts/part-NNNNN.parquet   one row per input image (see SCHEMA); written whole, then renamed
    DIR/errors.jsonl         one JSON object per image that could not be used (index, path, error)

Any Parquet reader opens ``DIR/parts`` (pandas, pyarrow, polars, DuckDB, Spark).
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
import pathlib
import tempfile
from typing import Any, Iterator

import numpy as np

MANIFEST = "manifest.json"
PARTS = "parts"
ERRORS = "errors.jsonl"
FORMAT = "gem-jax-batch"
FORMAT_VERSION = 1

#: The columns of a part file (README "Batch inference" shows how to read them).
SCHEMA = {
    "index": "int64: position of the image in the job's sorted input list",
    "path": "string: the input path as given; TAR::MEMBER for a member of a .tar shard",
    "error": "string: why the image could not be used (null when it was; then the columns below are null)",
    "height": "int32: the image's own height (after EXIF orientation)",
    "width": "int32: the image's own width",
    "input_height": "int32: the model input height",
    "input_width": "int32: the model input width",
    "grid_height": "int32: patch rows h (input_height / patch size)",
    "grid_width": "int32: patch columns w",
    "prompts": "list<string>: the prompts, in the order of the logits",
    "logits": "list<float16|float32>: patch-grid cosine logits (P, h, w), flattened in C order",
    "labels_png": "binary (with --labels): label map at the image's own size, a PNG (8-bit, 16-bit "
                  "beyond 255 prompts): 0 background, k + 1 prompt k",
    "heatmaps": "list<float16|float32> (with --heatmaps): min-max heatmaps (P, input_height, input_width), "
                "flattened in C order",
}


def arrow_schema(logits_dtype: str, labels: bool, heatmaps: bool):
    """The Arrow schema of a part file."""
    import pyarrow as pa

    value = pa.float16() if logits_dtype == "float16" else pa.float32()
    fields = [pa.field("index", pa.int64(), nullable=False), pa.field("path", pa.string(), nullable=False),
              pa.field("error", pa.string())]
    fields += [pa.field(n, pa.int32()) for n in ("height", "width", "input_height", "input_width",
                                                 "grid_height", "grid_width")]
    fields += [pa.field("prompts", pa.list_(pa.string())), pa.field("logits", pa.list_(value))]
    if labels:
        fields.append(pa.field("labels_png", pa.binary()))
    if heatmaps:
        fields.append(pa.field("heatmaps", pa.large_list(value)))
    return pa.schema(fields)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def readable(path) -> None:
    """Gives a file made by ``mkstemp`` (0600) the permissions of an ordinary new file."""
    os.chmod(path, 0o666 & ~_umask())


def write_atomic(path: pathlib.Path, data: bytes) -> None:
    """Writes ``data`` to a temporary sibling and renames it over ``path``."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        readable(tmp)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        pathlib.Path(tmp).unlink(missing_ok=True)
        raise


def part_path(out_dir: pathlib.Path, part: int) -> pathlib.Path:
    return out_dir / PARTS / f"part-{part:05d}.parquet"


def _upsample(grid: np.ndarray, hw: tuple[int, int]) -> np.ndarray:
    """(P, h, w) -> (P, H, W) bilinear, half-pixel centres: the matrices GEM upsamples with."""
    from gem_jax.models.layers import resize_matrix

    grid = np.asarray(grid, np.float32)
    if grid.shape[-2:] == tuple(hw):
        return grid
    my = resize_matrix(grid.shape[-2], hw[0], "bilinear").astype(np.float64)
    mx = resize_matrix(grid.shape[-1], hw[1], "bilinear").astype(np.float64)
    return np.einsum("Hh,phw,Ww->pHW", my, grid.astype(np.float64), mx).astype(np.float32)


def _min_max(maps: np.ndarray) -> np.ndarray:
    lo = maps.min(axis=(-2, -1), keepdims=True)
    span = maps.max(axis=(-2, -1), keepdims=True) - lo
    return np.where(span > 0, (maps - lo) / np.where(span > 0, span, 1.0), 0.0).astype(np.float32)


@dataclasses.dataclass
class Record:
    """One image of a batch job's output.

    Attributes:
      index: position in the job's sorted input list.
      path: the input path as given (``TAR::MEMBER`` for tar shards).
      error: why the image failed, or ``None``.
      original_size, input_size, grid_size: (height, width) of the image, of the model
        input and of the patch grid.
      prompts: the prompts, in the order of the logits.
      grid_logits: the stored patch-grid logits (P, h, w), float16 or float32.
    """

    index: int
    path: str
    error: str | None
    original_size: tuple[int, int] | None
    input_size: tuple[int, int] | None
    grid_size: tuple[int, int] | None
    prompts: list[str] | None
    grid_logits: np.ndarray | None
    _labels_png: bytes | None = None
    _heatmaps: np.ndarray | None = None

    def _size(self, size) -> tuple[int, int]:
        if size is None:
            return self.input_size
        if size == "original":
            return self.original_size
        if isinstance(size, int):
            return (size, size)
        return tuple(size)

    def logits(self, size=None) -> np.ndarray:
        """Cosine logits (P, H, W) upsampled bilinearly as :meth:`GEM.heatmaps` does, to
        ``size``: ``None`` for the model input size (what ``GEM.heatmaps`` returns), an int
        or (H, W), or ``"original"`` for the image's own size."""
        if self.error is not None:
            raise ValueError(f"{self.path} has no results: {self.error}")
        return _upsample(self.grid_logits, self._size(size))

    def heatmaps(self, size=None) -> np.ndarray:
        """:meth:`logits` min-max scaled per prompt to [0, 1] (as :meth:`GEM.heatmaps`)."""
        return _min_max(self.logits(size))

    def stored_heatmaps(self) -> np.ndarray:
        """The full-size heatmaps written with ``--heatmaps`` (P, input H, input W)."""
        if self._heatmaps is None:
            raise ValueError("this job was run without --heatmaps")
        return self._heatmaps

    def labels(self) -> np.ndarray:
        """The label map written with ``--labels`` at the image's own size: 0 background,
        ``k + 1`` prompt k."""
        if self._labels_png is None:
            raise ValueError("this job was run without --labels" if self.error is None
                             else f"{self.path} has no results: {self.error}")
        from PIL import Image

        with Image.open(io.BytesIO(self._labels_png)) as im:
            return np.asarray(im).astype(np.int32)


class Results:
    """A batch job's output directory: iterate it for :class:`Record` objects.

    Records come part by part (parts in input order); within a part, images in the
    order their batches finished, failed images last. ``errors=True`` also yields the
    failed images (their ``error`` is set).
    """

    def __init__(self, directory, errors: bool = False):
        self.directory = pathlib.Path(directory)
        path = self.directory / MANIFEST
        if not path.is_file():
            raise FileNotFoundError(f"{self.directory} is not a gem-jax batch output (no {MANIFEST})")
        self.manifest: dict = json.loads(path.read_text("utf-8"))
        self.include_errors = errors

    @property
    def part_files(self) -> list[pathlib.Path]:
        """The complete part files, in part order."""
        return sorted((self.directory / PARTS).glob("part-*.parquet"))

    def __iter__(self) -> Iterator[Record]:
        import pyarrow.parquet as pq

        for f in self.part_files:
            pf = pq.ParquetFile(f)
            for batch in pf.iter_batches(batch_size=64):
                for row in batch.to_pylist():
                    if row["error"] is not None and not self.include_errors:
                        continue
                    yield _record(row)

    def errors(self) -> list[dict]:
        """``{"index", "path", "error"}`` of every failed image in the complete parts."""
        import pyarrow.parquet as pq

        out = []
        for f in self.part_files:
            t = pq.read_table(f, columns=["index", "path", "error"]).to_pylist()
            out.extend(r for r in t if r["error"] is not None)
        return sorted(out, key=lambda r: r["index"])


def _record(row: dict) -> Record:
    if row["error"] is not None:
        return Record(row["index"], row["path"], row["error"], None, None, None, None, None)
    grid = (row["grid_height"], row["grid_width"])
    inp = (row["input_height"], row["input_width"])
    prompts = row["prompts"]
    logits = np.asarray(row["logits"]).reshape(len(prompts), *grid)
    heat = row.get("heatmaps")
    if heat is not None:
        heat = np.asarray(heat).reshape(len(prompts), *inp)
    return Record(row["index"], row["path"], None, (row["height"], row["width"]), inp, grid, prompts, logits,
                  row.get("labels_png"), heat)


def load_results(directory, errors: bool = False) -> Results:
    """Opens a ``gem-jax batch`` output directory: iterate it for :class:`Record` objects
    (``.path``, ``.logits(size)``, ``.heatmaps(size)``, ``.labels()``); ``.manifest`` is
    the job's manifest and ``.errors()`` lists the images that failed."""
    return Results(directory, errors=errors)


def read_manifest(out_dir: pathlib.Path) -> dict | None:
    path = out_dir / MANIFEST
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text("utf-8"))
    except (OSError, ValueError) as e:
        raise ValueError(f"{path} is unreadable ({e}); pass --force to start over") from None


def dump_json(doc: Any) -> bytes:
    return (json.dumps(doc, indent=2, sort_keys=False) + "\n").encode("utf-8")
