"""The method table: one list of names, options and their errors, the shared tower loop
used by the pipeline, the analysis and the benchmark (parity with the official codes is
in test_methods_parity.py)."""

from __future__ import annotations

import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest

from gem_jax import analysis as an
from gem_jax import bench, config
from gem_jax.engine import tower
from gem_jax.engine import attention as A
from gem_jax.engine import methods as M
from gem_jax.engine import tower as T
from gem_jax.analysis import localization as loc
from gem_jax.cli import build_parser
from gem_jax.models import VisionTransformer, init_params
from gem_jax.loading import Model
from gem_jax.pipeline import GEM
from gem_jax.tokenizer import Tokenizer
from tiny import TINY


@pytest.fixture(scope="module")
def model():
    return Model(TINY, init_params(TINY, seed=1), Tokenizer.default(TINY.text.context_length), "tiny")


TABLE = {name: M.get_method(name) for name in M.builtin_names()}


def test_one_list_of_methods_everywhere():
    assert M.builtin_names() == ("gem", "clip", "maskclip", "clipsurgery", "sclip", "clearclip", "naclip")
    assert M.method_names()[:7] == M.builtin_names()
    parser = build_parser()
    subs = next(a for a in parser._actions if a.dest == "command").choices
    for command in ("segment", "batch", "export", "eval"):
        action = next(a for a in subs[command]._actions if a.dest == "method")
        assert all(name in action.help for name in M.builtin_names()), command


def test_official_defaults_in_the_table():
    t = TABLE
    assert (t["gem"].blocks, t["clipsurgery"].blocks) == (6, 6)
    assert all(t[m].blocks == 1 for m in ("maskclip", "sclip", "clearclip", "naclip")) and t["clip"].blocks == 0
    assert [(t[m].residual, t[m].mlp) for m in ("maskclip", "sclip", "clearclip", "naclip")] == \
        [(True, True), (True, True), (False, False), (False, False)]
    assert t["naclip"].attention == A.SelfSelf(("k",), sigma=5.0)
    assert t["sclip"].attention == A.SelfSelf(("q", "k"))
    assert t["clipsurgery"].class_token == "original" and t["clipsurgery"].posemb == "bilinear"
    assert {t[m].posemb for m in ("sclip", "clearclip", "naclip")} == {"bicubic_scale"}
    assert t["maskclip"].posemb == "bicubic" and t["gem"].posemb == "bicubic_aa"


@pytest.mark.parametrize("name,kwargs,match", [
    ("sclip", dict(sigma=3.0), r"method sclip has no option sigma \(its options are residual, mlp\)"),
    ("sclip", dict(temperature=0.5), "method sclip has no option temperature"),
    ("gem", dict(sigma=3.0), "method gem has no option sigma"),
    ("naclip", dict(layers=2), "method naclip has no option layers"),
    ("gem", dict(residual=False), "method gem has no option residual"),
    ("clipsurgery", dict(mlp=True), "method clipsurgery has no option mlp"),
    ("clip", dict(iterations=5), r"method clip has no option iterations \(it has no options\)"),
    ("naclip", dict(sigma=0.0), "sigma must be a finite number > 0"),
    ("gem", dict(layers=0), "layers must be a positive int"),
    ("segformer", {}, "unknown method 'segformer'"),
])
def test_bad_options_are_refused(name, kwargs, match):
    with pytest.raises(ValueError, match=match):
        M.get_method(name, **kwargs)


def test_options_change_the_method():
    assert M.get_method("naclip", sigma=2).attention.sigma == 2.0
    assert M.get_method("clipsurgery", layers=3).blocks == 3
    m = M.get_method("clearclip", residual=True, mlp=True)
    assert (m.residual, m.mlp) == (True, True)
    assert M.get_method("gem", layers=2, iterations=3) == M.GEMOptions(layers=2, iterations=3).method()
    assert M.get_method("naclip").describe()["attention"] == {"kind": "self-self", "projections": ["k"], "sigma": 5.0}
    assert M.get_method("gem", iterations=None) is TABLE["gem"]  # None: not given


def test_neighbourhood_bias_by_hand():
    om = A.neighbourhood_bias((2, 3), 1.5)
    assert om.shape == (7, 7) and not om[0].any() and not om[:, 0].any()
    # patches 0 (row 0, col 0) and 5 (row 1, col 2): squared distance 1 + 4
    assert om[1, 6] == pytest.approx(np.exp(-5 / (2 * 1.5 ** 2)))
    np.testing.assert_allclose(np.diag(om)[1:], 1.0)
    np.testing.assert_allclose(om, om.T)


def test_one_block_path_replaces_the_last_block(model):
    """ClearCLIP by hand on the tiny tower at its own grid (no resampling): the last block's
    output is P(softmax(q qᵀ s) v)."""
    vit = VisionTransformer(TINY.vision, TINY.embed_dim)
    px = jnp.asarray(np.random.default_rng(0).standard_normal((2, 32, 32, 3)), jnp.float32)
    got = tower.vision_tokens(vit, model.params["visual"], px, TABLE["clearclip"])

    def by_hand(module, px):
        x = module.embed(px)
        for blk in module.resblocks[:-1]:
            x = blk(x)
        blk = module.resblocks[-1]
        q, k, v = blk.attn.qkv(blk.ln_1(x))
        w = jnp.exp(jnp.einsum("bhnd,bhmd->bhnm", q, q) * blk.attn.head_dim ** -0.5)
        mixed = jnp.einsum("bhnm,bhmd->bhnd", w / w.sum(-1, keepdims=True), v)
        b, h, n, d = mixed.shape
        return module.head(blk.attn.out(mixed.transpose(0, 2, 1, 3).reshape(b, n, h * d)))

    import flax.linen as nn

    ref = nn.apply(by_hand, vit)({"params": model.params["visual"]}, px)
    np.testing.assert_allclose(got["gem"], ref, atol=2e-5)
    np.testing.assert_allclose(got["clip"], vit.apply({"params": model.params["visual"]}, px)[0], atol=2e-5)


def test_analysis_takes_every_method_at_any_size(model):
    """Per-layer tokens of all methods (grouped by pos-embed resampling) end on the
    pipeline's own tokens; before a path starts it is CLIP's of the same resampling."""
    vit = VisionTransformer(TINY.vision, TINY.embed_dim)
    params = model.params["visual"]
    px = jnp.asarray(np.random.default_rng(1).standard_normal((2, 40, 48, 3)), jnp.float32)  # not the 4x4 grid
    paths = loc.method_paths(TINY.vision.layers)
    assert set(paths) == set(M.builtin_names()) and paths["gem"].blocks == 3
    toks = an.layer_tokens(vit, params, px, paths)
    for name, spec in paths.items():
        assert toks[name].shape == (3, 2, 31, 32)
        ref = tower.vision_tokens(vit, params, px, None if name == "clip" else spec)
        np.testing.assert_allclose(toks[name][-1], ref["clip" if name == "clip" else "gem"], atol=2e-5,
                                   err_msg=name)
    np.testing.assert_array_equal(toks["sclip"][1], toks["naclip"][1])  # same resampling, one pass
    assert not np.allclose(toks["sclip"][0], toks["maskclip"][0])  # different resampling
    met = an.localization_metrics(model, px, np.ones((2, 40, 48), bool) * (np.arange(48) < 20), paths=paths)
    assert met.paths == tuple(paths) and met.start_layer["naclip"] == 2 and met.start_layer["clip"] is None


def test_pipeline_runs_every_method_and_they_differ(model):
    image = np.random.default_rng(2).integers(0, 256, (40, 48, 3), dtype=np.uint8)
    maps = {m: GEM(model, method=m, size=(40, 48), layers=2 if TABLE[m].blocks > 1 else None)
            .heatmaps(image, ["cat", "dog"]).logits for m in M.builtin_names()}
    for m, lg in maps.items():
        assert lg.shape == (1, 2, 40, 48) and np.isfinite(lg).all(), m
    names = list(maps)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            assert not np.allclose(maps[a], maps[b], atol=1e-5), (a, b)


def test_flops_of_one_block_methods():
    cfg = config.architecture("ViT-B-16")
    plain = bench.count_flops(cfg, (448, 448), TABLE["clip"], 1)
    clear = bench.count_flops(cfg, (448, 448), TABLE["clearclip"], 1)
    sclip = bench.count_flops(cfg, (448, 448), TABLE["sclip"], 1)
    mask = bench.count_flops(cfg, (448, 448), TABLE["maskclip"], 1)
    n, c = 785, 768
    attn, mlp = 4 * n * n * c, 4 * n * c * 4 * c
    assert plain["self_self_attention"] == 0 and plain["gem_blocks_original"] == 0
    assert clear["total"] == pytest.approx(plain["total"] - mlp / 1e9)  # the same attention, no MLP
    assert sclip["total"] == pytest.approx(plain["total"] + attn / 1e9)  # two attentions
    assert mask["total"] == pytest.approx(plain["total"] - attn / 1e9)  # no attention


def test_bench_times_several_methods(monkeypatch):
    from gem_jax.config import ARCHITECTURES

    monkeypatch.setitem(ARCHITECTURES, "Tiny-3", TINY)
    monkeypatch.setattr("gem_jax.bench.model.matmul_peak", lambda *a, **k: 1.0)  # not what is tested here
    result = bench.run("Tiny-3", (32, 48), batches=(1,), prompts=(2,), rounds=1, progress=False,
                       methods=("clip", "naclip"))
    assert list(result["methods"]) == ["clip", "naclip"] and result["methods"]["naclip"]["layers"] == 1
    (case,) = result["cases"]
    assert [e["method"] for e in case["results"]] == ["clip", "naclip"]
    assert [e["max_abs_diff_vs_first"] for e in case["results"]] == [0.0, 0.0]
    assert case["results"][1]["gflop_per_image"] < case["results"][0]["gflop_per_image"]
    with pytest.raises(ValueError, match="gem-torch"):
        bench.run("Tiny-3", (32, 48), reference=True, methods=("sclip",), progress=False)


def test_cli_refuses_a_mismatched_option_before_loading_a_model():
    proc = subprocess.run([sys.executable, "-m", "gem_jax.cli", "segment", "--example", "-p", "cat",
                           "--method", "sclip", "--sigma", "3", "--model", "no/such-model"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr
    assert "method sclip has no option --sigma (its options are --residual/--no-residual, --mlp/--no-mlp)" \
        in proc.stderr and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


def test_feature_surgery_single_prompt_and_shapes():
    rng = np.random.default_rng(0)
    img = rng.standard_normal((1, 5, 8)).astype(np.float32)
    txt = rng.standard_normal((3, 8)).astype(np.float32)
    out = np.asarray(T.feature_surgery(img, txt))
    assert out.shape == (1, 5, 3)
    np.testing.assert_allclose(out.sum(-1), 0.0, atol=1e-5)  # the redundant part is the mean over prompts
    red = np.asarray(T.feature_surgery(img, txt[:1], txt[2]))
    np.testing.assert_allclose(red[0, :, 0], img[0] @ (txt[0] - txt[2]), rtol=1e-5)
