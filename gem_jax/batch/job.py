"""The batch job: stream images through a method in fixed-shape batches into resumable Parquet parts.

What it guarantees (each through the shared services: :mod:`gem_jax.files` for writing and
ownership, :mod:`gem_jax.checks` for prompts, the GEM's memory guard):

- It replaces or deletes only files it recorded as its own; anything else in its way is
  refused, naming the file (``--force`` included).
- One process per shard at a time: a second run on the same ``--out`` and shard is refused
  while the first holds its lock (the lock dies with its process).
- Resumption is by content: the manifest records the weights' fingerprint (not how the
  model was named) and every complete part's row count and checksum; a damaged part is
  redone, and said so. Finished images of an interrupted part are kept (committed in pieces
  as they complete), and both the interruption and the rerun say how many.
"""

from __future__ import annotations

import dataclasses
import functools
import io
import json
import os
import pathlib
import time
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from gem_jax import checks, files, postprocess
from gem_jax.batch import inputs as inputs_lib
from gem_jax.batch import loader as loader_lib
from gem_jax.batch import store
from gem_jax.batch.store import JobError
from gem_jax.engine.tower import min_max
from gem_jax.models.layers import resize_2d
from gem_jax.pipeline import PROMPT_CHUNK
from gem_jax.progress import Progress, Terminated
from gem_jax.text import bucket

#: Images per device in one forward pass, by backend, when ``--batch-size`` is not given.
DEFAULT_BATCH_PER_DEVICE = {"cpu": 8, "gpu": 32, "cuda": 32, "rocm": 32, "tpu": 32}
#: Finished images of a part are committed as a piece at least this often (rows) ...
PIECE_ROWS = 256
#: ... or this often (seconds), and always when the run is interrupted.
PIECE_SECONDS = 60.0


@dataclasses.dataclass
class BatchOptions:
    """What a batch job writes and how it runs.

    Attributes:
      prompts: the prompts whose logits are stored.
      classes: class names for label maps (their logits are computed with the prompts';
        the label maps are of the classes). Default: the label maps are of the prompts.
      store: per image, ``"logits"`` (the patch-grid logits of every prompt), ``"topk"``
        (the ``top_k`` best prompts per patch and their logits: for large vocabularies) or
        ``"labels"`` (only the label map).
      top_k: K of ``store="topk"``.
      part_size: images per part file (the unit of sharding).
      batch_size: images per forward pass (rounded up to whole shards per device);
        ``None`` for the backend's default.
      logits_dtype: ``"float16"`` or ``"float32"`` for the stored logits (and heatmaps).
      labels: also store label maps at each image's own size (PNG bytes).
      background_threshold: with label maps: pixels whose top class probability is below
        this are background (``None``: never).
      heatmaps: also store full-size min-max heatmaps at the input size.
      workers: decoding threads (default: the CPU count, at most 16).
      prefetch: decoded images kept ready ahead of the device (default: two batches plus
        one per worker).
      loader: ``"thread"`` or ``"grain"``.
      max_pixels: images larger than this are recorded as errors without decoding.
      shard: (index, count); ``None``: JAX's process index and count.
      force: delete the files an earlier job in the directory recorded as its own, and
        start over.
    """

    prompts: Sequence[str]
    classes: Sequence[str] | None = None
    store: str = "logits"
    top_k: int = 5
    part_size: int = 1024
    batch_size: int | None = None
    logits_dtype: str = "float16"
    labels: bool = False
    background_threshold: float | None = 0.85
    heatmaps: bool = False
    workers: int | None = None
    prefetch: int | None = None
    loader: str = "thread"
    max_pixels: int = loader_lib.Sizing.max_pixels
    shard: tuple[int, int] | None = None
    force: bool = False


@dataclasses.dataclass
class Summary:
    """What :func:`run` did.

    Attributes:
      shard: (index, count).
      parts: the parts this shard owns; ``parts_written``: those completed by this call.
      images: images in this shard's parts; ``processed``: those this call went through;
        ``kept``: finished images of interrupted parts an earlier run left, not redone.
      errors: images of this shard that failed (in all its parts, including earlier runs).
      redone: parts found damaged (checksum or row count) and done again.
      job_complete: every part of the whole job (all shards) exists.
      elapsed_s: wall time of this call.
    """

    shard: tuple[int, int]
    parts: int
    parts_written: int
    images: int
    processed: int
    kept: int
    errors: int
    redone: list[int]
    job_complete: bool
    elapsed_s: float


class Interrupted(KeyboardInterrupt):
    """The job stopped on Ctrl-C or SIGTERM (``terminated``); the message says what was kept and
    what remains."""

    def __init__(self, message: str, terminated: bool = False):
        super().__init__(message)
        self.terminated = terminated


def default_shard() -> tuple[int, int]:
    """(process index, process count) of JAX (``jax.distributed`` when initialised; else 0/1)."""
    return jax.process_index(), jax.process_count()


def default_batch_size(mesh_size: int) -> int:
    """``--batch-size``'s default: a backend's per-device figure times the devices (one figure on CPU)."""
    backend = jax.default_backend()
    return DEFAULT_BATCH_PER_DEVICE.get(backend, 8) * (mesh_size if backend != "cpu" else 1)


def all_prompts(opts: BatchOptions) -> tuple[list[str], list[int] | None]:
    """The prompts whose logits are computed (the prompts, then classes not among them) and the
    column of each class (``None``: the label maps are of the prompts)."""
    prompts = list(opts.prompts)
    if not opts.classes:
        return prompts, None
    out = prompts + [c for c in dict.fromkeys(opts.classes) if c not in prompts]
    column = {p: i for i, p in enumerate(out)}
    return out, [column[c] for c in opts.classes]


def job_spec(gem, items: Sequence[inputs_lib.Item], opts: BatchOptions) -> dict:
    """Everything that decides the results: a rerun into the same directory must match it."""
    described = gem.describe()
    return json.loads(json.dumps({
        "gem": described,
        "prompts": list(opts.prompts) if opts.prompts else list(opts.classes or []),
        "classes": list(opts.classes) if opts.classes else None,
        "store": opts.store, "top_k": opts.top_k if opts.store == "topk" else None,
        "logits_dtype": opts.logits_dtype,
        "labels": bool(opts.labels or opts.classes or opts.store == "labels"),
        "background_threshold": opts.background_threshold,
        "heatmaps": opts.heatmaps,
        "max_pixels": opts.max_pixels,
        "inputs": {"count": len(items), "sha256": inputs_lib.fingerprint(items)},
        "part_size": opts.part_size,
    }))


#: Parts of the spec that do not decide the results (how the model was named, where from).
_NOT_COMPARED = (("gem", "model", "name"),)


def _comparable(spec: dict) -> dict:
    spec = json.loads(json.dumps(spec))
    for path in _NOT_COMPARED:
        d = spec
        for k in path[:-1]:
            d = d.get(k, {}) if isinstance(d, dict) else {}
        if isinstance(d, dict):
            d.pop(path[-1], None)
    return spec


def _differences(old, new, prefix="") -> list[str]:
    if isinstance(old, dict) and isinstance(new, dict):
        out = []
        for k in list(old) + [k for k in new if k not in old]:
            out += _differences(old.get(k), new.get(k), f"{prefix}{'.' if prefix else ''}{k}")
        return out
    if old == new:
        return []
    show = lambda v: (repr(v) if len(repr(v)) <= 60 else repr(v)[:57] + "...")  # noqa: E731
    return [f"{prefix} was {show(old)}, now {show(new)}"]


def check_output(out_dir, *, force: bool) -> None:
    """Before the model loads: refuses an ``out_dir`` holding files a batch job would replace
    or delete but did not write (a foreign manifest, errors file or part files), naming them;
    ``force`` never changes that."""
    out_dir = pathlib.Path(out_dir)
    if not out_dir.exists():
        return
    foreign = store.foreign_files(out_dir)
    if foreign:
        more = f" (and {len(foreign) - 1} more)" if len(foreign) > 1 else ""
        raise JobError(f"{foreign[0]}{more} was not written by a gem-jax batch job (or was changed since); it is "
                       "left alone: move it away or choose another --out")
    if not force and (out_dir / store.MANIFEST).exists():
        store.read_manifest(out_dir)  # readable and of our format


def _new_manifest(out_dir: pathlib.Path, spec: dict, n_parts: int) -> None:
    """Creates the manifest unless one exists (hosts starting together agree on one)."""
    path = out_dir / store.MANIFEST
    doc = {"format": store.FORMAT, "version": store.FORMAT_VERSION, "spec": spec, "parts": n_parts,
           "complete_parts": {}, "counts": {"images": spec["inputs"]["count"], "parts": n_parts,
                                            "complete": False},
           "schema": store.SCHEMA}
    fd, tmp = files.open_temp(path)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(files.dump_json(doc))
            f.flush()
            os.fsync(f.fileno())
        files.Ledger(out_dir).record_as(path, tmp)  # noted before it takes its name: a kill leaves no orphan
        try:
            files.publish(tmp, path, overwrite=False)  # atomic create-if-absent
        except FileExistsError:
            return
    finally:
        pathlib.Path(tmp).unlink(missing_ok=True)


def prepare_directory(out_dir: pathlib.Path, spec: dict, n_parts: int, force: bool) -> None:
    """Creates the directory and its manifest, or checks that an existing job matches ``spec``."""
    check_output(out_dir, force=force)
    if force:
        store.clear_job(out_dir)
    files.make_dirs(out_dir / store.PARTS)
    files.remove_stale(out_dir)
    if store.read_manifest(out_dir) is None:
        if any((out_dir / store.PARTS).glob("part-*.parquet")):
            raise JobError(f"{out_dir} has part files but no {store.MANIFEST}")
        _new_manifest(out_dir, spec, n_parts)
    existing = store.read_manifest(out_dir)
    diffs = _differences(_comparable(existing.get("spec", {})), _comparable(spec))
    if diffs:
        more = f" (and {len(diffs) - 1} more difference(s))" if len(diffs) > 1 else ""
        raise JobError(f"{out_dir} holds a different job: {diffs[0]}{more}; use another --out, or pass --force to "
                       "delete that job's files and start over")


def _verify_part(out_dir: pathlib.Path, part: int, expected_rows: int, recorded: dict | None) -> str | None:
    """``None`` when part ``part`` is complete and sound, else why it must be (re)done."""
    path = store.part_path(out_dir, part)
    if not path.exists():
        return "missing"
    if recorded is None:
        # finished but killed before the manifest noted it: sound if it reads back whole
        try:
            import pyarrow.parquet as pq

            rows = pq.read_metadata(path).num_rows
        except Exception:
            return "unreadable"
        return None if rows == expected_rows else f"{rows} rows instead of {expected_rows}"
    if path.stat().st_size != recorded.get("bytes") or store.sha256_file(path) != recorded.get("sha256"):
        return "its checksum differs from the manifest's"
    if recorded.get("rows") != expected_rows:
        return f"{recorded.get('rows')} rows instead of {expected_rows}"
    return None


def _labels_png(labels: np.ndarray, original_hw: tuple[int, int], n_classes: int) -> bytes:
    from PIL import Image

    if n_classes < 256:
        im = Image.fromarray(labels.astype(np.uint8), mode="L")
    else:
        im = Image.fromarray(labels.astype(np.uint16))
    if im.size != (original_hw[1], original_hw[0]):
        im = im.resize((original_hw[1], original_hw[0]), Image.NEAREST)
    buf = io.BytesIO()
    im.save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


@functools.partial(jax.jit, static_argnames=("hw", "labels", "heatmaps", "out_dtype"))
def _post(grid, threshold, columns, *, hw, labels: bool, heatmaps: bool, out_dtype):
    """Device-side extras from the patch-grid logits (B, P, h, w): label maps (the label rule
    on the ``columns``) and heatmaps at the input size, upsampled as :meth:`GEM.heatmaps` does."""
    up = resize_2d(grid, hw, "bilinear", axes=(-2, -1))
    out = {}
    if heatmaps:
        out["heatmaps"] = min_max(up).astype(out_dtype)
    if labels:
        probs = postprocess.class_probabilities(up[:, columns])
        out["labels"] = jax.vmap(lambda p: postprocess.decide(p, threshold))(probs)
    return out


@functools.partial(jax.jit, static_argnames=("k",))
def _merge_topk(best_val, best_idx, grid, offset, valid, *, k):
    """The running top ``k`` prompts per patch, merged with a chunk of logits (B, P, h, w)
    whose prompt ``j`` is prompt ``offset + j`` (invalid prompts never win)."""
    vals = jnp.where(valid[:, :, None, None], grid, -jnp.inf).transpose(0, 2, 3, 1)  # (B, h, w, P)
    idx = jnp.broadcast_to(jnp.arange(grid.shape[1], dtype=jnp.int32) + offset, vals.shape)
    all_val = jnp.concatenate([best_val, vals], axis=-1)
    all_idx = jnp.concatenate([best_idx, idx], axis=-1)
    top, where = jax.lax.top_k(all_val, k)
    return top, jnp.take_along_axis(all_idx, where, axis=-1)


class _Pieces:
    """A part in progress: finished rows are committed as piece files in the part's pending
    directory, and merged into the part file when the part is whole."""

    def __init__(self, out_dir: pathlib.Path, part: int, schema):
        self.out_dir, self.part, self.schema = out_dir, part, schema
        self.dir = store.pending_dir(out_dir, part)
        self.buffer: list = []
        self.buffered_rows = 0
        self.committed_rows = 0
        self.last_commit = time.monotonic()

    def done_indices(self) -> set[int]:
        """Indices of the images earlier runs finished in this part (from readable pieces)."""
        import pyarrow.parquet as pq

        done: set[int] = set()
        if not self.dir.is_dir():
            return done
        files.remove_stale(self.dir)
        ledger = files.Ledger(self.dir)
        for f in sorted(self.dir.glob("piece-*.parquet")):
            if not ledger.owned(f):
                continue
            try:
                done.update(pq.read_table(f, columns=["index"]).column("index").to_pylist())
            except Exception:  # damaged: its images are done again
                files.remove_owned(f)
        return done

    def add(self, table) -> None:
        self.buffer.append(table)
        self.buffered_rows += table.num_rows
        if self.buffered_rows >= PIECE_ROWS or time.monotonic() - self.last_commit >= PIECE_SECONDS:
            self.commit_piece()

    def commit_piece(self) -> int:
        """Writes the buffered rows as a new piece; returns how many rows it held."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        n = self.buffered_rows
        if not n:
            return 0
        files.make_dirs(self.dir)
        existing = sorted(self.dir.glob("piece-*.parquet"))
        number = int(existing[-1].stem.split("-")[1]) + 1 if existing else 0
        path = self.dir / f"piece-{number:05d}.parquet"
        table = pa.concat_tables(self.buffer)
        files.atomic_write(path, lambda f: pq.write_table(table, f, compression="zstd", compression_level=1),
                           record=True)
        self.buffer, self.buffered_rows = [], 0
        self.committed_rows += n
        self.last_commit = time.monotonic()
        return n

    def finish(self, expected: int) -> tuple[int, int]:
        """Merges the pieces and the buffer into the part file, sorted by index; records it;
        returns (rows, errors)."""
        import pyarrow as pa
        import pyarrow.compute as pc
        import pyarrow.parquet as pq

        ledger = files.Ledger(self.dir) if self.dir.is_dir() else None
        pieces = [f for f in sorted(self.dir.glob("piece-*.parquet")) if ledger and ledger.owned(f)] \
            if self.dir.is_dir() else []
        tables = [pq.read_table(f, schema=self.schema) for f in pieces] + self.buffer
        table = pa.concat_tables(tables) if tables else self.schema.empty_table()
        table = table.sort_by("index")
        if table.num_rows != expected:
            raise JobError(f"part {self.part} holds {table.num_rows} rows instead of {expected}: its pending "
                           f"pieces in {self.dir} disagree with the input list")
        final = store.part_path(self.out_dir, self.part)
        files.atomic_write(final, lambda f: pq.write_table(table, f, compression="zstd", compression_level=1),
                           record=True)
        errors = table.num_rows - int(pc.sum(pc.is_null(table["error"]).cast("int64")).as_py() or 0)
        store.record_part(self.out_dir, self.part, table.num_rows, errors)
        if self.dir.is_dir():
            store.remove_tree_owned(self.dir)
        self.buffer, self.buffered_rows = [], 0
        return table.num_rows, errors


def _finish_job(out_dir: pathlib.Path, n_parts: int) -> bool:
    """When every part is complete: the job-wide errors.jsonl and the manifest's counts.
    Returns whether the job is complete."""
    with store.manifest_lock(out_dir):
        doc = store.read_manifest(out_dir)
        recorded = doc.get("complete_parts", {})
        names = [store.part_path(out_dir, j).name for j in range(n_parts)]
        if not all(n in recorded for n in names):
            return False
        if doc.get("counts", {}).get("complete"):
            return True
        errors = store.Results(out_dir, errors=True).errors()
        path = out_dir / store.ERRORS
        if os.path.lexists(path) and not files.Ledger(out_dir).owned(path):
            raise JobError(f"{path} was not written by this job; it is left alone and the job's errors are in the "
                           "error column of the part files")
        files.write_bytes(path, "".join(json.dumps(e, ensure_ascii=False) + "\n" for e in errors).encode(),
                          record=True)
        rows = sum(recorded[n]["rows"] for n in names)
        doc["counts"] = {"images": doc["spec"]["inputs"]["count"], "parts": n_parts, "records": rows - len(errors),
                         "errors": len(errors), "complete": True}
        store.write_manifest(out_dir, doc)
    return True


def run(gem, items: Sequence[inputs_lib.Item], out_dir, opts: BatchOptions, *,
        progress: Progress | None = None) -> Summary:
    """Runs (or resumes) a batch job of ``gem`` over ``items`` into ``out_dir``.

    The sorted input list is cut into parts of ``opts.part_size`` images; this process
    writes the parts of its shard that are not complete yet, committing finished images in
    pieces as it goes, so a killed run resumes where it stopped and a finished one does
    nothing. Raises :class:`JobError` when ``out_dir`` holds a different job or files the
    job did not write, :class:`~gem_jax.checks.PromptError` for prompts the model cannot
    tell apart, :class:`~gem_jax.engine.cost.MemoryLimitError` when a batch would not fit,
    and :class:`Interrupted` (after committing what was finished) on Ctrl-C.
    """
    progress = progress or Progress("batch")
    t0 = time.perf_counter()
    out_dir = pathlib.Path(out_dir)
    if not items:
        raise JobError("no input images")
    if opts.logits_dtype not in ("float16", "float32"):
        raise JobError(f"logits dtype must be float16 or float32, got {opts.logits_dtype!r}")
    if opts.store not in store.STORES:
        raise JobError(f"store must be one of {', '.join(store.STORES)}, got {opts.store!r}")
    prompts, class_columns = all_prompts(opts)
    if not prompts:
        raise JobError("no prompts given")
    checks.vet(gem.model.tokenizer, checks.clean_prompts(opts.prompts or []),
               checks.clean_prompts(opts.classes, "class name") if opts.classes else None, gem.templates, progress.note)
    if opts.store == "topk" and not 1 <= opts.top_k <= len(opts.prompts or prompts):
        raise JobError(f"--top-k must be between 1 and the {len(opts.prompts or prompts)} prompts, got {opts.top_k}")
    index, count = opts.shard or default_shard()
    if not 0 <= index < count:
        raise JobError(f"shard index {index} is not in [0, {count})")
    mesh_size = gem.mesh.size
    b = opts.batch_size or default_batch_size(mesh_size)
    b = -(-b // mesh_size) * mesh_size
    nominal = gem.input_size((max(gem.short_side or 1, 1), max(gem.short_side or 1, 1)))
    gem.check_memory(nominal, b, min(len(prompts), PROMPT_CHUNK), upsampled=opts.labels or opts.heatmaps
                     or opts.store == "labels" or bool(opts.classes))

    spec = job_spec(gem, items, opts)
    ranges = inputs_lib.part_ranges(len(items), opts.part_size)
    files.make_dirs(out_dir)
    lock = store.ShardLock(out_dir, index, count)
    lock.acquire()
    try:
        prepare_directory(out_dir, spec, len(ranges), opts.force)
        mine = inputs_lib.shard_parts(len(ranges), index, count)
        recorded = (store.read_manifest(out_dir) or {}).get("complete_parts", {})
        todo, redone = [], []
        for j in mine:
            why = _verify_part(out_dir, j, len(ranges[j]), recorded.get(store.part_path(out_dir, j).name))
            if why is None:
                if store.part_path(out_dir, j).name not in recorded:
                    rows, errors = _count(store.part_path(out_dir, j))
                    store.record_part(out_dir, j, rows, errors)
                continue
            if why not in ("missing",):
                redone.append(j)
                progress.note(f"part {j} ({store.part_path(out_dir, j).name}) is damaged ({why}): doing it again")
                store.part_path(out_dir, j).unlink(missing_ok=True)  # recorded as the job's (check_output)
            todo.append(j)
        n_mine = sum(len(ranges[j]) for j in mine)
        processed = kept = 0
        if todo:
            processed, kept = _process(gem, items, ranges, todo, out_dir, opts, prompts, class_columns, b, progress)
        else:
            progress.say(f"nothing to do: the {len(mine)} part(s) of shard {index}/{count} in {out_dir} are complete")
        recorded = (store.read_manifest(out_dir) or {}).get("complete_parts", {})
        errors = sum(recorded.get(store.part_path(out_dir, j).name, {}).get("errors", 0) for j in mine)
        complete = _finish_job(out_dir, len(ranges))
    finally:
        lock.release()
    return Summary((index, count), len(mine), len(todo), n_mine, processed, kept, errors, redone, complete,
                   time.perf_counter() - t0)


def _count(path: pathlib.Path) -> tuple[int, int]:
    import pyarrow.parquet as pq

    col = pq.read_table(path, columns=["error"]).column("error")
    return len(col), len(col) - col.null_count


def _process(gem, items, ranges, todo, out_dir, opts, prompts, class_columns, b, progress) -> tuple[int, int]:
    import pyarrow as pa
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P
    from PIL import Image

    if opts.max_pixels > (Image.MAX_IMAGE_PIXELS or 0):
        Image.MAX_IMAGE_PIXELS = opts.max_pixels  # our own limit is checked before Pillow's
    data = NamedSharding(gem.mesh, P("data"))
    n_store = len(opts.prompts) if opts.prompts else len(prompts)  # prompts stored (logits, top-k)
    text = gem.embed_text(prompts)
    chunk = len(prompts) if gem.feature_surgery else min(len(prompts), PROMPT_CHUNK)
    p_bucket = bucket(chunk, 8)
    chunks = []
    for p0 in range(0, len(prompts), p_bucket):
        n = min(p_bucket, len(prompts) - p0)
        t = np.zeros((p_bucket, text.shape[1]), np.float32)
        t[:n] = text[p0:p0 + n]
        m = np.zeros((p_bucket,), bool)
        m[:n] = True
        chunks.append((p0, n, jax.device_put(np.ascontiguousarray(np.broadcast_to(t, (b, *t.shape))), data),
                       jax.device_put(np.broadcast_to(m, (b, p_bucket)).copy(), data)))
    columns = np.asarray(class_columns if class_columns is not None else range(n_store), np.int32)
    threshold = np.float32(-1.0 if opts.background_threshold is None else opts.background_threshold)
    out_dtype = np.float16 if opts.logits_dtype == "float16" else np.float32
    labels = bool(opts.labels or opts.classes or opts.store == "labels")
    schema = store.arrow_schema(opts.store, opts.logits_dtype, labels, opts.heatmaps)
    workers = opts.workers or min(16, os.cpu_count() or 1)
    prefetch = opts.prefetch or 2 * b + workers
    sizing = loader_lib.Sizing(gem.size, gem.short_side, gem.model.config.vision.patch_size, opts.max_pixels,
                               max_long_side=gem.max_long_side)
    need_full = labels or opts.heatmaps

    pieces = {j: _Pieces(out_dir, j, schema) for j in todo}
    done = {j: pieces[j].done_indices() for j in todo}
    kept = sum(len(d) for d in done.values())
    total = sum(len(ranges[j]) for j in todo)
    progress.say(f"{total - kept} image(s) in {len(todo)} part(s) to do"
                 + (f" ({kept} finished earlier are kept)" if kept else "")
                 + f", batches of {b} on {gem.mesh.size} {jax.default_backend()} device(s), {workers} decoding "
                 f"thread(s)")
    pairs = [(i, items[i]) for j in todo for i in ranges[j] if i not in done[j]]
    stream = loader_lib.stream(pairs if opts.loader == "grain" else iter(pairs), sizing, workers=workers,
                               prefetch=prefetch, loader=opts.loader)
    value_type = schema.field("logits").type.value_type if opts.store == "logits" else (
        schema.field("topk_logits").type.value_type if opts.store == "topk" else pa.float32())
    inflight: list = []
    compiled: set = set()
    bar = progress.bar(total, initial=kept)

    def columns_of(group, grid_hw):
        n = len(group)
        shown = [store.display_path(d.item.path) for d in group]
        return {"index": pa.array([d.index for d in group], pa.int64()),
                "path": pa.array([s for s, _ in shown], pa.string()),
                "path_bytes": pa.array([raw for _, raw in shown], pa.binary()),
                "error": pa.nulls(n, pa.string()),
                "height": pa.array([d.original_hw[0] for d in group], pa.int32()),
                "width": pa.array([d.original_hw[1] for d in group], pa.int32()),
                "input_height": pa.array([d.input_hw[0] for d in group], pa.int32()),
                "input_width": pa.array([d.input_hw[1] for d in group], pa.int32()),
                "grid_height": pa.array([grid_hw[0]] * n, pa.int32()),
                "grid_width": pa.array([grid_hw[1]] * n, pa.int32())}

    def collect():
        part, group, results = inflight.pop()
        results = jax.device_get(results)
        n = len(group)
        grid_hw = results["grid_hw"]
        cols = columns_of(group, grid_hw)
        if opts.store == "logits":
            cols["logits"] = _list_column(results["logits"][:n].astype(out_dtype), value_type)
        elif opts.store == "topk":
            cols["topk_index"] = _list_column(results["topk_index"][:n].astype(np.int32), pa.int32())
            cols["topk_logits"] = _list_column(results["topk_logits"][:n].astype(out_dtype), value_type)
        if labels:
            n_classes = len(columns)
            cols["labels_png"] = pa.array([_labels_png(results["labels"][r], d.original_hw, n_classes)
                                           for r, d in enumerate(group)], pa.binary())
        if opts.heatmaps:
            cols["heatmaps"] = _list_column(results["heatmaps"][:n], value_type, large=True)
        pieces[part].add(pa.table(cols, schema=schema))
        bar.update(n)

    def submit(part, group):
        hw = tuple(group[0].input_hw)
        if hw not in compiled:
            gem.check_memory(hw, b, p_bucket, upsampled=need_full)
            compiled.add(hw)
            progress.say(f"compiling for {hw[0]}x{hw[1]} inputs (the first batch of this size) ...")
        pixels = np.zeros((b, *hw, 3), np.float32)
        for r, d in enumerate(group):
            pixels[r] = d.pixels
            d.pixels = None  # the device has them now
        tokens = gem.tokens(pixels)
        results: dict[str, Any] = {}
        grids = []
        best = None
        for p0, n, text_b, mask_b in chunks:
            grid = gem.grid_logits(tokens, text_b, mask_b)
            results["grid_hw"] = grid.shape[2:]
            if opts.store == "topk" and p0 < n_store:
                valid = mask_b & (jnp.arange(p_bucket)[None] + p0 < n_store)
                if best is None:
                    shape = (b, *grid.shape[2:], opts.top_k)
                    best = (jnp.full(shape, -jnp.inf, jnp.float32), jnp.zeros(shape, jnp.int32))
                best = _merge_topk(*best, grid, p0, valid, k=opts.top_k)
            if opts.store == "logits" or need_full:
                grids.append(grid[:, :n])
        if grids:
            full = jnp.concatenate(grids, axis=1) if len(grids) > 1 else grids[0]
            if opts.store == "logits":
                results["logits"] = full[:, :n_store]
            if need_full:
                results.update(_post(full, threshold, columns, hw=hw, labels=labels, heatmaps=opts.heatmaps,
                                     out_dtype=out_dtype))
        if best is not None:
            results["topk_logits"], results["topk_index"] = best
        inflight.insert(0, (part, group, results))
        if len(inflight) > 1:  # keep one batch on the device while the previous one is written
            collect()

    processed = 0
    finished_parts: set[int] = set()
    try:
        for j in todo:
            buckets: dict[tuple[int, int], list] = {}
            failed = []
            for _ in range(len(ranges[j]) - len(done[j])):
                d = next(stream)
                if d.error is not None:
                    failed.append(d)
                    continue
                group = buckets.setdefault(d.input_hw, [])
                group.append(d)
                if len(group) == b:
                    submit(j, buckets.pop(d.input_hw))
            for hw in list(buckets):
                submit(j, buckets.pop(hw))
            while inflight:
                collect()
            if failed:
                n = len(failed)
                cols = {name: pa.nulls(n, schema.field(name).type) for name in schema.names}
                shown = [store.display_path(d.item.path) for d in failed]
                cols["index"] = pa.array([d.index for d in failed], pa.int64())
                cols["path"] = pa.array([s for s, _ in shown], pa.string())
                cols["path_bytes"] = pa.array([raw for _, raw in shown], pa.binary())
                cols["error"] = pa.array([d.error for d in failed], pa.string())
                pieces[j].add(pa.table(cols, schema=schema))
                bar.update(n)
            pieces[j].finish(len(ranges[j]))
            finished_parts.add(j)
            processed += len(ranges[j]) - len(done[j])
    except KeyboardInterrupt as stop:
        # keep what was finished: the batches already computed, then the buffered rows
        try:
            while inflight:
                collect()
        except Exception:
            inflight.clear()
        for j in todo:
            if j not in finished_parts:
                pieces[j].commit_piece()
        now = processed + sum(pieces[j].committed_rows for j in todo if j not in finished_parts)
        what = "terminated" if isinstance(stop, Terminated) else "interrupted"
        raise Interrupted(f"{what}: kept {kept + now} finished image(s) of the {total} to do in {out_dir} "
                          f"({now} from this run); {total - kept - now} remain; rerun the same command to go on",
                          terminated=isinstance(stop, Terminated)) from None
    finally:
        bar.close()
        close = getattr(stream, "close", None)
        if close is not None:
            close()
    return processed, kept


def _list_column(rows: np.ndarray, value_type, large: bool = False):
    """(n, ...) array -> Arrow list array of n flattened rows."""
    import pyarrow as pa

    n = rows.shape[0]
    flat = np.ascontiguousarray(rows).reshape(-1)
    per = flat.size // max(n, 1)
    offsets = pa.array(np.arange(n + 1, dtype=np.int64 if large else np.int32) * per)
    cls = pa.LargeListArray if large else pa.ListArray
    return cls.from_arrays(offsets, pa.array(flat, type=value_type))
