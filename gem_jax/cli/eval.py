"""``gem-jax eval``: a benchmark's metrics under a protocol, resumable."""

from __future__ import annotations

import argparse
import dataclasses
import json
import pathlib
import sys

from gem_jax import checks, files
from gem_jax.cli import argtypes
from gem_jax.cli.common import (EXIT_OK, EXIT_PARTIAL, RuntimeFailure, UsageError, add_model_flags, check_method,
                                compile_cache_from_flags, gem_from_flags, load_model, memory_refusal, output_file,
                                progress_of)
from gem_jax.engine.cost import MemoryLimitError
from gem_jax.eval.class_names import NAME_SETS
from gem_jax.eval.datasets import READERS
from gem_jax.eval.images import IMAGE_STEPS, require_opencv
from gem_jax.eval.protocols import BORDERS, PROTOCOLS

_UNSET = object()


def _optional_probability(text: str):
    if text.strip().lower() == "none":
        return None
    return argtypes.probability(text)


def _dilations(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.replace(" ", "").split(",") if v)
    except ValueError:
        values = ()
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive ints separated by commas (e.g. 8,16), got {text!r}")
    return values


def protocol_overrides(args) -> dict:
    """The protocol fields the post-processing flags of ``gem-jax eval`` set."""
    out = {}
    if getattr(args, "template", None) is not None:
        out["template"] = args.template
    if getattr(args, "class_names", None) is not None:
        out["class_names"] = None if args.class_names == "dataset" else args.class_names
        if out["class_names"] is not None:
            out.update(synonyms=True, background_prompts=True)
    if getattr(args, "logit_scale", None) is not None:
        out["logit_scale"] = args.logit_scale
    for name in ("background_threshold", "area_threshold"):
        value = getattr(args, name, _UNSET)
        if value is not _UNSET:
            out[name] = value
    if getattr(args, "pamr", None) is not None:
        out["pamr_iterations"] = args.pamr
    if getattr(args, "pamr_dilations", None) is not None:
        out["pamr_dilations"] = args.pamr_dilations
    if getattr(args, "border", None) is not None:
        out["border"] = args.border
    if getattr(args, "image_steps", None) is not None:
        out["image_steps"] = args.image_steps
    return out


def add_parser(subparsers, parents=()) -> argparse.ArgumentParser:
    """Adds the ``eval`` sub-command to ``subparsers`` (``parents``: shared flag parsers)."""
    p = subparsers.add_parser(
        "eval", parents=list(parents), help="evaluate on a segmentation benchmark (mIoU, p-mIoU)",
        description="Evaluates a method (GEM by default, or the protocol's own) on a benchmark in its usual on-disk layout and writes the "
                    "metrics as JSON. The run is resumable: rerun the same command to continue.")
    p.add_argument("--dataset", required=True, choices=list(READERS), help="benchmark")
    p.add_argument("--root", required=True, help="dataset directory (e.g. VOCdevkit/VOC2012)")
    p.add_argument("--split", default="val", help="split (default val)")
    p.add_argument("--protocol", choices=list(PROTOCOLS), default="gem",
                   help="gem: the paper's (short side 448, one template); sclip, clearclip, naclip, maskclip: "
                        "each official pipeline's per-dataset settings (sizes, windows, templates, class names, "
                        "logit scale, thresholds, PAMR); see docs/REPRODUCING.md (default gem)")
    over = p.add_argument_group("post-processing (override the protocol's setting for this run)")
    over.add_argument("--class-names", default=None, metavar="SET",
                      help=f"class-name set ({', '.join(NAME_SETS)}), or 'dataset' for the dataset's own names")
    over.add_argument("--logit-scale", type=argtypes.positive_float, default=None,
                      help="multiplies the cosine logits before the softmax over prompts")
    over.add_argument("--background-threshold", type=_optional_probability, default=_UNSET, metavar="P",
                      help="background where the top class probability is below P ('none': off)")
    over.add_argument("--area-threshold", type=_optional_probability, default=_UNSET, metavar="F",
                      help="SCLIP's area threshold: drop classes on at most this fraction of the "
                           "non-background pixels ('none': off)")
    over.add_argument("--pamr", type=argtypes.nonneg_int, default=None, metavar="N",
                      help="PAMR iterations on the logits (0: off; NACLIP uses 10)")
    over.add_argument("--pamr-dilations", type=_dilations, default=None, metavar="D,D",
                      help="PAMR neighbour distances in pixels (default 8,16)")
    over.add_argument("--border", choices=BORDERS, default=None,
                      help="how a window that is not a patch multiple is fed to the model")
    over.add_argument("--image-steps", choices=list(IMAGE_STEPS), default=None,
                      help="how images are decoded, resized and normalised: gem (Pillow, bicubic, CLIP's mean "
                           "and std), mmseg (OpenCV decoding and bilinear resize, SCLIP's mean and std), "
                           "mmseg_imagenet (the same with ImageNet's, MaskCLIP's)")
    add_model_flags(p, sizing=False, method_default=None)
    p.add_argument("--limit", type=argtypes.positive_int, default=None, help="evaluate the first N images only")
    p.add_argument("--save-predictions", metavar="DIR", default=None, help="write predicted label maps as PNGs")
    p.add_argument("--out", metavar="FILE.json", default=None, help="results file (default: print the JSON)")
    p.add_argument("--state", metavar="FILE.npz", default=None,
                   help="resume state (default FILE.json.state.npz beside --out; none without --out)")
    p.add_argument("--restart", action="store_true", help="discard an existing state file and start over")
    p.add_argument("--save-every", type=argtypes.positive_float, default=60.0, metavar="SECONDS",
                   help="save the resume state this often (default 60; also on Ctrl-C and SIGTERM)")
    p.add_argument("--force", action="store_true", help="overwrite an existing --out file")
    p.add_argument("--on-error", choices=("fail", "skip"), default="fail",
                   help="an unreadable image or annotation stops the run (fail) or is skipped and listed (skip)")
    p.add_argument("--batch-size", type=argtypes.positive_int, default=None, help="images per forward pass")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (as --quiet)")
    p.set_defaults(run=run)
    return p


def run(args) -> int:
    """Runs ``gem-jax eval``: 0 when every image was evaluated, 3 when some were skipped
    (``--on-error skip``); errors raise :class:`UsageError` / :class:`RuntimeFailure`."""
    from gem_jax.eval.datasets import DatasetError, open_dataset
    from gem_jax.eval.protocols import get_protocol
    from gem_jax.eval.runner import EvaluationError, StateFileError, evaluate

    progress = progress_of(args, "eval")
    if args.no_progress:
        progress.quiet = True
    try:
        dataset = open_dataset(args.dataset, args.root, args.split)
    except DatasetError as e:
        raise RuntimeFailure(str(e)) from e
    if args.save_predictions and dataset.kind != "semantic":
        raise UsageError(f"--save-predictions applies to label-map datasets, not {args.dataset}")
    out = output_file(args.out, "--out", force=args.force) if args.out else None
    state = pathlib.Path(args.state) if args.state else (out.with_name(out.name + ".state.npz") if out else None)
    if state is not None:
        try:
            checks.output_file(state, "--state")
        except checks.OutputPathError as e:
            raise UsageError(str(e)) from None
        if state.exists() and not files.Ledger(state.parent).owned(state):
            raise RuntimeFailure(f"the state file {state} was not written by gem-jax eval (or was changed since); it "
                                 "is left alone: move it away or pass --state FILE")
    if args.save_predictions:
        try:
            checks.output_directory(args.save_predictions, "--save-predictions")
        except checks.OutputPathError as e:
            raise UsageError(str(e)) from None
    if args.restart and state is not None:
        files.remove_owned(state)
    try:
        protocol = get_protocol(args.protocol).for_dataset(dataset.name)
        overrides = protocol_overrides(args)
        if overrides.get("class_names") not in (None, *NAME_SETS):
            raise ValueError(f"unknown class-name set {overrides['class_names']!r}; choose one of "
                             f"{', '.join(NAME_SETS)} or 'dataset'")
        if overrides:
            protocol = dataclasses.replace(protocol, **overrides)
    except ValueError as e:
        raise UsageError(str(e)) from None
    if IMAGE_STEPS[protocol.image_steps].needs_opencv:
        try:
            require_opencv()
        except ImportError as e:
            raise RuntimeFailure(str(e)) from None
    if args.method is None:  # the method of the protocol's paper, GEM's for the gem protocol
        args.method = protocol.method or "gem"
    elif protocol.method is not None and protocol.method != args.method:
        progress.note(f"the {protocol.name} protocol comes from the {protocol.method} paper; evaluating --method "
                      f"{args.method}")
    check_method(args)
    compile_cache_from_flags(args)
    model = load_model(args.model, progress)
    gem = gem_from_flags(model, args, template=protocol.template, short_side=protocol.short_side)
    try:
        result = evaluate(gem, dataset, protocol, limit=args.limit, save_predictions=args.save_predictions,
                          state_file=state, on_error=args.on_error, batch_size=args.batch_size,
                          progress=not progress.quiet, save_interval=getattr(args, "save_every", 60.0))
    except StateFileError as e:  # rerunning would only fail again
        raise RuntimeFailure(str(e)) from e
    except MemoryLimitError as e:
        raise memory_refusal(e, size=None, batch="--batch-size") from None
    except (EvaluationError, DatasetError, OSError) as e:
        hint = f"; rerun to resume from {state}" if state is not None and state.exists() else ""
        raise RuntimeFailure(f"{e}{hint}") from e
    except KeyboardInterrupt:
        where = f"; rerun the same command to resume from {state}" if state is not None else ""
        progress.note(f"interrupted{where}")
        raise
    if out is not None:
        files.write_owned(out, lambda f: f.write(files.dump_json(result)), force=True)
    else:
        print(json.dumps(result, indent=2))
    metric = result["metric"]
    value = result[metric]
    shown = "n/a" if value is None else f"{value:.2f}"
    skipped = f", {result['num_skipped']} skipped" if result["num_skipped"] else ""
    random = " (RANDOM weights: says nothing of real localisation)" if model.random_weights else ""
    print(f"{dataset.name} {metric} {shown}{random} ({result['evaluated']}/{result['num_images']} images{skipped}, "
          f"{gem.method.name} on {model.name})" + (f" -> {out}" if out else ""), file=sys.stderr)
    return EXIT_PARTIAL if result["num_skipped"] else EXIT_OK
