"""``gem-jax export``: the image program as a serialized ``jax.export`` artefact for serving."""

from __future__ import annotations

from gem_jax import checks, files
from gem_jax.cli import argtypes
from gem_jax.cli.common import (EXIT_OK, RuntimeFailure, UsageError, add_model_flags, check_method,
                                gem_from_flags, load_model, memory_refusal, progress_of)
from gem_jax.engine.cost import MemoryLimitError


def add_parser(sub, parents) -> None:
    e = sub.add_parser(
        "export", parents=parents, help="the image program as a serialized jax.export artefact for serving",
        description="Writes OUT (the serialized program, StableHLO for each platform), OUT.params.npz (its "
                    "parameters), OUT.json (inputs, outputs, model, method and options) and, with -p, "
                    "OUT.text.npy (the prompts' embeddings). A serving process loads them with "
                    "jax.export.deserialize and numpy alone.")
    add_model_flags(e, sizing=False)
    e.add_argument("--size", type=argtypes.size, default=None,
                   help="the program's fixed input size: N or HxW (default 448, or the model's recommendation)")
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
    e.add_argument("--force", action="store_true", help="replace an artefact an earlier export wrote")
    e.set_defaults(run=run)


def run(args) -> int:
    from gem_jax import export

    progress = progress_of(args, "export")
    try:
        platforms = export.parse_platforms(args.platforms)
    except ValueError as e:
        raise UsageError(f"--platforms: {e}") from None
    try:
        texts = checks.clean_prompts(args.prompt_texts)
    except checks.PromptError as e:
        raise UsageError(str(e)) from None
    if texts and args.prompts is not None and args.prompts != len(texts):
        raise UsageError(f"--prompts {args.prompts} but {len(texts)} prompt(s) given with -p")
    if args.batch % args.devices:
        raise UsageError(f"--batch {args.batch} must be a multiple of --devices {args.devices}")
    try:
        checks.output_file(args.out, "--out")
        export.check_outputs(args.out, force=args.force, with_text=bool(texts))
    except checks.OutputPathError as e:
        raise UsageError(str(e)) from None
    except files.OutputError as e:
        raise RuntimeFailure(str(e)) from None
    check_method(args)
    import jax

    if args.devices > 1:
        jax.config.update("jax_num_cpu_devices", args.devices)  # only affects a CPU backend
    devices = jax.local_devices()
    if len(devices) < args.devices:
        raise UsageError(f"--devices {args.devices} but only {len(devices)} {jax.default_backend()} device(s)")
    from gem_jax.engine.tower import Schedule

    model = load_model(args.model, progress)
    # The CPU's chunked schedule only when the program is for CPUs alone.
    schedule = "auto" if set(platforms) == {"cpu"} else Schedule()
    gem = gem_from_flags(model, args, short_side=None, schedule=schedule, devices=devices[:args.devices])
    count = len(texts) if texts else (args.prompts or 16)
    try:
        checks.distinguishable(model.tokenizer, texts, gem.templates)
        gem.check_memory(export.input_hw(gem), args.batch, count)
    except checks.PromptError as e:
        raise UsageError(str(e)) from None
    except MemoryLimitError as e:
        raise memory_refusal(e, size="--size", batch="--batch") from None
    except ValueError as e:
        raise UsageError(str(e)) from None
    progress.say(f"lowering for {', '.join(platforms)} ...")
    try:
        written = export.write(gem, args.out, batch=args.batch, prompts=texts or count, platforms=platforms,
                               force=args.force)
    except files.OutputError as e:
        raise RuntimeFailure(str(e)) from None
    except ValueError as e:
        raise UsageError(str(e)) from None
    progress.say(f"exported {gem.method.name} on {model.name} for {', '.join(platforms)}: "
                 + ", ".join(str(p) for p in written.values()))
    return EXIT_OK
