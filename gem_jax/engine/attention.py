"""The attention kinds a method can put on its path: each mixes per-head values and
describes itself (its options, its FLOPs, the attention maps it keeps in memory).

An attention is any callable ``(q, k, v, ctx) -> (B, H, N, d)`` over (B, H, N, d)
inputs. To take part in result files, FLOP counts and memory estimates it also has
``options() -> dict`` (JSON values), ``flops(tokens, width) -> float`` (one block, all
heads) and ``maps`` (N x N float32 maps alive per (image, head) pair). Those three have
defaults in :class:`AttentionBase`; a dataclass attention's fields are its options,
which users set by name (``Method.configure``).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Protocol

import jax
import jax.numpy as jnp
import numpy as np

from gem_jax.engine import gem as gem_maths
from gem_jax.models.layers import softmax_attention


@dataclasses.dataclass(frozen=True)
class Context:
    """What an attention sees besides q, k, v.

    Attributes:
      y: (B, N, C) the block's ``ln_1`` input (GEM's adaptive temperature reads it).
      grid: (h, w) patch grid.
      head_dim: width of a head.
      head_chunk: most (image, head) pairs per step (:func:`map_heads`).
      inv_temp: an optional 1/tau overriding GEM's (analysis: differentiable).
    """

    y: Any
    grid: tuple[int, int]
    head_dim: int
    head_chunk: int | None = None
    inv_temp: Any = None

    @property
    def scale(self) -> float:
        return self.head_dim ** -0.5


class Attention(Protocol):
    """Mixes per-head values: ``(q, k, v, ctx) -> (B, H, N, d)`` from (B, H, N, d) inputs."""

    def __call__(self, q, k, v, ctx: Context): ...


def _json(value):
    return list(value) if isinstance(value, tuple) else value


class AttentionBase:
    """Defaults for the description an attention gives of itself."""

    #: What the attention is called in result files.
    kind: str = "attention"
    #: N x N float32 maps per (image, head) pair it keeps alive beside the block's own
    #: attention (whose logits, weights and product the estimate counts anyway).
    maps: int = 3

    def options(self) -> dict:
        """The attention's settings as JSON values (a dataclass's fields)."""
        if dataclasses.is_dataclass(self):
            return {f.name: _json(getattr(self, f.name)) for f in dataclasses.fields(self)}
        return {}

    def flops(self, tokens: int, width: int) -> float:
        """Multiply-adds x 2 of one block's mixing over all heads: here one softmax attention
        (``q kᵀ`` and ``weights v``)."""
        return 2 * 2 * tokens * tokens * width


def describe(attention) -> dict:
    """``{"kind": ..., **options}`` of any attention (defaults for one without the methods)."""
    kind = getattr(attention, "kind", None) or type(attention).__name__
    options = attention.options() if hasattr(attention, "options") else AttentionBase.options(attention)
    return {"kind": kind, **options}


def attention_flops(attention, tokens: int, width: int) -> float:
    """:meth:`AttentionBase.flops` of any attention (the default for one without it)."""
    fn = getattr(attention, "flops", None)
    return fn(tokens, width) if fn is not None else AttentionBase.flops(attention, tokens, width)


def attention_maps(attention) -> int:
    """:attr:`AttentionBase.maps` of any attention."""
    return int(getattr(attention, "maps", AttentionBase.maps))


def largest_divisor(n: int, at_most: int) -> int:
    """The largest divisor of ``n`` that is at most ``at_most``."""
    return max(d for d in range(1, min(n, at_most) + 1) if n % d == 0)


def map_heads(fn, chunk: int | None, *arrays):
    """Applies ``fn`` to (image, head) pairs ``chunk`` at a time.

    Args:
      fn: maps arrays (G, ...) to one array (G, ...), independently per leading row.
      chunk: most pairs per step; ``None`` calls ``fn`` once on everything.
      arrays: (B, H, ...) arrays, or arrays broadcastable to (B, H, 1, ...).
    Returns:
      ``fn``'s result, (B, H, ...).
    """
    b, h = arrays[0].shape[:2]
    if chunk is None or chunk >= b * h:
        return fn(*arrays)
    g = largest_divisor(b * h, chunk)
    flat = []
    for a in arrays:
        a = jnp.asarray(a)
        a = jnp.broadcast_to(a, (b, h) + a.shape[2:]) if a.ndim >= 2 else jnp.broadcast_to(a, (b, h))
        flat.append(a.reshape(b * h // g, g, *a.shape[2:]))
    out = jax.lax.map(lambda xs: fn(*xs), tuple(flat))
    return out.reshape(b, h, *out.shape[2:])


def _check_projections(projections) -> tuple[str, ...]:
    projections = tuple(projections) if not isinstance(projections, str) else tuple(projections)
    if (not projections or any(p not in gem_maths.PROJECTIONS for p in projections)
            or len(set(projections)) != len(projections)):
        raise ValueError(f"projections must be a non-empty subset of {gem_maths.PROJECTIONS}, got {projections!r}")
    # Canonical order, so equal options hash equal (they key jit caches).
    return tuple(p for p in gem_maths.PROJECTIONS if p in projections)


@dataclasses.dataclass(frozen=True)
class ValueOnly(AttentionBase):
    """MaskCLIP: no mixing, every token keeps its own value."""

    kind = "value"
    maps = 0

    def __call__(self, q, k, v, ctx: Context):
        return v

    def flops(self, tokens: int, width: int) -> float:
        return 0.0


@functools.lru_cache(maxsize=32)
def neighbourhood_bias(grid: tuple[int, int], sigma: float) -> np.ndarray:
    """NACLIP's Ω (1 + h*w, 1 + h*w): ``exp(-‖p_i - p_j‖² / (2σ²))`` between patch grid
    positions (row, col), zero on the class token's row and column."""
    h, w = grid
    rows, cols = np.divmod(np.arange(h * w), w)
    d2 = (rows[:, None] - rows[None]) ** 2 + (cols[:, None] - cols[None]) ** 2
    out = np.zeros((h * w + 1, h * w + 1), np.float32)
    out[1:, 1:] = np.exp(-d2 / (2.0 * sigma ** 2))
    return out


@dataclasses.dataclass(frozen=True)
class SelfSelf(AttentionBase):
    """``Σ_p softmax(p pᵀ s + Ω) v`` over ``projections`` (letters of "qkv").

    One projection is ClearCLIP (q), CLIP Surgery (v) or, with ``sigma``, NACLIP (k
    with the Gaussian neighbourhood Ω of :func:`neighbourhood_bias`, the same for every
    head, added after the scale); q and k is SCLIP (rows of the weights add to 2).

    Attributes:
      projections: which of q, k, v attend to themselves.
      sigma: NACLIP's neighbourhood width in patches (``None``: no neighbourhood term).
    """

    projections: tuple[str, ...]
    sigma: float | None = None

    kind = "self-self"
    maps = 1  # the sum over projections

    def __post_init__(self):
        if not self.projections or any(p not in gem_maths.PROJECTIONS for p in self.projections):
            raise ValueError(f"projections must be letters of qkv, got {self.projections!r}")
        object.__setattr__(self, "projections", tuple(self.projections))
        if self.sigma is not None:
            try:
                ok = math.isfinite(float(self.sigma)) and float(self.sigma) > 0
            except (TypeError, ValueError):
                ok = False
            if not ok:
                raise ValueError(f"sigma must be a finite number > 0, got {self.sigma!r}")
            object.__setattr__(self, "sigma", float(self.sigma))

    def __call__(self, q, k, v, ctx: Context):
        chosen = {"q": q, "k": k, "v": v}
        bias = None if self.sigma is None else jnp.asarray(neighbourhood_bias(tuple(ctx.grid), self.sigma))

        def mix(v, *ps):
            return sum(softmax_attention(p, p, v, ctx.scale, bias) for p in ps)

        return map_heads(mix, ctx.head_chunk, v, *(chosen[p] for p in self.projections))

    def flops(self, tokens: int, width: int) -> float:
        return len(self.projections) * 2 * 2 * tokens * tokens * width


@dataclasses.dataclass(frozen=True)
class GEMAttention(AttentionBase):
    """GEM's self-self attention ensemble (paper eqs. 5-7, :func:`gem_jax.engine.gem.self_self_attention`).

    Attributes:
      iterations: self-self attention repetitions before the final assignment to v (K).
      temperature: ``None`` for the adaptive temperature; a float is the paper's tau
        (the reference's ``ss_attn_temp`` is ``1 / tau``).
      projections: which of q, k, v feed the ensemble (paper Table 1).
      normalize: L2 normalisation and adaptive temperature (Table 1's "norm + temp");
        without it the attention uses the usual ``1 / sqrt(head_dim)`` scale unless a
        temperature is given.
    """

    iterations: int = 1
    temperature: float | None = None
    projections: tuple[str, ...] = gem_maths.PROJECTIONS
    normalize: bool = True

    kind = "gem"

    def __post_init__(self):
        it = self.iterations
        if not isinstance(it, int) or isinstance(it, bool) or it < 0:
            raise ValueError(f"iterations must be an int >= 0, got {it!r}")
        if it > gem_maths.MAX_ITERATIONS:
            raise ValueError(f"iterations must be at most {gem_maths.MAX_ITERATIONS}, got {it!r}")
        if self.temperature is not None:
            try:
                t = float(self.temperature)
            except (TypeError, ValueError):
                raise ValueError(f"temperature must be a number or None, got {self.temperature!r}") from None
            if not (math.isfinite(t) and t >= gem_maths.MIN_TEMPERATURE):
                raise ValueError(f"temperature must be a finite number >= {gem_maths.MIN_TEMPERATURE:g} (much "
                                 f"smaller ones underflow the attention weights to 0/0), got {self.temperature!r}")
        object.__setattr__(self, "projections", _check_projections(self.projections))
        object.__setattr__(self, "normalize", bool(self.normalize))

    @property
    def maps(self) -> int:  # one per projection of the ensemble
        return len(self.projections)

    def __call__(self, q, k, v, ctx: Context):
        if ctx.inv_temp is not None:
            inv_temp = ctx.inv_temp
        elif self.temperature is not None:
            inv_temp = jnp.float32(1.0 / float(self.temperature))
        elif self.normalize:
            inv_temp = gem_maths.adaptive_inverse_temperature(ctx.y, ctx.head_dim)
        else:
            inv_temp = jnp.float32(ctx.scale)
        inv_temp = jnp.broadcast_to(jnp.asarray(inv_temp, jnp.float32), (q.shape[0], 1, 1, 1))
        chosen = {"q": q, "k": k, "v": v}

        def ensemble(v, inv_temp, *ps):
            # One call per projection: XLA's CPU dot is much slower on a stacked 5-D batch.
            ss = [gem_maths.self_self_attention(p, v, inv_temp, self.iterations, self.normalize) for p in ps]
            return sum(ss) / len(ss)

        return map_heads(ensemble, ctx.head_chunk, v, inv_temp, *(chosen[p] for p in self.projections))

    def flops(self, tokens: int, width: int) -> float:
        return len(self.projections) * (self.iterations + 1) * 2 * 2 * tokens * tokens * width
