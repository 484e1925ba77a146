"""``gem-jax bench``: gem-jax (and the reference) timed on random weights."""

from __future__ import annotations



from gem_jax.cli import argtypes
from gem_jax.cli.common import EXIT_OK, RuntimeFailure, UsageError, output_file, progress_of
from gem_jax.config import architecture


def add_parser(sub, parents) -> None:
    bench = sub.add_parser("bench", parents=parents, help="time gem-jax (and the reference) on random weights",
                           description="Times gem-jax and, with --reference, gem-torch alternately on identical "
                                       "random weights, pixels and text embeddings; prints a table and writes "
                                       "JSON. The default cases (ViT-B/16 at 448, batches 1 and 4, 1/8/64 prompts; "
                                       "a warm-up and 5 rounds per case) take a few minutes on a 2-vCPU x86_64 CPU. "
                                       "--vocabulary times prompt counts (one image-tower pass whatever the "
                                       "count) and the text side against open_clip's encode_text.")
    bench.add_argument("--arch", default="ViT-B-16", help="architecture (ViT-B-16)")
    bench.add_argument("--size", type=argtypes.size, default=None, help="input size N or HxW (448; 224 with "
                                                                        "--vocabulary)")
    bench.add_argument("--batch", type=argtypes.positive_int, nargs="+", default=None,
                       help="batch sizes (1 4; with --pipeline one size, 8; with --vocabulary one size, 4)")
    bench.add_argument("--prompts", type=argtypes.positive_int, nargs="+", default=None,
                       help="prompt counts (1 8 64; with --pipeline one count, 8; with --vocabulary 8 128 1000 "
                            "10000)")
    bench.add_argument("--rounds", type=argtypes.positive_int, default=5, help="timed rounds per case (5)")
    bench.add_argument("--reference", action="store_true", help="also time gem-torch / open_clip (needs the test "
                                                                "extra)")
    bench.add_argument("--dtype", nargs="+", choices=("float32", "bfloat16"), default=["float32"],
                       help="gem-jax compute dtypes; later ones report their difference from the first")
    bench.add_argument("--head-chunk", type=argtypes.positive_int, default=None,
                       help="(image, head) pairs per attention step (default: the backend's best)")
    bench.add_argument("--image-chunk", type=argtypes.positive_int, default=None,
                       help="images per step through the tower (default: the backend's best)")
    bench.add_argument("--no-chunks", action="store_true", help="whole batch and all heads at once")
    bench.add_argument("--method", dest="methods", nargs="+", default=["gem"], metavar="METHOD",
                       help="methods to time, each with its official defaults (gem); any registered method")
    mode = bench.add_mutually_exclusive_group()
    mode.add_argument("--pipeline", action="store_true",
                      help="instead: the batch job's streaming input against pre-decoded pixels in memory")
    mode.add_argument("--vocabulary", action="store_true",
                      help="instead: prompt counts and the text side (with and without the 80 templates, first run "
                           "and cached)")
    bench.add_argument("--images", type=argtypes.positive_int, default=200,
                       help="with --pipeline: JPEG files of 500x375 to stream (200)")
    bench.add_argument("--workers", type=argtypes.positive_int, default=None,
                       help="with --pipeline: decoding threads (default: CPU count, at most 16)")
    bench.add_argument("--out", default=None, metavar="FILE.json", help="write the results as JSON")
    bench.add_argument("--force", action="store_true", help="overwrite an --out an earlier run wrote")
    bench.set_defaults(run=run)


def run(args) -> int:
    from gem_jax import bench, files
    from gem_jax.engine.methods import get_method
    from gem_jax.engine.tower import Schedule

    try:
        architecture(args.arch)
        for m in args.methods:
            get_method(m)
    except ValueError as e:
        raise UsageError(str(e)) from None
    out = output_file(args.out, "--out", suffix=".json", force=args.force) if args.out else None
    if args.no_chunks and (args.head_chunk or args.image_chunk):
        raise UsageError("--no-chunks cannot be combined with --head-chunk or --image-chunk")
    progress = progress_of(args, "bench")
    one = lambda values, default: (values or [default])[0]  # noqa: E731
    if (args.pipeline or args.vocabulary) and ((args.batch and len(args.batch) > 1)):
        raise UsageError("--pipeline and --vocabulary take one --batch size")
    try:
        if args.pipeline:
            if args.prompts is not None and len(args.prompts) > 1:
                raise UsageError("--pipeline takes one --prompts count")
            result = bench.pipeline(args.arch, args.size or 224, one(args.batch, 8), args.images,
                                    prompts=one(args.prompts, 8), rounds=args.rounds, workers=args.workers,
                                    progress=progress)
            table = bench.format_pipeline(result)
        elif args.vocabulary:
            result = bench.vocabulary(args.arch, args.size or 224, one(args.batch, 4),
                                      args.prompts or [8, 128, 1000, 10000], rounds=args.rounds,
                                      reference=args.reference, progress=progress)
            table = bench.format_vocabulary(result)
        else:
            if args.reference and "gem" not in args.methods:
                raise UsageError("--reference times gem-torch: include gem in --method")
            result = bench.run(args.arch, args.size or 448, args.batch or [1, 4], args.prompts or [1, 8, 64],
                               args.rounds, args.reference, args.dtype, Schedule() if args.no_chunks else "auto",
                               head_chunk=args.head_chunk, image_chunk=args.image_chunk, methods=args.methods,
                               progress=progress)
            table = bench.format_table(result)
    except RuntimeError as e:
        raise RuntimeFailure(str(e)) from None
    print(table)
    if out is not None:
        files.write_owned(out, lambda f: f.write(files.dump_json(result)), force=True)
        progress.say(f"wrote {out}")
    return EXIT_OK



