"""GEM's self-self attention (paper eqs. 5-7): normalised q-q, k-k, v-v with an adaptive temperature."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from gem_jax.models.layers import l2_normalize

PROJECTIONS = ("q", "k", "v")
#: Smallest accepted temperature tau, with a margin: much smaller ones (1e-30) underflow
#: every softmax weight of a row (a token's cosine with itself is 1 only up to rounding): 0/0.
MIN_TEMPERATURE = 1e-3
#: Most accepted self-self iterations: a bound on the run time of one call (the paper uses 1).
MAX_ITERATIONS = 100


def adaptive_inverse_temperature(y, head_dim: int):
    """GEM's adaptive 1/tau: mean token L2 norm of the block input ``y`` (B, N, C),
    over ``sqrt(head_dim)``; shape (B, 1, 1, 1) to broadcast over heads and tokens."""
    norms = jnp.sqrt(jnp.sum(jnp.square(y.astype(jnp.float32)), axis=-1))
    return (jnp.mean(norms, axis=-1) * head_dim ** -0.5)[:, None, None, None]


def _numerators(x, inv_temp, normalize: bool):
    """``(e, x')`` with ``softmax(x' x'^T / tau) = e / rowsum(e)``; ``x'`` is ``x``
    L2-normalised (``normalize``) or as float32."""
    if normalize:
        x = l2_normalize(x)
        # Cosines are at most 1 (the diagonal), so exp((cos - 1) / tau) is the
        # softmax numerator already shifted by its row maximum: no max pass needed.
        return jnp.exp((jnp.einsum("...nd,...md->...nm", x, x) - 1.0) * inv_temp), x
    x = x.astype(jnp.float32)
    logits = jnp.einsum("...nd,...md->...nm", x, x) * inv_temp
    return jnp.exp(logits - jnp.max(logits, axis=-1, keepdims=True)), x


def _weighted(e, values):
    """``(e / rowsum(e)) @ values``, normalising the (N, d) product instead of the (N, N) weights."""
    out = jnp.einsum("...nm,...md->...nd", e.astype(values.dtype), values)
    return out / jnp.sum(e, axis=-1, keepdims=True).astype(out.dtype)


def iterate(p, inv_temp, iterations: int, normalize: bool = True):
    """K steps of ``p <- softmax(p p^T / tau) p`` (eq. 6), in float32."""
    def step(_, x):
        e, x = _numerators(x, inv_temp, normalize)
        return _weighted(e, x)

    p = p.astype(jnp.float32)
    if iterations <= 4:  # unrolled: lets XLA fuse across steps
        for i in range(iterations):
            p = step(i, p)
        return p
    return jax.lax.fori_loop(0, iterations, step, p)


def self_self_attention(p, v, inv_temp, iterations: int = 1, normalize: bool = True):
    """Paper eqs. 5-7: iterate ``p <- softmax(p p^T / tau) p`` (on L2-normalised p),
    then assign the values: ``softmax(p p^T / tau) v``.

    Args:
      p: projections (..., N, d), the tokens that attend to themselves.
      v: values (..., N, d).
      inv_temp: 1/tau, broadcastable to (..., N, N).
      iterations: K, repetitions before the assignment.
      normalize: L2-normalise p before each product.
    Returns:
      (..., N, d) in v's dtype.
    """
    e, _ = _numerators(iterate(p, inv_temp, iterations, normalize), inv_temp, normalize)
    return _weighted(e, v).astype(v.dtype)
