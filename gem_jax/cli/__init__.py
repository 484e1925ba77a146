"""The ``gem-jax`` command: one module per command, the shared flags and errors in :mod:`~gem_jax.cli.common`.

Every command is a ``run(args) -> exit status`` registered by its module's
``add_parser``. Exit status: 0 done; 1 a well-formed command that could not be carried
out; 2 a usage mistake (checked before any model loads); 3 done, but some inputs were
skipped or failed (segment, batch, eval); 130 interrupted (Ctrl-C); 143 terminated
(SIGTERM). Errors are one line on stderr; ``--debug`` adds the traceback.
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading
import traceback
import warnings

from gem_jax import __version__
from gem_jax.cli import batch, bench, demo, export, models, segment, toy
from gem_jax.cli import eval as eval_command
from gem_jax.cli.common import EXIT_RUNTIME, EXIT_USAGE, Parser, RuntimeFailure, UsageError, add_common_flags
from gem_jax.checks import PromptTruncatedWarning
from gem_jax.progress import Terminated

COMMANDS = ("segment", "batch", "export", "models", "convert", "eval", "bench", "demo", "train-toy")


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="gem-jax",
        description="GEM (Grounding Everything Module) in JAX: open-vocabulary heatmaps and segmentation "
                    "from a pretrained CLIP, without training.")
    parser.add_argument("--version", action="version", version=f"gem-jax {__version__}")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    parser.add_argument("--quiet", "-q", action="store_true", help="no progress or status lines")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    common = Parser(add_help=False)
    add_common_flags(common)
    parents = [common]
    segment.add_parser(sub, parents)
    batch.add_parser(sub, parents)
    export.add_parser(sub, parents)
    models.add_parsers(sub, parents)
    eval_command.add_parser(sub, parents)
    bench.add_parser(sub, parents)
    demo.add_parser(sub, parents)
    toy.add_parser(sub, parents)
    return parser


def _terminate(signum, frame):
    raise Terminated()


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_usage(sys.stderr)
        print(f"gem-jax: error: give a command: {', '.join(COMMANDS)} (see gem-jax --help)", file=sys.stderr)
        return EXIT_USAGE
    # The commands say which prompts are cut in their own notes (checks.vet), not as Python warnings.
    warnings.filterwarnings("ignore", category=PromptTruncatedWarning)
    previous = None
    if threading.current_thread() is threading.main_thread():
        previous = signal.signal(signal.SIGTERM, _terminate)
    try:
        return args.run(args)
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
    except Terminated:
        print(f"gem-jax {args.command}: terminated", file=sys.stderr)
        return 143
    except KeyboardInterrupt:
        print(f"gem-jax {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # an unexpected failure: one line, the traceback with --debug
        if args.debug:
            traceback.print_exc()
        message = " ".join(str(e).split())
        print(f"gem-jax {args.command}: error: {type(e).__name__}: {message} (run with --debug for the traceback)",
              file=sys.stderr)
        return EXIT_RUNTIME
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)

