"""The analyses: clustering dynamics, spectral norms, localisation metrics, calibration, figures."""

from __future__ import annotations

import copy
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from matplotlib.figure import Figure

from gem_jax import analysis as an
from gem_jax.engine import methods, tower
from gem_jax.analysis import calibration as cal
from gem_jax.analysis import clustering as cl
from gem_jax.analysis import localization as loc
from gem_jax.analysis import plots
from gem_jax.models import VisionTransformer, init_params
from tiny import TINY


@pytest.fixture(scope="module")
def model():
    return types.SimpleNamespace(config=TINY, params=init_params(TINY, seed=1))


@pytest.fixture(scope="module")
def vit():
    return VisionTransformer(TINY.vision, TINY.embed_dim)


def pixels(b=2, h=32, w=40, seed=0):
    return jnp.asarray(np.random.default_rng(seed).standard_normal((b, h, w, 3)), jnp.float32)


# ---------------------------------------------------------------- clustering


ITERS = [0, 1, 2, 5, 10, 20, 40]
TEMPS = [0.05, 0.1, 0.2, 0.5, 1.0]


@pytest.fixture(scope="module")
def random_sets():
    keys = jax.random.split(jax.random.PRNGKey(0), 6)
    return jnp.stack([an.random_token_set(k, tokens=64, width=256, dim=16) for k in keys])


@pytest.fixture(scope="module")
def grid(random_sets):
    return an.clustering_grid(random_sets, ITERS, TEMPS)


def test_cluster_counts_fall_with_iterations_and_temperature(grid):
    """Section 3.2: more iterations and a higher temperature give fewer, larger clusters."""
    counts = grid.counts  # (sets, K, T)
    assert counts.shape == (6, len(ITERS), len(TEMPS))
    assert np.all(counts[:, 0] == 64)  # random vectors start as singletons
    assert np.all(counts[:, -1, -1] == 1)  # many steps at a high temperature: one cluster
    mean = counts.mean(axis=0)
    assert np.all(np.diff(mean, axis=0) <= 0), mean  # along iterations
    assert np.all(np.diff(mean, axis=1) <= 0), mean  # along temperature
    assert np.all(np.diff(counts, axis=1) <= 0) and np.all(np.diff(counts, axis=2) <= 0)
    # and it really moves: a clear drop inside the grid, not only at its corner
    assert mean[ITERS.index(10), TEMPS.index(0.1)] < 60 and mean[ITERS.index(10), TEMPS.index(0.5)] == 1


def np_iterate(x, tau, k):
    """The dynamics written out in float64: p <- softmax(p^ p^T / tau) p^, k times."""
    p = np.asarray(x, np.float64)
    for _ in range(k):
        pn = p / np.linalg.norm(p, axis=-1, keepdims=True)
        a = pn @ pn.T / tau
        a = np.exp(a - a.max(axis=-1, keepdims=True))
        p = (a / a.sum(axis=-1, keepdims=True)) @ pn
    return p


@pytest.mark.parametrize("s,k,t", [(0, 2, 0.2), (1, 5, 0.2), (2, 10, 0.1), (3, 20, 0.1), (4, 40, 0.05),
                                   (5, 1, 1.0), (0, 0, 0.5)])
def test_grid_equals_per_point_loop(grid, random_sets, s, k, t):
    ki, ti = ITERS.index(k), TEMPS.index(t)
    want = np_iterate(random_sets[s], t, k)
    np.testing.assert_allclose(grid.tokens[s, ki, ti], want, atol=2e-4, rtol=2e-4)
    assert grid.counts[s, ki, ti] == an.count_clusters(want)
    np.testing.assert_array_equal(grid.labels[s, ki, ti], cl.cluster_labels_np(want))
    # the library's single-point function agrees too
    with jax.default_matmul_precision("highest"):
        single = an.iterate_self_self(random_sets[s], t, k)
    np.testing.assert_allclose(single, want, atol=2e-4, rtol=2e-4)
    pn = want / np.linalg.norm(want, axis=-1, keepdims=True)
    att = np.exp((pn @ pn.T - 1) / t)
    np.testing.assert_allclose(grid.attention[s, ki, ti], att / att.sum(-1, keepdims=True), atol=2e-4)


def test_grid_accepts_unsorted_iterations_and_a_single_set(random_sets):
    g = an.clustering_grid(random_sets[0], [10, 0, 2], [0.2], with_attention=False)
    full = an.clustering_grid(random_sets[0], [0, 2, 10], [0.2], with_attention=False)
    assert g.counts.shape == (3, 1) and g.attention is None
    np.testing.assert_array_equal(g.counts[[1, 2, 0]], full.counts)
    with pytest.raises(ValueError):
        an.clustering_grid(random_sets[0], [1], [0.0])
    with pytest.raises(ValueError):
        an.clustering_grid(random_sets[0], [-1], [0.1])


def chain(angles):
    return np.stack([np.cos(angles), np.sin(angles), np.zeros_like(angles)], axis=-1)


def test_cluster_criterion_is_connected_components():
    # cos(0.1) > 0.99 links neighbours; cos(0.2) < 0.99, yet the chain is one cluster.
    x = np.concatenate([chain(np.array([0.0, 0.1, 0.2])), chain(np.array([1.5, 1.55])), [[0, 0, 1.0]]])
    x = x * np.array([1, 3, 0.5, 2, 1, 7])[:, None]  # directions only
    assert an.count_clusters(x) == 3
    labels, count = jax.jit(cl.cluster_labels)(jnp.asarray(x, jnp.float32))
    assert int(count) == 3
    np.testing.assert_array_equal(labels, [0, 0, 0, 1, 1, 2])
    np.testing.assert_array_equal(cl.cluster_labels_np(x), [0, 0, 0, 1, 1, 2])


@pytest.mark.parametrize("seed", range(3))
def test_long_shuffled_chain_is_one_cluster(seed):
    """Transitivity over many hops, in a scrambled order (a single min pass is not enough)."""
    rng = np.random.default_rng(seed)
    x = np.concatenate([chain(0.1 * np.arange(15)), chain(3.0 + 0.1 * np.arange(4)), [[0, 0, 1.0]]])
    perm = rng.permutation(len(x))
    labels, count = cl.cluster_labels(jnp.asarray(x[perm], jnp.float32))
    assert int(count) == 3 == an.count_clusters(x[perm])
    labels = np.asarray(labels)[np.argsort(perm)]
    assert len(set(labels[:15])) == 1 and len(set(labels[15:19])) == 1 and len(set(labels)) == 3


@pytest.mark.parametrize("seed", range(5))
def test_jittable_labels_equal_union_find(seed):
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((rng.integers(2, 8), 6))
    x = centres[rng.integers(len(centres), size=40)] + 0.03 * rng.standard_normal((40, 6))
    x = x[rng.permutation(40)].astype(np.float32)
    labels, count = cl.cluster_labels(jnp.asarray(x))
    np.testing.assert_array_equal(labels, cl.cluster_labels_np(x))
    assert int(count) == an.count_clusters(x)


def test_tokens_at_layer_equal_manual_ln1_and_qkv(model, vit):
    px = pixels()
    _, inter = vit.apply({"params": model.params["visual"]}, px)
    for layer in (0, 2, -1):
        idx = layer % TINY.vision.layers
        x = np.asarray(inter[f"block_{idx:02d}"], np.float64)
        blk = model.params["visual"][f"resblocks_{idx}"]
        mu = x.mean(-1, keepdims=True)
        y = (x - mu) / np.sqrt(((x - mu) ** 2).mean(-1, keepdims=True) + 1e-5)
        y = y * np.asarray(blk["ln_1"]["scale"]) + np.asarray(blk["ln_1"]["bias"])
        qkv = y @ np.asarray(blk["attn"]["in_proj"]["kernel"]) + np.asarray(blk["attn"]["in_proj"]["bias"])
        for i, p in enumerate("qkv"):
            part = qkv[..., i * 64:(i + 1) * 64].reshape(2, -1, 2, 32).transpose(0, 2, 1, 3)
            got = an.tokens_at_layer(model, px, layer, p)
            assert got.shape == (2, 2, 1 + 4 * 5, 32)
            np.testing.assert_allclose(got, part, atol=2e-4, rtol=1e-4)
    with pytest.raises(ValueError):
        an.tokens_at_layer(model, px, 3)
    with pytest.raises(ValueError):  # raw images need a size
        an.tokens_at_layer(model, np.zeros((32, 32, 3), np.uint8), 0)
    with pytest.raises(ValueError):
        an.tokens_at_layer(model, px, 0, "x")


def test_tokens_at_layer_preprocesses_raw_images(model):
    from gem_jax import preprocess

    image = np.random.default_rng(0).integers(0, 256, (40, 50, 3), dtype=np.uint8)
    got = an.tokens_at_layer(model, image, 1, "k", size=(32, 40))
    want = an.tokens_at_layer(model, preprocess.normalize(preprocess.resize(image, (32, 40))), 1, "k")
    np.testing.assert_array_equal(got, want)


# ---------------------------------------------------------------- Lipschitz constants


def test_spectral_norm_equals_numpy_per_head(model):
    report = an.lipschitz_constants(model)
    c, h = TINY.vision.width, TINY.vision.heads
    d = c // h
    for layer in range(TINY.vision.layers):
        kernel = np.asarray(model.params["visual"][f"resblocks_{layer}"]["attn"]["in_proj"]["kernel"], np.float64)
        torch_weight = kernel.T  # torch's in_proj_weight: rows q, k, v
        for i, p in enumerate("qkv"):
            for head in range(h):
                w = torch_weight[i * c + head * d:i * c + (head + 1) * d]  # (d, C), as torch slices heads
                assert abs(report.norms[p][layer, head] - np.linalg.norm(w, 2)) < 1e-4
    for p in "qkv":
        assert report.norms[p].shape == (TINY.vision.layers, h)
        assert report.mean[p] == pytest.approx(report.norms[p].mean())
        assert report.std[p] == pytest.approx(report.norms[p].std())
    assert "paper" in report.summary() and "0.51" in report.summary()


@pytest.mark.parametrize("top", [(2.0, 1.999), (2.0, 2.0), (2.0, 0.1)])
@pytest.mark.parametrize("wide", [False, True])
def test_spectral_norm_with_close_top_singular_values(top, wide):
    """Where plain power iteration from a random start stalls (ratio 0.9995 per step)."""
    rng = np.random.default_rng(0)
    u, _ = np.linalg.qr(rng.standard_normal((48, 8)))
    v, _ = np.linalg.qr(rng.standard_normal((8, 8)))
    w = (u * np.array([*top, 0.09, 0.08, 0.05, 0.02, 0.01, 0.0])) @ v.T
    w = w.T if wide else w
    got = jax.jit(an.spectral_norm)(jnp.asarray(w, jnp.float32))
    assert abs(float(got) - 2.0) < 1e-5


# ---------------------------------------------------------------- localisation metrics


def two_group_tokens(n_obj, n_bg, cos, rng, dim=5):
    """Object patches along a, background along b, cos(a, b) = cos, random positive scales."""
    a = np.eye(dim)[0]
    b = cos * a + np.sqrt(1 - cos ** 2) * np.eye(dim)[1]
    scales = rng.uniform(0.5, 3.0, n_obj + n_bg)[:, None]
    x = np.concatenate([np.tile(a, (n_obj, 1)), np.tile(b, (n_bg, 1))]) * scales
    mask = np.arange(n_obj + n_bg) < n_obj
    perm = rng.permutation(len(x))
    return x[perm].astype(np.float32), mask[perm], a


@pytest.mark.parametrize("n_obj,n_bg,cos", [(3, 5, 0.2), (6, 2, -0.5), (2, 9, 0.9)])
def test_contrasts_on_two_groups(n_obj, n_bg, cos):
    rng = np.random.default_rng(n_obj)
    x, mask, a = two_group_tokens(n_obj, n_bg, cos, rng)
    n = n_obj + n_bg
    assert float(an.object_background_contrast(x, mask)) == pytest.approx(1 - cos, abs=1e-5)
    assert float(an.text_object_background_contrast(x, 4.0 * a, mask)) == pytest.approx(1 - cos, abs=1e-5)
    # pairs within a group have cosine 1, across groups cos; the mean over ordered i != j:
    pairs = n_obj * (n_obj - 1) + n_bg * (n_bg - 1) + 2 * n_obj * n_bg * cos
    assert float(an.patch_similarity(x)) == pytest.approx(pairs / (n * (n - 1)), abs=1e-5)


def test_metrics_on_a_hand_worked_case():
    """Object e1, e2; background (e1 + e2)/sqrt(2), e3; text along e1. Cosines: e1.e2 = 0,
    e_i.(e1 + e2)/sqrt(2) = 1/sqrt(2) (i = 1, 2), everything with e3 is 0."""
    r = 1 / np.sqrt(2)
    x = np.array([[1, 0, 0], [0, 2, 0], [r, r, 0], [0, 0, 3]], np.float32)
    mask = np.array([1, 1, 0, 0], bool)
    # within the object: only e1.e2 = 0 (the diagonal does not count); across: (r + 0 + r + 0) / 4
    assert float(an.object_background_contrast(x, mask)) == pytest.approx(0 - r / 2, abs=1e-6)
    # text.object: (1 + 0) / 2; text.background: (r + 0) / 2
    assert float(an.text_object_background_contrast(x, np.array([2.0, 0, 0]), mask)) == \
        pytest.approx(0.5 - r / 2, abs=1e-6)
    # six unordered pairs, two of cosine r
    assert float(an.patch_similarity(x)) == pytest.approx(2 * r / 6, abs=1e-6)


def test_metric_corner_cases():
    eye = np.eye(6, dtype=np.float32)
    assert float(an.patch_similarity(eye)) == pytest.approx(0.0, abs=1e-7)
    assert float(an.patch_similarity(np.ones((4, 3), np.float32))) == pytest.approx(1.0)
    # text orthogonal to everything: no contrast; empty background: NaN
    x, mask, _ = two_group_tokens(3, 3, 0.0, np.random.default_rng(0))
    assert float(an.text_object_background_contrast(x, np.eye(5)[2], mask)) == pytest.approx(0.0, abs=1e-7)
    assert np.isnan(float(an.object_background_contrast(x, np.ones(6, bool))))
    # batched: leading axes broadcast
    batch = np.stack([x, x[::-1]])
    out = an.object_background_contrast(batch, np.stack([mask, mask[::-1]]))
    np.testing.assert_allclose(out, [1.0, 1.0], atol=1e-5)


def test_mask_to_patches_row_major_and_threshold():
    mask = np.zeros((16, 24), bool)
    mask[0:8, 8:16] = True  # patch (0, 1)
    mask[8:12, 16:24] = True  # half of patch (1, 2)
    np.testing.assert_array_equal(loc.mask_to_patches(mask, 8), [0, 1, 0, 0, 0, 1])
    np.testing.assert_array_equal(loc.mask_to_patches(mask, 8, threshold=0.75), [0, 1, 0, 0, 0, 0])


def test_layer_tokens_last_layer_equals_vision_tokens(model, vit):
    px = pixels()
    params = model.params["visual"]
    paths = loc.default_paths(TINY.vision.layers, layers=2)
    toks = an.layer_tokens(vit, params, px, paths)
    assert {k: v.shape for k, v in toks.items()} == {k: (3, 2, 21, 32) for k in paths}
    for name, opts in paths.items():
        ref = tower.vision_tokens(vit, params, px, opts, want_clip=True)
        np.testing.assert_allclose(toks[name][-1], ref["clip" if opts is None else "gem"], atol=1e-5)
    # before the parallel paths start (block 1), they are CLIP's tokens
    np.testing.assert_array_equal(toks["gem"][0], toks["clip"][0])
    assert not np.allclose(toks["gem"][1], toks["clip"][1])
    # a given inverse temperature is the same as GEMOptions(temperature=tau)
    tau = 0.3
    got = an.layer_tokens(vit, params, px, {"gem": paths["gem"]}, inv_temps={"gem": 1 / tau}, every_layer=False)
    ref = tower.vision_tokens(vit, params, px, methods.GEMOptions(layers=2, temperature=tau))["gem"]
    np.testing.assert_allclose(got["gem"][0], ref, atol=1e-5)


def test_localization_metrics_shapes_and_consistency(model, vit):
    _, px, labels = an.toy_scenes(3, 32, 2, seed=1)
    masks = labels != 0
    text = np.random.default_rng(0).standard_normal(32).astype(np.float32)
    met = an.localization_metrics(model, px, masks, text=text)
    assert met.paths == ("clip", "surgery", "gem")
    assert met.patch_similarity.shape == met.object_background.shape == (3, 3, 3)
    assert met.start_layer == {"clip": None, "surgery": 0, "gem": 0}
    toks = an.layer_tokens(vit, model.params["visual"], jnp.asarray(px))
    pm = loc.mask_to_patches(masks, 8)
    for i, name in enumerate(met.paths):
        for layer in range(3):
            patches = toks[name][layer][:, 1:]
            np.testing.assert_allclose(met.object_background[i, layer],
                                       an.object_background_contrast(patches, pm), atol=1e-6)
            np.testing.assert_allclose(met.text_object_background[i, layer],
                                       an.text_object_background_contrast(patches, text[None], pm), atol=1e-6)
    assert np.isnan(an.localization_metrics(model, px, masks).text_object_background).all()


# ---------------------------------------------------------------- calibration


def test_hard_segmentation_rule_and_soft_relaxation():
    rng = np.random.default_rng(0)
    logits = (0.05 * rng.standard_normal((2, 3, 5, 6))).astype(np.float32)
    z = 100 * logits.astype(np.float64)
    probs = np.exp(z - z.max(1, keepdims=True))
    probs /= probs.sum(1, keepdims=True)
    want = np.where(probs.max(1) < 0.7, 0, probs.argmax(1) + 1)
    np.testing.assert_array_equal(cal.hard_segmentation(jnp.asarray(logits), 0.7), want)
    soft = cal.soft_segmentation(jnp.asarray(logits), 0.7, sharpness=1e-4)
    np.testing.assert_allclose(soft.sum(1), 1.0, atol=1e-5)
    np.testing.assert_array_equal(np.argmax(soft, axis=1), want)


def test_soft_iou_on_one_hot_scores_is_mean_iou():
    labels = np.array([[[0, 0, 1, 1], [0, 2, 2, 1]]])
    pred = np.array([[[0, 1, 1, 1], [0, 2, 0, 1]]])
    # class 0: I 2, U 4; class 1: I 3, U 4; class 2: I 1, U 2
    assert cal.mean_iou(pred, labels, 3) == pytest.approx((0.5 + 0.75 + 0.5) / 3)
    scores = jax.nn.one_hot(pred, 3, axis=1)
    assert float(cal.soft_iou(scores, jnp.asarray(labels))) == pytest.approx((0.5 + 0.75 + 0.5) / 3)


def test_calibration_lowers_loss_and_freezes_params(model):
    _, px, labels = an.toy_scenes(8, 32, 2, seed=3)
    text = an.class_prototypes(model, px[:4], labels[:4], 2)
    before = copy.deepcopy(jax.device_get(model.params))
    res = an.calibrate(model, px[:4], labels[:4], text, px[4:], labels[4:], layers=2, steps=25,
                       learning_rate=0.1)
    after = jax.device_get(model.params)
    assert jax.tree_util.tree_structure(before) == jax.tree_util.tree_structure(after)
    for a, b in zip(jax.tree_util.tree_leaves(before), jax.tree_util.tree_leaves(after)):
        np.testing.assert_array_equal(a, b)
    assert res.loss_after < res.loss_before - 1e-3, res
    assert res.history.shape == (25,) and res.history[0] == pytest.approx(res.loss_before)
    assert res.temperature > 0 and 0 < res.background_threshold < 1
    assert (res.temperature, res.background_threshold) != (res.initial_temperature, res.initial_threshold)
    for m in (res.miou_before, res.miou_after, res.miou_default):
        assert 0 <= m <= 1
    # the starting temperature is the mean adaptive one
    assert res.initial_temperature == pytest.approx(float(np.mean(an.adaptive_temperatures(model, px[:4], 2))))


def test_temperature_gradient_flows_through_the_gem_path(model, vit):
    _, px, labels = an.toy_scenes(2, 32, 2, seed=4)
    text = jnp.asarray(an.class_prototypes(model, px, labels, 2))
    opts = methods.GEMOptions(layers=2)

    def f(inv):
        return jnp.sum(cal.gem_logits(vit, model.params["visual"], jnp.asarray(px), text, opts, inv) ** 2)

    g = jax.jit(jax.grad(f))(2.0)
    eps = 1e-2
    f = jax.jit(f)
    fd = (f(2.0 + eps) - f(2.0 - eps)) / (2 * eps)
    assert np.isfinite(g) and abs(g) > 0
    assert float(g) == pytest.approx(float(fd), rel=2e-2, abs=1e-4)


# ---------------------------------------------------------------- figures


def test_figures_are_figures_without_pyplot_state(grid, model):
    import matplotlib.pyplot as plt

    open_before = plt.get_fignums()
    _, px, labels = an.toy_scenes(2, 32, 2, seed=5)
    met = an.localization_metrics(model, px, labels != 0)
    res = cal.CalibrationResult(0.2, 0.5, 0.7, 0.85, 0.7, 0.6, 0.3, 0.35, 0.3, np.linspace(0.7, 0.6, 5))
    figs = [
        plots.cluster_count_figure(grid, title="random vectors"),
        plots.attention_figure(grid, (0,), iterations=[0, 10], temperatures=[0.1, 0.5]),
        plots.pca_figure(grid, (1,), iterations=[0, 40], temperatures=[0.1]),
        plots.lipschitz_figure(an.lipschitz_constants(model)),
        plots.localization_figure(met),
        plots.calibration_figure(res),
    ]
    assert all(isinstance(f, Figure) for f in figs)
    assert len(figs[1].axes) == 4 + 1  # 2 x 2 panels and a colour bar
    assert len(figs[4].axes) == 2  # no text given: the text metric is left out
    assert plt.get_fignums() == open_before
    with pytest.raises(ValueError):
        plots.attention_figure(grid, ())  # the grid has a token-set axis
