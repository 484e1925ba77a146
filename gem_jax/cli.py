"""The ``gem-jax`` command: segment, batch, export, models, convert, eval, bench."""

from __future__ import annotations

import argparse
import os
import pathlib
import re
import sys
import tempfile
import traceback

from gem_jax import argtypes

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
    add_model_flags(seg)
    seg.add_argument("--out", default="gem_out", help="output directory (default ./gem_out)")
    seg.add_argument("--save-logits", metavar="FILE.npz", default=None,
                     help="also save raw cosine logits, heatmaps and prompts")
    seg.add_argument("--cmap", default="jet", help="matplotlib colour map of the overlays (jet)")
    seg.add_argument("--alpha", type=argtypes.probability, default=0.5, help="overlay opacity in [0, 1] (0.5)")
    seg.add_argument("--force", action="store_true", help="overwrite existing output files")
    _add_cache_flags(seg)

    _add_batch_parser(sub, common)

    _add_export_parser(sub, common)

    sub.add_parser("models", parents=[common], help="list the model registry")

    conv = sub.add_parser("convert", parents=[common], help="convert a checkpoint into the native format")
    conv.add_argument("source", help="registry name, hub id, local directory or file")
    conv.add_argument("--out", required=True, help="output directory, e.g. weights/my-model")
    conv.add_argument("--activation", choices=("quick_gelu", "gelu"), default=None,
                      help="needed when the checkpoint does not say (bare safetensors files)")
    conv.add_argument("--force", action="store_true", help="replace an existing output directory")
    from gem_jax.eval import command as eval_command

    _add_cache_flags(eval_command.add_parser(sub, parents=[common]))

    bench = sub.add_parser("bench", parents=[common], help="time gem-jax (and the reference) on random weights",
                           description="Times gem-jax and, with --reference, gem-torch alternately on identical "
                                       "random weights, pixels and text embeddings; prints a table and "
                                       "writes JSON.")
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
    seg.add_argument("--method", choices=("gem", "clip"), default="gem", help="GEM or plain CLIP patch tokens")
    seg.add_argument("--gem-layers", type=argtypes.positive_int, default=6, help="last blocks with the GEM path (6)")
    seg.add_argument("--iterations", type=argtypes.nonneg_int, default=1, help="self-self attention iterations (1)")
    seg.add_argument("--temperature", type=argtypes.positive_float, default=None,
                     help="the paper's tau; default: adaptive")
    seg.add_argument("--template", default="a photo of a {}.",
                     help="prompt template with {} ('imagenet' for the 80-template ensemble)")
    size = seg.add_mutually_exclusive_group()
    size.add_argument("--size", type=argtypes.size, default=None, help="model input size: N or HxW (default 448)")
    size.add_argument("--short-side", type=argtypes.positive_int, default=None,
                      help="resize the shorter side to this, keeping the aspect")
    seg.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32", help="compute dtype")


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
    path.mkdir(parents=True, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", str(path))
    # The defaults skip programs compiled in under a second; ours are all worth keeping.
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    return path


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "_", text).strip("_")[:60] or "prompt"


def _plan_outputs(paths, prompts, classes, out_dir: pathlib.Path):
    """Per image: (overlay paths per prompt, grid path, label path | None)."""
    plans, seen = [], {}
    for path in paths:
        stem = _slug(path.stem)
        n = seen.get(stem, 0)
        seen[stem] = n + 1
        if n:
            stem = f"{stem}_{n}"
        overlays = [out_dir / f"{stem}__{_slug(p)}.png" for p in prompts]
        grid = out_dir / f"{stem}__grid.png" if prompts else None
        labels = out_dir / f"{stem}__labels.png" if classes else None
        plans.append((overlays, grid, labels))
    return plans


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
    if len(set(prompts)) != len(prompts):
        raise UsageError("a prompt is given twice")
    if args.save_logits and not prompts:
        raise UsageError("--save-logits needs prompts (-p)")
    if not args.images and not args.example:
        raise UsageError("no images given (pass IMAGE paths, a directory, a glob, or --example)")
    try:
        paths = preprocess.expand_image_paths(args.images) if args.images else []
    except preprocess.ImageError as e:
        raise RuntimeFailure(str(e)) from None
    if args.example:
        from gem_jax.pipeline import example_image_path

        paths.append(example_image_path())
    out_dir = pathlib.Path(args.out)
    plans = _plan_outputs(paths, prompts, classes, out_dir)
    targets = [p for overlays, grid, labels in plans for p in (*overlays, grid, labels) if p is not None]
    if args.save_logits:
        targets.append(pathlib.Path(args.save_logits))
    if not args.force:
        existing = [str(p) for p in targets if p.exists()]
        if existing:
            more = f" (and {len(existing) - 1} more)" if len(existing) > 1 else ""
            raise RuntimeFailure(f"output file exists: {existing[0]}{more}; pass --force to overwrite")
    if args.save_logits and not str(args.save_logits).endswith(".npz"):
        raise UsageError(f"--save-logits must name a .npz file, got {args.save_logits!r}")

    # Decode every image before the (slow) model load, so a bad file fails fast.
    try:
        images = [preprocess.load_image(p) for p in paths]
    except preprocess.ImageError as e:
        raise RuntimeFailure(str(e)) from None

    if not args.no_compile_cache:
        enable_compile_cache(args.compile_cache)
    import numpy as np

    from gem_jax import pipeline, visualize

    model = _load_model(args.model)
    try:
        gem = pipeline.GEM(model, method=args.method, layers=args.gem_layers, iterations=args.iterations,
                           temperature=args.temperature, template=args.template, size=args.size,
                           short_side=args.short_side, dtype=args.dtype)
    except ValueError as e:
        raise UsageError(str(e)) from None
    try:
        visualize.colorize(np.zeros((1, 1)), args.cmap)
    except ValueError as e:
        raise UsageError(str(e)) from None

    out_dir.mkdir(parents=True, exist_ok=True)
    all_logits, all_heat, sizes = [], [], []
    for image, path, (overlays, grid, labels_path) in _progress(list(zip(images, paths, plans)), "segment"):
        if prompts:
            out = gem.heatmaps(image, prompts)
            logits, heat = out.logits[0], out.heatmaps[0]
            all_logits.append(logits)
            all_heat.append(heat)
            sizes.append(out.sizes[0])
            shown = _to_original_size(heat, image.shape[:2])
            for p_idx, target in enumerate(overlays):
                visualize.save_png(visualize.overlay(image, shown[p_idx], cmap=args.cmap, alpha=args.alpha),
                                   target, overwrite=args.force)
            fig = visualize.heatmap_grid(image, shown, prompts, cmap=args.cmap, alpha=args.alpha)
            visualize.save_png(fig, grid, overwrite=args.force)
        if classes:
            labels = gem.segment(image, classes, args.background_threshold)
            labels = _to_original_size(labels, image.shape[:2], nearest=True)
            fig = visualize.label_figure(image, labels, classes)
            visualize.save_png(fig, labels_path, overwrite=args.force)
    if args.save_logits:
        _save_logits(pathlib.Path(args.save_logits), all_logits, all_heat, prompts, paths, sizes, args.force)
    written = len(targets)
    print(f"wrote {written} file(s) to {out_dir}" + (f" and {args.save_logits}" if args.save_logits else ""),
          file=sys.stderr)
    return EXIT_OK


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
    if not args.no_compile_cache:
        enable_compile_cache(args.compile_cache)
    from gem_jax import checkpoints, pipeline

    model = _load_model(args.model)
    try:
        gem = pipeline.GEM(model, method=args.method, layers=args.gem_layers, iterations=args.iterations,
                           temperature=args.temperature, template=args.template, size=args.size,
                           short_side=args.short_side, dtype=args.dtype)
    except ValueError as e:
        raise UsageError(str(e)) from None
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
    from gem_jax import checkpoints, gem as gem_lib, pipeline

    model = _load_model(args.model)
    # The CPU's chunked schedule only when the program is for CPUs alone.
    schedule = "auto" if set(platforms) == {"cpu"} else gem_lib.Schedule()
    try:
        gem = pipeline.GEM(model, method=args.method, layers=args.gem_layers, iterations=args.iterations,
                           temperature=args.temperature, template=args.template, size=args.size,
                           dtype=args.dtype, schedule=schedule, devices=devices[:args.devices])
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
    """Writes the npz atomically: ``logits``/``heatmaps`` (N, P, H, W) when all inputs share a
    size, otherwise ``logits_<i>``/``heatmaps_<i>`` per image; plus ``prompts``, ``images``, ``sizes``."""
    import numpy as np

    if path.exists() and not force:
        raise RuntimeFailure(f"output file exists: {path}; pass --force to overwrite")
    arrays = {"prompts": np.array(prompts), "images": np.array([str(p) for p in paths]),
              "sizes": np.array(sizes, dtype=np.int32)}
    if len(set(sizes)) == 1:
        arrays["logits"], arrays["heatmaps"] = np.stack(logits), np.stack(heat)
    else:
        for i, (lg, hm) in enumerate(zip(logits, heat)):
            arrays[f"logits_{i}"], arrays[f"heatmaps_{i}"] = lg, hm
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **arrays)
        os.replace(tmp, path)
    except BaseException:
        pathlib.Path(tmp).unlink(missing_ok=True)
        raise


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

    rows = [("name", "architecture", "weights", "hub repository", "converted")]
    for name in checkpoints.available_models():
        e = checkpoints.get_entry(name)
        rows.append((name, e.architecture, e.pretrained, e.hub_repo or "(none)",
                     "yes" if checkpoints.is_converted(name) else "no"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for i, r in enumerate(rows):
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())
        if i == 0:
            print("  ".join("-" * w for w in widths))
    print(f"\nconverted copies live in {checkpoints.weights_dir()}")
    return EXIT_OK


def cmd_convert(args) -> int:
    from gem_jax import checkpoints

    try:
        out = checkpoints.convert(args.source, args.out, force=args.force, activation=args.activation)
    except checkpoints.UnknownModelError as e:
        raise UsageError(str(e)) from None
    except FileExistsError as e:
        raise RuntimeFailure(f"{e}; pass --force to replace it") from None
    except (checkpoints.ModelNotAvailableError, checkpoints.CheckpointError, FileNotFoundError) as e:
        raise RuntimeFailure(str(e)) from None
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
        try:
            result = bench.run(args.arch, args.size, args.batch or [1, 4], args.prompts or [1, 8, 64], args.rounds,
                               args.reference, args.dtype, gem_lib.Schedule() if args.no_chunks else "auto",
                               head_chunk=args.head_chunk, image_chunk=args.image_chunk)
        except RuntimeError as e:
            raise RuntimeFailure(str(e)) from None
        print(bench.format_table(result))
    if out is not None:
        from gem_jax.eval.runner import write_json

        write_json(out, result)
        print(f"wrote {out}")
    return EXIT_OK


COMMANDS = {"segment": cmd_segment, "batch": cmd_batch, "export": cmd_export, "models": cmd_models, "convert": cmd_convert, "eval": cmd_eval,
            "bench": cmd_bench}


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
