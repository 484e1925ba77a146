"""argparse value types shared by the ``gem-jax`` commands: clear messages for bad values."""

from __future__ import annotations

import argparse
import math
import re

from gem_jax import preprocess


def size(text: str):
    try:
        return preprocess.parse_size(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


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


_UNITS = {"": 1, "b": 1, "k": 1 << 10, "kb": 1 << 10, "kib": 1 << 10, "m": 1 << 20, "mb": 1 << 20,
          "mib": 1 << 20, "g": 1 << 30, "gb": 1 << 30, "gib": 1 << 30, "t": 1 << 40, "tb": 1 << 40, "tib": 1 << 40}


def memory_limit(text: str):
    """``auto``, ``none`` or a size such as ``8G``, ``512M`` or a number of bytes."""
    t = text.strip().lower()
    if t in ("auto", "none"):
        return None if t == "none" else "auto"
    m = re.fullmatch(r"(\d+(?:\.\d+)?)\s*([a-z]*)", t)
    if not m or m.group(2) not in _UNITS or float(m.group(1)) <= 0:
        raise argparse.ArgumentTypeError(f"expected auto, none or a size such as 8G or 512M, got {text!r}")
    return int(float(m.group(1)) * _UNITS[m.group(2)])


def projections(text: str) -> tuple[str, ...]:
    letters = tuple(dict.fromkeys(text.strip().lower().replace(",", "")))
    if not letters or any(c not in "qkv" for c in letters):
        raise argparse.ArgumentTypeError(f"expected letters from q, k, v (e.g. qkv or v), got {text!r}")
    return letters
