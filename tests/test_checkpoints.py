"""Checkpoint readers against open_clip and transformers, the native format, and bad input."""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import gem_jax
from gem_jax.checkpoints import (
    CheckpointError,
    convert,
    read_checkpoint,
    read_native,
    save_native,
)
from gem_jax.checkpoints import native as native_mod
from gem_jax.checkpoints.layouts import config_from_openclip, config_from_transformers
from gem_jax.checkpoints.readers import load_torch

torch = pytest.importorskip("torch")

TOL = 1e-4


def leaves(tree, prefix=""):
    out = {}
    for k, v in tree.items():
        key = f"{prefix}/{k}" if prefix else k
        out.update(leaves(v, key) if isinstance(v, dict) else {key: np.asarray(v)})
    return out


def assert_same_params(a, b):
    la, lb = leaves(a), leaves(b)
    assert la.keys() == lb.keys()
    for k in la:
        assert la[k].dtype == lb[k].dtype == np.float32, k
        np.testing.assert_array_equal(la[k], lb[k], err_msg=k)


def openclip_reference(model, pixels, ids, kit):
    with torch.no_grad():
        img = model.encode_image(torch.from_numpy(pixels))
        txt = model.encode_text(torch.from_numpy(ids))
    return kit.l2n(img.numpy()), kit.l2n(txt.numpy())


def transformers_reference(model, pixels, ids, kit, interpolate=False):
    def feats(out):
        return out if isinstance(out, torch.Tensor) else out.pooler_output

    with torch.no_grad():
        img = feats(model.get_image_features(pixel_values=torch.from_numpy(pixels),
                                             interpolate_pos_encoding=interpolate))
        txt = feats(model.get_text_features(input_ids=torch.from_numpy(ids)))
    return kit.l2n(img.numpy()), kit.l2n(txt.numpy())


def assert_parity(parity, ours, ref, label):
    diffs = [parity(f"{label}: {part}", a, b) for part, a, b in zip(("image", "text"), ours, ref)]
    assert max(diffs) <= TOL, (label, diffs)


@pytest.mark.parametrize("quick_gelu,safetensors", [(True, True), (False, False)])
def test_openclip_hub_layout_matches_open_clip(tmp_path, clip_kit, quick_gelu, safetensors, parity):
    model, cfg = clip_kit.make_openclip(quick_gelu=quick_gelu)
    d = clip_kit.write_openclip_hub(model, cfg, tmp_path / "hub", safetensors=safetensors)
    ckpt = read_checkpoint(d)
    assert ckpt.layout == "openclip"
    assert ckpt.config.vision.activation == ckpt.config.text.activation == ("quick_gelu" if quick_gelu else "gelu")
    assert (ckpt.config.vision.heads, ckpt.config.text.heads, ckpt.config.vision.mlp_ratio) == (3, 4, 2.0)
    pixels, ids = clip_kit.tiny_inputs()
    ours = clip_kit.jax_embeddings(ckpt.config, ckpt.params, pixels, ids)
    assert_parity(parity, ours, openclip_reference(model, pixels, ids, clip_kit),
                  f"openclip-hub quick_gelu={quick_gelu} safetensors={safetensors}")


@pytest.mark.parametrize("hidden_act", ["quick_gelu", "gelu"])
def test_transformers_layout_matches_clipmodel(tmp_path, clip_kit, hidden_act, parity):
    model = clip_kit.make_transformers(hidden_act)
    d = clip_kit.write_transformers(model, tmp_path / "hf")
    ckpt = read_checkpoint(d)
    assert ckpt.layout == "transformers" and ckpt.tokenizer_dir == d
    assert ckpt.config.vision.activation == hidden_act
    pixels, ids = clip_kit.tiny_inputs()
    ours = clip_kit.jax_embeddings(ckpt.config, ckpt.params, pixels, ids)
    assert_parity(parity, ours, transformers_reference(model, pixels, ids, clip_kit), f"transformers {hidden_act}")


def test_transformers_bin_and_interpolated_size(tmp_path, clip_kit, parity):
    model = clip_kit.make_transformers("quick_gelu", seed=1)
    ckpt = read_checkpoint(clip_kit.write_transformers(model, tmp_path / "hf", safetensors=False))
    # transformers' interpolate_pos_encoding is non-antialiased bicubic
    pixels, ids = clip_kit.tiny_inputs(image_size=64)
    ours = clip_kit.jax_embeddings(ckpt.config, ckpt.params, pixels, ids, posemb_method="bicubic")
    assert_parity(parity, ours, transformers_reference(model, pixels, ids, clip_kit, interpolate=True),
                  "transformers .bin at 64 (interpolated)")


def test_openai_torchscript_fp16(tmp_path, clip_kit, parity):
    model, _ = clip_kit.make_openclip(clip_kit.TINY_OPENAI_CFG, quick_gelu=True, seed=2)
    path = clip_kit.write_openai_torchscript(model, tmp_path / "ViT-T-8.pt", image_size=32)
    ckpt = read_checkpoint(path)  # QuickGELU by default for OpenAI .pt
    assert ckpt.layout == "openai" and ckpt.config.vision.activation == "quick_gelu"
    assert ckpt.config.vision.heads == ckpt.config.text.heads == 2
    clip_kit.round_to_fp16_(model)
    pixels, ids = clip_kit.tiny_inputs()
    ours = clip_kit.jax_embeddings(ckpt.config, ckpt.params, pixels, ids)
    assert_parity(parity, ours, openclip_reference(model, pixels, ids, clip_kit), "openai torchscript fp16")


def test_plain_state_dict_pt_and_bare_safetensors(tmp_path, clip_kit, parity):
    from safetensors.torch import save_file

    model, _ = clip_kit.make_openclip(clip_kit.TINY_OPENAI_CFG, quick_gelu=False, seed=3)
    bare = tmp_path / "bare.safetensors"
    save_file(clip_kit.torch_state(model), str(bare))
    with pytest.raises(CheckpointError, match="activation"):
        read_checkpoint(bare)
    from_safetensors = read_checkpoint(bare, activation="gelu")
    pt = clip_kit.write_state_dict_pt(model, tmp_path / "train.pt", nested=True)
    from_pt = read_checkpoint(pt, activation="gelu")
    assert from_pt.layout == "openclip" and from_pt.config == from_safetensors.config
    assert read_checkpoint(pt).config.vision.activation == "quick_gelu"  # the OpenAI default
    pixels, ids = clip_kit.tiny_inputs()
    assert_parity(parity, clip_kit.jax_embeddings(from_safetensors.config, from_safetensors.params, pixels, ids),
                  openclip_reference(model, pixels, ids, clip_kit), "bare safetensors gelu")
    clip_kit.round_to_fp16_(model)
    assert_parity(parity, clip_kit.jax_embeddings(from_pt.config, from_pt.params, pixels, ids),
                  openclip_reference(model, pixels, ids, clip_kit), "plain state dict .pt fp16")


def hf_state_as_openclip(state: dict, n_vision: int, n_text: int) -> dict:
    """A transformers CLIPModel state dict renamed and fused into the OpenCLIP layout by hand."""
    out = {
        "visual.class_embedding": state["vision_model.embeddings.class_embedding"],
        "visual.conv1.weight": state["vision_model.embeddings.patch_embedding.weight"],
        "visual.positional_embedding": state["vision_model.embeddings.position_embedding.weight"],
        "visual.proj": state["visual_projection.weight"].T.contiguous(),
        "token_embedding.weight": state["text_model.embeddings.token_embedding.weight"],
        "positional_embedding": state["text_model.embeddings.position_embedding.weight"],
        "text_projection": state["text_projection.weight"].T.contiguous(),
        "logit_scale": state["logit_scale"],
    }
    for a, b in [("visual.ln_pre", "vision_model.pre_layrnorm"), ("visual.ln_post", "vision_model.post_layernorm"),
                 ("ln_final", "text_model.final_layer_norm")]:
        for p in ("weight", "bias"):
            out[f"{a}.{p}"] = state[f"{b}.{p}"]
    for tower_src, tower_dst, n in [("vision_model", "visual.transformer", n_vision),
                                    ("text_model", "transformer", n_text)]:
        for i in range(n):
            s, t = f"{tower_src}.encoder.layers.{i}", f"{tower_dst}.resblocks.{i}"
            for p in ("weight", "bias"):
                out[f"{t}.attn.in_proj_{p}"] = torch.cat([state[f"{s}.self_attn.{x}_proj.{p}"] for x in "qkv"])
                for a, b in [("ln_1", "layer_norm1"), ("ln_2", "layer_norm2"), ("attn.out_proj", "self_attn.out_proj"),
                             ("mlp.c_fc", "mlp.fc1"), ("mlp.c_proj", "mlp.fc2")]:
                    out[f"{t}.{a}.{p}"] = state[f"{s}.{b}.{p}"]
    assert len(out) == len(state) - 4 * (n_vision + n_text)  # q, k, v fused
    return {k: v.contiguous() for k, v in out.items()}


def test_same_weights_in_both_layouts_load_identically(tmp_path, clip_kit):
    from safetensors.torch import save_file

    model = clip_kit.make_transformers("gelu", seed=4)
    hf = read_checkpoint(clip_kit.write_transformers(model, tmp_path / "hf"))
    c = model.config
    oc = tmp_path / "oc"
    oc.mkdir()
    model_cfg = {"embed_dim": c.projection_dim,
                 "vision_cfg": {"image_size": c.vision_config.image_size, "patch_size": c.vision_config.patch_size,
                                "width": c.vision_config.hidden_size, "layers": c.vision_config.num_hidden_layers,
                                "head_width": c.vision_config.hidden_size // c.vision_config.num_attention_heads,
                                "mlp_ratio": c.vision_config.intermediate_size / c.vision_config.hidden_size},
                 "text_cfg": {"context_length": c.text_config.max_position_embeddings,
                              "vocab_size": c.text_config.vocab_size, "width": c.text_config.hidden_size,
                              "heads": c.text_config.num_attention_heads, "layers": c.text_config.num_hidden_layers}}
    (oc / "open_clip_config.json").write_text(json.dumps({"model_cfg": model_cfg}))
    state = hf_state_as_openclip(clip_kit.torch_state(model), c.vision_config.num_hidden_layers,
                                 c.text_config.num_hidden_layers)
    save_file(state, str(oc / "open_clip_model.safetensors"))
    openclip = read_checkpoint(oc)
    assert openclip.config == hf.config
    assert_same_params(openclip.params, hf.params)


def test_native_round_trip(tmp_path, clip_kit):
    model = clip_kit.make_transformers("gelu")
    src = read_checkpoint(clip_kit.write_transformers(model, tmp_path / "hf"))
    out = save_native(tmp_path / "native", src.config, src.params, src.tokenizer_dir, metadata={"note": "x"})
    doc = json.loads((out / "config.json").read_text())
    assert doc["format"] == "gem-jax" and doc["version"] == 1 and doc["note"] == "x"
    assert doc["clip"] == src.config.to_dict()
    assert sorted(p.name for p in out.iterdir()) == [".gem-jax-files.jsonl", "config.json", "merges.txt",
                                                   "model.safetensors", "vocab.json"]  # and the record of them
    back = read_native(out)
    assert back.config == src.config and back.layout == "native" and back.tokenizer_dir == out
    assert_same_params(back.params, src.params)
    assert read_checkpoint(out).config == src.config  # detected as native
    assert not list(tmp_path.glob(".native*"))


def test_convert_refuses_to_overwrite_and_replaces_with_force(tmp_path, clip_kit):
    model, cfg = clip_kit.make_openclip(quick_gelu=False)
    src = clip_kit.write_openclip_hub(model, cfg, tmp_path / "hub")
    out = convert(src, tmp_path / "out")
    before = (out / "model.safetensors").read_bytes()
    with pytest.raises(FileExistsError, match="already exists .a gem-jax checkpoint.; pass --force"):
        convert(src, out)
    with pytest.raises(FileExistsError):
        save_native(out, read_native(out).config, read_native(out).params)
    assert (out / "model.safetensors").read_bytes() == before
    model2, _ = clip_kit.make_openclip(quick_gelu=False, seed=5)
    src2 = clip_kit.write_openclip_hub(model2, cfg, tmp_path / "hub2")
    convert(src2, out, force=True)
    assert_same_params(read_native(out).params, read_checkpoint(src2).params)
    assert json.loads((out / "config.json").read_text())["source"] == str(src2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hub", "hub2", "out"]
    (tmp_path / "empty").mkdir()
    convert(src, tmp_path / "empty")  # an empty directory is not in the way
    assert read_native(tmp_path / "empty").config == read_checkpoint(src).config


def test_failed_conversion_leaves_nothing_behind(tmp_path, clip_kit, monkeypatch):
    model, cfg = clip_kit.make_openclip()
    src = clip_kit.write_openclip_hub(model, cfg, tmp_path / "src" / "hub")

    def half_write(tensors, path):
        pathlib.Path(path).write_bytes(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(native_mod, "_write_tensors", half_write)
    before = sorted(tmp_path.rglob("*"))
    with pytest.raises(OSError, match="disk full"):
        convert(src, tmp_path / "a" / "b" / "out")
    assert sorted(tmp_path.rglob("*")) == before
    # the same with an existing target under force: the old copy survives intact
    monkeypatch.undo()
    out = convert(src, tmp_path / "out")
    snapshot = {p.name: p.read_bytes() for p in out.iterdir()}
    monkeypatch.setattr(native_mod, "_write_tensors", half_write)
    with pytest.raises(OSError):
        convert(src, out, force=True)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == snapshot
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "src"]


def test_native_reads_without_torch(tmp_path, clip_kit):
    model, cfg = clip_kit.make_openclip()
    out = convert(clip_kit.write_openclip_hub(model, cfg, tmp_path / "hub"), tmp_path / "native")
    code = textwrap.dedent(f"""
        import sys
        sys.modules["torch"] = None  # any import of torch now fails
        from gem_jax.checkpoints import read_native, resolve
        a = read_native({str(out)!r})
        b = resolve({str(out)!r})
        assert a.config == b.config and b.layout == "native"
        print("ok")
    """)
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(pathlib.Path(gem_jax.__file__).parents[1]))
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 0 and "ok" in r.stdout, r.stderr[-2000:]


def test_native_is_strict(tmp_path, clip_kit):
    from safetensors.numpy import load_file, save_file

    model, cfg = clip_kit.make_openclip()
    out = convert(clip_kit.write_openclip_hub(model, cfg, tmp_path / "hub"), tmp_path / "native")
    tensors = load_file(str(out / "model.safetensors"))
    del tensors["visual/ln_post/bias"]
    tensors["visual/extra"] = np.zeros(3, np.float32)
    save_file(tensors, str(out / "model.safetensors"))
    with pytest.raises(CheckpointError, match="visual/ln_post/bias") as e:
        read_native(out)
    assert "visual/extra" in str(e.value)
    doc = json.loads((out / "config.json").read_text())
    (out / "config.json").write_text(json.dumps({**doc, "version": 99}))
    with pytest.raises(CheckpointError, match="version 99"):
        read_native(out)


@pytest.fixture
def hf_dir(tmp_path, clip_kit):
    return clip_kit.write_transformers(clip_kit.make_transformers("quick_gelu"), tmp_path / "hf")


def test_truncated_and_corrupt_safetensors(tmp_path, hf_dir):
    w = hf_dir / "model.safetensors"
    w.write_bytes(w.read_bytes()[: w.stat().st_size // 2])
    with pytest.raises(CheckpointError, match=r"model\.safetensors.*truncated or corrupt"):
        read_checkpoint(hf_dir)
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(os.urandom(4096))
    with pytest.raises(CheckpointError, match="junk.safetensors"):
        read_checkpoint(junk, activation="gelu")
    empty = tmp_path / "empty.safetensors"
    empty.write_bytes(b"")
    with pytest.raises(CheckpointError, match="empty.safetensors"):
        read_checkpoint(empty, activation="gelu")


def test_unknown_layouts(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="is empty"):
        read_checkpoint(tmp_path / "empty")
    rnd = tmp_path / "random"
    rnd.mkdir()
    (rnd / "notes.txt").write_text("hello")
    (rnd / "data.npy").write_bytes(os.urandom(64))
    with pytest.raises(CheckpointError, match="no checkpoint.*notes.txt"):
        read_checkpoint(rnd)
    (rnd / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(CheckpointError, match="bert"):
        read_checkpoint(rnd)
    (rnd / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="config.json"):
        read_checkpoint(rnd)
    with pytest.raises(CheckpointError, match="unknown checkpoint file type"):
        read_checkpoint(rnd / "data.npy")
    bad_pt = tmp_path / "bad.pt"
    bad_pt.write_bytes(os.urandom(1000))
    with pytest.raises(CheckpointError, match="bad.pt"):
        read_checkpoint(bad_pt)
    with pytest.raises(FileNotFoundError):
        read_checkpoint(tmp_path / "nope")


def test_missing_extra_and_misshapen_tensors(tmp_path, clip_kit):
    from safetensors.torch import save_file

    model, _ = clip_kit.make_openclip(clip_kit.TINY_OPENAI_CFG)
    base = clip_kit.torch_state(model)

    def read(state):
        path = tmp_path / "s.safetensors"
        save_file(state, str(path))
        return read_checkpoint(path, activation="quick_gelu")

    with pytest.raises(CheckpointError, match=r"missing 1 tensor\(s\): transformer\.resblocks\.1\.ln_2\.bias"):
        read({k: v for k, v in base.items() if k != "transformer.resblocks.1.ln_2.bias"})
    with pytest.raises(CheckpointError, match=r"unexpected 1 tensor\(s\): visual\.head\.weight"):
        read({**base, "visual.head.weight": torch.zeros(2)})
    with pytest.raises(CheckpointError, match=r"wrong shape.*visual\.ln_pre\.weight"):
        read({**base, "visual.ln_pre.weight": torch.zeros(7)})
    read({**base, "logit_scale": torch.zeros(())})  # exempt


def test_transformers_qkv_errors_name_the_source_keys(tmp_path, hf_dir):
    from safetensors.numpy import load_file, save_file

    state = load_file(str(hf_dir / "model.safetensors"))
    k = "vision_model.encoder.layers.1.self_attn.k_proj.weight"
    state[k] = state[k][:-3]
    save_file(state, str(hf_dir / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"wrong shape.*layers\.1\.self_attn\.q_proj\.weight \+ "
                                              r"vision_model\.encoder\.layers\.1\.self_attn\.k_proj\.weight"):
        read_checkpoint(hf_dir)
    del state[k]
    save_file(state, str(hf_dir / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"missing 1 tensor\(s\): " + k.replace(".", r"\.")):
        read_checkpoint(hf_dir)


def test_config_disagreeing_with_tensors(tmp_path, clip_kit, hf_dir):
    cfg = json.loads((hf_dir / "config.json").read_text())
    cfg["vision_config"]["image_size"] = 64
    cfg["text_config"]["intermediate_size"] = 128
    (hf_dir / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError) as e:
        read_checkpoint(hf_dir)
    msg = str(e.value)
    assert "vision.image_size: 64 in the config, 32 in the tensors" in msg
    assert "text.mlp_ratio: 2.0 in the config, 4.0 in the tensors" in msg and "mlp.fc1.weight" in msg
    model, oc_cfg = clip_kit.make_openclip()
    oc = clip_kit.write_openclip_hub(model, {**oc_cfg, "embed_dim": 40}, tmp_path / "oc")
    with pytest.raises(CheckpointError, match=r"open_clip_config\.json disagrees.*embed_dim: 40 in the config, "
                                              r"48 in the tensors.*text_projection"):
        read_checkpoint(oc)


def test_config_parsers():
    c = config_from_openclip({"model_cfg": {"embed_dim": 512, "vision_cfg": {"image_size": 224, "layers": 12,
                                                                            "width": 768, "patch_size": 16},
                                            "text_cfg": {"layers": 12}}})
    assert (c.vision.heads, c.text.heads, c.text.width, c.text.context_length, c.text.vocab_size) == (12, 8, 512, 77,
                                                                                                     49408)
    assert c.vision.activation == "gelu"
    assert config_from_openclip({"embed_dim": 8, "quick_gelu": True,
                                 "vision_cfg": {"width": 64, "image_size": [32, 32], "patch_size": 8, "layers": 1},
                                 "text_cfg": {"width": 64, "heads": 1, "layers": 1}}).text.activation == "quick_gelu"
    for bad, field in [({"timm_model_name": "vit_base"}, "timm_model_name"), ({"layers": [3, 4, 6, 3]}, "layers"),
                       ({"attentional_pool": True}, "attentional_pool")]:
        with pytest.raises(CheckpointError, match=field):
            config_from_openclip({"embed_dim": 8, "vision_cfg": bad, "text_cfg": {}})
    with pytest.raises(CheckpointError, match="hf_model_name"):
        config_from_openclip({"embed_dim": 8, "vision_cfg": {}, "text_cfg": {"hf_model_name": "roberta-base"}})
    # an old transformers config.json that leaves transformers' defaults out
    t = config_from_transformers({"projection_dim": 512, "text_config": {}, "vision_config": {"patch_size": 16}})
    assert t.vision.width == 768 and t.vision.patch_size == 16 and t.text.context_length == 77
    assert t.text.activation == "quick_gelu"
    with pytest.raises(CheckpointError, match="hidden_act"):
        config_from_transformers({"text_config": {"hidden_act": "relu"}, "vision_config": {}})
    with pytest.raises(CheckpointError, match="siglip"):
        config_from_transformers({"model_type": "siglip", "text_config": {}, "vision_config": {}})


def test_torch_missing_gives_install_hint(tmp_path, clip_kit, monkeypatch):
    model, cfg = clip_kit.make_openclip()
    d = clip_kit.write_openclip_hub(model, cfg, tmp_path / "hub", safetensors=False)
    monkeypatch.setitem(sys.modules, "torch", None)
    with pytest.raises(CheckpointError, match=r'pip install "gem-jax\[torch\]"'):
        read_checkpoint(d)
    with pytest.raises(CheckpointError, match="gem-jax"):
        load_torch(d / "open_clip_pytorch_model.bin")


@pytest.mark.parametrize("vision_layers,text_layers", [(1, 1), (3, 2), (2, 5)])
def test_param_shapes_equal_a_full_trace(vision_layers, text_layers):
    """The expected tree traces one block per tower and repeats it; it must equal the
    tree a full ``init`` makes, structure, shapes and dtypes."""
    import jax
    import jax.numpy as jnp

    from gem_jax.config import CLIPConfig, TextConfig, VisionConfig
    from gem_jax.models import CLIP, param_shapes

    config = CLIPConfig(vision=VisionConfig(image_size=32, patch_size=8, width=64, layers=vision_layers, heads=2),
                        text=TextConfig(context_length=16, vocab_size=100, width=32, layers=text_layers, heads=2),
                        embed_dim=24)
    full = jax.eval_shape(CLIP(config).init, jax.random.PRNGKey(0), jax.ShapeDtypeStruct((1, 32, 32, 3), jnp.float32),
                          jax.ShapeDtypeStruct((1, 16), jnp.int32))["params"]
    fast = param_shapes(config)
    assert jax.tree_util.tree_structure(fast) == jax.tree_util.tree_structure(full)
    for a, b in zip(jax.tree_util.tree_leaves(fast), jax.tree_util.tree_leaves(full)):
        assert (a.shape, a.dtype) == (b.shape, b.dtype)
    assert len([k for k in fast["visual"] if k.startswith("resblocks_")]) == vision_layers
    fast["visual"].pop("proj")  # callers get their own containers
    assert "proj" in param_shapes(config)["visual"]
