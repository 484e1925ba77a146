"""The ``gem-jax eval`` command: parser and entry point (wired into :mod:`gem_jax.cli`)."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import pathlib
import signal
import sys
import threading
import traceback

from gem_jax import argtypes
from gem_jax.eval.datasets import READERS
from gem_jax.class_names import NAME_SETS
from gem_jax.eval.images import IMAGE_STEPS, require_opencv
from gem_jax.eval.protocols import BORDERS, PROTOCOLS

EXIT_OK, EXIT_RUNTIME, EXIT_USAGE = 0, 1, 2
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


def _projections(text: str) -> tuple[str, ...]:
    letters = tuple(dict.fromkeys(text.strip().lower().replace(",", "")))
    if not letters or any(c not in "qkv" for c in letters):
        raise argparse.ArgumentTypeError(f"expected letters from q, k, v (e.g. qkv or v), got {text!r}")
    return letters


def add_parser(subparsers, parents=()) -> argparse.ArgumentParser:
    """Adds the ``eval`` sub-command to ``subparsers`` (``parents``: shared flag parsers)."""
    p = subparsers.add_parser(
        "eval", parents=list(parents), help="evaluate on a segmentation benchmark (mIoU, p-mIoU)",
        description="Evaluates GEM (or plain CLIP) on a benchmark in its usual on-disk layout and writes the "
                    "metrics as JSON. The run is resumable: rerun the same command to continue.")
    p.add_argument("--dataset", required=True, choices=list(READERS), help="benchmark")
    p.add_argument("--root", required=True, help="dataset directory (e.g. VOCdevkit/VOC2012)")
    p.add_argument("--split", default="val", help="split (default val)")
    p.add_argument("--model", default=None, help="registry name, hub id, local directory or file "
                                                 "(default ViT-B/16:openai)")
    p.add_argument("--protocol", choices=list(PROTOCOLS), default="gem",
                   help="gem: the paper's (short side 448, one template); sclip, clearclip, naclip, maskclip: "
                        "each official pipeline's per-dataset settings (sizes, windows, templates, class names, "
                        "logit scale, thresholds, PAMR); see docs/REPRODUCING.md (default gem)")
    over = p.add_argument_group("post-processing (override the protocol's setting for this run)")
    over.add_argument("--template", default=None,
                      help="prompt template with {}, or 'imagenet' (80 templates) or 'imagenet85' (85)")
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
    argtypes.add_method_arguments(p, default=None)
    p.add_argument("--gem-layers", type=argtypes.positive_int, default=None,
                   help="last blocks with the method's path (gem, clipsurgery: 6; the others change one)")
    p.add_argument("--iterations", type=argtypes.nonneg_int, default=1, help="self-self attention iterations (1)")
    p.add_argument("--temperature", type=argtypes.positive_float, default=None, help="the paper's tau; default adaptive")
    p.add_argument("--projections", type=_projections, default=("q", "k", "v"),
                   help="self-self projections to ensemble, letters of qkv (default qkv; Table 1)")
    p.add_argument("--no-norm", action="store_true",
                   help="without L2 normalisation and adaptive temperature (Table 1's first row)")
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
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32", help="compute dtype")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


class _Usage(Exception):
    pass


class _Runtime(Exception):
    pass


def _load_model(name):
    from gem_jax import checkpoints, pipeline

    unknown = getattr(checkpoints, "UnknownModelError", None)
    try:
        return pipeline.load(name)
    except Exception as e:
        if unknown is not None and isinstance(e, unknown):
            raise _Usage(str(e)) from None
        raise _Runtime(f"cannot load model {name or '(default)'}: {e}") from e


class _Terminated(BaseException):
    """SIGTERM arrived (a scheduler's pre-emption, ``timeout``): stop as on Ctrl-C, saving the state."""


@contextlib.contextmanager
def _sigterm_interrupts():
    """While inside, SIGTERM raises :class:`_Terminated` (the runner saves its state on the way out)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        raise _Terminated()

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _execute(args) -> int:
    from gem_jax.eval.datasets import DatasetError, open_dataset
    from gem_jax.eval.protocols import get_protocol

    try:
        dataset = open_dataset(args.dataset, args.root, args.split)
    except DatasetError as e:
        raise _Runtime(str(e)) from e
    if args.save_predictions and dataset.kind != "semantic":
        raise _Usage(f"--save-predictions applies to label-map datasets, not {args.dataset}")
    out = pathlib.Path(args.out) if args.out else None
    if out is not None and out.is_dir():
        raise _Usage(f"--out must name a file, {out} is a directory")
    if out is not None and out.exists() and not getattr(args, "force", False):
        raise _Runtime(f"output file exists: {out}; pass --force to overwrite")
    state = pathlib.Path(args.state) if args.state else (out.with_name(out.name + ".state.npz") if out else None)
    if state is not None and state.is_dir():
        raise _Usage(f"--state must name a file, {state} is a directory")
    if args.save_predictions and pathlib.Path(args.save_predictions).is_file():
        raise _Usage(f"--save-predictions must name a directory, {args.save_predictions} is a file")
    if args.restart and state is not None:
        state.unlink(missing_ok=True)
    try:
        protocol = get_protocol(args.protocol).for_dataset(dataset.name)
        overrides = protocol_overrides(args)
        if overrides.get("class_names") not in (None, *NAME_SETS):
            raise ValueError(f"unknown class-name set {overrides['class_names']!r}; choose one of "
                             f"{', '.join(NAME_SETS)} or 'dataset'")
        if overrides:
            protocol = dataclasses.replace(protocol, **overrides)
    except ValueError as e:
        raise _Usage(str(e)) from None
    if IMAGE_STEPS[protocol.image_steps].needs_opencv:
        try:
            require_opencv()
        except ImportError as e:
            raise _Runtime(str(e)) from None

    if args.method is None:  # the method of the protocol's paper, GEM's for the gem protocol
        args.method = protocol.method or "gem"
    elif protocol.method is not None and protocol.method != args.method:
        print(f"gem-jax eval: note: the {protocol.name} protocol comes from the {protocol.method} paper; "
              f"evaluating --method {args.method}", file=sys.stderr)

    from gem_jax import pipeline
    from gem_jax.eval.runner import EvaluationError, StateFileError, evaluate, write_json

    from gem_jax import gem as gem_lib

    try:  # option values, before the slow model load
        gem_lib.GEMOptions(layers=6 if args.gem_layers is None else args.gem_layers, iterations=args.iterations, temperature=args.temperature,
                           projections=args.projections, normalize=not args.no_norm)
        argtypes.check_method(args)
    except ValueError as e:
        raise _Usage(str(e)) from None
    model = _load_model(args.model)
    try:
        gem = pipeline.GEM(model, **argtypes.method_kwargs(args), layers=args.gem_layers,
                           iterations=args.iterations,
                           temperature=args.temperature, projections=args.projections, normalize=not args.no_norm,
                           template=protocol.template, short_side=protocol.short_side, dtype=args.dtype)
    except ValueError as e:
        raise _Usage(str(e)) from None
    try:
        with _sigterm_interrupts():
            result = evaluate(gem, dataset, protocol, limit=args.limit, save_predictions=args.save_predictions,
                              state_file=state, on_error=args.on_error, batch_size=args.batch_size,
                              progress=not args.no_progress, save_interval=getattr(args, "save_every", 60.0))
    except StateFileError as e:  # rerunning would only fail again
        raise _Runtime(str(e)) from e
    except (EvaluationError, DatasetError, OSError) as e:
        hint = f"; rerun to resume from {state}" if state is not None and state.exists() else ""
        raise _Runtime(f"{e}{hint}") from e
    except (KeyboardInterrupt, _Terminated) as e:
        where = f"; rerun the same command to resume from {state}" if state is not None else ""
        what = "terminated" if isinstance(e, _Terminated) else "interrupted"
        print(f"gem-jax eval: {what}{where}", file=sys.stderr)
        return 143 if isinstance(e, _Terminated) else 130
    if out is not None:
        write_json(out, result)
    else:
        print(json.dumps(result, indent=2))
    metric = result["metric"]
    value = result[metric]
    shown = "n/a" if value is None else f"{value:.2f}"
    skipped = f", {result['num_skipped']} skipped" if result["num_skipped"] else ""
    print(f"{dataset.name} {metric} {shown} ({result['evaluated']}/{result['num_images']} images{skipped})"
          + (f" -> {out}" if out else ""), file=sys.stderr)
    return EXIT_OK


def run(args) -> int:
    """Runs ``gem-jax eval``: 0 on success, 2 for a usage error, 1 for a runtime error (one-line
    message on stderr; the traceback too with ``--debug``)."""
    try:
        return _execute(args)
    except _Usage as e:
        print(f"gem-jax eval: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except _Runtime as e:
        if getattr(args, "debug", False):
            traceback.print_exc()
        print(f"gem-jax eval: error: {e}", file=sys.stderr)
        return EXIT_RUNTIME
    except Exception as e:  # unexpected: still one line
        if getattr(args, "debug", False):
            traceback.print_exc()
        print(f"gem-jax eval: error: {type(e).__name__}: {e}", file=sys.stderr)
        return EXIT_RUNTIME
