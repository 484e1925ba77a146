"""``gem-jax train-toy``: trains the toy CLIP of ``docs/TOY_MODEL.md`` (resumable after any kill)."""

from __future__ import annotations

import dataclasses
import json
import pathlib

from gem_jax import files
from gem_jax.checkpoints.native import CONFIG_FILE, NotReplaceableError, check_replaceable, is_native
from gem_jax.cli import argtypes
from gem_jax.cli.common import EXIT_OK, UsageError, progress_of


def add_parser(sub, parents) -> None:
    p = sub.add_parser(
        "train-toy", parents=parents, help="train the toy CLIP on synthetic scenes (docs/TOY_MODEL.md)",
        description="Trains the toy CLIP of docs/TOY_MODEL.md on synthetic captioned scenes with the "
                    "image-caption contrastive loss only, and writes it in gem-jax's native format. The state is "
                    "saved every few steps to OUT.state.npz: rerun the same command to resume after an "
                    "interruption (even kill -9). With the defaults it reproduces the shipped model.")
    p.add_argument("--out", required=True, metavar="DIR", help="directory to write the model to")
    p.add_argument("--seed", type=argtypes.nonneg_int, default=None,
                   help="seed of the initial weights and of the training scenes (default: the shipped model's)")
    p.add_argument("--steps", type=argtypes.positive_int, default=None,
                   help="optimiser steps (default: the recipe's; another number is another run)")
    p.add_argument("--recipe", metavar="FILE.json", default=None,
                   help="recipe fields to change, as a JSON object (e.g. {\"batch_size\": 64})")
    p.add_argument("--force", action="store_true",
                   help="start over: discard this run's saved state and replace a toy model gem-jax wrote at --out")
    p.add_argument("--save-every", type=argtypes.positive_int, default=25, metavar="STEPS",
                   help="save the training state every this many steps (default 25)")
    p.set_defaults(run=run)


def _recipe(args):
    from gem_jax.toy import train  # jax and optax: loaded by this command only

    recipe = train.RECIPE
    if args.recipe:
        try:
            fields = json.loads(pathlib.Path(args.recipe).read_text("utf-8"))
        except OSError as e:
            raise UsageError(f"cannot read --recipe {args.recipe}: {e.strerror or e}") from None
        except ValueError as e:
            raise UsageError(f"--recipe {args.recipe} is not JSON: {e}") from None
        if not isinstance(fields, dict):
            raise UsageError(f"--recipe {args.recipe} must hold a JSON object of recipe fields")
        try:
            recipe = train.Recipe.from_dict({**recipe.to_dict(), **fields})
            recipe.config()
        except (TypeError, ValueError) as e:
            raise UsageError(f"--recipe {args.recipe}: {e}") from None
    if args.steps is not None:
        recipe = dataclasses.replace(recipe, steps=args.steps)
    return recipe


def _finished(out: pathlib.Path):
    """The ``toy`` record of a finished model at ``out``, or None."""
    if not is_native(out):
        return None
    try:
        return json.loads((out / CONFIG_FILE).read_text("utf-8")).get("toy")
    except (OSError, ValueError):
        return None


def run(args) -> int:
    from gem_jax.toy import train  # jax and optax: loaded by this command only

    progress = progress_of(args, "train-toy")
    recipe = _recipe(args)
    seed = train.SEED if args.seed is None else args.seed
    out = pathlib.Path(args.out).expanduser()
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out must name a directory, {out} is a file")
    state = train.state_path(out)
    if out.is_dir() and any(out.iterdir()):
        done = _finished(out)
        if done is not None and not args.force:
            if done.get("seed") == seed and done.get("recipe") == recipe.to_dict():
                progress.say(f"{out} is already trained ({done.get('steps')} steps, seed {seed}); nothing to do "
                             "(--force trains it again)")
                return EXIT_OK
            raise UsageError(f"{out} holds a toy model of another seed or recipe; pass --force to replace it, or "
                             "choose another --out")
        try:
            check_replaceable(out)  # only a checkpoint gem-jax wrote is ever replaced
        except NotReplaceableError as e:
            raise UsageError(str(e)) from None
    try:
        result = train.train(out, recipe, seed, save_every=args.save_every, progress=progress, force=args.force)
    except files.OutputError as e:
        raise UsageError(str(e)) from None
    except train.StateError as e:
        raise UsageError(f"{e}; pass --force to start over") from None
    except KeyboardInterrupt:
        if state.exists():
            progress.note(f"the state is saved; rerun the same command to resume from {state}")
        raise
    resumed = f", resumed from step {result.resumed_from}" if result.resumed_from else ""
    progress.say(f"{result.steps} steps in {result.total_seconds / 60:.1f} min{resumed}; loss "
                 f"{result.final_loss:.3f}, logit scale {result.logit_scale:.1f} -> {out}")
    return EXIT_OK
