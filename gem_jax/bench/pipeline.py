"""The input-pipeline benchmark: the batch job's streaming input against pre-decoded pixels."""

from __future__ import annotations

import itertools
import os
import shutil
import statistics
import tempfile
import time
from typing import Sequence

import jax
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from PIL import Image

from gem_jax import batch as batch_lib
from gem_jax.batch import loader as loader_lib
from gem_jax.bench.model import cpu_name, sayer
from gem_jax.config import CLIPConfig, architecture
from gem_jax.loading import Model
from gem_jax.models import init_params
from gem_jax.pipeline import GEM
from gem_jax.progress import Progress
from gem_jax.tokenizer import Tokenizer


def _photo_like_jpegs(directory, n: int, hw: tuple[int, int], seed: int = 0) -> None:
    """``n`` JPEG files of ``hw`` (quality 90): smooth random colour fields with some grain,
    closer to photographs in size and decoding cost than white noise."""
    rng = np.random.default_rng(seed)
    for i in range(n):
        small = rng.integers(0, 256, (hw[0] // 16, hw[1] // 16, 3), dtype=np.uint8)
        big = np.asarray(Image.fromarray(small).resize((hw[1], hw[0]), Image.BICUBIC), np.int16)
        big = np.clip(big + rng.integers(-12, 13, big.shape), 0, 255).astype(np.uint8)
        Image.fromarray(big).save(os.path.join(directory, f"img{i:05d}.jpg"), quality=90)


def _drive(gem, batches, text_b, mask_b) -> int:
    """Runs (pixels, count) batches through the patch-grid program as the batch job does: the
    next batch is dispatched before the previous one's logits are fetched. Returns images."""
    done, prev = 0, None
    for pixels, count in batches:
        cur = (gem.grid_logits(gem.tokens(pixels), text_b, mask_b), count)
        if prev is not None:
            np.asarray(jax.device_get(prev[0]))
            done += prev[1]
        prev = cur
    if prev is not None:
        np.asarray(jax.device_get(prev[0]))
        done += prev[1]
    return done


def _batches(decoded, b: int):
    """Fixed-shape (b, H, W, 3) batches from an iterable of decoded images (one input size)."""
    group = []
    for d in decoded:
        group.append(d)
        if len(group) == b:
            yield _stack(group, b), b
            group = []
    if group:
        yield _stack(group, b), len(group)


def _stack(group, b):
    pixels = np.zeros((b, *group[0].pixels.shape), np.float32)
    for r, d in enumerate(group):
        pixels[r] = d.pixels
    return pixels


def pipeline(arch: str | CLIPConfig = "ViT-B-32", size: int | tuple[int, int] = 224, batch: int = 8, images: int = 200,
             image_hw: tuple[int, int] = (375, 500), prompts: int = 8, rounds: int = 2,
             loaders: Sequence[str] = ("thread", "grain"), workers: int | None = None,
             progress=True) -> dict:
    """Streaming overlap: throughput from JPEG files on disk against pre-decoded pixels in memory.

    Writes ``images`` JPEG files of ``image_hw`` to a temporary directory and, in one process
    with one compiled program and the same batch size, times alternately (``rounds`` times):
    ``in_memory`` (pixels decoded beforehand, only batching and the device), ``stream_<loader>``
    (decoding and resizing on host threads through the batch job's loader while the device
    computes) and ``batch_job`` (the whole ``gem-jax batch`` path: loader, device, float16
    Parquet parts written and renamed), in reverse order every other round. Reports images/s (the median round), each
    streaming figure as a fraction of ``in_memory``, and the process CPU time per image
    (all threads; on a CPU backend, what the rates would be bound by on an idle machine). ``arch`` is a standard architecture
    name or a :class:`CLIPConfig` (random weights either way).
    """
    say = sayer(progress)

    hw = (size, size) if isinstance(size, int) else tuple(size)
    config = architecture(arch) if isinstance(arch, str) else arch
    arch = arch if isinstance(arch, str) else "custom"
    model = Model(config, init_params(config), Tokenizer.default(config.text.context_length), f"random {arch}")
    gem = GEM(model, size=hw, batch_size=batch, memory_limit=None)
    b = -(-batch // gem.mesh.size) * gem.mesh.size
    workers = workers or min(16, os.cpu_count() or 1)
    names = [f"prompt {i}" for i in range(prompts)]
    data = NamedSharding(gem.mesh, P("data"))
    text = gem.embed_text(names)
    text_b = jax.device_put(np.ascontiguousarray(np.broadcast_to(text, (b, *text.shape))), data)
    mask_b = jax.device_put(np.ones((b, prompts), bool), data)
    tmp = tempfile.mkdtemp(prefix="gem-jax-bench-")
    load_before = os.getloadavg() if hasattr(os, "getloadavg") else None
    try:
        src = os.path.join(tmp, "images")
        os.mkdir(src)
        say(f"writing {images} JPEG files of {image_hw[1]}x{image_hw[0]}")
        _photo_like_jpegs(src, images, image_hw)
        items = batch_lib.expand_inputs([src])
        pairs = list(enumerate(items))
        sizing = loader_lib.Sizing(gem.size, None, config.vision.patch_size)
        quiet = Progress("batch", quiet=True)
        say("decoding them into memory and compiling")
        t = time.perf_counter()
        decoded = [loader_lib.decode(it, i, sizing) for i, it in pairs]
        decode_s = time.perf_counter() - t
        _drive(gem, itertools.islice(_batches(decoded, b), 1), text_b, mask_b)  # compile

        def in_memory():
            return _drive(gem, _batches(decoded, b), text_b, mask_b)

        def streamed(loader):
            def go():
                it = loader_lib.stream(pairs, sizing, workers=workers, prefetch=2 * b + workers, loader=loader)
                return _drive(gem, _batches(it, b), text_b, mask_b)
            return go

        def job():
            opts = batch_lib.BatchOptions(names, batch_size=b, workers=workers, shard=(0, 1), force=True)
            return batch_lib.run(gem, items, os.path.join(tmp, "out"), opts, progress=quiet).processed

        cases = {"in_memory": in_memory, **{f"stream_{name}": streamed(name) for name in loaders},
                 "batch_job": job}
        times: dict[str, list] = {k: [] for k in cases}
        cpu: dict[str, list] = {k: [] for k in cases}
        for r in range(rounds):
            order = list(cases.items()) if r % 2 == 0 else list(cases.items())[::-1]  # drift hits all alike
            for name, fn in order:
                t, c = time.perf_counter(), time.process_time()
                n = fn()
                times[name].append(time.perf_counter() - t)
                cpu[name].append(time.process_time() - c)
                if n != images:
                    raise RuntimeError(f"{name} went through {n} of {images} images")
                say(f"round {r + 1}/{rounds}: {name}: {images / times[name][-1]:.2f} images/s")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    rates = {k: images / statistics.median(v) for k, v in times.items()}
    return {
        "arch": arch, "size": list(hw), "batch": b, "images": images, "image_size": [image_hw[1], image_hw[0]],
        "prompts": prompts, "rounds": rounds, "workers": workers,
        "decode_ms_per_image_one_thread": 1000 * decode_s / images,
        "images_per_s": rates, "times_s": times,
        "cpu_ms_per_image": {k: 1000 * statistics.median(v) / images for k, v in cpu.items()},
        "fraction_of_in_memory": {k: v / rates["in_memory"] for k, v in rates.items() if k != "in_memory"},
        "machine": {"processor": cpu_name(), "cpu_count": os.cpu_count(), "jax": jax.__version__,
                    "backend": jax.default_backend(),
                    "load_average_before": load_before,
                    "load_average_after": os.getloadavg() if hasattr(os, "getloadavg") else None},
    }


def format_pipeline(result: dict) -> str:
    """A Markdown table of :func:`pipeline`'s result."""
    m = result["machine"]
    load = m.get("load_average_before")
    lines = [
        f"{result['arch']} at {result['size'][0]}x{result['size'][1]}, batch {result['batch']}, "
        f"{result['images']} JPEG files of {result['image_size'][0]}x{result['image_size'][1]}, "
        f"{result['prompts']} prompts, {result['workers']} decoding threads, median of {result['rounds']} rounds; "
        f"{m['processor']}, {m['cpu_count']} CPUs, jax {m['jax']} ({m['backend']})"
        + (f"; load average {load[0]:.1f} before, {m['load_average_after'][0]:.1f} after" if load else ""),
        f"decoding + resizing alone: {result['decode_ms_per_image_one_thread']:.1f} ms per image on one thread",
        "",
        "| input path | images/s | of in-memory | process CPU ms per image |",
        "|---|---:|---:|---:|",
    ]
    for name, rate in result["images_per_s"].items():
        frac = result["fraction_of_in_memory"].get(name)
        lines.append(f"| {name} | {rate:.2f} | {'' if frac is None else f'{100 * frac:.0f}%'} "
                     f"| {result['cpu_ms_per_image'][name]:.0f} |")
    return "\n".join(lines)
