"""``gem-jax models`` and ``gem-jax convert``: what models there are, and converting them."""

from __future__ import annotations

import sys

from gem_jax import checkpoints
from gem_jax.cli import argtypes
from gem_jax.cli.common import EXIT_OK, RuntimeFailure, UsageError


def add_parsers(sub, parents) -> None:
    m = sub.add_parser("models", parents=parents, help="list the model registry and the models in weights/",
                       description="Lists the registry (name, architecture, activation, weights, hub repository, "
                                   "local copy) and every other model folder in the weights directory.")
    m.set_defaults(run=run_models)
    conv = sub.add_parser("convert", parents=parents, help="convert a checkpoint into the native format",
                          description="Reads a checkpoint in any layout and writes the native one. A registry "
                                      "name, or the hub id of a registry model, goes to that model's folder in "
                                      "the weights directory unless --out says otherwise. --random writes seeded "
                                      "random weights of an architecture, to try every command without real ones.")
    conv.add_argument("source", help="registry name, hub id, local directory or file; with --random an "
                                     "architecture (ViT-B-16, ...)")
    conv.add_argument("--out", default=None, help="output directory, e.g. weights/my-model (default for registry "
                                                  "models: their folder in the weights directory)")
    conv.add_argument("--random", action="store_true", help="seeded random weights of the architecture SOURCE")
    conv.add_argument("--seed", type=argtypes.nonneg_int, default=0, help="with --random: the seed (0)")
    conv.add_argument("--activation", choices=("quick_gelu", "gelu"), default=None,
                      help="needed when the checkpoint does not say (bare safetensors files)")
    conv.add_argument("--force", action="store_true", help="replace a checkpoint directory gem-jax wrote")
    conv.set_defaults(run=run_convert)


def _table(rows) -> list[str]:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = []
    for i, r in enumerate(rows):
        lines.append("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())
        if i == 0:
            lines.append("  ".join("-" * w for w in widths))
    return lines


def run_models(args) -> int:
    states = {"converted": "converted", "original": "original files", "missing": "-", "packaged": "packaged"}
    rows = [("name", "architecture", "activation", "weights", "hub repository", "local copy")]
    for name in checkpoints.available_models():
        e = checkpoints.get_entry(name)
        rows.append((name, e.architecture, e.activation, e.pretrained, e.hub_repo or "(none)",
                     states.get(checkpoints.local_state(name), checkpoints.local_state(name))))
    print("\n".join(_table(rows)))
    root = checkpoints.weights_dir()
    print(f"\nlocal copies live in {root}/<name>, e.g. {checkpoints.local_dir(checkpoints.DEFAULT_MODEL).name}; "
          "\"original files\" load as they are, `gem-jax convert NAME` makes the faster native copy")
    print("toy: a tiny CLIP gem-jax trained on synthetic scenes, inside the package (no download); not CLIP, "
          "its model card is docs/TOY_MODEL.md")
    others = checkpoints.local_folders()
    if others:
        print(f"\nother model folders in {root} (load them with --model PATH):")
        print("\n".join(_table([("folder", "holds")] + [(str(d), state) for d, state in others])))
    return EXIT_OK


def run_convert(args) -> int:
    try:
        if args.seed and not args.random:
            raise UsageError("--seed applies only to --random")
        if args.random:
            if args.activation:
                raise UsageError("--activation does not apply to --random (the architecture sets it)")
            out = args.out or checkpoints.weights_dir() / f"random-{args.source.replace('/', '-')}"
            out = checkpoints.convert_random(args.source, out, seed=args.seed, force=args.force)
        else:
            out = checkpoints.convert(args.source, args.out, force=args.force, activation=args.activation)
    except checkpoints.UnknownModelError as e:
        raise UsageError(str(e)) from None
    except FileExistsError as e:
        raise RuntimeFailure(str(e)) from None
    except (checkpoints.ModelNotAvailableError, checkpoints.CheckpointError, FileNotFoundError) as e:
        raise RuntimeFailure(str(e)) from None
    except ValueError as e:  # no --out for a non-registry source, an unknown architecture
        raise UsageError(str(e)) from None
    if not getattr(args, "quiet", False):
        if args.random:
            print(f"convert: wrote RANDOM weights of {args.source} (seed {args.seed}) -> {out}", file=sys.stderr)
        else:
            print(f"convert: {args.source} -> {out}", file=sys.stderr)
    return EXIT_OK
