"""The vocabulary benchmark: what prompt counts and the text side cost.

Image side: ``GEM.heatmaps(..., grid=True)`` on a few images with 8 to 10,000 prompts
whose embeddings are already in memory, so the time is the image tower (once per image)
plus one small product per prompt chunk; peak memory beside it. Text side: the 80-template
ensemble of some class names through gem-jax's text tower (texts on their own length), the
same texts through open_clip's ``encode_text`` on the same weights in the same process
(``reference``), and a second GEM reading them from the on-disk cache.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from typing import Sequence

import numpy as np

from gem_jax.bench.model import PeakRSS, cpu_name, reference_model, sayer
from gem_jax.config import architecture
from gem_jax.loading import Model
from gem_jax.engine import get_method
from gem_jax.models import init_params
from gem_jax.pipeline import GEM
from gem_jax.text import imagenet_templates
from gem_jax.tokenizer import Tokenizer

#: Class names of the text-side case (20 of them, as many as VOC's).
CLASSES = ("aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow", "dining table",
           "dog", "horse", "motorbike", "person", "potted plant", "sheep", "sofa", "train", "tv monitor")


def _median_time(fn, rounds: int) -> tuple[float, list[float]]:
    times = []
    for _ in range(rounds):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times), times


def vocabulary(arch: str = "ViT-B-32", size: int | tuple[int, int] = 224, batch: int = 4,
               prompt_counts: Sequence[int] = (8, 128, 1000, 10000), rounds: int = 3, reference: bool = False,
               progress=True, classes: Sequence[str] = CLASSES) -> dict:
    """Times prompt counts and the text side (see the module doc); returns a JSON-ready dict."""
    import os

    import jax

    say = sayer(progress)
    config = architecture(arch)
    torch_model = None
    if reference:
        try:
            import open_clip  # noqa: F401
        except ImportError as e:
            raise RuntimeError(f"--reference needs open_clip_torch ({e}); install the test extra") from None
        say(f"building the reference {arch} and copying its random weights")
        torch_model, params = reference_model(arch, config)
    else:
        params = init_params(config)
    model = Model(config, params, Tokenizer.default(config.text.context_length), f"random {arch}",
                  random_weights=True)
    rng = np.random.default_rng(0)
    hw = (size, size) if isinstance(size, int) else tuple(size)
    images = [rng.integers(0, 256, (*hw, 3), dtype=np.uint8) for _ in range(batch)]
    # GEM's default blocks, or every block of an architecture with fewer
    layers = min(get_method("gem").blocks, config.vision.layers)
    gem = GEM(model, size=hw, batch_size=batch, layers=layers, text_cache=False, memory_limit=None)
    result = {"arch": arch, "size": list(hw), "batch": batch, "rounds": rounds, "image_side": [],
              "machine": {"processor": cpu_name(), "cpu_count": os.cpu_count(), "jax": jax.__version__,
                          "backend": jax.default_backend(),
                          "load_average": os.getloadavg() if hasattr(os, "getloadavg") else None}}
    for n in prompt_counts:
        prompts = [f"thing number {i}" for i in range(n)]
        say(f"{n} prompts: their embeddings into memory (not timed)")
        gem.embed_text(prompts)
        gem.heatmaps(images, prompts, grid=True)  # compile
        with PeakRSS() as mem:
            median, times = _median_time(lambda: gem.heatmaps(images, prompts, grid=True), rounds)
        result["image_side"].append({"prompts": n, "median_s": median, "times_s": times,
                                     "peak_rss_increase_bytes": mem.peak})
        say(f"{n} prompts: {median:.3f} s per call (median of {rounds})")
    base = result["image_side"][0]["median_s"]
    for case in result["image_side"]:
        case["vs_first"] = case["median_s"] / base

    texts = [t.format(c) for c in classes for t in imagenet_templates()]
    text = {"classes": len(classes), "templates": len(imagenet_templates()), "texts": len(texts)}
    cache = tempfile.mkdtemp(prefix="gem-jax-bench-text-")
    try:
        first = GEM(model, layers=layers, template="imagenet", text_cache=cache, memory_limit=None)
        first.embed_text(classes[:1])  # compile the text tower
        first = GEM(model, layers=layers, template="imagenet", text_cache=cache, memory_limit=None)
        t = time.perf_counter()
        ours = first.embed_text(list(classes))
        text["gem_jax_s"] = time.perf_counter() - t
        second = GEM(model, layers=layers, template="imagenet", text_cache=cache, memory_limit=None)
        t = time.perf_counter()
        cached = second.embed_text(list(classes))
        text["cached_s"] = time.perf_counter() - t
        text["cached_equal"] = bool(np.array_equal(ours, cached))
        single = GEM(model, layers=layers, text_cache=False, memory_limit=None)
        t = time.perf_counter()
        single.embed_text(list(classes))
        text["one_template_s"] = time.perf_counter() - t
    finally:
        import shutil

        shutil.rmtree(cache, ignore_errors=True)
    say(f"text: {len(texts)} texts in {text['gem_jax_s']:.2f} s with gem-jax, {text['cached_s']:.3f} s from the cache")
    if torch_model is not None:
        import torch
        import open_clip

        tokenizer = open_clip.get_tokenizer(arch)
        ids = tokenizer(texts)
        with torch.inference_mode():
            torch_model.encode_text(ids[:8])  # warm-up
            t = time.perf_counter()
            ref = torch_model.encode_text(ids).float().numpy()
            text["open_clip_s"] = time.perf_counter() - t
        ref = ref / np.linalg.norm(ref, axis=-1, keepdims=True)
        ref = ref.reshape(len(classes), len(imagenet_templates()), -1).mean(axis=1)
        ref = ref / np.linalg.norm(ref, axis=-1, keepdims=True)
        text["max_abs_diff_vs_open_clip"] = float(np.abs(ref - ours).max())
        text["speedup_vs_open_clip"] = text["open_clip_s"] / text["gem_jax_s"]
        say(f"text: open_clip encode_text {text['open_clip_s']:.2f} s ({text['speedup_vs_open_clip']:.1f}x slower)")
    result["text_side"] = text
    return result


def format_vocabulary(result: dict) -> str:
    """A Markdown table of :func:`vocabulary`'s result."""
    m = result["machine"]
    load = m.get("load_average")
    lines = [f"{result['arch']} at {result['size'][0]}x{result['size'][1]}, {result['batch']} images, grid logits, "
             f"text embeddings in memory, median of {result['rounds']}; {m['processor']}, {m['cpu_count']} CPUs, "
             f"jax {m['jax']}" + (f"; load average {load[0]:.1f}" if load else ""), "",
             "| prompts | time | vs first | peak RSS +MB |", "|---:|---:|---:|---:|"]
    for c in result["image_side"]:
        peak = "" if c["peak_rss_increase_bytes"] is None else f"{c['peak_rss_increase_bytes'] / 2 ** 20:.0f}"
        lines.append(f"| {c['prompts']:,} | {c['median_s']:.3f} s | {c['vs_first']:.2f}x | {peak} |")
    t = result["text_side"]
    lines += ["", f"text: {t['classes']} classes x {t['templates']} templates = {t['texts']:,} texts", "",
              "| text side | time |", "|---|---:|",
              f"| gem-jax, 80 templates, first run | {t['gem_jax_s']:.2f} s |",
              f"| gem-jax, 80 templates, from the cache | {t['cached_s']:.3f} s |",
              f"| gem-jax, one template | {t['one_template_s']:.2f} s |"]
    if "open_clip_s" in t:
        lines.append(f"| open_clip encode_text, 80 templates | {t['open_clip_s']:.2f} s "
                     f"({t['speedup_vs_open_clip']:.1f}x gem-jax's; max diff {t['max_abs_diff_vs_open_clip']:.1e}) |")
    return "\n".join(lines)
