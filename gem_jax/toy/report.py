"""The model card's table: every method on the held-out toy scenes, trained weights beside random ones.

``python -m gem_jax.toy.report [--model DIR] [--scenes 200] [--json FILE]`` prints the
Markdown table of ``docs/TOY_MODEL.md`` (pointing and AUROC of each method, retrieval),
measured on the shipped model (or ``--model``) and on random weights of the same
architecture (seed 0).
"""

from __future__ import annotations

import argparse
import json
import sys
import time

from gem_jax.checkpoints import read_native
from gem_jax.engine.methods import method_names
from gem_jax.loading import Model, model_from_checkpoint
from gem_jax.models import init_params
from gem_jax.toy import model_path, scenes
from gem_jax.toy import measures as ev
from gem_jax.toy.measures import HELD_OUT


def method_options(method: str, defaults: dict, layers: int) -> dict:
    """The options each method is measured with: GEM with the model's recommended settings;
    CLIP Surgery over the same blocks as GEM; the one-block methods as published; every method
    at the model's input size and prompt template."""
    common = {k: defaults[k] for k in ("size", "template") if k in defaults}
    if method == "gem":
        return {k: v for k, v in defaults.items() if k != "method"}
    if method == "clipsurgery":
        return {**common, "layers": defaults.get("layers", layers)}
    return common


def random_model(model, seed: int = 0):
    """A model of ``model``'s architecture and tokenizer with random weights."""
    return Model(model.config, init_params(model.config, seed=seed), model.tokenizer, "random", random_weights=True)


def measure(model, defaults: dict, seeds, methods=None) -> dict:
    """``{"trained": {method: result}, "random": {method: result}}`` on the scenes of ``seeds``
    (``methods``: default every registered method)."""

    methods = method_names() if methods is None else methods
    size = defaults.get("size", model.config.vision.image_size)
    sc = scenes.scenes(seeds, size)
    out = {}
    for label, m in (("trained", model), ("random", random_model(model))):
        out[label] = {}
        for i, method in enumerate(methods):
            opts = method_options(method, defaults, model.config.vision.layers)
            out[label][method] = ev.evaluate(m, method=method, scenes=sc, retrieval_too=(i == 0), **opts)
    return out


def table(results: dict) -> str:
    """The Markdown table of :func:`measure`'s results."""
    lines = ["| method | pointing | AUROC | pointing, random weights | AUROC, random weights |",
             "|---|---|---|---|---|"]
    for method, r in results["trained"].items():
        z = results["random"][method]
        lines.append(f"| {method} | {r['pointing']:.3f} | {r['auroc']:.3f} | {z['pointing']:.3f} | {z['auroc']:.3f} |")
    first = next(iter(results["trained"]))
    t, z = results["trained"][first], results["random"][first]
    lines += ["", "| retrieval (top-1) | trained | random weights |", "|---|---|---|",
              f"| text -> image | {t['text_to_image_top1']:.3f} | {z['text_to_image_top1']:.3f} |",
              f"| image -> text | {t['image_to_text_top1']:.3f} | {z['image_to_text_top1']:.3f} |"]
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m gem_jax.toy.report", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="a toy model directory (default: the shipped one)")
    p.add_argument("--scenes", type=int, default=len(HELD_OUT), help="held-out scenes (seeds 0..N-1; default 200)")
    p.add_argument("--json", default=None, help="also write the results as JSON to this file")
    args = p.parse_args(argv)
    path = args.model or model_path()
    model = model_from_checkpoint(read_native(path), "toy")
    defaults = dict(model.defaults)
    t0 = time.perf_counter()
    results = measure(model, defaults, range(args.scenes))
    print(table(results))
    print(f"\n{args.scenes} held-out scenes (seeds 0-{args.scenes - 1}), "
          f"{results['trained']['gem']['objects']} objects; {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump({"model": str(path), "defaults": defaults, **results}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
