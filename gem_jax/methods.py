"""GEM and its training-free siblings as one table: what each does to the last blocks.

Every method here changes only the last ``blocks`` blocks of CLIP's image tower, in
the same way: a second path starts from the tokens entering the first modified
block; in each modified block it adds (or, without ``residual``, becomes) the output
projection of ``attention(q, k, v)``, where q, k, v are the block's own projections
of ``ln_1`` of the *original* path's tokens, then optionally runs the block's MLP.
The original blocks keep running beside it. With one modified block this is exactly
"replace the last block". The tower loop that runs a :class:`Method` is
:func:`gem_jax.gem.run_paths`; the pipeline, the analysis tools, the benchmark and
the evaluation all go through it.

``TABLE`` (official defaults; ``s = head_dim ** -0.5``; residual / MLP on the path;
pos-embed resampling at other sizes):

- ``clip``: no block changed; bicubic_aa.
- ``gem``: last 6; GEM's normalised q-q, k-k, v-v ensemble (paper eqs. 5-7); yes / no;
  bicubic_aa.
- ``maskclip``: last 1; ``v``, each token its own value; yes / yes; bicubic.
- ``clipsurgery``: last 6; ``softmax(v vᵀ s) v``, then the original path's class token;
  yes / no; bilinear.
- ``sclip``: last 1; ``(softmax(q qᵀ s) + softmax(k kᵀ s)) v``; yes / yes; bicubic_scale.
- ``clearclip``: last 1; ``softmax(q qᵀ s) v``; no / no; bicubic_scale.
- ``naclip``: last 1; ``softmax(k kᵀ s + Ω) v``, Ω Gaussian over grid distances
  (σ = 5); no / no; bicubic_scale.

The resampling names are :data:`gem_jax.models.layers.POSEMB_METHODS`: how each
official code resamples the positional embedding at a size other than the
checkpoint's grid.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Literal, Protocol

import jax
import jax.numpy as jnp
import numpy as np

from gem_jax import gem as gem_lib
from gem_jax.gem import GEMOptions
from gem_jax.models.layers import POSEMB_METHODS, l2_normalize, softmax_attention

__all__ = ["Attention", "Context", "GEMAttention", "METHODS", "Method", "ONE_BLOCK", "SelfSelf", "TABLE", "ValueOnly",
           "as_method", "feature_surgery", "get_method", "masked_feature_surgery", "neighbourhood_bias"]

METHODS = gem_lib.METHODS


@dataclasses.dataclass(frozen=True)
class Context:
    """What an attention sees besides q, k, v.

    Attributes:
      y: (B, N, C) the block's ``ln_1`` input (GEM's adaptive temperature reads it).
      grid: (h, w) patch grid.
      head_dim: width of a head.
      head_chunk: most (image, head) pairs per step (:func:`gem_jax.gem.map_heads`).
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


@dataclasses.dataclass(frozen=True)
class ValueOnly:
    """MaskCLIP: no mixing, every token keeps its own value."""

    def __call__(self, q, k, v, ctx: Context):
        return v


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
class SelfSelf:
    """``Σ_p softmax(p pᵀ s + Ω) v`` over ``projections`` (letters of "qkv").

    One projection is ClearCLIP (q), CLIP Surgery (v) or, with ``sigma``, NACLIP (k
    with the Gaussian neighbourhood Ω of :func:`neighbourhood_bias`, the same for every
    head, added after the scale); q and k is SCLIP (rows of the weights add to 2).
    """

    projections: tuple[str, ...]
    sigma: float | None = None

    def __post_init__(self):
        if not self.projections or any(p not in gem_lib.PROJECTIONS for p in self.projections):
            raise ValueError(f"projections must be letters of qkv, got {self.projections!r}")
        if self.sigma is not None and not float(self.sigma) > 0:
            raise ValueError(f"sigma must be > 0, got {self.sigma!r}")

    def __call__(self, q, k, v, ctx: Context):
        chosen = {"q": q, "k": k, "v": v}
        bias = None if self.sigma is None else jnp.asarray(neighbourhood_bias(tuple(ctx.grid), float(self.sigma)))

        def mix(v, *ps):
            return sum(softmax_attention(p, p, v, ctx.scale, bias) for p in ps)

        return gem_lib.map_heads(mix, ctx.head_chunk, v, *(chosen[p] for p in self.projections))


@dataclasses.dataclass(frozen=True)
class GEMAttention:
    """GEM's self-self attention ensemble (:class:`gem_jax.gem.GEMOptions`)."""

    options: GEMOptions

    def __call__(self, q, k, v, ctx: Context):
        opts = self.options
        if ctx.inv_temp is not None:
            inv_temp = ctx.inv_temp
        elif opts.temperature is not None:
            inv_temp = jnp.float32(1.0 / float(opts.temperature))
        elif opts.normalize:
            inv_temp = gem_lib.adaptive_inverse_temperature(ctx.y, ctx.head_dim)
        else:
            inv_temp = jnp.float32(ctx.scale)
        inv_temp = jnp.broadcast_to(jnp.asarray(inv_temp, jnp.float32), (q.shape[0], 1, 1, 1))
        chosen = {"q": q, "k": k, "v": v}

        def ensemble(v, inv_temp, *ps):
            # One call per projection: XLA's CPU dot is much slower on a stacked 5-D batch.
            ss = [gem_lib.self_self_attention(p, v, inv_temp, opts.iterations, opts.normalize) for p in ps]
            return sum(ss) / len(ss)

        return gem_lib.map_heads(ensemble, ctx.head_chunk, v, inv_temp, *(chosen[p] for p in opts.projections))


@dataclasses.dataclass(frozen=True)
class Method:
    """What a method does to the last ``blocks`` blocks of the image tower (see the module doc).

    Attributes:
      name: the method's name.
      attention: the per-head mixing of values (``None`` with ``blocks == 0``).
      blocks: how many last blocks carry the second path (0: the plain tower).
      residual: add the attention output to the path's tokens (else it replaces them).
      mlp: then apply the block's MLP (with its residual) on the path.
      class_token: ``"original"`` puts the original path's class token on the path's
        output (CLIP Surgery); ``"own"`` keeps the path's.
      posemb: how the positional embedding is resampled at other sizes
        (:data:`gem_jax.models.layers.POSEMB_METHODS`).
    """

    name: str
    attention: Attention | None
    blocks: int = 1
    residual: bool = True
    mlp: bool = True
    class_token: Literal["own", "original"] = "own"
    posemb: str = "bicubic_aa"

    def __post_init__(self):
        if not isinstance(self.blocks, int) or isinstance(self.blocks, bool) or self.blocks < 0:
            raise ValueError(f"{self.name}: blocks must be an int >= 0, got {self.blocks!r}")
        if (self.blocks == 0) != (self.attention is None):
            raise ValueError(f"{self.name}: an attention is needed exactly when blocks > 0")
        if self.class_token not in ("own", "original"):
            raise ValueError(f"{self.name}: class_token must be 'own' or 'original', got {self.class_token!r}")
        if self.posemb not in POSEMB_METHODS:
            raise ValueError(f"{self.name}: posemb must be one of {POSEMB_METHODS}, got {self.posemb!r}")

    def options(self) -> dict:
        """The settings that change results, as plain JSON values (for result files)."""
        att = self.attention
        out: dict[str, Any] = {"layers": self.blocks, "residual": self.residual, "mlp": self.mlp,
                               "class_token": self.class_token, "posemb": self.posemb}
        if isinstance(att, GEMAttention):
            opts = dataclasses.asdict(att.options)
            opts["projections"] = list(opts["projections"])
            out.update(opts)
        elif isinstance(att, SelfSelf):
            out.update(projections=list(att.projections), sigma=att.sigma)
        return out


#: Every method with its official defaults (the single list of names is ``METHODS``).
TABLE: dict[str, Method] = {
    "gem": Method("gem", GEMAttention(GEMOptions()), blocks=6, residual=True, mlp=False),
    "clip": Method("clip", None, blocks=0),
    "maskclip": Method("maskclip", ValueOnly(), blocks=1, residual=True, mlp=True, posemb="bicubic"),
    "clipsurgery": Method("clipsurgery", SelfSelf(("v",)), blocks=6, residual=True, mlp=False,
                          class_token="original", posemb="bilinear"),
    "sclip": Method("sclip", SelfSelf(("q", "k")), blocks=1, residual=True, mlp=True, posemb="bicubic_scale"),
    "clearclip": Method("clearclip", SelfSelf(("q",)), blocks=1, residual=False, mlp=False,
                        posemb="bicubic_scale"),
    "naclip": Method("naclip", SelfSelf(("k",), sigma=5.0), blocks=1, residual=False, mlp=False,
                     posemb="bicubic_scale"),
}
assert tuple(TABLE) == METHODS, "gem_jax.gem.METHODS and the table must list the same methods"

#: Methods whose official code modifies exactly one block.
ONE_BLOCK = tuple(name for name, m in TABLE.items() if m.blocks == 1)


def get_method(name: str, *, layers: int | None = None, residual: bool | None = None, mlp: bool | None = None,
               sigma: float | None = None, iterations: int = 1, temperature: float | None = None,
               projections=gem_lib.PROJECTIONS, normalize: bool = True) -> Method:
    """The :class:`Method` called ``name`` with its official defaults, changed where asked.

    Args:
      name: one of :data:`METHODS`.
      layers: last blocks with the second path (``gem``, ``clipsurgery``; default 6).
      residual: keep the residual (one-block methods; the official switches of
        ClearCLIP ``ignore_residual`` and NACLIP ``arch`` flip residual and MLP together).
      mlp: apply the block's MLP on the path (``gem``: Table 6's variant, and the
        one-block methods).
      sigma: NACLIP's Gaussian neighbourhood width in patches (default 5).
      iterations, temperature, projections, normalize: GEM's, see
        :class:`gem_jax.gem.GEMOptions`.
    Raises:
      ValueError: an unknown name, or an option the method does not have (``clip``
        changes no block and ignores them all).
    """
    if name not in TABLE:
        raise ValueError(f"method must be one of {METHODS}, got {name!r}")
    base = TABLE[name]
    if name == "clip":  # changes no block: the block options have nothing to change
        return base
    if sigma is not None and name != "naclip":
        raise ValueError(f"sigma is an option of naclip only, not of {name}")
    if layers is not None and name in ONE_BLOCK:
        if layers != 1:
            raise ValueError(f"method {name} modifies only the last block; layers must be 1, got {layers}")
    if residual is not None and name not in ONE_BLOCK and not residual:
        raise ValueError(f"method {name} keeps the residual of its path; residual can be switched off only for "
                         f"{', '.join(ONE_BLOCK)}")
    if mlp is not None and name == "clipsurgery" and mlp:
        raise ValueError("method clipsurgery has no MLP on its new path")
    changes: dict[str, Any] = {}
    if layers is not None:
        changes["blocks"] = layers
    if residual is not None:
        changes["residual"] = bool(residual)
    if mlp is not None:
        changes["mlp"] = bool(mlp)
    if name == "gem":
        opts = GEMOptions(layers=changes.get("blocks", base.blocks), iterations=iterations, temperature=temperature,
                          projections=tuple(projections), normalize=normalize, mlp=changes.get("mlp", base.mlp))
        changes["attention"] = GEMAttention(opts)
    if sigma is not None:
        changes["attention"] = SelfSelf(base.attention.projections, sigma=float(sigma))
    if "blocks" in changes and (not isinstance(changes["blocks"], int) or changes["blocks"] < 1):
        raise ValueError(f"layers must be a positive int, got {layers!r}")
    return dataclasses.replace(base, **changes)


def as_method(spec: "Method | GEMOptions | None") -> Method:
    """A :class:`Method` from a method, GEM options (the GEM method with them) or ``None`` (plain CLIP)."""
    if spec is None:
        return TABLE["clip"]
    if isinstance(spec, GEMOptions):
        return Method("gem", GEMAttention(spec), blocks=spec.layers, residual=True, mlp=spec.mlp)
    if isinstance(spec, Method):
        return spec
    raise TypeError(f"expected a Method, GEMOptions or None, got {type(spec).__name__}")


def feature_surgery(image, text, redundant=None):
    """CLIP Surgery's feature surgery: similarities with the features shared by all
    prompts removed.

    Args:
      image: (B, N, D) L2-normalised image tokens, class token first.
      text: (T, D) L2-normalised text embeddings.
      redundant: optional (D,) or (1, D) embedding to subtract from every text
        embedding instead (CLIP Surgery's choice with a single prompt: the empty
        prompt's embedding).
    Returns:
      (B, N, T): without ``redundant``, ``w_t (f_i · g_t) - mean_t'(w_t' f_i · g_t')``
      with ``w = p / mean(p)``, ``p = softmax_t(2 f_cls · g_t)``; with it,
      ``f_i · (g_t - redundant)``.
    """
    image = jnp.asarray(image, jnp.float32)
    text = jnp.asarray(text, jnp.float32)
    hi = jax.lax.Precision.HIGHEST
    if redundant is not None:
        return jnp.einsum("bnd,td->bnt", image, text - jnp.reshape(redundant, (1, -1)), precision=hi)
    prob = jax.nn.softmax(2.0 * jnp.einsum("bd,td->bt", image[:, 0], text, precision=hi), axis=-1)
    w = prob / jnp.mean(prob, axis=-1, keepdims=True)
    sims = jnp.einsum("bnd,td->bnt", image, text, precision=hi) * w[:, None, :]
    return sims - jnp.mean(sims, axis=-1, keepdims=True)



def masked_feature_surgery(tokens, text, valid, redundant):
    """:func:`feature_surgery` of one image's patches against its valid prompts.

    Args:
      tokens: (1 + N, D) image tokens, class token first (normalised here).
      text: (P, D) text embeddings (normalised here); rows where ``valid`` is False
        are padding and take no part.
      valid: (P,) bool.
      redundant: (D,) the embedding subtracted when only one prompt is valid.
    Returns:
      (P, N) similarities of the patch tokens (padding rows are meaningless).
    """
    f, g = l2_normalize(tokens), l2_normalize(text)
    n = jnp.maximum(jnp.sum(valid), 1)
    hi = jax.lax.Precision.HIGHEST
    prob = jax.nn.softmax(jnp.where(valid, 2.0 * jnp.einsum("pd,d->p", g, f[0], precision=hi), -jnp.inf))
    sims = jnp.einsum("nd,pd->np", f, g, precision=hi) * (prob * n)  # w = p / mean over the valid prompts
    several = sims - jnp.sum(jnp.where(valid, sims, 0.0), axis=-1, keepdims=True) / n
    single = jnp.einsum("nd,pd->np", f, g - jnp.reshape(redundant, (1, -1)), precision=hi)
    return jnp.where(n > 1, several, single)[1:].T
