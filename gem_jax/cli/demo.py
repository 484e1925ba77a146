"""``gem-jax demo``: the web page."""

from __future__ import annotations

from gem_jax import checkpoints
from gem_jax.cli import argtypes
from gem_jax.cli.common import RuntimeFailure, UsageError, add_cache_flags, compile_cache_from_flags


def add_parser(sub, parents) -> None:
    demo = sub.add_parser("demo", parents=parents, help="a web page to try GEM (needs the demo extra)",
                          description="Serves a Gradio page: an image, many prompts, every method; overlays, a "
                                      "label map, the raw logits and the model time. Needs pip install "
                                      "\"gem-jax[demo]\". It listens on 127.0.0.1; --host 0.0.0.0 or --share "
                                      "expose it to others (see docs/DEMO.md): then give --auth.")
    demo.add_argument("--model", default=None, help="registry name, hub id, local directory or file "
                                                    f"(default {checkpoints.DEFAULT_MODEL})")
    demo.add_argument("--host", default="127.0.0.1", help="address to listen on (127.0.0.1; 0.0.0.0 for all)")
    demo.add_argument("--port", type=argtypes.positive_int, default=7860, help="port (7860)")
    demo.add_argument("--share", action="store_true", help="also open a public Gradio share link (needs network)")
    demo.add_argument("--auth", default=None, metavar="USER:PASSWORD",
                      help="ask for this user name and password (Gradio's login); or @FILE with one USER:PASSWORD "
                           "per line")
    demo.add_argument("--memory-limit", type=argtypes.memory_limit, default="auto", metavar="auto|none|SIZE",
                      help="refuse requests whose memory estimate exceeds this (auto: 90%% of the free memory)")
    add_cache_flags(demo)
    demo.set_defaults(run=run)


def run(args) -> int:
    from gem_jax import demo

    try:
        auth = demo.parse_auth(args.auth) if args.auth else None
    except ValueError as e:
        raise UsageError(f"--auth: {e}") from None
    compile_cache_from_flags(args)
    try:
        return demo.serve(args.model, host=args.host, port=args.port, share=args.share, auth=auth,
                          memory_limit=args.memory_limit, text_cache=not args.no_text_cache,
                          quiet=getattr(args, "quiet", False))
    except checkpoints.UnknownModelError as e:
        raise UsageError(str(e)) from None
    except demo.StartError as e:
        raise RuntimeFailure(str(e)) from None
