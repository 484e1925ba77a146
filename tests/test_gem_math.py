"""The self-self attention maths against a direct NumPy reading of the paper's equations."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gem_jax.engine import gem as gem_maths, methods, tower


def np_l2(x):
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def np_softmax(a):
    a = a - a.max(axis=-1, keepdims=True)
    e = np.exp(a)
    return e / e.sum(axis=-1, keepdims=True)


def np_self_self(p, v, tau, iterations):
    """Eqs. 5-7, token by token: each normalised token is replaced by the softmax
    (temperature tau) weighted mean of the normalised tokens; K times; then the
    attention of the normalised result is applied to the values."""
    p = p.astype(np.float64)
    for _ in range(iterations):
        pn = np_l2(p)
        new = np.empty_like(pn)
        for i in range(len(pn)):
            w = np_softmax(np.array([pn[i] @ pn[j] / tau for j in range(len(pn))]))
            new[i] = sum(w[j] * pn[j] for j in range(len(pn)))
        p = new
    pn = np_l2(p)
    return np_softmax(pn @ pn.T / tau) @ v


@settings(max_examples=20, deadline=None)
@given(n=st.integers(2, 12), d=st.integers(1, 8), k=st.integers(0, 3), tau=st.floats(0.05, 2.0),
       seed=st.integers(0, 2 ** 16))
def test_self_self_attention_equals_equations(n, d, k, tau, seed):
    rng = np.random.default_rng(seed)
    p, v = rng.standard_normal((2, n, d))
    want = np_self_self(p, v, tau, k)
    with jax.default_matmul_precision("highest"):
        got = gem_maths.self_self_attention(jnp.asarray(p, jnp.float32), jnp.asarray(v, jnp.float32), 1.0 / tau, k)
    np.testing.assert_allclose(np.asarray(got), want, atol=2e-4, rtol=2e-4)


def test_adaptive_temperature():
    y = np.random.default_rng(0).standard_normal((3, 7, 16)).astype(np.float32)
    got = np.asarray(gem_maths.adaptive_inverse_temperature(jnp.asarray(y), head_dim=4))
    want = np.linalg.norm(y, axis=-1).mean(axis=-1) / 2.0
    assert got.shape == (3, 1, 1, 1)
    np.testing.assert_allclose(got[:, 0, 0, 0], want, rtol=1e-6)


def count_clusters(x, cos_threshold=0.99):
    """Groups of tokens whose directions agree (cosine > threshold), by union-find."""
    x = np_l2(np.asarray(x, np.float64))
    sim = x @ x.T > cos_threshold
    parent = list(range(len(x)))

    def find(i):
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for i, j in zip(*np.nonzero(sim)):
        parent[find(i)] = find(j)
    return len({find(i) for i in range(len(x))})


def iterate(x, tau, k):
    """K steps of normalised self-self attention on token set x (the clustering dynamics)."""
    def step(_, p):
        pn = p / jnp.linalg.norm(p, axis=-1, keepdims=True)
        return jax.nn.softmax(pn @ pn.T / tau, axis=-1) @ pn
    return np.asarray(jax.lax.fori_loop(0, k, step, jnp.asarray(x)))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_clustering_fewer_larger_groups_with_tau_and_iterations(seed):
    """Paper section 3.2: higher temperature and more iterations give fewer, larger clusters."""
    x = np.random.default_rng(seed).standard_normal((64, 8)).astype(np.float32)
    with jax.default_matmul_precision("highest"):
        by_tau = [count_clusters(iterate(x, tau, 10)) for tau in (0.05, 0.1, 0.2, 0.5)]
        by_iter = [count_clusters(iterate(x, 0.1, k)) for k in (0, 2, 10, 40)]
    assert by_tau == sorted(by_tau, reverse=True) and by_tau[0] > by_tau[-1], by_tau
    assert by_iter == sorted(by_iter, reverse=True) and by_iter[0] > by_iter[-1], by_iter
    assert by_iter[0] == 64  # random vectors start as singletons
    assert by_tau[-1] <= 4  # a high temperature merges nearly everything


def test_options_validation():
    for bad in [dict(layers=0), dict(iterations=-1), dict(temperature=0.0), dict(projections=()),
                dict(projections=("q", "x")), dict(projections=("q", "q"))]:
        with pytest.raises(ValueError):
            methods.GEMOptions(**bad)
    assert methods.GEMOptions(projections=("v", "q")).projections == ("q", "v")


def test_min_max_constant_map_is_zero_not_nan():
    maps = jnp.stack([jnp.ones((4, 4)), jnp.arange(16.0).reshape(4, 4)])
    out = np.asarray(tower.min_max(maps))
    assert np.all(out[0] == 0) and out[1].min() == 0 and out[1].max() == 1
