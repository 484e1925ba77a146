"""Lipschitz constants (spectral norms) of each head's q, k, v projections (paper section 3.2)."""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
    "PAPER_LIPSCHITZ",
    "LipschitzReport",
    "head_projections",
    "lipschitz_constants",
    "spectral_norm",
]

#: The paper's figures (section 3.2), CLIP ViT-B/16 with real OpenAI weights:
#: mean and standard deviation over heads and layers, ``{projection: (mean, std)}``.
PAPER_LIPSCHITZ: dict[str, tuple[float, float]] = {"q": (0.66, 0.104), "k": (0.63, 0.091), "v": (0.51, 0.073)}

_HIGHEST = jax.lax.Precision.HIGHEST


def spectral_norm(w, *, squarings: int = 30, refine: int = 10, seed: int = 0):
    """Largest singular value of the matrix ``w`` (m, n) by power iteration on ``w^T w``.

    Plain power iteration converges like ``(sigma_2 / sigma_1)^(2t)``, slowly when the
    top two singular values are close, so the powers are taken by repeated squaring:
    ``squarings`` trace-normalised squarings of the Gram matrix G give
    ``G^(2^squarings)``, applied to a random start vector; ``refine`` ordinary power
    steps follow, and the norm is ``||w v||`` for the final unit vector v. Fixed work,
    no data-dependent loop: jittable and vmappable.
    """
    w = jnp.asarray(w, jnp.float32)
    gram = jnp.matmul(w.T, w, precision=_HIGHEST)  # (n, n), positive semi-definite

    def square(_, g):
        g = jnp.matmul(g, g, precision=_HIGHEST)
        return g / jnp.maximum(jnp.trace(g), 1e-30)  # eigenvalues stay in [0, 1]

    power = jax.lax.fori_loop(0, squarings, square, gram / jnp.maximum(jnp.trace(gram), 1e-30))
    v = jax.random.normal(jax.random.PRNGKey(seed), (w.shape[-1],), jnp.float32)

    def step(_, v):
        u = jnp.matmul(gram, v, precision=_HIGHEST)
        return u / jnp.maximum(jnp.linalg.norm(u), 1e-30)

    v = step(0, jnp.matmul(power, v, precision=_HIGHEST))
    v = jax.lax.fori_loop(0, refine, step, v)
    return jnp.linalg.norm(jnp.matmul(w, v, precision=_HIGHEST))


@functools.partial(jax.jit, static_argnames=("squarings", "refine"))
def _all_norms(w, squarings: int, refine: int):
    """(P, L, H, C, d) -> (P, L, H): vmapped over projections, layers and heads."""
    fn = functools.partial(spectral_norm, squarings=squarings, refine=refine)
    for _ in range(3):
        fn = jax.vmap(fn)
    return fn(w)


def head_projections(params_visual, heads: int) -> dict[str, np.ndarray]:
    """Each head's slice of each block's fused input projection.

    The Flax kernel ``attn.in_proj.kernel`` is (C, 3C) with columns q, k, v (torch's
    ``in_proj_weight`` transposed). Head h of projection p is the (C, d) block of
    columns ``p*C + h*d : p*C + (h + 1)*d``, d = C / heads: the linear map from
    ``ln_1`` of a block's input to that head's q, k or v (bias excluded; it does not
    change a Lipschitz constant). Its spectral norm equals that of torch's (d, C)
    row block.

    Returns:
      ``{"q" | "k" | "v": (L, heads, C, d)}``.
    """
    blocks = sorted((k for k in params_visual if k.startswith("resblocks_")), key=lambda k: int(k.split("_")[1]))
    if not blocks:
        raise ValueError("no resblocks_N in the visual parameters")
    kernels = np.stack([np.asarray(params_visual[b]["attn"]["in_proj"]["kernel"], np.float32) for b in blocks])
    n_layers, c, c3 = kernels.shape
    if c3 != 3 * c or c % heads:
        raise ValueError(f"in_proj kernel {kernels.shape[1:]} does not fit width {c} and {heads} heads")
    d = c // heads
    split = kernels.reshape(n_layers, c, 3, heads, d).transpose(2, 0, 3, 1, 4)  # (3, L, H, C, d)
    return {p: split[i] for i, p in enumerate("qkv")}


@dataclasses.dataclass(frozen=True)
class LipschitzReport:
    """Spectral norms of each head's projections.

    Attributes:
      norms: ``{"q" | "k" | "v": (L, heads)}`` spectral norms.
      mean: ``{projection: mean over layers and heads}``.
      std: ``{projection: standard deviation over layers and heads}`` (population, ddof 0).
      per_layer_mean: ``{projection: (L,)}`` mean over heads.
      per_layer_std: ``{projection: (L,)}`` standard deviation over heads.
    """

    norms: dict[str, np.ndarray]
    mean: dict[str, float]
    std: dict[str, float]
    per_layer_mean: dict[str, np.ndarray]
    per_layer_std: dict[str, np.ndarray]

    def summary(self) -> str:
        """One line per projection, ours beside the paper's (which are for real ViT-B/16 weights)."""
        lines = []
        for p in "qkv":
            pm, ps = PAPER_LIPSCHITZ[p]
            lines.append(f"C_{p} = {self.mean[p]:.3f} +- {self.std[p]:.3f}   "
                         f"(paper, CLIP ViT-B/16 real weights: {pm:.2f} +- {ps:.3f})")
        return "\n".join(lines)


def lipschitz_constants(model, *, squarings: int = 30, refine: int = 10) -> LipschitzReport:
    """Spectral norm of W_q, W_k, W_v of every head of every block of a model's image tower.

    One jitted call, the power iteration vmapped over projections, layers and heads.
    See :func:`head_projections` for exactly which matrices.

    Args:
      model: a loaded model (``.config``, ``.params``).
      squarings, refine: power-iteration work (see :func:`spectral_norm`).
    """
    mats = head_projections(model.params["visual"], model.config.vision.heads)
    stacked = jnp.asarray(np.stack([mats[p] for p in "qkv"]))
    norms = np.asarray(jax.device_get(_all_norms(stacked, squarings, refine)), np.float64)
    by = {p: norms[i] for i, p in enumerate("qkv")}
    return LipschitzReport(
        norms=by,
        mean={p: float(v.mean()) for p, v in by.items()},
        std={p: float(v.std()) for p, v in by.items()},
        per_layer_mean={p: v.mean(axis=1) for p, v in by.items()},
        per_layer_std={p: v.std(axis=1) for p, v in by.items()},
    )
