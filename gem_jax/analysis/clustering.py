"""Clustering dynamics of iterated, normalised self-self attention (paper section 3.2, Figures 4 and 10)."""

from __future__ import annotations

import dataclasses
import functools
from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from gem_jax.engine import gem as gem_maths
from gem_jax.analysis.localization import as_pixels, visual_tower
from gem_jax.models import VisionTransformer
from gem_jax.models.layers import l2_normalize

#: Two tokens belong to one cluster when their directions agree to this cosine
#: (and clusters are the connected components of that relation).
COS_THRESHOLD = 0.99

__all__ = [
    "COS_THRESHOLD",
    "ClusteringGrid",
    "clustering_grid",
    "cluster_labels",
    "cluster_labels_np",
    "count_clusters",
    "iterate_self_self",
    "random_token_set",
    "self_self_weights",
    "tokens_at_layer",
]


def count_clusters(x, cos_threshold: float = COS_THRESHOLD) -> int:
    """Number of clusters of the token set ``x`` (N, d), in NumPy.

    Clusters are the connected components of the graph linking tokens whose
    L2-normalised directions have cosine ``> cos_threshold`` (union-find).
    """
    return int(cluster_labels_np(x, cos_threshold).max(initial=-1) + 1)


def cluster_labels_np(x, cos_threshold: float = COS_THRESHOLD) -> np.ndarray:
    """Cluster label of each token of ``x`` (N, d) by union-find, in NumPy.

    Labels are 0..C-1, numbered in the order of each cluster's first token (the same
    numbering as :func:`cluster_labels`).
    """
    x = np.asarray(x, np.float64)
    x = x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)
    parent = np.arange(len(x))

    def find(i):
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for i, j in zip(*np.nonzero(x @ x.T > cos_threshold)):
        ri, rj = find(i), find(j)
        parent[max(ri, rj)] = min(ri, rj)  # the root is the smallest member
    roots = np.array([find(i) for i in range(len(x))], np.int64)
    _, dense = np.unique(roots, return_inverse=True)
    return dense.reshape(-1).astype(np.int32)


def cluster_labels(x, cos_threshold: float = COS_THRESHOLD):
    """Jittable clustering of the token set ``x`` (N, d): ``(labels (N,), count)``.

    Same criterion as :func:`count_clusters` (components of ``cosine > cos_threshold``),
    found by min-label propagation with pointer jumping in a ``lax.while_loop``;
    labels are 0..count-1 in the order of each cluster's first token.
    """
    xn = l2_normalize(x)
    n = xn.shape[0]
    idx = jnp.arange(n)
    linked = (jnp.einsum("nd,md->nm", xn, xn, precision=jax.lax.Precision.HIGHEST) > cos_threshold)
    linked = linked | jnp.eye(n, dtype=bool)

    def step(state):
        labels, _ = state
        new = jnp.min(jnp.where(linked, labels[None, :], n), axis=1)
        new = new[new]  # pointer jumping: a member's label is in the same component
        return new, jnp.any(new != labels)

    roots, _ = jax.lax.while_loop(lambda s: s[1], step, (idx, jnp.array(True)))
    is_root = roots == idx
    dense = jnp.cumsum(is_root) - 1
    return dense[roots].astype(jnp.int32), jnp.sum(is_root).astype(jnp.int32)


def self_self_weights(p, inv_temp):
    """The self-self attention matrix ``softmax(p^ p^T / tau)`` of L2-normalised ``p`` (..., N, d)."""
    pn = l2_normalize(p)
    logits = jnp.einsum("...nd,...md->...nm", pn, pn, precision=jax.lax.Precision.HIGHEST)
    return jax.nn.softmax(logits * inv_temp, axis=-1)


def _step(p, inv_temp):
    # One step of the dynamics: p <- softmax(p^ p^T / tau) p^, with p^ = l2norm(p). It is
    # GEM's self-self attention with the normalised tokens as their own values.
    return gem_maths.self_self_attention(p, l2_normalize(p), inv_temp, iterations=0)


def iterate_self_self(x, temperature: float, iterations: int):
    """``iterations`` steps of normalised self-self attention on the token set ``x`` (..., N, d).

    Each step replaces every normalised token by the softmax-weighted (temperature
    ``temperature``) mean of all normalised tokens: GEM's iteration (eq. 6) on its own.
    """
    x = jnp.asarray(x, jnp.float32)
    return jax.lax.fori_loop(0, iterations, lambda _, p: _step(p, 1.0 / temperature), x)


def random_token_set(key, tokens: int = 64, width: int = 256, dim: int = 16):
    """A set of random tokens seen through a random projection: (tokens, dim).

    Tokens are standard normal in ``width`` dimensions and the projection is a Gaussian
    (width, dim) matrix scaled by ``1 / sqrt(width)``, a stand-in for a head's W_q/k/v.
    """
    kx, kw = jax.random.split(key)
    x = jax.random.normal(kx, (tokens, width))
    w = jax.random.normal(kw, (width, dim)) * width ** -0.5
    return x @ w


@dataclasses.dataclass(frozen=True)
class ClusteringGrid:
    """The dynamics over a grid of iteration counts K and temperatures tau.

    Leading ``...`` axes are those of the token sets given to :func:`clustering_grid`.

    Attributes:
      iterations: (K,) iteration counts.
      temperatures: (T,) temperatures tau (the softmax divides by tau).
      counts: (..., K, T) number of clusters after k iterations at temperature tau.
      labels: (..., K, T, N) cluster label of each token (0..count-1).
      tokens: (..., K, T, N, d) token set after k iterations (not normalised).
      attention: (..., K, T, N, N) the attention GEM would assign values with after
        k iterations, ``softmax(p^ p^T / tau)``; ``None`` unless asked for.
      cos_threshold: the cluster criterion (cosine between normalised tokens).
    """

    iterations: np.ndarray
    temperatures: np.ndarray
    counts: np.ndarray
    labels: np.ndarray
    tokens: np.ndarray
    attention: np.ndarray | None
    cos_threshold: float


@functools.partial(jax.jit, static_argnames=("k_max", "with_attention"))
def _grid(x, temperatures, iterations, cos_threshold, k_max: int, with_attention: bool):
    """x (S, N, d) -> states (S, K, T, N, d), labels, counts, attention: one program."""

    def trajectory(p0, tau):  # (N, d), () -> (K, N, d)
        def body(p, _):
            p = _step(p, 1.0 / tau)
            return p, p

        _, traj = jax.lax.scan(body, p0, None, length=k_max)
        traj = jnp.concatenate([p0[None], traj], axis=0)  # states after 0..k_max steps
        return traj[iterations]

    over_temps = jax.vmap(trajectory, in_axes=(None, 0), out_axes=1)  # (K, T, N, d)
    states = jax.vmap(over_temps, in_axes=(0, None))(x, temperatures)  # (S, K, T, N, d)

    def each_point(fn):
        return jax.vmap(jax.vmap(jax.vmap(fn)))

    labels, counts = each_point(lambda p: cluster_labels(p, cos_threshold))(states)
    attention = None
    if with_attention:
        inv = (1.0 / temperatures)[None, None, :, None, None]
        attention = self_self_weights(states, inv)
    return states, labels, counts, attention


def clustering_grid(x, iterations: Sequence[int], temperatures: Sequence[float], *,
                    cos_threshold: float = COS_THRESHOLD, with_attention: bool = True) -> ClusteringGrid:
    """Runs the clustering dynamics on token sets over a (K, tau) grid in one jitted call.

    The whole grid is one XLA program: ``jax.vmap`` over the token sets and the
    temperatures, one ``lax.scan`` up to the largest K that keeps the states at every
    requested K, and the cluster count vmapped over every grid point; the results
    reach the host in one transfer.

    Args:
      x: token sets (..., N, d), e.g. :func:`random_token_set` or :func:`tokens_at_layer`.
      iterations: iteration counts K (0 is the input itself).
      temperatures: temperatures tau > 0.
      cos_threshold: tokens whose normalised directions agree to a cosine above this
        are linked; clusters are the connected components.
      with_attention: also return the (N, N) attention matrix of every grid point.
    Returns:
      a :class:`ClusteringGrid`.
    """
    x = jnp.asarray(x, jnp.float32)
    if x.ndim < 2:
        raise ValueError(f"token sets must have shape (..., N, d), got {x.shape}")
    iters = np.asarray(iterations, np.int32).reshape(-1)
    temps = np.asarray(temperatures, np.float32).reshape(-1)
    if iters.size == 0 or temps.size == 0:
        raise ValueError("need at least one iteration count and one temperature")
    if np.any(iters < 0):
        raise ValueError(f"iteration counts must be >= 0, got {iters.tolist()}")
    if not np.all(temps > 0):
        raise ValueError(f"temperatures must be > 0, got {temps.tolist()}")
    lead, (n, d) = x.shape[:-2], x.shape[-2:]
    out = _grid(x.reshape(-1, n, d), jnp.asarray(temps), jnp.asarray(iters), float(cos_threshold),
                int(iters.max()), bool(with_attention))
    states, labels, counts, attention = jax.device_get(out)
    k, t = iters.size, temps.size
    return ClusteringGrid(
        iterations=iters,
        temperatures=temps,
        counts=counts.reshape(*lead, k, t),
        labels=labels.reshape(*lead, k, t, n),
        tokens=states.reshape(*lead, k, t, n, d),
        attention=None if attention is None else attention.reshape(*lead, k, t, n, n),
        cos_threshold=float(cos_threshold),
    )


def _block_index(layer: int, n_blocks: int) -> int:
    if not -n_blocks <= layer < n_blocks:
        raise ValueError(f"layer {layer} is out of range for {n_blocks} blocks")
    return layer % n_blocks


@functools.partial(jax.jit, static_argnames=("vit", "layer"))
def _qkv_at(vit: VisionTransformer, params, pixels, layer: int):
    def run(module, pixels):
        x = module.embed(pixels)
        for blk in module.resblocks[:layer]:
            x = blk(x)
        blk = module.resblocks[layer]
        y = blk.ln_1(x).astype(module.dtype)
        return blk.attn.qkv(y)

    return nn.apply(run, vit)({"params": params}, pixels)


def tokens_at_layer(model, image, layer: int, projection: str = "v", *, size=None):
    """The q, k or v tokens of one block of a loaded model, as GEM's path reads them.

    ``ln_1`` of the block's input, then the block's fused input projection, split
    into heads: the token sets self-self attention iterates on in that block.

    Args:
      model: a loaded model (anything with ``.config`` and ``.params``, e.g.
        :class:`gem_jax.pipeline.Model`).
      image: see :func:`gem_jax.analysis.localization.as_pixels` (an image, a list of
        images, or normalised pixels (B, H, W, 3) as a JAX/float array with
        ``size=None``).
      layer: block index (negative counts from the last block).
      projection: ``"q"``, ``"k"`` or ``"v"``.
      size: model input size for raw images (int or (H, W)).
    Returns:
      (B, heads, 1 + h*w, head_dim) float32, class token first.
    """
    if projection not in gem_maths.PROJECTIONS:
        raise ValueError(f"projection must be one of {gem_maths.PROJECTIONS}, got {projection!r}")
    vit, params = visual_tower(model)
    pixels = as_pixels(image, model.config.vision.patch_size, size=size)
    layer = _block_index(layer, model.config.vision.layers)
    q, k, v = _qkv_at(vit, params, pixels, layer)
    return {"q": q, "k": k, "v": v}[projection]
