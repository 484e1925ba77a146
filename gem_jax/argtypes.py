"""argparse value types shared by the ``gem-jax`` commands: clear messages for bad values."""

from __future__ import annotations

import argparse
import math
import re


def size(text: str):
    m = re.fullmatch(r"\s*(\d+)\s*(?:[xX]\s*(\d+)\s*)?", text)
    if not m:
        raise argparse.ArgumentTypeError(f"expected N or HxW (e.g. 448 or 320x480), got {text!r}")
    h = int(m.group(1))
    if h < 1 or (m.group(2) is not None and int(m.group(2)) < 1):
        raise argparse.ArgumentTypeError(f"sizes must be at least 1, got {text!r}")
    return h if m.group(2) is None else (h, int(m.group(2)))


def positive_float(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not (v > 0 and math.isfinite(v)):
        raise argparse.ArgumentTypeError(f"expected a finite number > 0, got {text!r}")
    return v


def probability(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1], got {text!r}") from None
    if not 0.0 <= v <= 1.0:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1], got {text!r}")
    return v


def nonneg_int(text: str) -> int:
    if not text.isdigit():
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}")
    return int(text)


def positive_int(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}")
    return int(text)


METHOD_HELP = ("gem, clip (plain patch tokens), maskclip, clipsurgery, sclip, clearclip, naclip: "
               "what each changes is in the README's methods table")


def add_method_arguments(parser: argparse.ArgumentParser, default: str | None = "gem") -> None:
    """``--method`` (choices: the one list of methods) and the method options, for every
    command that chooses a method. ``--gem-layers``, ``--iterations`` and
    ``--temperature`` are added by the commands themselves. ``default=None`` leaves the
    choice to the command (``eval``: the protocol's method)."""
    from gem_jax.config import METHODS

    parser.add_argument("--method", choices=METHODS, default=default,
                        help=METHOD_HELP + (f" (default {default})" if default else " (default: the protocol's method)"))
    parser.add_argument("--sigma", type=positive_float, default=None,
                        help="naclip: width of the Gaussian neighbourhood, in patches (default 5)")
    parser.add_argument("--residual", action=argparse.BooleanOptionalAction, default=None,
                        help="one-block methods: keep the residual in the modified block (default: the method's "
                             "own: on for maskclip and sclip, off for clearclip and naclip)")
    parser.add_argument("--mlp", action=argparse.BooleanOptionalAction, default=None,
                        help="run the block's MLP on the method's path (default: the method's own: on for "
                             "maskclip and sclip, off for gem, clipsurgery, clearclip, naclip)")
    parser.add_argument("--feature-surgery", action="store_true",
                        help="CLIP Surgery's feature surgery in place of the raw cosines (any method; off)")


def method_kwargs(args: argparse.Namespace) -> dict:
    """The ``GEM(...)`` keyword arguments of :func:`add_method_arguments`'s flags."""
    return dict(method=args.method, sigma=args.sigma, residual=args.residual, mlp=args.mlp,
                feature_surgery=args.feature_surgery)


def check_method(args: argparse.Namespace):
    """The :class:`gem_jax.methods.Method` of the method flags; raises ValueError when they
    do not fit the method (before any model load)."""
    from gem_jax.methods import get_method

    return get_method(args.method, layers=args.gem_layers, residual=args.residual, mlp=args.mlp, sigma=args.sigma,
                      iterations=args.iterations, temperature=args.temperature)
