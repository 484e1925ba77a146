"""The ``gem-jax`` command: segment, batch, export, models, convert, eval, bench."""

from __future__ import annotations

import argparse
import hashlib
import os
import pathlib
import re
import sys
import traceback

from gem_jax import _files, argtypes
from gem_jax.config import METHODS

EXIT_OK, EXIT_RUNTIME, EXIT_USAGE = 0, 1, 2


class UsageError(Exception):
    """A bad argument value: exit status 2."""


class RuntimeFailure(Exception):
    """A well-formed command that could not be carried out: exit status 1."""


class _Parser(argparse.ArgumentParser):
    """argparse with one-line usage errors (the full usage stays behind --help)."""

    def error(self, message):
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="gem-jax",
        description="GEM (Grounding Everything Module) in JAX: open-vocabulary heatmaps and segmentation "
                    "from a pretrained CLIP, without training.")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    common = _Parser(add_help=False)
    # Accepted after the command too; SUPPRESS keeps the top-level value when absent.
    common.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show full tracebacks")

    seg = sub.add_parser("segment", parents=[common], help="heatmaps and label maps for images and prompts",
                         description="Writes, per image, an overlay PNG per prompt, a grid of all prompts, and "
                                     "with --classes a colour label map with a legend.")
    seg.add_argument("images", nargs="*", metavar="IMAGE", help="image files, directories or glob patterns")
    seg.add_argument("--example", action="store_true", help="use the bundled example image (a cat)")
    seg.add_argument("-p", "--prompt", dest="prompts", action="extend", nargs="+", default=[], metavar="PROMPT",
                     help="text to localise; repeat or list several")
    seg.add_argument("--classes", nargs="+", metavar="CLASS", help="class names for a label map")
    seg.add_argument("--background-threshold", type=argtypes.probability, default=0.85,
                     help="with --classes: pixels whose top class probability is below this are background "
                          "(default 0.85)")
    seg.add_argument("--logit-scale", type=argtypes.positive_float, default=100.0,
                     help="with --classes: softmax of this times the cosine (default 100, CLIP's)")
    seg.add_argument("--area-threshold", type=argtypes.probability, default=None,
                     help="with --classes: drop classes on at most this fraction of the image (SCLIP's; off)")
    seg.add_argument("--pamr", type=argtypes.nonneg_int, default=0, metavar="N",
                     help="with --classes: PAMR iterations on the logits, dilations 8 and 16 (NACLIP: 10; off)")
    add_model_flags(seg)
    seg.add_argument("--out", default="gem_out", help="output directory (default ./gem_out)")
    seg.add_argument("--save-logits", metavar="FILE.npz", default=None,
                     help="also save raw cosine logits, heatmaps and prompts")
    seg.add_argument("--cmap", default="jet", help="matplotlib colour map of the overlays (jet)")
    seg.add_argument("--alpha", type=argtypes.probability, default=0.5, help="overlay opacity in [0, 1] (0.5)")
    seg.add_argument("--force", action="store_true", help="overwrite existing output files")
    seg.add_argument("--on-error", choices=("fail", "skip"), default="fail",
                     help="an unreadable image stops the run (fail) or is skipped and listed at the end (skip)")
    _add_cache_flags(seg)

    _add_batch_parser(sub, common)

    _add_export_parser(sub, common)

    sub.add_parser("models", parents=[common], help="list the model registry")

    conv = sub.add_parser("convert", parents=[common], help="convert a checkpoint into the native format",
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
    conv.add_argument("--force", action="store_true", help="replace an existing output directory")
    from gem_jax.eval import command as eval_command

    _add_cache_flags(eval_command.add_parser(sub, parents=[common]))

    demo = sub.add_parser("demo", parents=[common], help="a web page to try GEM (needs the demo extra)",
                          description="Serves a Gradio page: an image, many prompts, every method; overlays, a "
                                      "label map, the raw logits and the model time. Needs pip install "
                                      "\"gem-jax[demo]\".")
    demo.add_argument("--model", default=None, help="registry name, hub id, local directory or file "
                                                    "(default ViT-B/16:openai)")
    demo.add_argument("--host", default="127.0.0.1", help="address to listen on (127.0.0.1; 0.0.0.0 for all)")
    demo.add_argument("--port", type=argtypes.positive_int, default=7860, help="port (7860)")
    demo.add_argument("--share", action="store_true", help="also open a public Gradio share link (needs network)")
    _add_cache_flags(demo)

    bench = sub.add_parser("bench", parents=[common], help="time gem-jax (and the reference) on random weights",
                           description="Times gem-jax and, with --reference, gem-torch alternately on identical "
                                       "random weights, pixels and text embeddings; prints a table and "
                                       "writes JSON. The default cases (ViT-B/16 at 448, batches 1 and 4, "
                                       "1/8/64 prompts; a warm-up and 5 rounds per case) take about 2 minutes on "
                                       "a 2-vCPU x86_64 CPU, about 7 with --reference (estimated from the "
                                       "per-call times in the README's performance section).")
    bench.add_argument("--arch", default="ViT-B-16", help="architecture (ViT-B-16)")
    bench.add_argument("--size", type=argtypes.size, default=448, help="input size N or HxW (448)")
    bench.add_argument("--batch", type=argtypes.positive_int, nargs="+", default=None,
                       help="batch sizes (1 4; with --pipeline one size, 8)")
    bench.add_argument("--prompts", type=argtypes.positive_int, nargs="+", default=None,
                       help="prompt counts (1 8 64; with --pipeline one count, 8)")
    bench.add_argument("--rounds", type=argtypes.positive_int, default=5, help="timed rounds per case (5)")
    bench.add_argument("--reference", action="store_true", help="also time gem-torch (needs the test extra)")
    bench.add_argument("--dtype", nargs="+", choices=("float32", "bfloat16"), default=["float32"],
                       help="gem-jax compute dtypes; later ones report their difference from the first")
    bench.add_argument("--head-chunk", type=argtypes.positive_int, default=None,
                       help="(image, head) pairs per attention step (default: the backend's best)")
    bench.add_argument("--image-chunk", type=argtypes.positive_int, default=None,
                       help="images per step through the tower (default: the backend's best)")
    bench.add_argument("--no-chunks", action="store_true", help="whole batch and all heads at once")
    bench.add_argument("--method", dest="methods", nargs="+", choices=METHODS, default=["gem"],
                       help="methods to time, each with its official defaults (gem)")
    bench.add_argument("--pipeline", action="store_true",
                       help="instead: the batch job's streaming input against pre-decoded pixels in memory")
    bench.add_argument("--images", type=argtypes.positive_int, default=200,
                       help="with --pipeline: JPEG files of 500x375 to stream (200)")
    bench.add_argument("--workers", type=argtypes.positive_int, default=None,
                       help="with --pipeline: decoding threads (default: CPU count, at most 16)")
    bench.add_argument("--out", default=None, metavar="FILE.json", help="write the results as JSON")
    bench.add_argument("--force", action="store_true", help="overwrite --out")
    return parser


def _add_batch_parser(sub, common):
    b = sub.add_parser(
        "batch", parents=[common], help="streaming, resumable inference over many images into Parquet",
        description="Runs GEM over many images into Parquet part files in --out (patch-grid logits per image; "
                    "optionally label maps and heatmaps). Decoding overlaps the device; a killed run resumes "
                    "where it stopped when rerun with the same command; --shard splits the work between hosts. "
                    "Read the results with gem_jax.load_results(DIR) or any Parquet reader.")
    b.add_argument("inputs", nargs="+", metavar="INPUT",
                   help="image files, directories (recursive), glob patterns, .tar shards, or @LIST.txt "
                        "(one per line)")
    b.add_argument("-p", "--prompt", dest="prompts", action="extend", nargs="+", default=[], metavar="PROMPT",
                   help="text to localise; repeat or list several")
    b.add_argument("--prompts-file", default=None, metavar="FILE", help="prompts, one per line")
    b.add_argument("--classes", nargs="+", metavar="CLASS",
                   help="class names as the prompts, with label maps (same as -p ... --labels)")
    b.add_argument("--out", required=True, metavar="DIR", help="output directory (created; resumed if it exists)")
    add_model_flags(b)
    b.add_argument("--logits-dtype", choices=("float16", "float32"), default="float16",
                   help="dtype of the stored logits (float16; float32 for exact values)")
    b.add_argument("--labels", action="store_true", help="also store a label map per image (PNG, own size)")
    b.add_argument("--background-threshold", type=argtypes.probability, default=0.85,
                   help="with --labels: pixels whose top class probability is below this are background (0.85)")
    b.add_argument("--heatmaps", action="store_true",
                   help="also store full-size heatmaps (P x input size per image: large)")
    b.add_argument("--batch-size", type=argtypes.positive_int, default=None,
                   help="images per forward pass (default: 8 on CPU, 32 per GPU/TPU device)")
    b.add_argument("--part-size", type=argtypes.positive_int, default=1024,
                   help="images per part file, the unit of resumption and sharding (1024)")
    b.add_argument("--shard", default=None, metavar="INDEX/COUNT",
                   help="do only this host's share, e.g. 0/4 (default: jax.process_index()/process_count())")
    b.add_argument("--distributed", action="store_true",
                   help="call jax.distributed.initialize() first (TPU pods, SLURM, Kubernetes: see README)")
    b.add_argument("--workers", type=argtypes.positive_int, default=None,
                   help="image decoding threads (default: CPU count, at most 16)")
    b.add_argument("--prefetch", type=argtypes.positive_int, default=None,
                   help="decoded images kept ready ahead of the device (default: 2 batches + workers)")
    b.add_argument("--loader", choices=("thread", "grain"), default="thread", help="input pipeline (thread)")
    b.add_argument("--max-pixels", type=argtypes.positive_int, default=None,
                   help="refuse images with more pixels (default: Pillow's decompression bomb limit)")
    b.add_argument("--force", action="store_true", help="delete an existing job in --out and start over")
    b.add_argument("--quiet", action="store_true", help="no progress output")
    b.add_argument("--log-every", type=argtypes.positive_int, default=1000,
                   help="without a terminal: a progress line every N images (1000)")
    _add_cache_flags(b)


def _add_export_parser(sub, common):
    e = sub.add_parser(
        "export", parents=[common], help="the image program as a serialized jax.export artefact for serving",
        description="Writes OUT (the serialized program, StableHLO for each platform), OUT.params.npz (its "
                    "parameters), OUT.json (inputs and outputs) and, with -p, OUT.text.npy (the prompts' "
                    "embeddings). A serving process loads them with jax.export.deserialize and numpy alone.")
    add_model_flags(e)
    e.add_argument("--batch", type=argtypes.positive_int, default=8, help="images per call (8)")
    e.add_argument("--prompts", type=argtypes.positive_int, default=None, metavar="N",
                   help="prompts per call (16; with -p: their count)")
    e.add_argument("-p", "--prompt", dest="prompt_texts", action="extend", nargs="+", default=[],
                   metavar="PROMPT", help="prompts whose embeddings to write beside the program")
    e.add_argument("--platforms", default="cpu,cuda,tpu",
                   help="comma-separated platforms to lower for, present or not (cpu,cuda,tpu)")
    e.add_argument("--devices", type=argtypes.positive_int, default=1,
                   help="devices the batch is sharded over (1); on a CPU host, that many CPU devices")
    e.add_argument("--out", required=True, metavar="FILE", help="the program file (others beside it)")
    e.add_argument("--force", action="store_true", help="overwrite existing files")


def add_model_flags(seg):
    """The model, method, GEM-option, sizing and dtype flags that segment and batch share."""
    seg.add_argument("--model", default=None, help="registry name, hub id, local directory or file "
                                                   "(default ViT-B/16:openai)")
    argtypes.add_method_arguments(seg)
    seg.add_argument("--gem-layers", type=argtypes.positive_int, default=None,
                     help="last blocks with the method's path (gem, clipsurgery: 6; the others change one)")
    seg.add_argument("--iterations", type=argtypes.nonneg_int, default=1, help="self-self attention iterations (1)")
    seg.add_argument("--temperature", type=argtypes.positive_float, default=None,
                     help="the paper's tau; default: adaptive")
    seg.add_argument("--template", default="a photo of a {}.",
                     help="prompt template with {} ('imagenet' for the 80-template ensemble, 'imagenet85' for "
                          "those and 5 scene templates)")
    size = seg.add_mutually_exclusive_group()
    size.add_argument("--size", type=argtypes.size, default=None, help="model input size: N or HxW (default 448)")
    size.add_argument("--short-side", type=argtypes.positive_int, default=None,
                      help="resize the shorter side to this, keeping the aspect")
    seg.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32", help="compute dtype")


def _gem_from_flags(model, args, **overrides):
    """``GEM(model, ...)`` from the flags of :func:`add_model_flags` (``overrides`` win);
    options that do not fit the model are a usage error."""
    from gem_jax import pipeline

    kwargs = dict(argtypes.method_kwargs(args), layers=args.gem_layers, iterations=args.iterations,
                  temperature=args.temperature, template=args.template, size=args.size,
                  short_side=args.short_side, dtype=args.dtype)
    try:
        return pipeline.GEM(model, **{**kwargs, **overrides})
    except ValueError as e:
        raise UsageError(str(e)) from None


def _add_cache_flags(p):
    p.add_argument("--compile-cache", default=None, metavar="DIR",
                   help="persistent JAX compilation cache (default: $GEM_JAX_COMPILE_CACHE or "
                        "~/.cache/gem_jax/xla)")
    p.add_argument("--no-compile-cache", action="store_true", help="do not use the persistent cache")


def enable_compile_cache(directory: str | None) -> pathlib.Path:
    """Turns on JAX's persistent compilation cache, so a second run of a shape does not compile."""
    import jax

    path = pathlib.Path(directory or os.environ.get("GEM_JAX_COMPILE_CACHE")
                        or pathlib.Path.home() / ".cache" / "gem_jax" / "xla").expanduser()
    if path.exists() and not path.is_dir():
        raise UsageError(f"the compilation cache must be a directory, {path} is a file "
                         "(pass --compile-cache DIR or --no-compile-cache)")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise RuntimeFailure(f"cannot create the compilation cache {path} ({e.strerror or e}); "
                             "pass --compile-cache DIR or --no-compile-cache") from None
    jax.config.update("jax_compilation_cache_dir", str(path))
    # The defaults skip programs compiled in under a second; ours are all worth keeping.
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    return path


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "_", text).strip("_")[:60]


def _prompt_name(prompt: str) -> str:
    """The file-name part of a prompt: its slug when that keeps everything (lower case, words
    joined by ``_``), else the slug plus a short hash, so names never collide, even on
    case-insensitive file systems, and do not depend on the other prompts."""
    slug = _slug(prompt).lower()
    if slug and slug not in ("grid", "labels") and slug.replace("_", " ") == prompt:
        return slug
    return f"{slug or 'prompt'}-{hashlib.sha1(prompt.encode()).hexdigest()[:8]}"


def _plan_outputs(paths, prompts, classes, out_dir: pathlib.Path):
    """Per image: (overlay paths per prompt, grid path, label path | None), all names distinct."""
    plans, used = [], set()
    for path in paths:
        base = _slug(path.stem) or "image"
        stem, n = base, 0
        while stem.lower() in used:  # images of the same name from different folders
            n += 1
            stem = f"{base}_{n}"
        used.add(stem.lower())
        overlays = [out_dir / f"{stem}__{_prompt_name(p)}.png" for p in prompts]
        grid = out_dir / f"{stem}__grid.png" if prompts else None
        labels = out_dir / f"{stem}__labels.png" if classes else None
        plans.append((overlays, grid, labels))
    names = [str(p).lower() for plan in plans for p in (*plan[0], *plan[1:]) if p is not None]
    assert len(set(names)) == len(names), "output names collide"
    return plans


def _vision_layers(name) -> int | None:
    """The model's vision depth when known without loading it (registry names, native directories)."""
    import json

    from gem_jax import checkpoints, config

    try:
        if name and pathlib.Path(name).expanduser().is_dir():
            doc = json.loads((pathlib.Path(name).expanduser() / "config.json").read_text(encoding="utf-8"))
            return config.CLIPConfig.from_dict(doc["clip"]).vision.layers
        return config.architecture(checkpoints.get_entry(name or checkpoints.DEFAULT_MODEL).architecture).vision.layers
    except Exception:  # anything else is checked once the model is loaded
        return None


def _check_options(args, out_dir: pathlib.Path) -> None:
    """Every option and output path that needs no model, checked before the slow model load."""
    import numpy as np

    from gem_jax import pipeline, preprocess, visualize

    if out_dir.exists() and not out_dir.is_dir():
        raise UsageError(f"--out must be a directory, {out_dir} is a file")
    if args.save_logits:
        logits = pathlib.Path(args.save_logits)
        if logits.is_dir() or not logits.name.endswith(".npz"):
            raise UsageError(f"--save-logits must name a .npz file, got {args.save_logits!r}")
        if logits.parent.exists() and not logits.parent.is_dir():
            raise UsageError(f"--save-logits: {logits.parent} is a file, not a directory")
    try:
        argtypes.check_method(args)  # the method's options, GEM's iterations and temperature
        preprocess.target_size(224, 224, size=args.size, short_side=args.short_side)
        pipeline.GEM._templates(args.template)
        visualize.colorize(np.zeros((1, 1)), args.cmap)
    except ValueError as e:
        raise UsageError(str(e)) from None


def _check_depth(args) -> None:
    blocks = argtypes.check_method(args).blocks
    depth = _vision_layers(args.model) if blocks > 1 else None
    if depth is not None and blocks > depth:
        raise UsageError(f"--gem-layers {blocks} exceeds the model's {depth} vision blocks")


def cmd_segment(args) -> int:
    from gem_jax import preprocess

    prompts = [p.strip() for p in args.prompts]
    if any(not p for p in prompts):
        raise UsageError("a prompt is empty; give text such as -p cat")
    classes = [c.strip() for c in args.classes] if args.classes else None
    if classes is not None and any(not c for c in classes):
        raise UsageError("a class name is empty")
    if not prompts and not classes:
        raise UsageError("nothing to localise: give prompts with -p PROMPT (or class names with --classes)")
    from gem_jax.tokenizer import first_duplicate

    for what, names in (("prompt", prompts), ("class", classes or ())):
        dup = first_duplicate(names)
        if dup:  # duplicate classes would split their probability between the copies
            same = "is given twice" if dup[0] == dup[1] else f"and {dup[0]!r} are the same to the model"
            raise UsageError(f"{what} {dup[1]!r} {same}; give each once")
    if args.save_logits and not prompts:
        raise UsageError("--save-logits needs prompts (-p)")
    files = [p for p in prompts if os.path.isfile(p)]
    if not args.images and not args.example:
        if files:
            raise UsageError(f"no images given: the prompt {files[0]!r} is a file; -p takes every word after it, "
                             f"so put the images first (gem-jax segment {files[0]} -p PROMPT) or end the prompts "
                             "with --")
        raise UsageError("no images given (pass IMAGE paths, a directory, a glob, or --example)")
    if files:
        print(f"note: the prompt {files[0]!r} is also a file name; images go before -p or after --", file=sys.stderr)
    try:
        paths = preprocess.expand_image_paths(args.images) if args.images else []
    except preprocess.ImageError as e:
        raise RuntimeFailure(str(e)) from None
    if args.example:
        from gem_jax.pipeline import example_image_path

        paths.append(example_image_path())
    out_dir = pathlib.Path(args.out)
    _check_options(args, out_dir)
    plans = _plan_outputs(paths, prompts, classes, out_dir)
    targets = [p for overlays, grid, labels in plans for p in (*overlays, grid, labels) if p is not None]
    if args.save_logits:
        targets.append(pathlib.Path(args.save_logits))
    if not args.force:
        existing = [str(p) for p in targets if p.exists()]
        if existing:
            more = f" (and {len(existing) - 1} more)" if len(existing) > 1 else ""
            raise RuntimeFailure(f"output file exists: {existing[0]}{more}; pass --force to overwrite")

    # A cheap check before the (slow) model load: every file is opened and its header read
    # (format and size, no pixels), so a missing, unreadable or non-image file fails fast;
    # the pixels are decoded later, while the model runs (see _segment_images).
    dims, kept, skipped = [], [], []
    for path, plan in zip(paths, plans):
        try:
            dims.append(_probe_image(path))
            kept.append((path, plan))
        except preprocess.ImageError as e:
            if args.on_error == "fail":
                raise RuntimeFailure(f"{e} (--on-error skip goes on without it)") from None
            skipped.append(f"{path}: {e}")
    if not kept:
        raise RuntimeFailure(f"none of the {len(paths)} image(s) could be read: {skipped[0]}")
    paths, plans = [p for p, _ in kept], [plan for _, plan in kept]
    _check_depth(args)

    if not args.no_compile_cache:
        enable_compile_cache(args.compile_cache)
    import time

    import numpy as np

    from gem_jax import pipeline

    start = time.perf_counter()
    print(f"loading model {args.model or 'ViT-B/16:openai'} ...", file=sys.stderr)
    model = _load_model(args.model)
    print(f"loaded in {time.perf_counter() - start:.1f} s", file=sys.stderr)
    note = None
    if model.random_weights:
        note = pipeline.RANDOM_WEIGHTS_NOTE
        print(f"note: {model.name} has random weights (gem-jax convert --random); the pictures say so",
              file=sys.stderr)
    gem = _gem_from_flags(model, args)
    try:  # every image's memory need (from its header's size), before anything is computed
        for hw in dict.fromkeys(dims):
            shape = np.broadcast_to(np.zeros((), np.uint8), (*hw, 3))  # a size without pixels
            gem.check_memory(gem._input_size(shape, None, None), 1, len(set(prompts) | set(classes or ())))
    except pipeline.MemoryLimitError as e:
        raise RuntimeFailure(str(e)) from None

    made = not out_dir.exists()
    out_dir.mkdir(parents=True, exist_ok=True)
    _files.remove_stale(out_dir)  # leftovers of a killed run
    try:
        written, failed = _segment_images(args, gem, paths, plans, prompts, classes, out_dir, note)
    except BaseException:
        if made and not any(out_dir.iterdir()):
            out_dir.rmdir()  # leave no empty output directory behind
        raise
    skipped += failed
    print(f"wrote {written} file(s) to {out_dir}" + (f" and {args.save_logits}" if args.save_logits else "")
          + f" in {time.perf_counter() - start:.1f} s", file=sys.stderr)
    if skipped:
        print(f"skipped {len(skipped)} unreadable image(s):\n  " + "\n  ".join(skipped), file=sys.stderr)
    return EXIT_OK


#: Images decoded ahead of the model by segment's loader threads: what bounds its memory.
SEGMENT_PREFETCH = 4


def _probe_image(path) -> tuple[int, int]:
    """The (height, width) an image file's header gives, checked without decoding its pixels:
    Pillow opens it and verifies its structure (a PNG's chunks and their checksums, so a
    truncated one is caught; a JPEG's damage is only found when decoded). The size is for the
    memory check, which does not depend on the orientation. Raises
    :class:`gem_jax.preprocess.ImageError` in ``load_image``'s words."""
    from PIL import Image

    from gem_jax import preprocess

    path = pathlib.Path(path)
    if not path.exists():
        raise preprocess.ImageError(f"image file not found: {path}")
    if path.is_dir():
        raise preprocess.ImageError(f"{path} is a directory, not an image file")

    def one_line(e):
        return " ".join(str(e).split()) or type(e).__name__

    try:
        im = Image.open(path)
    except Exception as e:  # UnidentifiedImageError, PermissionError, an empty file, ...
        raise preprocess.ImageError(f"cannot read image {path}: {one_line(e)}") from e
    try:
        with im:
            w, h = im.size
            im.verify()
    except Exception as e:  # damaged data past the header
        raise preprocess.ImageError(f"cannot decode image {path}: {one_line(e)}") from e
    return h, w


def _segment_images(args, gem, paths, plans, prompts, classes, out_dir, note) -> tuple[int, list[str]]:
    """Decodes the images on loader threads, a few ahead of the model, and writes each one's
    pictures (and its logits) as soon as it is done; returns (files written, skipped images)."""
    import time

    import numpy as np

    from gem_jax import pipeline, visualize
    from gem_jax.batch import inputs as inputs_lib
    from gem_jax.batch import loader

    # one tower pass per image serves both: the label map comes from the classes' logits
    wanted = prompts + [c for c in dict.fromkeys(classes or []) if c not in prompts]
    column = {p: i for i, p in enumerate(wanted)}
    # The loader hands over the decoded image; GEM.heatmaps resizes it itself (with its cap on
    # the long side), so the loader's own model-input pixels are asked at the smallest size, one
    # patch. No pixel limit of our own: Pillow's, as in GEM.heatmaps, refuses decompression bombs.
    patch = gem.model.config.vision.patch_size
    sizing = loader.Sizing(patch, None, patch, max_pixels=sys.maxsize, keep_image=True)
    workers = max(1, min(SEGMENT_PREFETCH, os.cpu_count() or 1))
    stream = loader.stream(((i, inputs_lib.Item(str(p), str(p))) for i, p in enumerate(paths)), sizing,
                           workers=workers, prefetch=SEGMENT_PREFETCH)
    logits_file = _LogitsWriter(pathlib.Path(args.save_logits), prompts, args.force) if args.save_logits else None
    compiled, written, skipped, done = set(), 0, [], 0
    try:
        for path, (overlays, grid, labels_path) in _progress(list(zip(paths, plans)), "segment"):
            d = next(stream)
            if d.error is not None:
                message = _decode_error(path, d.error)
                if args.on_error == "fail":
                    raise RuntimeFailure(f"{message} (--on-error skip goes on without it)")
                skipped.append(f"{path}: {message}")
                continue
            image, d.pixels, d.image = d.image, None, None  # segment resizes itself (as GEM.heatmaps does)
            hw = gem._input_size(image, None, None)
            tick = time.perf_counter()
            if hw not in compiled:
                cached = "" if args.no_compile_cache else "; later runs read the compile cache"
                print(f"compiling for {hw[0]}x{hw[1]} (first image of this size{cached}) ...", file=sys.stderr)
            try:
                out = gem.heatmaps(image, wanted)
            except pipeline.MemoryLimitError as e:
                raise RuntimeFailure(str(e)) from None
            logits, heat = np.asarray(out.logits[0]), np.asarray(out.heatmaps[0])
            if hw not in compiled:
                compiled.add(hw)
                print(f"first {hw[0]}x{hw[1]} image took {time.perf_counter() - tick:.1f} s", file=sys.stderr)
            done += 1
            if prompts:
                logits, heat = logits[:len(prompts)], heat[:len(prompts)]
                if logits_file is not None:
                    logits_file.add(logits, heat, path, out.sizes[0])
                shown = _to_original_size(heat, image.shape[:2])
                for p_idx, target in enumerate(overlays):
                    visualize.save_png(visualize.overlay(image, shown[p_idx], cmap=args.cmap, alpha=args.alpha),
                                       target, overwrite=args.force)
                    written += 1
                fig = visualize.heatmap_grid(image, shown, prompts, cmap=args.cmap, alpha=args.alpha, title=note)
                visualize.save_png(fig, grid, overwrite=args.force)
                written += 1
            if classes:
                class_logits = np.asarray(out.logits[0])[[column[c] for c in classes]]
                labels = pipeline.label_map(image, class_logits, args.background_threshold,
                                            logit_scale=args.logit_scale, area_threshold=args.area_threshold,
                                            pamr_iterations=args.pamr)
                labels = _to_original_size(labels, image.shape[:2], nearest=True)
                fig = visualize.label_figure(image, labels, classes, title=note)
                visualize.save_png(fig, labels_path, overwrite=args.force)
                written += 1
        if not done:
            raise RuntimeFailure(f"none of the {len(paths)} image(s) could be read: {skipped[0]}")
        if logits_file is not None:
            logits_file.commit()
    finally:
        if logits_file is not None:
            logits_file.abort()
        stream.close()
    return written, skipped


def _decode_error(path, reason: str) -> str:
    """The message for an image the loader could not decode: ``load_image``'s own words for it
    (the same as before decoding was streamed), read again for this rare case."""
    from gem_jax import preprocess

    try:
        preprocess.load_image(path)
    except preprocess.ImageError as e:
        return str(e)
    return f"cannot read image {path}: {reason}"


class _LogitsWriter:
    """Writes segment's ``--save-logits`` file without holding every image's arrays: each
    image's logits and heatmaps go to ``.npy`` files in a temporary directory beside the
    target as they come, and :meth:`commit` streams them into the ``.npz`` (the schema
    :func:`_save_logits` describes), atomically. :meth:`abort` removes what is left."""

    def __init__(self, path: pathlib.Path, prompts, force: bool):
        self.path, self.prompts, self.force = path, list(prompts), force
        self.made_parent = not path.parent.exists()
        path.parent.mkdir(parents=True, exist_ok=True)
        _files.remove_stale(path.parent)
        self.temp = _files.make_temp_dir(path)
        self.images, self.sizes, self.shapes = [], [], []

    def add(self, logits, heatmaps, image_path, size) -> None:
        """Stores one image's (P, H, W) logits and heatmaps."""
        import numpy as np

        i = len(self.images)
        np.save(self.temp / f"logits_{i}.npy", np.ascontiguousarray(logits))
        np.save(self.temp / f"heatmaps_{i}.npy", np.ascontiguousarray(heatmaps))
        self.images.append(str(image_path))
        self.sizes.append(tuple(size))
        self.shapes.append((logits.shape, logits.dtype, heatmaps.shape, heatmaps.dtype))

    def commit(self) -> None:
        """Assembles the ``.npz`` from the stored arrays and renames it into place."""
        import zipfile

        import numpy as np

        if self.path.exists() and not self.force:
            raise RuntimeFailure(f"output file exists: {self.path}; pass --force to overwrite")
        small = {"prompts": np.array(self.prompts), "images": np.array(self.images),
                 "sizes": np.array(self.sizes, dtype=np.int32)}
        n = len(self.images)
        stacked = len(set(self.sizes)) == 1 and len(set(self.shapes)) == 1

        def copy_body(dst, name):  # an .npy file's data, without its header
            with open(self.temp / name, "rb") as src:
                if np.lib.format.read_magic(src) == (1, 0):
                    np.lib.format.read_array_header_1_0(src)
                else:
                    np.lib.format.read_array_header_2_0(src)
                while chunk := src.read(1 << 20):
                    dst.write(chunk)

        def write(f):
            with zipfile.ZipFile(f, mode="w", compression=zipfile.ZIP_STORED, allowZip64=True) as zf:
                for key, value in small.items():
                    with zf.open(f"{key}.npy", "w", force_zip64=True) as dst:
                        np.lib.format.write_array(dst, value, allow_pickle=False)
                if stacked:
                    for key, which in (("logits", 0), ("heatmaps", 2)):
                        shape, dtype = self.shapes[0][which], self.shapes[0][which + 1]
                        with zf.open(f"{key}.npy", "w", force_zip64=True) as dst:
                            header = {"descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": False,
                                      "shape": (n, *shape)}
                            np.lib.format.write_array_header_1_0(dst, header)
                            for i in range(n):
                                copy_body(dst, f"{key}_{i}.npy")
                else:
                    for i in range(n):
                        for key in ("logits", "heatmaps"):
                            with zf.open(f"{key}_{i}.npy", "w", force_zip64=True) as dst, \
                                    open(self.temp / f"{key}_{i}.npy", "rb") as src:
                                while chunk := src.read(1 << 20):
                                    dst.write(chunk)

        _files.atomic_write(self.path, write)

    def abort(self) -> None:
        """Removes the temporary directory (and a parent directory made for nothing)."""
        import shutil

        shutil.rmtree(self.temp, ignore_errors=True)
        if self.made_parent and self.path.parent.exists() and not any(self.path.parent.iterdir()):
            self.path.parent.rmdir()


def _batch_prompts(args) -> tuple[list[str], bool]:
    """(prompts, labels) from -p / --prompts-file / --classes."""
    prompts = [p.strip() for p in args.prompts]
    if args.prompts_file:
        try:
            lines = pathlib.Path(args.prompts_file).read_text("utf-8").splitlines()
        except OSError as e:
            raise UsageError(f"cannot read --prompts-file {args.prompts_file}: {e.strerror or e}") from None
        prompts += [ln.strip() for ln in lines if ln.strip()]
    labels = args.labels
    if args.classes:
        if prompts:
            raise UsageError("give prompts either with -p/--prompts-file or with --classes, not both")
        prompts, labels = [c.strip() for c in args.classes], True
    if any(not p for p in prompts):
        raise UsageError("a prompt is empty; give text such as -p cat")
    if not prompts:
        raise UsageError("nothing to localise: give prompts with -p PROMPT, --prompts-file FILE or --classes")
    if len(set(prompts)) != len(prompts):
        dup = next(p for p in prompts if prompts.count(p) > 1)
        raise UsageError(f"the prompt {dup!r} is given twice")
    return prompts, labels


def cmd_batch(args) -> int:
    from gem_jax import batch

    prompts, labels = _batch_prompts(args)
    shard = None
    if args.shard is not None:
        try:
            shard = batch.parse_shard(args.shard)
        except ValueError as e:
            raise UsageError(str(e)) from None
    try:
        items = batch.expand_inputs(args.inputs)
    except batch.InputError as e:
        raise RuntimeFailure(str(e)) from None
    if args.distributed:
        import jax

        try:
            jax.distributed.initialize()
        except Exception as e:  # no cluster found, coordinator unreachable, ...
            raise RuntimeFailure(f"jax.distributed.initialize() failed: {' '.join(str(e).split())}") from None
    try:  # the method's options, before the slow model load
        argtypes.check_method(args)
    except ValueError as e:
        raise UsageError(str(e)) from None
    if not args.no_compile_cache:
        enable_compile_cache(args.compile_cache)
    from gem_jax import checkpoints

    model = _load_model(args.model)
    gem = _gem_from_flags(model, args)
    opts = batch.BatchOptions(
        prompts=prompts, part_size=args.part_size, batch_size=args.batch_size, logits_dtype=args.logits_dtype,
        labels=labels, background_threshold=args.background_threshold, heatmaps=args.heatmaps,
        workers=args.workers, prefetch=args.prefetch, loader=args.loader, shard=shard, force=args.force,
        quiet=args.quiet, log_every=args.log_every,
        **({"max_pixels": args.max_pixels} if args.max_pixels else {}))
    try:
        summary = batch.run(gem, items, args.out, opts, model_name=args.model or checkpoints.DEFAULT_MODEL)
    except batch.JobError as e:
        raise RuntimeFailure(str(e)) from None
    index, count = summary.shard
    where = f"shard {index}/{count}: " if count > 1 else ""
    if not args.quiet and summary.parts_written:
        rate = summary.processed / summary.elapsed_s if summary.elapsed_s > 0 else 0.0
        print(f"batch: {where}wrote {summary.parts_written} part(s), {summary.processed} image(s) in "
              f"{summary.elapsed_s:.1f} s ({rate:.1f} images/s) to {args.out}", file=sys.stderr)
    if summary.errors:
        listed = (f"{args.out}/errors.jsonl" if summary.job_complete
                  else "the error column of the part files; errors.jsonl comes when every shard is done")
        print(f"batch: {where}{summary.errors} of {summary.images} image(s) failed (see {listed})",
              file=sys.stderr)
        return EXIT_RUNTIME
    return EXIT_OK


def cmd_export(args) -> int:
    platforms = [p.strip() for p in args.platforms.split(",") if p.strip()]
    from gem_jax import export

    bad = [p for p in platforms if p not in export.PLATFORMS]
    if bad or not platforms:
        raise UsageError(f"--platforms takes some of {', '.join(export.PLATFORMS)}, got {args.platforms!r}")
    if args.short_side is not None:
        raise UsageError("export needs a fixed --size, not --short-side")
    texts = [t.strip() for t in args.prompt_texts]
    if any(not t for t in texts):
        raise UsageError("a prompt is empty")
    if texts and args.prompts is not None and args.prompts != len(texts):
        raise UsageError(f"--prompts {args.prompts} but {len(texts)} prompt(s) given with -p")
    if args.batch % args.devices:
        raise UsageError(f"--batch {args.batch} must be a multiple of --devices {args.devices}")
    paths = export.artefact_paths(args.out)
    existing = [str(p) for p in paths.values() if p.exists()]
    if existing and not args.force:
        raise RuntimeFailure(f"output file exists: {existing[0]}; pass --force to overwrite")
    import jax

    if args.devices > 1:
        jax.config.update("jax_num_cpu_devices", args.devices)  # only affects a CPU backend
    devices = jax.local_devices()
    if len(devices) < args.devices:
        raise UsageError(f"--devices {args.devices} but only {len(devices)} {jax.default_backend()} device(s)")
    from gem_jax import checkpoints, gem as gem_lib

    model = _load_model(args.model)
    # The CPU's chunked schedule only when the program is for CPUs alone.
    schedule = "auto" if set(platforms) == {"cpu"} else gem_lib.Schedule()
    gem = _gem_from_flags(model, args, short_side=None, schedule=schedule, devices=devices[:args.devices])
    try:
        written = export.write(gem, args.out, batch=args.batch, prompts=texts or args.prompts or 16,
                               platforms=platforms, model_name=args.model or checkpoints.DEFAULT_MODEL)
    except ValueError as e:
        raise UsageError(str(e)) from None
    print(f"exported for {', '.join(platforms)}: " + ", ".join(str(p) for p in written.values()), file=sys.stderr)
    return EXIT_OK


def _to_original_size(maps, hw, nearest=False):
    """(..., h, w) maps resized to the image's own (H, W) for display."""
    import numpy as np
    from PIL import Image

    maps = np.asarray(maps)
    if maps.shape[-2:] == tuple(hw):
        return maps
    resample = Image.NEAREST if nearest else Image.BILINEAR
    flat = maps.reshape(-1, *maps.shape[-2:])
    out = [np.asarray(Image.fromarray(m.astype(np.float32), mode="F").resize(hw[::-1], resample)) for m in flat]
    out = np.stack(out).reshape(*maps.shape[:-2], *hw)
    return out.astype(maps.dtype) if nearest else out


def _save_logits(path: pathlib.Path, logits, heat, prompts, paths, sizes, force):
    """Writes the ``--save-logits`` npz of arrays already in memory, through :class:`_LogitsWriter`:
    ``logits``/``heatmaps`` (N, P, H, W) when all inputs share a size, otherwise
    ``logits_<i>``/``heatmaps_<i>`` per image; plus ``prompts``, ``images``, ``sizes``."""
    if path.exists() and not force:
        raise RuntimeFailure(f"output file exists: {path}; pass --force to overwrite")
    writer = _LogitsWriter(path, prompts, force)
    try:
        for lg, hm, image_path, size in zip(logits, heat, paths, sizes):
            writer.add(lg, hm, image_path, size)
        writer.commit()
    finally:
        writer.abort()


def _progress(items, desc):
    if len(items) <= 1:
        return items
    from tqdm.auto import tqdm

    return tqdm(items, desc=desc, unit="image", file=sys.stderr)


def _load_model(name):
    from gem_jax import checkpoints, pipeline

    try:
        return pipeline.load(name)
    except checkpoints.UnknownModelError as e:
        raise UsageError(str(e)) from None
    except (checkpoints.ModelNotAvailableError, checkpoints.CheckpointError, FileNotFoundError) as e:
        raise RuntimeFailure(str(e)) from None


def cmd_models(args) -> int:
    from gem_jax import checkpoints

    states = {"converted": "converted", "original": "original files", "missing": "-"}
    rows = [("name", "architecture", "activation", "weights", "hub repository", "local copy")]
    for name in checkpoints.available_models():
        e = checkpoints.get_entry(name)
        rows.append((name, e.architecture, e.activation, e.pretrained, e.hub_repo or "(none)",
                     states[checkpoints.local_state(name)]))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for i, r in enumerate(rows):
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())
        if i == 0:
            print("  ".join("-" * w for w in widths))
    print(f"\nlocal copies live in {checkpoints.weights_dir()}/<name>, e.g. "
          f"{checkpoints.local_dir(checkpoints.DEFAULT_MODEL).name}; \"original files\" load as they are, "
          "`gem-jax convert NAME` makes the faster native copy")
    return EXIT_OK


def cmd_convert(args) -> int:
    from gem_jax import checkpoints

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
        raise RuntimeFailure(str(e) if args.force else f"{e}; pass --force to replace it") from None
    except (checkpoints.ModelNotAvailableError, checkpoints.CheckpointError, FileNotFoundError) as e:
        raise RuntimeFailure(str(e)) from None
    except ValueError as e:  # no --out for a non-registry source, an unknown architecture
        raise UsageError(str(e)) from None
    if args.random:
        print(f"wrote RANDOM weights of {args.source} (seed {args.seed}) -> {out}", file=sys.stderr)
    else:
        print(f"converted {args.source} -> {out}", file=sys.stderr)
    return EXIT_OK


def cmd_eval(args) -> int:
    from gem_jax.eval import command as eval_command

    if not args.no_compile_cache:
        enable_compile_cache(args.compile_cache)
    return eval_command.run(args)  # prints its own one-line errors and picks the exit status


def cmd_bench(args) -> int:
    from gem_jax import bench, config
    from gem_jax import gem as gem_lib

    try:
        config.architecture(args.arch)
    except ValueError as e:
        raise UsageError(str(e)) from None
    out = pathlib.Path(args.out) if args.out else None
    if out is not None and (out.is_dir() or (out.parent.exists() and not out.parent.is_dir())):
        raise UsageError(f"--out must name a JSON file, got {args.out!r}")  # before the timing, not after
    if out is not None and out.exists() and not args.force:
        raise RuntimeFailure(f"output file exists: {out}; pass --force to overwrite")
    if args.no_chunks and (args.head_chunk or args.image_chunk):
        raise UsageError("--no-chunks cannot be combined with --head-chunk or --image-chunk")
    if args.pipeline:
        if (args.batch is not None and len(args.batch) > 1) or (args.prompts is not None and len(args.prompts) > 1):
            raise UsageError("--pipeline takes one --batch size and one --prompts count")
        try:
            result = bench.pipeline(args.arch, args.size, (args.batch or [8])[0], args.images,
                                    prompts=(args.prompts or [8])[0], rounds=args.rounds, workers=args.workers)
        except RuntimeError as e:
            raise RuntimeFailure(str(e)) from None
        print(bench.format_pipeline(result))
    else:
        if args.reference and "gem" not in args.methods:
            raise UsageError("--reference times gem-torch: include gem in --method")
        try:
            result = bench.run(args.arch, args.size, args.batch or [1, 4], args.prompts or [1, 8, 64], args.rounds,
                               args.reference, args.dtype, gem_lib.Schedule() if args.no_chunks else "auto",
                               head_chunk=args.head_chunk, image_chunk=args.image_chunk, methods=args.methods)
        except RuntimeError as e:
            raise RuntimeFailure(str(e)) from None
        print(bench.format_table(result))
    if out is not None:
        from gem_jax.eval.runner import write_json

        write_json(out, result)
        print(f"wrote {out}")
    return EXIT_OK


def cmd_demo(args) -> int:
    from gem_jax import checkpoints, demo

    try:
        return demo.serve(args)
    except checkpoints.UnknownModelError as e:
        raise UsageError(str(e)) from None
    except demo.StartError as e:
        raise RuntimeFailure(str(e)) from None


COMMANDS = {"segment": cmd_segment, "batch": cmd_batch, "export": cmd_export, "models": cmd_models,
            "convert": cmd_convert, "eval": cmd_eval, "bench": cmd_bench, "demo": cmd_demo}


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_usage(sys.stderr)
        print("gem-jax: error: give a command: segment, batch, export, models, convert, eval or bench "
              "(see gem-jax --help)",
              file=sys.stderr)
        return EXIT_USAGE
    try:
        return COMMANDS[args.command](args)
    except UsageError as e:
        if args.debug:
            traceback.print_exc()
        print(f"gem-jax {args.command}: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except RuntimeFailure as e:
        if args.debug:
            traceback.print_exc()
        print(f"gem-jax {args.command}: error: {e}", file=sys.stderr)
        return EXIT_RUNTIME
    except KeyboardInterrupt:
        print("gem-jax: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # an unexpected failure: one line, the traceback with --debug
        if args.debug:
            traceback.print_exc()
        print(f"gem-jax {args.command}: error: {type(e).__name__}: {e} (run with --debug for the traceback)",
              file=sys.stderr)
        return EXIT_RUNTIME


if __name__ == "__main__":
    sys.exit(main())
