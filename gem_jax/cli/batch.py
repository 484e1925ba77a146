"""``gem-jax batch``: streaming, resumable inference over many images into Parquet parts."""

from __future__ import annotations

import pathlib

from gem_jax import checks
from gem_jax.cli import argtypes
from gem_jax.cli.common import (EXIT_OK, EXIT_PARTIAL, RuntimeFailure, UsageError, add_model_flags, check_method,
                                compile_cache_from_flags, gem_from_flags, load_model, memory_refusal, output_dir,
                                progress_of, prompts_and_classes)
from gem_jax.engine.cost import MemoryLimitError


def add_parser(sub, parents) -> None:
    b = sub.add_parser(
        "batch", parents=parents, help="streaming, resumable inference over many images into Parquet",
        description="Runs a method over many images into Parquet part files in --out (patch-grid logits per "
                    "image; optionally label maps and heatmaps, or only the top prompts per patch). Decoding "
                    "overlaps the device; a killed run resumes where it stopped when rerun with the same "
                    "command; --shard splits the work between hosts. Read the results with "
                    "gem_jax.load_results(DIR) or any Parquet reader.")
    b.add_argument("inputs", nargs="+", metavar="INPUT",
                   help="image files, directories (recursive), glob patterns, .tar shards, or @LIST.txt "
                        "(one per line)")
    b.add_argument("-p", "--prompt", dest="prompts", action="extend", nargs="+", default=[], metavar="PROMPT",
                   help="text to localise; repeat or list several")
    b.add_argument("--prompts-file", default=None, metavar="FILE", help="prompts, one per line (UTF-8)")
    b.add_argument("--classes", nargs="+", metavar="CLASS",
                   help="class names for label maps (with -p, as in segment: the label maps are of the classes)")
    b.add_argument("--out", required=True, metavar="DIR", help="output directory (created; resumed if it exists)")
    add_model_flags(b)
    b.add_argument("--logits-dtype", choices=("float16", "float32"), default="float16",
                   help="dtype of the stored logits (float16; float32 for exact values)")
    b.add_argument("--store", choices=("logits", "topk", "labels"), default=None,
                   help="per image: logits, the patch-grid logits of every prompt (default); topk, the --top-k best "
                        "prompts per patch and their logits (for large vocabularies); labels, only the label map")
    b.add_argument("--top-k", type=argtypes.positive_int, default=None, metavar="K",
                   help="with --store topk (implied): prompts kept per patch (default 5)")
    b.add_argument("--labels", action="store_true", help="also store a label map per image (PNG, own size)")
    b.add_argument("--background-threshold", type=argtypes.probability, default=0.85,
                   help="with --labels: pixels whose top class probability is below this are background (0.85)")
    b.add_argument("--heatmaps", action="store_true",
                   help="also store full-size heatmaps (P x input size per image: large)")
    b.add_argument("--batch-size", type=argtypes.positive_int, default=None,
                   help="images per forward pass (default: 8 on CPU, 32 per GPU/TPU device)")
    b.add_argument("--part-size", type=argtypes.positive_int, default=1024,
                   help="images per part file, the unit of sharding (1024); finished images are kept as "
                        "they complete, so an interrupted part resumes where it stopped")
    b.add_argument("--shard", default=None, metavar="INDEX/COUNT",
                   help="do only this host's share, e.g. 0/4 (default: jax.process_index()/process_count())")
    b.add_argument("--distributed", action="store_true",
                   help="call jax.distributed.initialize() first (TPU pods, SLURM, Kubernetes: see docs/BATCH.md)")
    b.add_argument("--workers", type=argtypes.positive_int, default=None,
                   help="image decoding threads (default: CPU count, at most 16)")
    b.add_argument("--prefetch", type=argtypes.positive_int, default=None,
                   help="decoded images kept ready ahead of the device (default: 2 batches + workers)")
    b.add_argument("--loader", choices=("thread", "grain"), default="thread", help="input pipeline (thread)")
    b.add_argument("--max-pixels", type=argtypes.positive_int, default=None,
                   help="refuse images with more pixels (default: Pillow's decompression bomb limit, 89,478,485)")
    b.add_argument("--force", action="store_true",
                   help="start the job in --out over: deletes the files an earlier batch job recorded as its own "
                        "(nothing else)")
    b.add_argument("--log-every", type=argtypes.positive_int, default=1000,
                   help="without a terminal: a progress line every N images (1000)")
    b.set_defaults(run=run)


def batch_prompts(args) -> tuple[list[str], list[str] | None]:
    """(prompts, classes) from -p / --prompts-file / --classes."""
    prompts = list(args.prompts)
    if args.prompts_file:
        try:
            data = pathlib.Path(args.prompts_file).read_bytes()
        except OSError as e:
            raise UsageError(f"cannot read --prompts-file {args.prompts_file}: {e.strerror or e}") from None
        try:
            text = data.decode("utf-8-sig")
        except UnicodeDecodeError as e:
            raise UsageError(f"--prompts-file {args.prompts_file} is not UTF-8 text (byte {e.start} is "
                             f"{data[e.start:e.start + 1]!r}): give a text file with one prompt per line") from None
        if "\x00" in text:
            raise UsageError(f"--prompts-file {args.prompts_file} holds NUL bytes: it is not a text file")
        prompts += [ln for ln in text.splitlines() if ln.strip()]
    return prompts_and_classes(prompts, args.classes,
                               "give prompts with -p PROMPT, --prompts-file FILE or --classes")


def run(args) -> int:
    from gem_jax import batch

    prompts, classes = batch_prompts(args)
    progress = progress_of(args, "batch", log_every=args.log_every)
    shard = None
    if args.shard is not None:
        try:
            shard = batch.parse_shard(args.shard)
        except ValueError as e:
            raise UsageError(str(e)) from None
    out = output_dir(args.out)
    check_method(args)
    try:
        items = batch.expand_inputs(args.inputs)
    except batch.InputError as e:
        raise RuntimeFailure(str(e)) from None
    try:
        batch.check_output(out, force=args.force)
    except batch.JobError as e:
        raise RuntimeFailure(str(e)) from None
    if args.distributed:
        import jax

        try:
            jax.distributed.initialize()
        except Exception as e:  # no cluster found, coordinator unreachable, ...
            raise RuntimeFailure(f"jax.distributed.initialize() failed: {' '.join(str(e).split())}") from None
    compile_cache_from_flags(args)
    model = load_model(args.model, progress)
    gem = gem_from_flags(model, args)
    labels = args.labels or bool(classes)
    store = args.store or ("topk" if args.top_k else "logits")
    if args.top_k and store != "topk":
        raise UsageError(f"--top-k goes with --store topk, not --store {store}")
    opts = batch.BatchOptions(
        prompts=prompts, classes=classes, store=store, top_k=args.top_k or 5, part_size=args.part_size,
        batch_size=args.batch_size,
        logits_dtype=args.logits_dtype, labels=labels, background_threshold=args.background_threshold,
        heatmaps=args.heatmaps, workers=args.workers, prefetch=args.prefetch, loader=args.loader, shard=shard,
        force=args.force, **({"max_pixels": args.max_pixels} if args.max_pixels else {}))
    try:
        summary = batch.run(gem, items, out, opts, progress=progress)
    except batch.Interrupted as e:
        progress.note(str(e))
        return 143 if e.terminated else 130
    except checks.PromptError as e:
        raise UsageError(str(e)) from None
    except MemoryLimitError as e:
        raise memory_refusal(e, batch="--batch-size") from None
    except batch.JobError as e:
        raise RuntimeFailure(str(e)) from None
    index, count = summary.shard
    where = f"shard {index}/{count}: " if count > 1 else ""
    if summary.processed:
        rate = summary.processed / summary.elapsed_s if summary.elapsed_s > 0 else 0.0
        progress.say(f"{where}{summary.processed} image(s) in {summary.elapsed_s:.1f} s ({rate:.1f} images/s) "
                     f"to {out}")
    if summary.errors:
        listed = (f"{out}/errors.jsonl" if summary.job_complete
                  else "the error column of the part files; errors.jsonl comes when every shard is done")
        progress.note(f"{where}{summary.errors} of {summary.images} image(s) could not be used (see {listed}); "
                      "exit status 3")
        return EXIT_PARTIAL
    return EXIT_OK
