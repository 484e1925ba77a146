"""The model benchmark: gem-jax and the reference ``gem-torch`` side by side on identical weights.

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
import functools
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

from gem_jax.config import CLIPConfig, architecture
from gem_jax.engine.cost import count_flops
from gem_jax.engine.methods import GEMOptions, get_method
from gem_jax.engine.tower import Schedule
from gem_jax.loading import Model
from gem_jax.models import init_params
from gem_jax.pipeline import GEM
from gem_jax.progress import Progress
from gem_jax.tokenizer import Tokenizer


def sayer(progress):
    """A function printing one measurement line (through ``progress``, or stderr if True)."""
    if isinstance(progress, Progress):
        return progress.say
    if progress:
        return Progress("bench").say
    return lambda msg: None


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


class PeakRSS:
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
        with PeakRSS() as mem:
            t = time.perf_counter()
            out = self.call()
            self.times.append(time.perf_counter() - t)
        if mem.peak is not None:
            self.rss = max(self.rss, mem.peak)
        return out


def _jax_runner(model, size, batch, text, opts, dtype, schedule, method: str = "gem") -> tuple[_Runner, Callable]:
    spec = opts.method() if method == "gem" else get_method(method)
    g = GEM(model, method=spec, size=size, batch_size=batch, dtype=dtype, schedule=schedule, memory_limit=None)
    pixels, emb = text["pixels"], text["jax"]
    mask = np.ones(emb.shape[:2], bool)
    program = jax.jit(functools.partial(g.program))
    t = time.perf_counter()
    compiled = program.lower(g.visual_params, pixels, emb, mask).compile()
    compile_s = time.perf_counter() - t
    mem = compiled.memory_analysis()
    xla_bytes = None if mem is None else int(mem.temp_size_in_bytes + mem.argument_size_in_bytes
                                             + mem.output_size_in_bytes)

    def call():
        return jax.device_get(compiled(g.visual_params, pixels, emb, mask))

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


def reference_model(arch: str, config: CLIPConfig):
    """A random open_clip CLIP of ``arch`` and the same weights as gem-jax parameters."""
    import open_clip
    import torch

    from gem_jax.checkpoints.layouts import params_from_openclip  # torch only here

    torch.manual_seed(0)
    model = open_clip.create_model(arch, pretrained=None,
                                   force_quick_gelu=config.vision.activation == "quick_gelu").eval()
    sd = {k: v.detach().float().numpy() for k, v in model.state_dict().items()}
    return model, jax.tree_util.tree_map(jnp.asarray, params_from_openclip(sd, config))


def run(arch: str = "ViT-B-16", size: int | tuple[int, int] = 448, batches: Sequence[int] = (1, 4),
        prompts: Sequence[int] = (1, 8, 64), rounds: int = 5, reference: bool = False,
        dtypes: Sequence[str] = ("float32",), schedule: Schedule | str = "auto",
        head_chunk: int | None = None, image_chunk: int | None = None,
        opts: GEMOptions = GEMOptions(), progress: Progress | bool = True,
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
      schedule: gem-jax's :class:`~gem_jax.Schedule` or ``"auto"``.
      head_chunk, image_chunk: when given, replace that field of the schedule.
      opts: GEM options.
      progress: a :class:`~gem_jax.progress.Progress` for a line per measurement (or a bool).
      methods: the methods timed (any registered method's name, official defaults; GEM
        with ``opts``); "max diff vs first" compares each with the first run of the
        same method (the reference is GEM). FLOPs come from each method's attention.
    """
    say = sayer(progress)
    hw = (size, size) if isinstance(size, int) else tuple(size)
    config = architecture(arch)
    methods = tuple(dict.fromkeys(methods))
    if not methods:
        raise ValueError("no methods given")
    if reference and "gem" not in methods:
        raise ValueError("the reference is gem-torch: time it with the gem method")
    specs = {m: opts.method() if m == "gem" else get_method(m) for m in methods}
    torch_model = None
    if reference:
        try:
            import gem.gem_wrapper  # noqa: F401
            import open_clip  # noqa: F401
        except ImportError as e:
            raise RuntimeError(f"--reference needs gem-torch and open_clip_torch ({e}); "
                               'install them with: pip install -e ".[test]"') from None
        say(f"building the reference {arch} and copying its random weights")
        torch_model, params = reference_model(arch, config)
    else:
        params = init_params(config)
    model = Model(config, params, Tokenizer.default(config.text.context_length), f"random {arch}")
    schedule = Schedule.resolve(schedule, tokens=config.vision.tokens(hw))
    schedule = dataclasses.replace(schedule, **{k: v for k, v in (("head_chunk", head_chunk),
                                                                  ("image_chunk", image_chunk)) if v})

    say("measuring the float32 matmul peak")
    peaks = [matmul_peak()]
    result = {
        "arch": arch, "size": list(hw), "gem_options": dataclasses.asdict(opts), "methods": {m: spec.describe() for m, spec in specs.items()},
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




def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


