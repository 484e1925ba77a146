"""Transformer building blocks shared by both CLIP towers, named after the checkpoint keys."""

from __future__ import annotations

import functools
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

Dtype = Any

# As in PyTorch: eps 1e-5 and the two-pass variance (Flax defaults to 1e-6 and the
# fast E[x^2] - E[x]^2 form). Always computed in float32, whatever the compute dtype.
LayerNorm = functools.partial(nn.LayerNorm, epsilon=1e-5, use_fast_variance=False, dtype=jnp.float32)


def quick_gelu(x):
    """OpenAI's GELU approximation, ``x * sigmoid(1.702 x)``."""
    return x * jax.nn.sigmoid(1.702 * x)


def exact_gelu(x):
    # jax.nn.gelu defaults to the tanh approximation; checkpoints were trained with erf.
    return jax.nn.gelu(x, approximate=False)


ACTIVATION_FNS: dict[str, Callable] = {"quick_gelu": quick_gelu, "gelu": exact_gelu}


def l2_normalize(x, axis=-1, eps=1e-12):
    """``x / max(||x||, eps)`` in float32, as ``torch.nn.functional.normalize``."""
    x = x.astype(jnp.float32)
    norm = jnp.sqrt(jnp.sum(x * x, axis=axis, keepdims=True))
    return x / jnp.maximum(norm, eps)


def split_heads(x, heads):
    """(B, N, C) -> (B, heads, N, C // heads)."""
    b, n, c = x.shape
    return x.reshape(b, n, heads, c // heads).transpose(0, 2, 1, 3)


def merge_heads(x):
    """(B, heads, N, d) -> (B, N, heads * d)."""
    b, h, n, d = x.shape
    return x.transpose(0, 2, 1, 3).reshape(b, n, h * d)


def softmax_attention(q, k, v, scale, mask=None):
    """``softmax(q k^T * scale + mask) v`` over (..., N, d); logits and softmax in float32."""
    logits = jnp.einsum("...qd,...kd->...qk", q, k, preferred_element_type=jnp.float32) * scale
    if mask is not None:
        logits = logits + mask
    weights = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    return jnp.einsum("...qk,...kd->...qd", weights, v)


class MultiheadAttention(nn.Module):
    """PyTorch-style multi-head attention with a fused input projection.

    Attributes:
      width: token width.
      heads: number of heads.
      dtype: compute dtype of the projections.
      param_dtype: storage dtype of the parameters.
    """

    width: int
    heads: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    def setup(self):
        dense = functools.partial(nn.Dense, dtype=self.dtype, param_dtype=self.param_dtype)
        # Rows of the fused projection: q, then k, then v (torch's in_proj_weight order).
        self.in_proj = dense(3 * self.width)
        self.out_proj = dense(self.width)

    @property
    def head_dim(self) -> int:
        return self.width // self.heads

    def qkv(self, x):
        """Projects (B, N, C) tokens to q, k, v, each (B, heads, N, head_dim)."""
        q, k, v = jnp.split(self.in_proj(x), 3, axis=-1)
        return tuple(split_heads(t, self.heads) for t in (q, k, v))

    def attend(self, q, k, v, mask=None):
        """Scaled dot-product attention over split heads, returning merged (B, N, C)."""
        return merge_heads(softmax_attention(q, k, v, self.head_dim ** -0.5, mask))

    def out(self, o):
        """The output projection applied to merged heads."""
        return self.out_proj(o)

    def __call__(self, x, mask=None):
        return self.out(self.attend(*self.qkv(x), mask=mask))


class MLP(nn.Module):
    """``c_proj(act(c_fc(x)))``.

    Attributes:
      width: token width.
      hidden: hidden width.
      activation: key of :data:`ACTIVATION_FNS`.
    """

    width: int
    hidden: int
    activation: str = "quick_gelu"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    def setup(self):
        dense = functools.partial(nn.Dense, dtype=self.dtype, param_dtype=self.param_dtype)
        self.c_fc = dense(self.hidden)
        self.c_proj = dense(self.width)

    def __call__(self, x):
        return self.c_proj(ACTIVATION_FNS[self.activation](self.c_fc(x)))


class ResidualAttentionBlock(nn.Module):
    """Pre-LN transformer block: ``x + attn(ln_1(x))`` then ``x + mlp(ln_2(x))``."""

    width: int
    heads: int
    mlp_width: int
    activation: str = "quick_gelu"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    def setup(self):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        self.ln_1 = LayerNorm(param_dtype=self.param_dtype)
        self.attn = MultiheadAttention(self.width, self.heads, **kw)
        self.ln_2 = LayerNorm(param_dtype=self.param_dtype)
        self.mlp = MLP(self.width, self.mlp_width, self.activation, **kw)

    def residual_mlp(self, x):
        """``x + mlp(ln_2(x))``, the block's second half."""
        return x + self.mlp(self.ln_2(x)).astype(x.dtype)

    def __call__(self, x, mask=None):
        x = x + self.attn(self.ln_1(x).astype(self.dtype), mask).astype(x.dtype)
        return self.residual_mlp(x)


def _cubic(x, a):
    x = np.abs(x)
    return np.where(x < 1, ((a + 2) * x - (a + 3)) * x * x + 1,
                    np.where(x < 2, ((x - 5) * x + 8) * x * a - 4 * a, 0.0))


@functools.lru_cache(maxsize=256)
def resize_matrix(in_size: int, out_size: int, method: str, scale_factor: float | None = None) -> np.ndarray:
    """The (out_size, in_size) matrix of PyTorch's 1-D ``interpolate`` (align_corners=False).

    ``method`` is ``"bicubic_aa"`` (antialiased bicubic, Keys a = -0.5, support widened
    when downsampling; what open_clip and GEM use for positional embeddings),
    ``"bicubic"`` (a = -0.75, edge-clamped; transformers' ``interpolate_pos_encoding``)
    or ``"bilinear"`` (half-pixel centres, no antialias).

    ``scale_factor``, when given, places the samples as torch does for
    ``interpolate(scale_factor=..., recompute_scale_factor=False)``: source
    coordinate ``(i + 0.5) / scale_factor - 0.5`` instead of ``in_size / out_size``
    (not for ``"bicubic_aa"``).
    """
    scale = in_size / out_size
    if scale_factor is not None:
        if method == "bicubic_aa":
            raise ValueError("scale_factor is not supported with bicubic_aa")
        scale = 1.0 / scale_factor
    m = np.zeros((out_size, in_size), np.float64)
    rows = np.arange(out_size)
    if method == "bicubic_aa":
        support = 2.0 * scale if scale >= 1 else 2.0
        inv = 1.0 / scale if scale >= 1 else 1.0
        for i in rows:
            center = scale * (i + 0.5)
            lo = max(int(center - support + 0.5), 0)
            hi = min(int(center + support + 0.5), in_size)
            j = np.arange(lo, hi)
            w = _cubic((j - center + 0.5) * inv, -0.5)
            m[i, lo:hi] = w / w.sum()
    elif method == "bicubic":
        src = scale * (rows + 0.5) - 0.5
        base = np.floor(src).astype(int)
        t = src - base
        for off in range(-1, 3):
            w = _cubic(t - off, -0.75)
            np.add.at(m, (rows, np.clip(base + off, 0, in_size - 1)), w)
    elif method == "bilinear":
        src = np.maximum(scale * (rows + 0.5) - 0.5, 0.0)
        lo = np.minimum(np.floor(src).astype(int), in_size - 1)
        hi = np.minimum(lo + 1, in_size - 1)
        t = src - lo
        np.add.at(m, (rows, lo), 1 - t)
        np.add.at(m, (rows, hi), t)
    else:
        raise ValueError(f"unknown resize method {method!r}")
    return m.astype(np.float32)


def resize_2d(x, out_hw: tuple[int, int], method: str, axes=(-3, -2),
              scale_factors: tuple[float, float] | None = None):
    """Resizes the two spatial ``axes`` of ``x`` with :func:`resize_matrix` (two matmuls);
    ``scale_factors`` (per axis) as in :func:`resize_matrix`."""
    ah, aw = (a % x.ndim for a in axes)
    in_h, in_w = x.shape[ah], x.shape[aw]
    if (in_h, in_w) == tuple(out_hw):
        return x
    sy, sx = scale_factors or (None, None)
    my = jnp.asarray(resize_matrix(in_h, out_hw[0], method, sy))
    mx = jnp.asarray(resize_matrix(in_w, out_hw[1], method, sx))
    x = jnp.moveaxis(x, (ah, aw), (-2, -1))
    x = jnp.einsum("Hh,...hw,Ww->...HW", my, x.astype(jnp.float32), mx,
                   precision=jax.lax.Precision.HIGHEST)
    return jnp.moveaxis(x, (-2, -1), (ah, aw))


#: How positional embeddings can be resampled (see :func:`resample_posemb`).
POSEMB_METHODS = ("bicubic_aa", "bicubic", "bilinear", "bicubic_scale")


def resample_posemb(posemb, old_grid: tuple[int, int], new_grid: tuple[int, int],
                    method: str = "bicubic_aa"):
    """Resamples the grid part of a (1 + h*w, C) positional embedding to a new grid.

    ``method`` is one of :data:`POSEMB_METHODS`: a :func:`resize_matrix` method to
    size (h, w), or ``"bicubic_scale"``: bicubic with torch's scale factor
    ``((h + 0.1) / g_h, (w + 0.1) / g_w)`` used for the coordinates too
    (``recompute_scale_factor=False``), as SCLIP, ClearCLIP and NACLIP resample.
    The class position (row 0) is kept as is. A pure array function, applied at call
    time, so parameters never depend on the input resolution.
    """
    if method not in POSEMB_METHODS:
        raise ValueError(f"unknown positional embedding resampling {method!r}; one of {POSEMB_METHODS}")
    if tuple(old_grid) == tuple(new_grid):
        return posemb
    cls, grid = posemb[:1], posemb[1:]
    grid = grid.reshape(*old_grid, -1)
    if method == "bicubic_scale":
        factors = tuple((n + 0.1) / g for n, g in zip(new_grid, old_grid))
        grid = resize_2d(grid, new_grid, "bicubic", axes=(0, 1), scale_factors=factors)
    else:
        grid = resize_2d(grid, new_grid, method, axes=(0, 1))
    grid = grid.astype(posemb.dtype)
    return jnp.concatenate([cls, grid.reshape(-1, grid.shape[-1])], axis=0)
