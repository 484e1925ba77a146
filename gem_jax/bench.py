"""Side-by-side benchmark of gem-jax and the reference ``gem-torch`` on identical weights.

``gem-jax bench`` runs :func:`run` and prints :func:`format_table`. Both implementations
get the same random weights, the same normalised pixels and the same text embeddings
(text encoding is left out of the timing for both), and produce min-max heatmaps at
the input size. Calls alternate (gem-jax, reference, gem-jax, ...) after warm-up and
compilation so that drift in a noisy machine hits both alike; the median time per
call is reported, with the fastest beside it.

Achieved GFLOP/s divides the analytic count of :func:`count_flops` (the work GEM needs,
the same number for both implementations) by the median time, and is compared with
the float32 matmul peak measured in the same process (:func:`matmul_peak`): the best
of timings taken before the first case and after every case, so that a slow first
measurement on a noisy machine does not make a fraction of the peak exceed 100%.
"""

from __future__ import annotations

import dataclasses
import itertools
import os
import platform
import statistics
import threading
import time
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from gem_jax import gem as gem_lib
from gem_jax.config import CLIPConfig, architecture


def matmul_peak(n: int = 2048, repeats: int = 7) -> float:
    """The fastest float32 ``jnp.dot`` of two (n, n) matrices, in GFLOP/s."""
    rng = np.random.default_rng(0)
    a, b = (jnp.asarray(rng.standard_normal((n, n), dtype=np.float32)) for _ in range(2))
    dot = jax.jit(jnp.dot)
    dot(a, b).block_until_ready()
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        dot(a, b).block_until_ready()
        best = min(best, time.perf_counter() - t)
    return 2 * n ** 3 / best / 1e9


def count_flops(config: CLIPConfig, size: tuple[int, int], opts, prompts: int) -> dict:
    """Multiply-adds x 2 of one image's heatmaps, by part (GFLOP).

    ``opts`` is GEM options or any :class:`gem_jax.methods.Method`. Counts matrix
    products only (elementwise work, softmax and LayerNorm are small beside them):
    patch embedding, the blocks before the method's path, the original blocks beside
    it (their q/k/v projections, attention and MLP, except the last block's attention
    output and MLP when the path does not use them), the path's attention with its
    output projection and MLP (GEM: ``iterations + 1`` attentions of two N x N products
    per projection; one per projection for the other self-self attentions; none for
    MaskCLIP's), ``ln_post @ proj``, the text similarity and the bilinear upsampling.
    The keys keep GEM's names for every method.
    """
    from gem_jax.methods import GEMAttention, SelfSelf, as_method

    method = as_method(opts)
    v = config.vision
    p = v.patch_size
    h, w = size[0] // p, size[1] // p
    n, c, m, d = v.tokens(size), v.width, v.mlp_width, config.embed_dim
    qkv, attn, out, mlp = 2 * n * c * 3 * c, 2 * 2 * n * n * c, 2 * n * c * c, 2 * 2 * n * c * m
    k = method.blocks
    att = method.attention
    if isinstance(att, GEMAttention):
        mixing = len(att.options.projections) * (att.options.iterations + 1) * attn
    elif isinstance(att, SelfSelf):
        mixing = len(att.projections) * attn
    else:
        mixing = 0
    last_original = 1 if method.class_token == "original" else 0
    parts = {
        "patch_embed": 2 * h * w * c * 3 * p * p,
        "blocks": (v.layers - k) * (qkv + attn + out + mlp),
        "gem_blocks_original": k * qkv + max(k - 1 + last_original, 0) * (attn + out + mlp),
        "self_self_attention": k * (mixing + out + (mlp if method.mlp else 0)),
        "head": 2 * n * c * d,
        "similarity": 2 * h * w * d * prompts,
        "upsample": 2 * prompts * (size[0] * h * w + size[0] * w * size[1]),
    }
    parts = {k: x / 1e9 for k, x in parts.items()}
    parts["total"] = sum(parts.values())
    return parts


class _PeakRSS:
    """Highest resident set size while the block runs, above what it was before (bytes).

    Sampled every 2 ms from ``/proc/self/statm``; ``None`` where that does not exist.
    """

    def __init__(self):
        self.peak: int | None = None

    @staticmethod
    def _rss() -> int | None:
        try:
            with open("/proc/self/statm") as f:
                return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        except (OSError, ValueError, IndexError):
            return None

    def __enter__(self):
        self._base = self._rss()
        self._max = self._base
        self._stop = threading.Event()
        if self._base is not None:
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def _sample(self):
        while not self._stop.is_set():
            r = self._rss()
            if r is not None and r > self._max:
                self._max = r
            time.sleep(0.002)

    def __exit__(self, *exc):
        self._stop.set()
        if self._base is not None:
            self._thread.join()
            self._max = max(self._max, self._rss() or 0)
            self.peak = self._max - self._base
        return False


@dataclasses.dataclass
class _Runner:
    name: str
    call: Callable[[], Any]
    compile_s: float | None = None
    xla_bytes: int | None = None
    times: list = dataclasses.field(default_factory=list)
    rss: int = 0

    def timed(self):
        with _PeakRSS() as mem:
            t = time.perf_counter()
            out = self.call()
            self.times.append(time.perf_counter() - t)
        if mem.peak is not None:
            self.rss = max(self.rss, mem.peak)
        return out


def _jax_runner(model, size, batch, text, opts, dtype, schedule, method: str = "gem") -> tuple[_Runner, Callable]:
    from gem_jax.pipeline import GEM

    kw = dict(layers=opts.layers, iterations=opts.iterations, temperature=opts.temperature) if method == "gem" else {}
    g = GEM(model, method=method, size=size, batch_size=batch, dtype=dtype, schedule=schedule, **kw)
    pixels, emb = text["pixels"], text["jax"]
    mask = np.ones(emb.shape[:2], bool)
    t = time.perf_counter()
    compiled = g._maps.lower(g._vparams, pixels, emb, mask).compile()
    compile_s = time.perf_counter() - t
    mem = compiled.memory_analysis()
    xla_bytes = None if mem is None else int(mem.temp_size_in_bytes + mem.argument_size_in_bytes
                                             + mem.output_size_in_bytes)

    def call():
        return jax.device_get(compiled(g._vparams, pixels, emb, mask))

    name = f"gem-jax {dtype}" if method == "gem" else f"{method} (gem-jax {dtype})"
    return _Runner(name, call, compile_s, xla_bytes), lambda out: out[1]


def _reference_runner(torch_model, opts, text) -> tuple[_Runner, Callable]:
    import copy

    import torch
    from gem.gem_wrapper import GEMWrapper

    ref = GEMWrapper(copy.deepcopy(torch_model), tokenizer=None, depth=opts.layers + 1,
                     ss_attn_iter=opts.iterations,
                     ss_attn_temp=None if opts.temperature is None else 1.0 / opts.temperature)
    emb = torch.from_numpy(text["torch"])
    ref.encode_text = lambda prompts: emb  # the same embeddings, and no text tower in the timing
    x = torch.from_numpy(np.ascontiguousarray(text["pixels"].transpose(0, 3, 1, 2)))
    prompts = [""] * emb.shape[1]

    def call():
        with torch.inference_mode():
            return ref(x, prompts, normalize=True)

    return _Runner("reference gem-torch", call), lambda out: out.numpy()


def _reference_model(arch: str, config: CLIPConfig):
    """A random open_clip CLIP of ``arch`` and the same weights as gem-jax parameters."""
    import open_clip
    import torch

    from gem_jax.checkpoints.layouts import params_from_openclip

    torch.manual_seed(0)
    model = open_clip.create_model(arch, pretrained=None,
                                   force_quick_gelu=config.vision.activation == "quick_gelu").eval()
    sd = {k: v.detach().float().numpy() for k, v in model.state_dict().items()}
    return model, jax.tree_util.tree_map(jnp.asarray, params_from_openclip(sd, config))


def run(arch: str = "ViT-B-16", size: int | tuple[int, int] = 448, batches: Sequence[int] = (1, 4),
        prompts: Sequence[int] = (1, 8, 64), rounds: int = 5, reference: bool = False,
        dtypes: Sequence[str] = ("float32",), schedule: gem_lib.Schedule | str = "auto",
        head_chunk: int | None = None, image_chunk: int | None = None,
        opts: gem_lib.GEMOptions = gem_lib.GEMOptions(), progress: bool = True,
        methods: Sequence[str] = ("gem",)) -> dict:
    """Benchmarks every (batch, prompt count) case; returns a JSON-ready dict.

    Args:
      arch: a standard architecture name (random weights: speed does not depend on them).
      size: input size, int or (H, W).
      batches, prompts: the cases.
      rounds: timed calls per implementation and case, alternating.
      reference: also time ``gem-torch`` (needs the ``test`` extra's packages).
      dtypes: gem-jax compute dtypes; each after the first also reports the max abs
        difference of its heatmaps from the first's.
      schedule: gem-jax's :class:`~gem_jax.gem.Schedule` or ``"auto"``.
      head_chunk, image_chunk: when given, replace that field of the schedule.
      opts: GEM options.
      progress: print a line per measurement to stderr.
      methods: the methods timed (:data:`gem_jax.gem.METHODS`, official defaults; GEM
        with ``opts``); "max diff vs first" compares each with the first run of the
        same method (the reference is GEM).
    """
    import sys

    from gem_jax.pipeline import Model
    from gem_jax.tokenizer import Tokenizer

    def say(msg):
        if progress:
            print(msg, file=sys.stderr, flush=True)

    hw = (size, size) if isinstance(size, int) else tuple(size)
    config = architecture(arch)
    methods = tuple(dict.fromkeys(methods))
    unknown = [m for m in methods if m not in gem_lib.METHODS]
    if unknown or not methods:
        raise ValueError(f"methods must be among {gem_lib.METHODS}, got {list(methods)}")
    if reference and "gem" not in methods:
        raise ValueError("the reference is gem-torch: time it with the gem method")
    from gem_jax.methods import get_method

    specs = {m: opts if m == "gem" else get_method(m) for m in methods}
    torch_model = None
    if reference:
        try:
            import gem.gem_wrapper  # noqa: F401
            import open_clip  # noqa: F401
        except ImportError as e:
            raise RuntimeError(f"--reference needs gem-torch and open_clip_torch ({e}); "
                               'install them with: pip install -e ".[test]"') from None
        say(f"building the reference {arch} and copying its random weights")
        torch_model, params = _reference_model(arch, config)
    else:
        from gem_jax.models import init_params

        params = init_params(config)
    model = Model(config, params, Tokenizer.default(config.text.context_length), f"random {arch}")
    schedule = gem_lib.Schedule.resolve(schedule, tokens=config.vision.tokens(hw))
    schedule = dataclasses.replace(schedule, **{k: v for k, v in (("head_chunk", head_chunk),
                                                                  ("image_chunk", image_chunk)) if v})

    say("measuring the float32 matmul peak")
    peaks = [matmul_peak()]
    result = {
        "arch": arch, "size": list(hw), "gem_options": dataclasses.asdict(opts), "methods": list(methods),
        "schedule": dataclasses.asdict(schedule), "rounds": rounds,
        "matmul_peak_gflops": None,
        "machine": {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
                    "cpu_count": os.cpu_count(), "jax": jax.__version__, "backend": jax.default_backend(),
                    "devices": [str(d) for d in jax.devices()]},
        "cases": [],
    }
    if reference:
        import torch

        result["machine"]["torch"] = torch.__version__
        result["machine"]["torch_threads"] = torch.get_num_threads()
    rng = np.random.default_rng(0)
    for batch in batches:
        for n_prompts in prompts:
            flops = {m: count_flops(config, hw, spec, n_prompts) for m, spec in specs.items()}
            emb = rng.standard_normal((n_prompts, config.embed_dim)).astype(np.float32)
            emb /= np.linalg.norm(emb, axis=-1, keepdims=True)
            data = {"pixels": rng.standard_normal((batch, *hw, 3)).astype(np.float32),
                    "jax": np.broadcast_to(emb, (batch, *emb.shape)).copy(), "torch": emb[None]}
            runners, of = [], []
            for method in methods:
                for dtype in dtypes:
                    say(f"batch {batch}, {n_prompts} prompts: compiling {method} gem-jax {dtype}")
                    runners.append(_jax_runner(model, hw, batch, data, opts, dtype, schedule, method))
                    of.append(method)
            if reference:
                runners.append(_reference_runner(torch_model, opts, data))
                of.append("gem")
            outputs = [heat(r.timed()) for r, heat in runners]  # warm-up
            first = {m: outputs[of.index(m)] for m in methods}
            for i in range(rounds):
                for r, _ in runners:
                    r.timed()
                say(f"batch {batch}, {n_prompts} prompts: round {i + 1}/{rounds}: "
                    + ", ".join(f"{r.name} {r.times[-1]:.2f} s" for r, _ in runners))
            case = {"batch": batch, "prompts": n_prompts, "gflop_per_image": flops[methods[0]], "results": []}
            for (r, _), out, method in zip(runners, outputs, of):
                timed = r.times[1:]
                median = statistics.median(timed)
                total = flops[method]["total"]
                entry = {
                    "name": r.name, "method": method, "gflop_per_image": total,
                    "images_per_s": batch / median, "images_per_s_best": batch / min(timed),
                    "median_s": median, "times_s": timed,
                    "gflops": total * batch / median,
                    "compile_s": r.compile_s, "xla_memory_bytes": r.xla_bytes, "peak_rss_increase_bytes": r.rss,
                    "max_abs_diff_vs_first": float(np.abs(np.asarray(out, np.float32)
                                                          - np.asarray(first[method], np.float32)).max()),
                }
                case["results"].append(entry)
            if reference:
                ref = case["results"][-1]["images_per_s"]
                for entry in case["results"][:-1]:
                    entry["ratio_vs_reference"] = entry["images_per_s"] / ref
            result["cases"].append(case)
            peaks.append(matmul_peak(repeats=3))
    result["matmul_peak_gflops"] = peak = max(peaks)
    result["matmul_peak_samples_gflops"] = peaks
    for case in result["cases"]:
        for entry in case["results"]:
            entry["fraction_of_peak"] = entry["gflops"] / peak
    return result


def format_table(result: dict) -> str:
    """A Markdown table of :func:`run`'s result."""
    lines = [
        f"{result['arch']} at {result['size'][0]}x{result['size'][1]}, {result['rounds']} alternating rounds; "
        f"float32 matmul peak {result['matmul_peak_gflops']:.0f} GFLOP/s (best of "
        f"{len(result.get('matmul_peak_samples_gflops') or [0])} timings over the run); "
        f"{result['machine']['processor']}, {result['machine']['cpu_count']} CPUs, jax {result['machine']['jax']}"
        + (f", torch {result['machine']['torch']}" if "torch" in result["machine"] else ""),
        "",
        "| batch | prompts | implementation | images/s (median) | best | vs reference | GFLOP/s | of peak "
        "| compile s | XLA memory MB | peak RSS +MB | max diff vs first |",
        "|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    mb = lambda b: "" if b is None else f"{b / 2 ** 20:.0f}"  # noqa: E731
    for case in result["cases"]:
        for e in case["results"]:
            ratio = e.get("ratio_vs_reference")
            ratio = "" if ratio is None else f"{ratio:.2f}x"
            compile_s = "" if e["compile_s"] is None else f"{e['compile_s']:.1f}"
            lines.append(
                f"| {case['batch']} | {case['prompts']} | {e['name']} | {e['images_per_s']:.3f} "
                f"| {e['images_per_s_best']:.3f} | {ratio} "
                f"| {e['gflops']:.0f} | {100 * e['fraction_of_peak']:.0f}% "
                f"| {compile_s} | {mb(e['xla_memory_bytes'])} "
                f"| {mb(e['peak_rss_increase_bytes'])} | {e['max_abs_diff_vs_first']:.1e} |")
    return "\n".join(lines)


def _photo_like_jpegs(directory, n: int, hw: tuple[int, int], seed: int = 0) -> None:
    """``n`` JPEG files of ``hw`` (quality 90): smooth random colour fields with some grain,
    closer to photographs in size and decoding cost than white noise."""
    from PIL import Image

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
        cur = (gem._grid(gem._vparams, pixels, text_b, mask_b), count)
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
             progress: bool = True) -> dict:
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
    import shutil
    import sys
    import tempfile

    from gem_jax import batch as batch_lib
    from gem_jax.batch import loader as loader_lib
    from gem_jax.models import init_params
    from gem_jax.pipeline import GEM, Model
    from gem_jax.tokenizer import Tokenizer
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    def say(msg):
        if progress:
            print(msg, file=sys.stderr, flush=True)

    hw = (size, size) if isinstance(size, int) else tuple(size)
    config = architecture(arch) if isinstance(arch, str) else arch
    arch = arch if isinstance(arch, str) else "custom"
    model = Model(config, init_params(config), Tokenizer.default(config.text.context_length), f"random {arch}")
    gem = GEM(model, size=hw, batch_size=batch)
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
            opts = batch_lib.BatchOptions(names, batch_size=b, workers=workers, quiet=True, shard=(0, 1),
                                          force=True)
            return batch_lib.run(gem, items, os.path.join(tmp, "out"), opts).processed

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
        "machine": {"processor": _cpu_name(), "cpu_count": os.cpu_count(), "jax": jax.__version__,
                    "backend": jax.default_backend(),
                    "load_average_before": load_before,
                    "load_average_after": os.getloadavg() if hasattr(os, "getloadavg") else None},
    }


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


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
