"""A method defined outside the package is one entry: registered with one call (or through
the ``gem_jax.methods`` entry-point group) it works in the API, every command, the FLOP count,
the memory estimate and every result file's description."""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import gem_jax
from gem_jax import bench
from gem_jax.engine import cost
from gem_jax.engine.attention import AttentionBase, map_heads
from gem_jax.config import architecture
from gem_jax.models.layers import softmax_attention
from tiny import save_tiny


@dataclasses.dataclass(frozen=True)
class SharpKeys(AttentionBase):
    """k-k attention at ``sharpness`` times the usual scale: a method none of the built-in ones is."""

    sharpness: float = 2.0
    kind = "sharp-keys"
    maps = 7  # claims more memory than it needs, so the estimate shows it was asked

    def __call__(self, q, k, v, ctx):
        return map_heads(lambda k, v: softmax_attention(k, k, v, ctx.scale * self.sharpness), ctx.head_chunk, k, v)

    def flops(self, tokens, width):
        return 123e9  # a figure no built-in method has, so the count shows it was asked


METHOD = gem_jax.Method("sharpkeys", SharpKeys(), blocks=2, residual=True, mlp=False,
                        options=("layers", "sharpness"), summary="k-k attention, sharper")


@pytest.fixture(scope="module")
def registered():
    gem_jax.register_method(METHOD, replace=True)
    return METHOD


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    d = tmp_path_factory.mktemp("model") / "tiny"
    save_tiny(d, seed=4)
    return d


def test_registered_method_in_the_api(registered, model):
    m = gem_jax.load(str(model))
    assert "sharpkeys" in gem_jax.method_names()
    image = np.random.default_rng(0).integers(0, 256, (40, 48, 3), dtype=np.uint8)
    sharp = gem_jax.GEM(m, method="sharpkeys", size=(40, 48), sharpness=4.0)
    other = gem_jax.GEM(m, method="sharpkeys", size=(40, 48))
    assert sharp.method.attention.sharpness == 4.0 and sharp.method.blocks == 2
    a, b = sharp.heatmaps(image, ["cat", "dog"]).logits, other.heatmaps(image, ["cat", "dog"]).logits
    assert a.shape == (1, 2, 40, 48) and not np.allclose(a, b)  # its option reaches the computation
    assert sharp.describe()["method"] == {"name": "sharpkeys", "layers": 2, "residual": True, "mlp": False,
                                          "class_token": "own",
                                          "attention": {"kind": "sharp-keys", "sharpness": 4.0},
                                          "posemb": "bicubic_aa"}
    with pytest.raises(ValueError, match=r"method sharpkeys has no option iterations \(its options are layers, "
                                         r"sharpness\)"):
        gem_jax.GEM(m, method="sharpkeys", iterations=2)
    with pytest.raises(ValueError, match="built in"):
        gem_jax.register_method(dataclasses.replace(METHOD, name="gem"))
    with pytest.raises(ValueError, match="registered already"):
        gem_jax.register_method(dataclasses.replace(METHOD, summary="another"))


def test_registered_method_in_flops_and_memory(registered):
    cfg = architecture("ViT-B-16")
    flops = bench.count_flops(cfg, (224, 224), "sharpkeys", 1)
    assert flops["self_self_attention"] >= 2 * 123  # its own count, for each of its 2 blocks
    plain = cost.estimate_memory(cfg, (448, 448), 1, 1, method="clip", schedule=gem_jax.Schedule())
    mine = cost.estimate_memory(cfg, (448, 448), 1, 1, method="sharpkeys", schedule=gem_jax.Schedule())
    n = cfg.vision.tokens((448, 448))
    assert mine - plain == cfg.vision.heads * n * n * 4 * 7  # its 7 maps per (image, head) pair


PLUGIN = textwrap.dedent('''
    import dataclasses
    import gem_jax
    from gem_jax.engine.attention import AttentionBase, map_heads
    from gem_jax.models.layers import softmax_attention

    @dataclasses.dataclass(frozen=True)
    class SharpKeys(AttentionBase):
        sharpness: float = 2.0
        kind = "sharp-keys"

        def __call__(self, q, k, v, ctx):
            return map_heads(lambda k, v: softmax_attention(k, k, v, ctx.scale * self.sharpness), ctx.head_chunk,
                             k, v)

        def flops(self, tokens, width):
            return 123e9

    METHOD = gem_jax.Method("sharpkeys", SharpKeys(), blocks=2, residual=True, mlp=False,
                            options=("layers", "sharpness"))
''')


@pytest.fixture(scope="module")
def plugin(tmp_path_factory):
    """An installed distribution declaring the method in the ``gem_jax.methods`` group."""
    site = tmp_path_factory.mktemp("site")
    (site / "sharp_plugin.py").write_text(PLUGIN)
    info = site / "sharp_plugin-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: sharp-plugin\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text("[gem_jax.methods]\nsharpkeys = sharp_plugin:METHOD\n")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(site), str(pathlib.Path(__file__).parent)]),
               HF_HUB_OFFLINE="1", JAX_PLATFORMS="cpu")
    return env


def _cli(env, *args, cwd):
    return subprocess.run([sys.executable, "-m", "gem_jax.cli", *map(str, args)], env=env, cwd=cwd,
                          capture_output=True, text=True, timeout=600)


def test_entry_point_method_in_every_command(plugin, model, tmp_path):
    image = tmp_path / "img.png"
    from PIL import Image

    Image.fromarray(np.random.default_rng(1).integers(0, 256, (30, 40, 3), dtype=np.uint8)).save(image)
    common = ["--model", model, "--method", "sharpkeys", "--gem-layers", "2", "--no-compile-cache",
              "--no-text-cache", "--quiet"]
    seg = _cli(plugin, "segment", image, "-p", "cat", "--size", "32", "--out", tmp_path / "seg",
               "--save-logits", tmp_path / "seg.npz", *common, cwd=tmp_path)
    assert seg.returncode == 0, seg.stderr
    assert (tmp_path / "seg" / "img__sharpkeys__cat.png").exists()
    saved = json.loads(str(np.load(tmp_path / "seg.npz")["description"]))
    assert saved["method"]["attention"] == {"kind": "sharp-keys", "sharpness": 2.0}

    job = _cli(plugin, "batch", image, "-p", "cat", "dog", "--size", "32", "--out", tmp_path / "job", *common,
               cwd=tmp_path)
    assert job.returncode == 0, job.stderr
    manifest = json.loads((tmp_path / "job" / "manifest.json").read_text())
    assert manifest["spec"]["gem"]["method"]["name"] == "sharpkeys"

    exp = _cli(plugin, "export", "--size", "32", "--batch", "1", "--prompts", "2", "--platforms", "cpu",
               "--out", tmp_path / "prog", *common, cwd=tmp_path)
    assert exp.returncode == 0, exp.stderr
    meta = json.loads((tmp_path / "prog.json").read_text())
    assert meta["method"]["attention"]["kind"] == "sharp-keys" and meta["method"]["layers"] == 2

    bad = _cli(plugin, "segment", image, "-p", "cat", "--out", tmp_path / "bad", "--iterations", "3", *common,
               cwd=tmp_path)
    assert bad.returncode == 2 and "method sharpkeys has no option --iterations" in bad.stderr, bad.stderr

    b = _cli(plugin, "bench", "--arch", "ViT-B-32", "--size", "64", "--batch", "1", "--prompts", "1",
             "--rounds", "1", "--method", "sharpkeys", "--out", tmp_path / "bench.json", "--quiet", cwd=tmp_path)
    assert b.returncode == 0, b.stderr
    result = json.loads((tmp_path / "bench.json").read_text())
    assert result["cases"][0]["results"][0]["gflop_per_image"] > 2 * 123
