"""The batch job's output directory: the manifest, the part files and their records, the
errors, the lock, and reading it back (:func:`load_results`).

Layout of an output directory::

    DIR/manifest.json        what was run (model, method, options, templates, prompts, version), and
                             every complete part with its row count and sha256
    DIR/parts/part-NNNNN.parquet   one row per input image (see SCHEMA); written whole, then renamed
    DIR/parts/_pending/part-NNNNN/piece-MMMMM.parquet   finished images of a part still in progress
    DIR/errors.jsonl         one JSON object per image that could not be used (index, path, error)
    DIR/.gem-jax-files.jsonl the files gem-jax wrote here (``--force`` deletes only these)

Any Parquet reader opens ``DIR/parts`` (pandas, pyarrow, polars, DuckDB, Spark; names starting
with ``_`` or ``.`` are skipped by their dataset readers).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import io
import json
import os
import pathlib
from typing import Iterator

import numpy as np

from gem_jax import files, postprocess
from gem_jax.engine.tower import min_max

MANIFEST = "manifest.json"
PARTS = "parts"
PENDING = "_pending"
ERRORS = "errors.jsonl"
FORMAT = "gem-jax-batch"
FORMAT_VERSION = 2
#: What a job stores per image besides the labels and heatmaps it is asked for.
STORES = ("logits", "topk", "labels")

#: The columns of a part file (docs/BATCH.md shows how to read them).
SCHEMA = {
    "index": "int64: position of the image in the job's sorted input list",
    "path": "string: the input path as given; TAR::MEMBER for a member of a .tar shard (bytes that are not "
            "UTF-8 appear as \\xNN escapes; path_bytes then holds the exact name)",
    "path_bytes": "binary: the exact path when it is not UTF-8 (else null)",
    "error": "string: why the image could not be used (null when it was; then the columns below are null)",
    "height": "int32: the image's own height (after EXIF orientation)",
    "width": "int32: the image's own width",
    "input_height": "int32: the model input height",
    "input_width": "int32: the model input width",
    "grid_height": "int32: patch rows h (input_height / patch size)",
    "grid_width": "int32: patch columns w",
    "logits": "list<float16|float32> (--store logits, the default): patch-grid cosine logits (P, h, w), "
              "flattened in C order; the prompts are the manifest's",
    "topk_index": "list<int32> (--store topk): the K best prompts per patch (h, w, K), best first, as indices "
                  "into the manifest's prompts",
    "topk_logits": "list<float16|float32> (--store topk): their cosine logits (h, w, K)",
    "labels_png": "binary (with --labels or --classes, or --store labels): label map at the image's own size, "
                  "a PNG (8-bit, 16-bit beyond 255 classes): 0 background, k + 1 class k",
    "heatmaps": "list<float16|float32> (with --heatmaps): min-max heatmaps (P, input_height, input_width), "
                "flattened in C order",
}


def arrow_schema(store: str, logits_dtype: str, labels: bool, heatmaps: bool):
    """The Arrow schema of a part file."""
    import pyarrow as pa

    value = pa.float16() if logits_dtype == "float16" else pa.float32()
    fields = [pa.field("index", pa.int64(), nullable=False), pa.field("path", pa.string(), nullable=False),
              pa.field("path_bytes", pa.binary()), pa.field("error", pa.string())]
    fields += [pa.field(n, pa.int32()) for n in ("height", "width", "input_height", "input_width",
                                                 "grid_height", "grid_width")]
    if store == "logits":
        fields.append(pa.field("logits", pa.list_(value)))
    elif store == "topk":
        fields += [pa.field("topk_index", pa.list_(pa.int32())), pa.field("topk_logits", pa.list_(value))]
    if labels or store == "labels":
        fields.append(pa.field("labels_png", pa.binary()))
    if heatmaps:
        fields.append(pa.field("heatmaps", pa.large_list(value)))
    return pa.schema(fields)


def part_path(out_dir: pathlib.Path, part: int) -> pathlib.Path:
    return pathlib.Path(out_dir) / PARTS / f"part-{part:05d}.parquet"


def pending_dir(out_dir: pathlib.Path, part: int) -> pathlib.Path:
    return pathlib.Path(out_dir) / PARTS / PENDING / f"part-{part:05d}"


def sha256_file(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def display_path(raw: str) -> tuple[str, bytes | None]:
    """A path as the ``path`` column holds it (valid UTF-8, undecodable bytes as ``\\xNN``) and
    its exact bytes when they are not UTF-8."""
    try:
        raw.encode("utf-8")
        return raw, None
    except UnicodeEncodeError:
        exact = raw.encode("utf-8", "surrogateescape")
        return exact.decode("utf-8", "backslashreplace"), exact


class JobError(Exception):
    """The job cannot be run as asked (the message says why in one sentence)."""


# ----------------------------------------------------------------------------- the manifest


def read_manifest(out_dir: pathlib.Path) -> dict | None:
    """The manifest of ``out_dir``, ``None`` when there is none; :class:`JobError` when it is
    not a gem-jax batch manifest or cannot be read."""
    path = pathlib.Path(out_dir) / MANIFEST
    if not path.exists():
        return None
    try:
        doc = json.loads(path.read_text("utf-8"))
    except (OSError, ValueError) as e:
        raise JobError(f"{path} cannot be read as a gem-jax batch manifest ({type(e).__name__}); it is left "
                       "alone: move it away or choose another --out") from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise JobError(f"{path} is not a gem-jax batch manifest; it is left alone: move it away or choose "
                       "another --out")
    if doc.get("version") != FORMAT_VERSION:
        raise JobError(f"{path} is a batch manifest of format version {doc.get('version')!r}; this gem-jax "
                       f"writes version {FORMAT_VERSION}: use another --out (or an older gem-jax to resume it)")
    return doc


@contextlib.contextmanager
def manifest_lock(out_dir: pathlib.Path):
    """Serialises read-modify-write of the manifest between the processes of a job."""
    import fcntl

    fd = os.open(pathlib.Path(out_dir) / f".{MANIFEST}.lock", os.O_RDWR | os.O_CREAT, 0o666)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def write_manifest(out_dir: pathlib.Path, doc: dict) -> None:
    files.write_json(pathlib.Path(out_dir) / MANIFEST, doc, record=True)


def record_part(out_dir: pathlib.Path, part: int, rows: int, errors: int) -> None:
    """Notes a complete part in the manifest: its rows, errors and checksum."""
    path = part_path(out_dir, part)
    entry = {"rows": rows, "errors": errors, "bytes": path.stat().st_size, "sha256": sha256_file(path)}
    with manifest_lock(out_dir):
        doc = read_manifest(out_dir)
        doc.setdefault("complete_parts", {})[path.name] = entry
        write_manifest(out_dir, doc)


class ShardLock:
    """An exclusive lock of one shard of a job on its output directory, held while the process
    lives (the operating system drops it when the process dies, ``kill -9`` included)."""

    def __init__(self, out_dir: pathlib.Path, index: int, count: int):
        self.path = pathlib.Path(out_dir) / f".lock-shard-{index}-of-{count}"
        self.fd = None
        self.index, self.count = index, count

    def acquire(self) -> None:
        import fcntl

        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            try:
                holder = os.read(fd, 200).decode("utf-8", "replace").strip()
            except OSError:
                holder = ""
            os.close(fd)
            who = f" ({holder})" if holder else ""
            raise JobError(f"another gem-jax batch is running on {self.path.parent} (shard {self.index}/"
                           f"{self.count}{who}); wait for it to finish, or use another --out") from None
        import socket

        os.ftruncate(fd, 0)
        os.write(fd, f"pid {os.getpid()} on {socket.gethostname()}".encode())
        self.fd = fd

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


# ----------------------------------------------------------------------------- ownership


def owned_job_files(out_dir: pathlib.Path) -> list[pathlib.Path]:
    """Every file in ``out_dir`` (and its parts) that a batch job recorded as its own."""
    out_dir = pathlib.Path(out_dir)
    found = [out_dir / n for n in files.Ledger(out_dir).names()]
    parts = out_dir / PARTS
    if parts.is_dir():
        found += [p for p in sorted(parts.iterdir()) if files.Ledger(parts).recorded(p)]
        pending = parts / PENDING
        if pending.is_dir():
            for d in sorted(pending.iterdir()):
                if d.is_dir():
                    found += [d / n for n in files.Ledger(d).names()]
    return found


def foreign_files(out_dir: pathlib.Path) -> list[pathlib.Path]:
    """Files where a batch job would write that it did not write (the manifest, the errors,
    part files): a job refuses to start over or resume over them."""
    out_dir = pathlib.Path(out_dir)
    out: list[pathlib.Path] = []
    ledger = files.Ledger(out_dir)
    for name in (MANIFEST, ERRORS):
        p = out_dir / name
        if os.path.lexists(p) and not ledger.owned(p):
            out.append(p)
    parts = out_dir / PARTS
    if parts.is_dir():
        pl = files.Ledger(parts)
        for p in sorted(parts.iterdir()):
            # a part the job recorded writing is its own, even damaged since (it is then redone)
            if p.name.startswith("part-") and p.name.endswith(".parquet") and not pl.recorded(p):
                out.append(p)
    return out


def clear_job(out_dir: pathlib.Path) -> list[pathlib.Path]:
    """Deletes the files a batch job recorded as its own in ``out_dir`` (``--force``), nothing
    else; returns them."""
    removed = []
    for p in owned_job_files(out_dir):
        if p.parent.name == PARTS and files.Ledger(p.parent).recorded(p):
            p.unlink(missing_ok=True)  # a part of the job's, damaged or not
            files.Ledger(p.parent).forget(p)
            removed.append(p)
        elif files.remove_owned(p):
            removed.append(p)
    pending = pathlib.Path(out_dir) / PARTS / PENDING
    if pending.is_dir():
        for d in pending.iterdir():
            if d.is_dir():
                files.remove_stale(d)
                _rmdir_if_only_ledger(d)
        _rmdir_if_only_ledger(pending)
    return removed


def _rmdir_if_only_ledger(d: pathlib.Path) -> None:
    try:
        names = {p.name for p in d.iterdir()}
    except OSError:
        return
    if names <= {files.LEDGER}:
        with contextlib.suppress(OSError):
            (d / files.LEDGER).unlink(missing_ok=True)
            d.rmdir()


# ----------------------------------------------------------------------------- reading back


def _upsample(grid: np.ndarray, hw: tuple[int, int]) -> np.ndarray:
    """(P, h, w) -> (P, H, W) bilinear, half-pixel centres: the matrices GEM upsamples with."""
    return postprocess.resize_maps(grid, hw)


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
      grid_logits: the stored patch-grid logits (P, h, w), float16 or float32 (``None``
        unless the job stored logits).
      topk_index, topk_logits: the stored top prompts per patch (h, w, K) and their logits
        (``None`` unless the job stored them).
    """

    index: int
    path: str
    error: str | None
    original_size: tuple[int, int] | None
    input_size: tuple[int, int] | None
    grid_size: tuple[int, int] | None
    prompts: list[str] | None
    grid_logits: np.ndarray | None
    topk_index: np.ndarray | None = None
    topk_logits: np.ndarray | None = None
    labels_png: bytes | None = dataclasses.field(default=None, repr=False)
    stored_heatmaps_array: np.ndarray | None = dataclasses.field(default=None, repr=False)

    def __repr__(self) -> str:
        if self.error is not None:
            return f"Record({self.index}, {self.path!r}, error={self.error!r})"
        stored = [k for k, v in (("logits", self.grid_logits), ("topk", self.topk_index),
                                 ("labels", self.labels_png), ("heatmaps", self.stored_heatmaps_array))
                  if v is not None]
        return (f"Record({self.index}, {self.path!r}, {self.original_size[0]}x{self.original_size[1]} -> "
                f"{self.input_size[0]}x{self.input_size[1]}, {len(self.prompts)} prompt(s), "
                f"stored: {', '.join(stored)})")

    def _size(self, size) -> tuple[int, int]:
        if size is None:
            return self.input_size
        if size == "original":
            return self.original_size
        if isinstance(size, int):
            return (size, size)
        return tuple(size)

    def _check(self) -> None:
        if self.error is not None:
            raise ValueError(f"{self.path} has no results: {self.error}")

    def logits(self, size=None) -> np.ndarray:
        """Cosine logits (P, H, W) upsampled bilinearly as :meth:`GEM.heatmaps` does, to
        ``size``: ``None`` for the model input size (what ``GEM.heatmaps`` returns), an int
        or (H, W), or ``"original"`` for the image's own size."""
        self._check()
        if self.grid_logits is None:
            raise ValueError("this job stored no logits (--store topk or labels): use topk() or labels()")
        return _upsample(self.grid_logits, self._size(size))

    def heatmaps(self, size=None) -> np.ndarray:
        """:meth:`logits` min-max scaled per prompt to [0, 1] (as :meth:`GEM.heatmaps`)."""
        return min_max(self.logits(size)).astype(np.float32)

    def topk(self) -> tuple[np.ndarray, np.ndarray]:
        """The stored top prompts per patch: (indices (h, w, K) into ``prompts``, their logits)."""
        self._check()
        if self.topk_index is None:
            raise ValueError("this job stored no top-k prompts (run it with --store topk)")
        return self.topk_index, self.topk_logits

    def stored_heatmaps(self) -> np.ndarray:
        """The full-size heatmaps written with ``--heatmaps`` (P, input H, input W)."""
        if self.stored_heatmaps_array is None:
            raise ValueError("this job was run without --heatmaps")
        return self.stored_heatmaps_array

    def labels(self) -> np.ndarray:
        """The label map written with ``--labels`` at the image's own size: 0 background,
        ``k + 1`` class k."""
        if self.labels_png is None:
            raise ValueError("this job stored no label maps (--labels, --classes or --store labels)"
                             if self.error is None else f"{self.path} has no results: {self.error}")
        from PIL import Image

        with Image.open(io.BytesIO(self.labels_png)) as im:
            return np.asarray(im).astype(np.int32)


class Results:
    """A batch job's output directory, as a sequence of :class:`Record` objects (images that
    failed are left out unless ``errors=True``).

    ``len(results)``, ``results[i]``, iteration, ``results.to_pandas()`` (one row per image,
    the scalar columns), ``results.manifest`` and ``results.errors()``. Records come in input
    order; only complete parts are read.
    """

    def __init__(self, directory, errors: bool = False):
        self.directory = pathlib.Path(directory)
        path = self.directory / MANIFEST
        if not path.is_file():
            raise FileNotFoundError(f"{self.directory} is not a gem-jax batch output (no {MANIFEST})")
        try:
            self.manifest: dict = json.loads(path.read_text("utf-8"))
        except ValueError as e:
            raise ValueError(f"{path} is not a readable gem-jax batch manifest: {e}") from None
        if not isinstance(self.manifest, dict) or self.manifest.get("format") != FORMAT:
            raise ValueError(f"{path} is not a gem-jax batch manifest")
        self.include_errors = errors
        self._index: list[tuple[pathlib.Path, int]] | None = None

    @property
    def prompts(self) -> list[str]:
        """The job's prompts, in the order of the logits."""
        return list(self.manifest["spec"]["prompts"])

    @property
    def part_files(self) -> list[pathlib.Path]:
        """The complete part files, in part order."""
        return sorted((self.directory / PARTS).glob("part-*.parquet"))

    def _rows(self) -> list[tuple[pathlib.Path, int]]:
        """(part file, row) of every record, in input order."""
        if self._index is None:
            import pyarrow.parquet as pq

            rows = []
            for f in self.part_files:
                t = pq.read_table(f, columns=["index", "error"]).to_pydict()
                rows += [(idx, f, r) for r, (idx, err) in enumerate(zip(t["index"], t["error"]))
                         if err is None or self.include_errors]
            self._index = [(f, r) for _, f, r in sorted(rows, key=lambda x: x[0])]
        return self._index

    def __len__(self) -> int:
        return len(self._rows())

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        rows = self._rows()
        if not -len(rows) <= i < len(rows):
            raise IndexError(f"record {i} of {len(rows)}")
        f, r = rows[i]
        import pyarrow.parquet as pq

        row = pq.read_table(f).slice(r, 1).to_pylist()[0]
        return self._record(row)

    def __iter__(self) -> Iterator[Record]:
        import pyarrow.parquet as pq

        rows = []
        for f in self.part_files:
            pf = pq.ParquetFile(f)
            for batch in pf.iter_batches(batch_size=64):
                for row in batch.to_pylist():
                    if row["error"] is not None and not self.include_errors:
                        continue
                    rows.append(row)
            rows.sort(key=lambda row: row["index"])
            yield from (self._record(row) for row in rows)
            rows = []

    def __repr__(self) -> str:
        spec = self.manifest.get("spec", {})
        counts = self.manifest.get("counts", {})
        method = spec.get("gem", {}).get("method", {}).get("name", "?")
        model = spec.get("gem", {}).get("model", {}).get("name", "?")
        random = ", RANDOM weights" if spec.get("gem", {}).get("model", {}).get("random_weights") else ""
        return (f"Results({str(self.directory)!r}: {len(self)} record(s), {len(spec.get('prompts', []))} "
                f"prompt(s), {method} on {model}{random}, complete={counts.get('complete', False)})")

    def _record(self, row: dict) -> Record:
        prompts = self.prompts
        path = row["path"] if row.get("path_bytes") is None else os.fsdecode(row["path_bytes"])
        if row["error"] is not None:
            return Record(row["index"], path, row["error"], None, None, None, None, None)
        grid = (row["grid_height"], row["grid_width"])
        inp = (row["input_height"], row["input_width"])
        logits = row.get("logits")
        if logits is not None:
            logits = np.asarray(logits).reshape(len(prompts), *grid)
        topk_index = topk_logits = None
        if row.get("topk_index") is not None:
            k = len(row["topk_index"]) // (grid[0] * grid[1])
            topk_index = np.asarray(row["topk_index"], np.int32).reshape(*grid, k)
            topk_logits = np.asarray(row["topk_logits"]).reshape(*grid, k)
        heat = row.get("heatmaps")
        if heat is not None:
            heat = np.asarray(heat).reshape(len(prompts), *inp)
        return Record(row["index"], path, None, (row["height"], row["width"]), inp, grid, prompts, logits,
                      topk_index, topk_logits, row.get("labels_png"), heat)

    def errors(self) -> list[dict]:
        """``{"index", "path", "error"}`` of every failed image in the complete parts."""
        import pyarrow.parquet as pq

        out = []
        for f in self.part_files:
            t = pq.read_table(f, columns=["index", "path", "error"]).to_pylist()
            out.extend(r for r in t if r["error"] is not None)
        return sorted(out, key=lambda r: r["index"])

    def to_pandas(self):
        """One row per image with the scalar columns (index, path, error, sizes), no arrays."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        cols = ["index", "path", "error", "height", "width", "input_height", "input_width", "grid_height",
                "grid_width"]
        tables = [pq.read_table(f, columns=cols) for f in self.part_files]
        if not tables:
            import pandas as pd

            return pd.DataFrame(columns=cols)
        t = pa.concat_tables(tables).sort_by("index")
        if not self.include_errors:
            import pyarrow.compute as pc

            t = t.filter(pc.is_null(t["error"]))
        return t.to_pandas()


def load_results(directory, errors: bool = False) -> Results:
    """Opens a ``gem-jax batch`` output directory: a sequence of :class:`Record` objects
    (``.path``, ``.logits(size)``, ``.heatmaps(size)``, ``.labels()``, ``.topk()``);
    ``.manifest`` is the job's manifest, ``.errors()`` lists the images that failed and
    ``.to_pandas()`` gives a table of the scalar columns."""
    return Results(directory, errors=errors)


def remove_tree_owned(d: pathlib.Path) -> None:
    """Removes a pending part directory's files that gem-jax wrote, then the directory (and the
    pending directory above it) if nothing else is left."""
    for n in files.Ledger(d).names():
        files.remove_owned(d / n)
    files.remove_stale(d)
    _rmdir_if_only_ledger(d)
    with contextlib.suppress(OSError):
        d.parent.rmdir()  # only when empty
