"""The ``gem-jax train-toy`` command: trains the toy CLIP of the model card (resumable)."""

from __future__ import annotations

import argparse
import dataclasses
import json
import pathlib
import sys
import traceback

from gem_jax import argtypes

EXIT_OK, EXIT_RUNTIME, EXIT_USAGE = 0, 1, 2
_NAME = "gem-jax train-toy"


def add_parser(subparsers, parents=()) -> argparse.ArgumentParser:
    """Adds the ``train-toy`` sub-command to ``subparsers`` (``parents``: shared flag parsers)."""
    p = subparsers.add_parser(
        "train-toy", parents=list(parents), help="train the toy CLIP on synthetic scenes (docs/TOY_MODEL.md)",
        description="Trains the toy CLIP of docs/TOY_MODEL.md on synthetic captioned scenes with the "
                    "image-caption contrastive loss, and writes it in gem-jax's native format. The state is "
                    "saved every few steps to OUT.state.npz: rerun the same command to resume after an "
                    "interruption.")
    p.add_argument("--out", required=True, metavar="DIR", help="directory to write the model to")
    p.add_argument("--seed", type=argtypes.nonneg_int, default=None,
                   help="seed of the initial weights and of the training scenes (default: the shipped model's)")
    p.add_argument("--steps", type=argtypes.positive_int, default=None,
                   help="optimiser steps (default: the recipe's; another number is another run)")
    p.add_argument("--recipe", metavar="FILE.json", default=None,
                   help="recipe fields to change, as a JSON object (e.g. {\"batch_size\": 64})")
    p.add_argument("--force", action="store_true",
                   help="start over: discard a saved state and replace a model already at --out")
    p.add_argument("--save-every", type=argtypes.positive_int, default=25, metavar="STEPS",
                   help="save the training state every this many steps (default 25)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


class _Usage(Exception):
    pass


def _recipe(args):
    from gem_jax.toy import train

    recipe = train.RECIPE
    if args.recipe:
        try:
            fields = json.loads(pathlib.Path(args.recipe).read_text("utf-8"))
        except OSError as e:
            raise _Usage(f"cannot read --recipe {args.recipe}: {e.strerror or e}") from None
        except ValueError as e:
            raise _Usage(f"--recipe {args.recipe} is not JSON: {e}") from None
        if not isinstance(fields, dict):
            raise _Usage(f"--recipe {args.recipe} must hold a JSON object of recipe fields")
        try:
            recipe = train.Recipe.from_dict({**recipe.to_dict(), **fields})
            recipe.config()
        except (TypeError, ValueError) as e:
            raise _Usage(f"--recipe {args.recipe}: {e}") from None
    if args.steps is not None:
        recipe = dataclasses.replace(recipe, steps=args.steps)
    return recipe


def _finished(out: pathlib.Path):
    """The ``toy`` record of a finished model at ``out``, or None."""
    from gem_jax.checkpoints.native import CONFIG_FILE, is_native

    if not is_native(out):
        return None
    try:
        return json.loads((out / CONFIG_FILE).read_text("utf-8")).get("toy")
    except (OSError, ValueError):
        return None


def _execute(args) -> int:
    from gem_jax.checkpoints.native import NotReplaceableError, _check_replaceable
    from gem_jax.toy import train

    recipe = _recipe(args)
    seed = train.SEED if args.seed is None else args.seed
    out = pathlib.Path(args.out).expanduser()
    if out.exists() and not out.is_dir():
        raise _Usage(f"--out must name a directory, {out} is a file")
    state = train.state_path(out)
    if out.is_dir() and any(out.iterdir()):
        done = _finished(out)
        if done is not None and not args.force:
            if done.get("seed") == seed and done.get("recipe") == recipe.to_dict():
                print(f"{_NAME}: {out} is already trained ({done.get('steps')} steps, seed {seed}); nothing to do "
                      "(--force trains it again)", file=sys.stderr)
                return EXIT_OK
            raise _Usage(f"{out} holds a toy model of another seed or recipe; pass --force to replace it, or "
                         "choose another --out")
        try:
            _check_replaceable(out)
        except NotReplaceableError as e:
            raise _Usage(str(e)) from None
    if args.force:
        state.unlink(missing_ok=True)
    try:
        result = train.train(out, recipe, seed, save_every=args.save_every, progress=not args.no_progress)
    except train.StateError as e:
        raise _Usage(f"{e}; pass --force to start over") from None
    except KeyboardInterrupt:
        where = f"; rerun the same command to resume from {state}" if state.exists() else ""
        print(f"{_NAME}: interrupted{where}", file=sys.stderr)
        return 130
    resumed = f", resumed from step {result.resumed_from}" if result.resumed_from else ""
    print(f"{_NAME}: {result.steps} steps in {result.total_seconds / 60:.1f} min{resumed}; loss "
          f"{result.final_loss:.3f}, logit scale {result.logit_scale:.1f} -> {out}", file=sys.stderr)
    return EXIT_OK


def run(args) -> int:
    """Runs ``gem-jax train-toy``: 0 on success, 2 for a usage error, 1 for a runtime error (one
    line on stderr; the traceback too with ``--debug``)."""
    try:
        return _execute(args)
    except _Usage as e:
        print(f"{_NAME}: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except Exception as e:
        if getattr(args, "debug", False):
            traceback.print_exc()
        print(f"{_NAME}: error: {type(e).__name__}: {e}" if not isinstance(e, OSError) else f"{_NAME}: error: {e}",
              file=sys.stderr)
        return EXIT_RUNTIME


def main(argv=None) -> int:
    """``python -m gem_jax.toy.command ...``: the sub-command on its own."""
    parser = argparse.ArgumentParser(prog=_NAME)
    sub = parser.add_subparsers(dest="command", required=True)
    add_parser(sub)
    return run(parser.parse_args(["train-toy", *(sys.argv[1:] if argv is None else argv)]))


if __name__ == "__main__":
    sys.exit(main())
