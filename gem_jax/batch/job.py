"""The batch job: stream images through GEM in fixed-shape batches into resumable Parquet parts."""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import io
import json
import os
import pathlib
import sys
import tempfile
import time
from typing import Any, Callable, Sequence

import jax
import numpy as np

from gem_jax.batch import inputs as inputs_lib
from gem_jax.batch import loader as loader_lib
from gem_jax.batch import results as res

#: Images per device in one forward pass, by backend, when ``--batch-size`` is not given.
DEFAULT_BATCH_PER_DEVICE = {"cpu": 8, "gpu": 32, "cuda": 32, "rocm": 32, "tpu": 32}


class JobError(Exception):
    """The job cannot be run as asked (the message says why in one sentence)."""


@dataclasses.dataclass
class BatchOptions:
    """What a batch job writes and how it runs.

    Attributes:
      prompts: the prompts (at least one).
      part_size: images per part file (the unit of resumption and of sharding).
      batch_size: images per forward pass (rounded up to whole shards per device);
        ``None`` for the backend's default.
      logits_dtype: ``"float16"`` or ``"float32"`` for the stored logits (and heatmaps).
      labels: also store label maps at each image's own size (PNG bytes).
      background_threshold: with ``labels``: pixels whose top class probability is below
        this are background (``None``: never).
      heatmaps: also store full-size min-max heatmaps at the input size.
      workers: decoding threads (default: the CPU count, at most 16).
      prefetch: decoded images kept ready ahead of the device (default: two batches plus
        one per worker).
      loader: ``"thread"`` or ``"grain"``.
      max_pixels: images larger than this are recorded as errors without decoding.
      shard: (index, count); ``None``: JAX's process index and count.
      force: delete an existing job's outputs in the directory and start over.
      quiet: no progress output.
      log_every: without a terminal, a progress line every this many images.
    """

    prompts: Sequence[str]
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
    quiet: bool = False
    log_every: int = 1000


@dataclasses.dataclass
class Summary:
    """What :func:`run` did.

    Attributes:
      shard: (index, count).
      parts: the parts this shard owns; ``parts_written``: those written by this call.
      images: images in this shard's parts; ``processed``: those this call went through.
      errors: images of this shard that failed (in all its parts, including earlier runs).
      job_complete: every part of the whole job (all shards) exists.
      elapsed_s: wall time of this call.
    """

    shard: tuple[int, int]
    parts: int
    parts_written: int
    images: int
    processed: int
    errors: int
    job_complete: bool
    elapsed_s: float


def model_fingerprint(model) -> str:
    """sha256 of the parameter names, shapes, dtypes and a strided sample of every leaf's values."""
    h = hashlib.sha256()
    leaves = jax.tree_util.tree_flatten_with_path(model.params)[0]
    for path, leaf in leaves:
        h.update(jax.tree_util.keystr(path).encode())
        h.update(f"{tuple(leaf.shape)}{leaf.dtype}".encode())
        # On the host: slicing on the device would compile a program per leaf shape.
        flat = np.asarray(jax.device_get(leaf)).reshape(-1)
        h.update(np.asarray(flat[::max(1, flat.size // 4096)], np.float32).tobytes())
    return h.hexdigest()


def _jsonable(value):
    return json.loads(json.dumps(value, default=lambda o: list(o) if isinstance(o, (tuple, set)) else str(o)))


def job_spec(gem, model_name: str, items: Sequence[inputs_lib.Item], opts: BatchOptions) -> dict:
    """Everything that decides the results: a rerun into the same directory must match it."""
    from gem_jax import __version__

    # the method's whole description (blocks, attention and its options, residual, MLP, ...)
    spec = dataclasses.asdict(gem.spec)
    options = {"layers": spec.pop("blocks"), **spec, "feature_surgery": gem.feature_surgery}
    return _jsonable({
        "model": {"name": model_name, "fingerprint": model_fingerprint(gem.model),
                  "config": dataclasses.asdict(gem.model.config)},
        "method": gem.method,
        "options": options,
        "templates": list(gem.templates),
        "prompts": list(opts.prompts),
        "size": gem.size, "short_side": gem.short_side, "dtype": gem.dtype,
        "logits_dtype": opts.logits_dtype,
        "labels": opts.labels, "background_threshold": opts.background_threshold if opts.labels else None,
        "heatmaps": opts.heatmaps,
        "max_pixels": opts.max_pixels,
        "inputs": {"count": len(items), "sha256": inputs_lib.fingerprint(items)},
        "part_size": opts.part_size,
        "gem_jax": __version__,
    })


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


def _manifest_doc(spec: dict, n_parts: int, counts: dict | None = None) -> dict:
    return {"format": res.FORMAT, "version": res.FORMAT_VERSION, "spec": spec, "parts": n_parts,
            "counts": counts or {"images": spec["inputs"]["count"], "parts": n_parts, "parts_complete": 0,
                                 "records": 0, "errors": 0, "complete": False},
            "schema": res.SCHEMA}


def _clear(out_dir: pathlib.Path) -> None:
    """Removes what a batch job writes (and nothing else)."""
    parts = out_dir / res.PARTS
    if parts.is_dir():
        for f in parts.iterdir():
            if f.name.startswith(("part-", ".part-")):
                f.unlink()
        if not any(parts.iterdir()):
            parts.rmdir()
    for name in (res.MANIFEST, res.ERRORS):
        (out_dir / name).unlink(missing_ok=True)


def prepare_directory(out_dir: pathlib.Path, spec: dict, n_parts: int, force: bool) -> None:
    """Creates the directory and its manifest, or checks that an existing job matches ``spec``."""
    if force:
        _clear(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / res.PARTS).mkdir(exist_ok=True)
    doc = _manifest_doc(spec, n_parts)
    path = out_dir / res.MANIFEST
    if not path.exists():
        if any((out_dir / res.PARTS).glob("part-*.parquet")):
            raise JobError(f"{out_dir} has part files but no {res.MANIFEST}; pass --force to start over")
        fd, tmp = tempfile.mkstemp(prefix=f".{res.MANIFEST}.", suffix=".tmp", dir=out_dir)
        res.readable(tmp)
        with os.fdopen(fd, "wb") as f:
            f.write(res.dump_json(doc))
        try:
            os.link(tmp, path)  # atomic create-if-absent: hosts starting together agree on one manifest
        except FileExistsError:
            pass
        except OSError:  # file systems without hard links
            if not path.exists():
                os.replace(tmp, path)
        finally:
            pathlib.Path(tmp).unlink(missing_ok=True)
    try:
        existing = res.read_manifest(out_dir)
    except ValueError as e:
        raise JobError(str(e)) from None
    if existing is None or existing.get("format") != res.FORMAT:
        raise JobError(f"{path} is not a gem-jax batch manifest; pass --force to start over")
    diffs = _differences(existing.get("spec"), spec)
    if diffs:
        more = f" (and {len(diffs) - 1} more difference(s))" if len(diffs) > 1 else ""
        raise JobError(f"{out_dir} holds a different job: {diffs[0]}{more}; use another --out or pass --force "
                       "to start over")


class _PartWriter:
    """One part file, written under a temporary name and renamed when whole."""

    def __init__(self, out_dir: pathlib.Path, part: int, schema):
        import pyarrow.parquet as pq

        self.final = res.part_path(out_dir, part)
        fd, tmp = tempfile.mkstemp(prefix=f".{self.final.name}.", suffix=".tmp", dir=self.final.parent)
        os.close(fd)
        res.readable(tmp)
        self.tmp = pathlib.Path(tmp)
        self.schema = schema
        self.writer = pq.ParquetWriter(self.tmp, schema, compression="zstd", compression_level=1)
        self.buffer: list = []
        self.buffered_rows = self.buffered_bytes = 0
        self.errors = 0

    def add(self, table) -> None:
        self.buffer.append(table)
        self.buffered_rows += table.num_rows
        self.buffered_bytes += table.nbytes
        if self.buffered_rows >= 256 or self.buffered_bytes >= 64 << 20:
            self.flush()

    def flush(self) -> None:
        import pyarrow as pa

        if self.buffer:
            self.writer.write_table(pa.concat_tables(self.buffer))
            self.buffer, self.buffered_rows, self.buffered_bytes = [], 0, 0

    def commit(self) -> None:
        self.flush()
        self.writer.close()
        with open(self.tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(self.tmp, self.final)

    def abort(self) -> None:
        try:
            self.writer.close()
        except Exception:
            pass
        self.tmp.unlink(missing_ok=True)


def _list_column(rows: np.ndarray, value_type, large: bool = False):
    """(n, ...) array -> Arrow list array of n flattened rows."""
    import pyarrow as pa

    n = rows.shape[0]
    flat = np.ascontiguousarray(rows).reshape(-1)
    per = flat.size // max(n, 1)
    offsets = pa.array(np.arange(n + 1, dtype=np.int64 if large else np.int32) * per)
    cls = pa.LargeListArray if large else pa.ListArray
    return cls.from_arrays(offsets, pa.array(flat, type=value_type))


def _labels_png(labels: np.ndarray, original_hw: tuple[int, int], n_prompts: int) -> bytes:
    from PIL import Image

    if n_prompts < 256:
        im = Image.fromarray(labels.astype(np.uint8), mode="L")
    else:
        im = Image.fromarray(labels.astype(np.uint16))
    if im.size != (original_hw[1], original_hw[0]):
        im = im.resize((original_hw[1], original_hw[0]), Image.NEAREST)
    buf = io.BytesIO()
    im.save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


@functools.partial(jax.jit, static_argnames=("hw", "labels", "heatmaps", "out_dtype"))
def _post(grid, threshold, *, hw, labels: bool, heatmaps: bool, out_dtype):
    """Device-side extras from the patch-grid logits (B, P, h, w): label maps and heatmaps at
    the input size, upsampled as :meth:`GEM.heatmaps` does."""
    import jax.numpy as jnp

    from gem_jax import gem as gem_lib
    from gem_jax.models.layers import resize_2d

    up = resize_2d(grid, hw, "bilinear", axes=(-2, -1))
    out = {}
    if heatmaps:
        out["heatmaps"] = gem_lib.min_max(up).astype(out_dtype)
    if labels:
        # As labels_from_logits: the top prompt, background where its softmax probability
        # (over prompts, of 100 x cosine) is below the threshold.
        top = jnp.max(up, axis=1, keepdims=True)
        p_top = 1.0 / jnp.sum(jnp.exp(100.0 * (up - top)), axis=1)
        lab = jnp.argmax(up, axis=1).astype(jnp.int32) + 1
        out["labels"] = jnp.where(p_top < threshold, 0, lab)
    return out


class _Progress:
    def __init__(self, total: int, quiet: bool, log_every: int, say: Callable[[str], None]):
        self.total, self.quiet, self.log_every, self.say = total, quiet, log_every, say
        self.done = 0
        self.start = time.perf_counter()
        self.bar = None
        self.next_log = log_every
        if not quiet and sys.stderr.isatty():
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, desc="batch", unit="image", file=sys.stderr, smoothing=0.05)

    def update(self, n: int) -> None:
        self.done += n
        if self.bar is not None:
            self.bar.update(n)
        elif not self.quiet and (self.done >= self.next_log or self.done == self.total):
            while self.next_log <= self.done:
                self.next_log += self.log_every
            elapsed = time.perf_counter() - self.start
            rate = self.done / elapsed if elapsed > 0 else 0.0
            eta = (self.total - self.done) / rate if rate > 0 else float("nan")
            self.say(f"batch: {self.done}/{self.total} images, {rate:.1f} images/s, ETA {_duration(eta)}")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _duration(seconds: float) -> str:
    if seconds != seconds:
        return "?"
    seconds = int(round(seconds))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s" if m else f"{s}s"


def default_shard() -> tuple[int, int]:
    """(process index, process count) of JAX (``jax.distributed`` when initialised; else 0/1)."""
    return jax.process_index(), jax.process_count()


def default_batch_size(mesh_size: int) -> int:
    """``--batch-size``'s default: a backend's per-device figure times the devices (one figure on CPU)."""
    return DEFAULT_BATCH_PER_DEVICE.get(jax.default_backend(), 8) * (mesh_size if jax.default_backend() != "cpu" else 1)


def _count_errors(paths: Sequence[pathlib.Path]) -> tuple[int, int]:
    import pyarrow.parquet as pq

    records = errors = 0
    for p in paths:
        col = pq.read_table(p, columns=["error"]).column("error")
        records += len(col)
        errors += len(col) - col.null_count
    return records, errors


def _finish_job(out_dir: pathlib.Path, spec: dict, n_parts: int) -> bool:
    """When every part exists: the job-wide errors.jsonl and the manifest's counts. Returns
    whether the job is complete."""
    done = [res.part_path(out_dir, j) for j in range(n_parts) if res.part_path(out_dir, j).exists()]
    if len(done) < n_parts:
        return False
    results = res.Results(out_dir)
    errors = results.errors()
    res.write_atomic(out_dir / res.ERRORS, "".join(json.dumps(e) + "\n" for e in errors).encode("utf-8"))
    records, _ = _count_errors(done)
    counts = {"images": spec["inputs"]["count"], "parts": n_parts, "parts_complete": len(done),
              "records": records - len(errors), "errors": len(errors), "complete": True}
    res.write_atomic(out_dir / res.MANIFEST, res.dump_json(_manifest_doc(spec, n_parts, counts)))
    return True


def run(gem, items: Sequence[inputs_lib.Item], out_dir, opts: BatchOptions, *, model_name: str = "model",
        say: Callable[[str], None] | None = None) -> Summary:
    """Runs (or resumes) a batch job of ``gem`` over ``items`` into ``out_dir``.

    The sorted input list is cut into parts of ``opts.part_size`` images; this process
    writes the parts of its shard that do not exist yet, each under a temporary name
    renamed when whole, so a killed run resumes where it stopped and a finished one does
    nothing. Raises :class:`JobError` when ``out_dir`` holds a different job.
    """
    say = say or (lambda msg: print(msg, file=sys.stderr, flush=True))
    t0 = time.perf_counter()
    out_dir = pathlib.Path(out_dir)
    if not items:
        raise JobError("no input images")
    if opts.logits_dtype not in ("float16", "float32"):
        raise JobError(f"logits dtype must be float16 or float32, got {opts.logits_dtype!r}")
    prompts = list(opts.prompts)
    if not prompts or any(not isinstance(p, str) or not p.strip() for p in prompts):
        raise JobError("prompts must be a non-empty list of non-empty strings")
    if len(set(prompts)) != len(prompts):
        raise JobError("a prompt is given twice")
    index, count = opts.shard or default_shard()
    if not 0 <= index < count:
        raise JobError(f"shard index {index} is not in [0, {count})")
    spec = job_spec(gem, model_name, items, opts)
    ranges = inputs_lib.part_ranges(len(items), opts.part_size)
    prepare_directory(out_dir, spec, len(ranges), opts.force)

    mine = inputs_lib.shard_parts(len(ranges), index, count)
    todo = [j for j in mine if not res.part_path(out_dir, j).exists()]
    for j in todo:  # leftovers of a killed run: never complete, never read
        for stale in (out_dir / res.PARTS).glob(f".part-{j:05d}.parquet.*.tmp"):
            stale.unlink(missing_ok=True)
    n_mine = sum(len(ranges[j]) for j in mine)
    written = processed = 0
    if todo:
        processed = _process(gem, items, ranges, todo, out_dir, opts, spec, say)
        written = len(todo)
    else:
        say(f"batch: nothing to do: the {len(mine)} part(s) of shard {index}/{count} in {out_dir} are complete")
    _, errors = _count_errors([res.part_path(out_dir, j) for j in mine])
    complete = _finish_job(out_dir, spec, len(ranges))
    return Summary((index, count), len(mine), written, n_mine, processed, errors, complete,
                   time.perf_counter() - t0)


def _process(gem, items, ranges, todo, out_dir, opts, spec, say) -> int:
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P
    from PIL import Image

    if opts.max_pixels > (Image.MAX_IMAGE_PIXELS or 0):
        Image.MAX_IMAGE_PIXELS = opts.max_pixels  # our own limit is checked before Pillow's
    mesh_size = gem.mesh.size
    b = opts.batch_size or default_batch_size(mesh_size)
    b = -(-b // mesh_size) * mesh_size
    data = NamedSharding(gem.mesh, P("data"))
    prompts = list(opts.prompts)
    text = gem.embed_text(prompts)
    text_b = jax.device_put(np.ascontiguousarray(np.broadcast_to(text, (b, *text.shape))), data)
    mask_b = jax.device_put(np.ones((b, len(prompts)), bool), data)
    threshold = np.float32(-1.0 if opts.background_threshold is None else opts.background_threshold)
    out_dtype = np.float16 if opts.logits_dtype == "float16" else np.float32
    schema = res.arrow_schema(opts.logits_dtype, opts.labels, opts.heatmaps)
    workers = opts.workers or min(16, os.cpu_count() or 1)
    prefetch = opts.prefetch or 2 * b + workers
    sizing = loader_lib.Sizing(gem.size, gem.short_side, gem.model.config.vision.patch_size, opts.max_pixels)
    total = sum(len(ranges[j]) for j in todo)
    progress = _Progress(total, opts.quiet, opts.log_every, say)
    if not opts.quiet:
        say(f"batch: {total} image(s) in {len(todo)} part(s) to do, batches of {b} on "
            f"{mesh_size} {jax.default_backend()} device(s), {workers} decoding thread(s)")
    pairs = ((i, items[i]) for j in todo for i in ranges[j])
    if opts.loader == "grain":
        pairs = list(pairs)  # grain indexes a sequence
    stream = loader_lib.stream(pairs, sizing, workers=workers, prefetch=prefetch, loader=opts.loader)

    import pyarrow as pa

    value_type = schema.field("logits").type.value_type
    inflight: list = []

    def collect():
        writer, group, grid, post = inflight.pop()
        grid, post = jax.device_get((grid, post))
        n = len(group)
        cols: dict[str, Any] = {
            "index": pa.array([d.index for d in group], pa.int64()),
            "path": pa.array([d.item.path for d in group], pa.string()),
            "error": pa.nulls(n, pa.string()),
            "height": pa.array([d.original_hw[0] for d in group], pa.int32()),
            "width": pa.array([d.original_hw[1] for d in group], pa.int32()),
            "input_height": pa.array([d.input_hw[0] for d in group], pa.int32()),
            "input_width": pa.array([d.input_hw[1] for d in group], pa.int32()),
            "grid_height": pa.array([grid.shape[2]] * n, pa.int32()),
            "grid_width": pa.array([grid.shape[3]] * n, pa.int32()),
            "prompts": pa.array([prompts] * n, pa.list_(pa.string())),
            "logits": _list_column(grid[:n].astype(out_dtype), value_type),
        }
        if opts.labels:
            cols["labels_png"] = pa.array([_labels_png(post["labels"][r], d.original_hw, len(prompts))
                                           for r, d in enumerate(group)], pa.binary())
        if opts.heatmaps:
            cols["heatmaps"] = _list_column(post["heatmaps"][:n], value_type, large=True)
        writer.add(pa.table(cols, schema=schema))
        progress.update(n)

    def submit(writer, group):
        hw = group[0].input_hw
        pixels = np.zeros((b, *hw, 3), np.float32)
        for r, d in enumerate(group):
            pixels[r] = d.pixels
        grid = gem._grid(gem._vparams, pixels, text_b, mask_b)
        post = None
        if opts.labels or opts.heatmaps:
            post = _post(grid, threshold, hw=tuple(hw), labels=opts.labels, heatmaps=opts.heatmaps,
                         out_dtype=out_dtype)
        for d in group:
            d.pixels = None  # the device has them now
        inflight.insert(0, (writer, group, grid, post))
        if len(inflight) > 1:  # keep one batch on the device while the previous one is written
            collect()

    processed = 0
    writer = None
    try:
        for j in todo:
            writer = _PartWriter(out_dir, j, schema)
            buckets: dict[tuple[int, int], list] = {}
            failed = []
            for _ in ranges[j]:
                d = next(stream)
                if d.error is not None:
                    failed.append(d)
                    continue
                bucket = buckets.setdefault(d.input_hw, [])
                bucket.append(d)
                if len(bucket) == b:
                    submit(writer, buckets.pop(d.input_hw))
            for hw in list(buckets):
                submit(writer, buckets.pop(hw))
            while inflight:
                collect()
            if failed:
                n = len(failed)
                cols = {name: pa.nulls(n, schema.field(name).type) for name in schema.names}
                cols["index"] = pa.array([d.index for d in failed], pa.int64())
                cols["path"] = pa.array([d.item.path for d in failed], pa.string())
                cols["error"] = pa.array([d.error for d in failed], pa.string())
                writer.add(pa.table(cols, schema=schema))
                progress.update(n)
            writer.commit()
            writer = None
            processed += len(ranges[j])
    finally:
        if writer is not None:
            writer.abort()
        progress.close()
        stream_close = getattr(stream, "close", None)
        if stream_close is not None:
            stream_close()
    return processed
