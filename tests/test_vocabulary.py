"""Any vocabulary size: the text tower on the texts' own length, the on-disk text cache, the
image tower once per image whatever the prompt count, feature surgery over chunks, and maps
at the image's own size at ordinary cost."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import gem_jax
from gem_jax import pipeline, postprocess, text, textcache
from gem_jax.loading import Model
from gem_jax.models import TextTransformer, init_params
from gem_jax.models.layers import l2_normalize, resize_matrix
from gem_jax.tokenizer import Tokenizer
from tiny import TINY, save_tiny


@pytest.fixture(scope="module")
def model():
    return Model(TINY, init_params(TINY, seed=8), Tokenizer.default(TINY.text.context_length), "tiny")


TEXTS = ["a photo of a cat.", "a bad photo of the dining table.", "itap of a vehicle registration plate.",
         " ".join(["a very long prompt"] * 30), "x"]


def full_context(model, texts):
    tower = TextTransformer(model.config.text, model.config.embed_dim)
    ids = model.tokenizer(texts)
    with jax.default_matmul_precision("highest"):
        return np.asarray(l2_normalize(tower.apply({"params": model.params["text"]}, ids)))


def test_texts_run_on_their_own_length_and_equal_the_full_context(model):
    ids = model.tokenizer(TEXTS[:3])
    assert text.sequence_length(ids) == 16 < ids.shape[1] == 77  # the chunk's longest, rounded up
    assert text.sequence_length(model.tokenizer(TEXTS[3:4])) == 77  # a cut text needs every position
    with jax.default_matmul_precision("highest"):
        ours = text.TextEncoder(model, jnp.float32).encode(TEXTS)
    np.testing.assert_allclose(ours, full_context(model, TEXTS), atol=1e-6)


@pytest.mark.parametrize("width,layers,heads", [(512, 12, 8), (768, 2, 12)])  # ViT-B's and ViT-L's text widths
def test_text_on_its_own_length_equals_open_clip(width, layers, heads):
    """open_clip's ``encode_text`` on all 77 positions, perturbed random weights, against
    gem-jax on each chunk's own length (the tolerance of the parity tests)."""
    torch = pytest.importorskip("torch")
    from conftest import perturb_
    from gem_jax.checkpoints.layouts import params_from_openclip
    from gem_jax.config import CLIPConfig, TextConfig, VisionConfig
    from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg

    torch.manual_seed(0)
    ref = perturb_(CLIP(64, CLIPVisionCfg(image_size=32, patch_size=16, width=64, layers=1, head_width=32),
                        CLIPTextCfg(width=width, heads=heads, layers=layers), quick_gelu=True))
    config = CLIPConfig(vision=VisionConfig(image_size=32, patch_size=16, width=64, layers=1, heads=2),
                        text=TextConfig(width=width, layers=layers, heads=heads), embed_dim=64)
    sd = {k: v.detach().float().numpy() for k, v in ref.state_dict().items()}
    model = Model(config, jax.tree_util.tree_map(jnp.asarray, params_from_openclip(sd, config)), Tokenizer.default())
    texts = [t.format(c) for c in ("cat", "dining table", "remote control") for t in text.imagenet_templates()[:12]]
    with torch.no_grad():
        want = torch.nn.functional.normalize(ref.encode_text(torch.from_numpy(model.tokenizer(texts)).long()),
                                             dim=-1).numpy()
    with jax.default_matmul_precision("highest"):
        got = text.TextEncoder(model, jnp.float32).encode(texts)
    assert np.abs(got - want).max() <= 1e-4


def test_the_image_tower_runs_once_per_image_for_any_prompt_count(model, monkeypatch):
    image = np.random.default_rng(0).integers(0, 256, (32, 40, 3), dtype=np.uint8)
    prompts = [f"thing {i}" for i in range(300)]
    g = gem_jax.GEM(model, layers=2, size=(32, 40), text_cache=False)
    towers, chunks = [], []
    real_tokens, real_grid = g.tokens, g.grid_logits
    monkeypatch.setattr(g, "tokens", lambda px: (towers.append(px.shape[0]), real_tokens(px))[1])
    monkeypatch.setattr(g, "grid_logits", lambda *a: (chunks.append(a[1].shape[1]), real_grid(*a))[1])
    out = g.heatmaps([image, image[::-1]], prompts, grid=True)
    assert towers == [2] and chunks == [128, 128, 128]  # one tower pass, three chunks of prompts
    one = gem_jax.GEM(model, layers=2, size=(32, 40), text_cache=False).heatmaps(image, prompts[250:], grid=True)
    np.testing.assert_allclose(out.logits[0, 250:], one.logits[0], atol=1e-6)


def test_feature_surgery_over_chunks_equals_all_prompts_at_once(model, monkeypatch):
    image = np.random.default_rng(1).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    prompts = [f"object {i}" for i in range(21)]
    whole = gem_jax.GEM(model, layers=2, size=32, feature_surgery=True, text_cache=False).heatmaps(image, prompts)
    monkeypatch.setattr(pipeline, "PROMPT_CHUNK", 8)
    g = gem_jax.GEM(model, layers=2, size=32, feature_surgery=True, text_cache=False)
    chunked = g.heatmaps(image, prompts)
    np.testing.assert_allclose(chunked.logits, whole.logits, atol=1e-5)
    # and both are CLIP Surgery's feature surgery of the whole set (the reference function)
    from gem_jax.engine import tower

    pixels = gem_jax.preprocess.normalize(gem_jax.preprocess.resize(image, (32, 32)))[None]
    tok = g.tokens(pixels)
    flat = np.concatenate([np.asarray(tok["cls"])[:, None], np.asarray(tok["patches"]).reshape(1, 16, -1)], 1)
    ref = tower.masked_feature_surgery(flat[0], g.embed_text(prompts), np.ones(21, bool), g.embed_text([""])[0])
    up = postprocess.resize_maps(np.asarray(ref).reshape(21, 4, 4), (32, 32))
    np.testing.assert_allclose(chunked.logits[0], up, atol=1e-5)


CACHE_RUN = textwrap.dedent("""
    import sys
    import gem_jax
    from gem_jax import text
    calls = []
    real = text.TextEncoder.encode
    text.TextEncoder.encode = lambda self, texts: (calls.append(len(texts)), real(self, texts))[1]
    gem = gem_jax.GEM(gem_jax.load(sys.argv[1]), layers=1, template="imagenet", text_cache=sys.argv[2] == "on")
    emb = gem.embed_text(["cat", "dog", "a red car"])
    print(sum(calls), float(emb.sum()))
""")


def test_a_second_process_is_served_from_the_text_cache(tmp_path):
    model_dir = tmp_path / "m"
    save_tiny(model_dir, seed=8)
    env = dict(os.environ, GEM_JAX_CACHE=str(tmp_path / "cache"), JAX_PLATFORMS="cpu")
    run = lambda cache: subprocess.run([sys.executable, "-c", CACHE_RUN, str(model_dir), cache], env=env,  # noqa
                                       capture_output=True, text=True, timeout=300)
    first, second, off = run("on"), run("on"), run("off")
    for proc in (first, second, off):
        assert proc.returncode == 0, proc.stderr
    texts_first, sum_first = first.stdout.split()
    texts_second, sum_second = second.stdout.split()
    assert int(texts_first) == 3 * 80 and int(texts_second) == 0 and sum_first == sum_second
    assert int(off.stdout.split()[0]) == 3 * 80  # --no-text-cache / text_cache=False: the tower runs
    files = list((tmp_path / "cache" / "text").rglob("*.npz"))
    assert len(files) == 1 and oct(stat.S_IMODE(files[0].stat().st_mode)) == oct(0o666 & ~_umask())


def _umask():
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_the_cache_is_keyed_and_bounded(model, tmp_path):
    cache = textcache.TextCache(tmp_path, max_bytes=30_000)
    g = gem_jax.GEM(model, layers=1, text_cache=False)
    for i in range(12):  # each file ~3 kB: the oldest go beyond 30 kB
        cache.put(g, {f"prompt {i} {j}": np.full(32, i, np.float32) for j in range(20)})
    kept = sorted(cache.root.rglob("*.npz"), key=lambda f: f.stat().st_mtime)
    assert sum(f.stat().st_size for f in kept) <= 30_000 and 0 < len(kept) < 12
    assert cache.get(g, ["prompt 11 0"])["prompt 11 0"][0] == 11  # the newest is there
    assert cache.get(g, ["prompt 0 0"]) == {}  # the oldest is gone
    other = gem_jax.GEM(model, layers=1, template="itap of a {}.", text_cache=False)
    assert cache.get(other, ["prompt 11 0"]) == {}  # another template set: another key
    bf16 = gem_jax.GEM(model, layers=1, dtype="bfloat16", text_cache=False)
    assert cache.get(bf16, ["prompt 11 0"]) == {}  # another dtype: another key


def test_resize_maps_equals_the_separable_resize():
    rng = np.random.default_rng(0)
    maps = rng.standard_normal((3, 14, 19)).astype(np.float32)
    for hw in ((451, 300), (20, 7), (14, 19)):
        want = np.einsum("Hh,phw,Ww->pHW", resize_matrix(14, hw[0], "bilinear").astype(np.float64),
                         maps.astype(np.float64), resize_matrix(19, hw[1], "bilinear").astype(np.float64))
        np.testing.assert_allclose(postprocess.resize_maps(maps, hw), want, atol=1e-5)
