"""The model registry, weights directory and hub resolution (against a fake hub, never the network)."""

from __future__ import annotations

import ast
import importlib.util
import json
import pathlib

import numpy as np
import pytest

import gem_jax
from gem_jax.checkpoints import (
    DEFAULT_MODEL,
    MODELS,
    CheckpointError,
    ModelEntry,
    ModelNotAvailableError,
    UnknownModelError,
    available_models,
    convert,
    get_entry,
    is_converted,
    read_checkpoint,
    read_native,
    resolve,
    weights_dir,
)
from gem_jax.checkpoints.layouts import config_from_transformers
from gem_jax.checkpoints.native import is_native
from gem_jax.config import ARCHITECTURES


def reference_zoo() -> dict[str, list[str]]:
    """``_MODELS`` of the reference (gem/gem.py), read without importing it."""
    spec = importlib.util.find_spec("gem")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("gem-torch is not installed")
    src = pathlib.Path(list(spec.submodule_search_locations)[0], "gem.py").read_text()
    for node in ast.parse(src).body:
        if isinstance(node, ast.Assign) and getattr(node.targets[0], "id", None) == "_MODELS":
            return ast.literal_eval(node.value)
    raise AssertionError("_MODELS not found in gem/gem.py")


def test_registry_covers_the_reference_zoo():
    names = available_models()
    for model, tags in reference_zoo().items():
        for tag in tags:
            assert f"{model}:{tag}" in names
    assert DEFAULT_MODEL == "ViT-B/16:openai" and DEFAULT_MODEL in MODELS
    assert len({get_entry(n).local_name for n in names}) == len(names)


def test_entries_are_consistent():
    for name, e in MODELS.items():
        if e.packaged:  # ships inside gem-jax (toy): tested with it
            assert e.hub_repo is None and e.package_dir().name == e.packaged
            continue
        assert e.name == name and name.endswith(":" + e.pretrained)
        assert e.architecture in ARCHITECTURES, name
        arch = ARCHITECTURES[e.architecture]
        assert arch.vision.activation == arch.text.activation == e.activation, name
        assert e.layout in ("openclip", "transformers")
        assert e.hub_repo or e.url, name  # some way to get the weights, if only by hand
        if e.hub_repo:
            assert e.hub_repo.count("/") == 1 and not e.hub_repo.endswith("/")


def test_activations():
    for name, e in MODELS.items():
        if e.packaged:
            continue
        if e.pretrained == "openai" or e.pretrained.startswith("metaclip"):
            assert e.activation == "quick_gelu", name
        elif name in ("ViT-B/32:laion400m_e31", "ViT-B/32:laion400m_e32"):
            assert e.activation == "quick_gelu", name  # trained with QuickGELU (release files say so)
        else:
            assert e.pretrained.startswith("laion") and e.activation == "gelu", name


def test_hub_repos_follow_open_clip_2_23():
    pretrained = pytest.importorskip("open_clip.pretrained")
    for name, e in MODELS.items():
        if e.packaged:
            continue
        arch = e.architecture.replace("-quickgelu", "") if e.pretrained == "openai" else e.architecture
        cfg = pretrained._PRETRAINED.get(arch, {}).get(e.pretrained) or \
            pretrained._PRETRAINED.get(e.architecture, {}).get(e.pretrained)
        assert cfg is not None, name
        if cfg.get("hf_hub"):
            assert e.hub_repo == cfg["hf_hub"].strip("/") and e.layout == "openclip", name
        elif e.hub_repo is not None:
            assert e.layout == "transformers", name  # a transformers conversion of the same weights


def test_get_entry_aliases_and_suggestions():
    assert get_entry("ViT-B/16:openai").architecture == "ViT-B-16-quickgelu"
    assert get_entry("vit-b-16:OpenAI").name == "ViT-B/16:openai"
    assert get_entry("ViT-L/14").name == "ViT-L/14:openai"  # a bare model name means its OpenAI weights
    with pytest.raises(UnknownModelError, match=r"did you mean 'ViT-B/16:openai'") as e:
        get_entry("ViT-B/16:opnai")
    assert isinstance(e.value, ValueError)
    with pytest.raises(ValueError, match="did you mean 'ViT-L/14:laion2b_s32b_b82k'"):
        get_entry("ViT-L/14:laion2b_s32b_b82")


def test_weights_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("GEM_JAX_WEIGHTS", str(tmp_path / "w"))
    assert weights_dir() == tmp_path / "w"
    monkeypatch.delenv("GEM_JAX_WEIGHTS")
    checkout = pathlib.Path(gem_jax.__file__).resolve().parents[1] / "weights"
    if checkout.is_dir():
        assert weights_dir() == checkout
    installed = tmp_path / "site-packages" / "gem_jax" / "__init__.py"
    installed.parent.mkdir(parents=True)
    monkeypatch.setattr(gem_jax, "__file__", str(installed))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    assert weights_dir() == tmp_path / "cache" / "gem_jax" / "weights"


@pytest.fixture
def tiny_registry(tmp_path, monkeypatch, clip_kit, fake_hub):
    """A tiny transformers CLIP published on the fake hub as "test/tiny-clip" and registered as
    "Tiny/8:test"; returns (entry, the repository directory)."""
    model = clip_kit.make_transformers("quick_gelu")
    repo = clip_kit.write_transformers(model, tmp_path / "repo")
    fake_hub.add_repo("test/tiny-clip", repo)
    config = config_from_transformers(json.loads((repo / "config.json").read_text()))
    monkeypatch.setitem(ARCHITECTURES, "Tiny-8-quickgelu", config)
    entry = ModelEntry("Tiny/8:test", "Tiny-8-quickgelu", "test", "test/tiny-clip", "transformers", "quick_gelu",
                       "model.safetensors", "pytorch_model.bin", "config.json")
    monkeypatch.setitem(MODELS, entry.name, entry)
    return entry, repo


def test_resolve_downloads_and_converts_once(tiny_registry, fake_hub):
    entry, repo = tiny_registry
    assert not is_converted(entry.name)
    ckpt = resolve(entry.name)
    target = weights_dir() / "Tiny-8.test"
    assert ckpt.layout == "native" and ckpt.source == str(target) and is_converted(entry.name)
    assert {f for _, f, _ in fake_hub.calls} >= {"config.json", "model.safetensors", "vocab.json", "merges.txt"}
    assert "pytorch_model.bin" not in {f for _, f, _ in fake_hub.calls}  # only the files needed
    assert (target / "vocab.json").is_file() and ckpt.tokenizer_dir == target
    meta = json.loads((target / "config.json").read_text())
    assert meta["hub_repo"] == "test/tiny-clip" and meta["name"] == "Tiny/8:test"
    direct = read_checkpoint(repo)
    assert ckpt.config == direct.config
    np.testing.assert_array_equal(ckpt.params["visual"]["proj"], direct.params["visual"]["proj"])
    n_calls = len(fake_hub.calls)
    again = resolve("tiny/8:TEST", offline=True)
    assert len(fake_hub.calls) == n_calls  # no download the second time
    assert again.config == ckpt.config
    assert resolve(entry.name, activation="gelu").config.vision.activation == "gelu"


def test_resolve_falls_back_to_the_torch_weights_file(tiny_registry, fake_hub):
    torch = pytest.importorskip("torch")
    from safetensors.torch import load_file

    entry, repo = tiny_registry
    expected = read_checkpoint(repo)
    torch.save(load_file(str(repo / "model.safetensors")), repo / "pytorch_model.bin")
    (repo / "model.safetensors").unlink()  # the repository has only the .bin now
    ckpt = resolve(entry.name)
    assert ("test/tiny-clip", "pytorch_model.bin", False) in fake_hub.calls
    np.testing.assert_array_equal(ckpt.params["text"]["resblocks_1"]["attn"]["in_proj"]["kernel"],
                                  expected.params["text"]["resblocks_1"]["attn"]["in_proj"]["kernel"])


def test_resolve_offline_says_what_to_download(tiny_registry, fake_hub, monkeypatch):
    entry, _ = tiny_registry
    target = weights_dir() / "Tiny-8.test"
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelNotAvailableError) as e:
        resolve(entry.name)
    msg = str(e.value)
    assert "test/tiny-clip" in msg and str(target) in msg and "offline" in msg
    assert f"hf download test/tiny-clip config.json model.safetensors --local-dir {target}" in msg
    assert all(local_only for _, _, local_only in fake_hub.calls)
    assert not target.exists()
    monkeypatch.delenv("HF_HUB_OFFLINE")
    fake_hub.network = False  # the hub raises LocalEntryNotFoundError, as without a connection
    with pytest.raises(ModelNotAvailableError, match=r"test/tiny-clip(.|\n)*--local-dir " + str(target)):
        resolve(entry.name)


def test_manual_download_into_weights_dir_is_used(tiny_registry, fake_hub):
    entry, repo = tiny_registry
    fake_hub.network = False
    target = weights_dir() / entry.local_name
    target.mkdir(parents=True)
    for name in ("config.json", "model.safetensors"):
        (target / name).write_bytes((repo / name).read_bytes())
    ckpt = resolve(entry.name)
    assert ckpt.layout == "transformers" and ckpt.config == ARCHITECTURES["Tiny-8-quickgelu"]
    assert fake_hub.calls == []


def test_wrong_files_for_an_entry_are_refused(tiny_registry, fake_hub, clip_kit, tmp_path, monkeypatch):
    entry, _ = tiny_registry
    other = clip_kit.write_transformers(clip_kit.make_transformers("gelu"), tmp_path / "other")
    fake_hub.add_repo("test/tiny-clip", other)  # gelu weights where QuickGELU ones are registered
    monkeypatch.setitem(MODELS, entry.name, entry)
    ckpt = resolve(entry.name)  # the registry's activation wins over config.json
    assert ckpt.config.vision.activation == "quick_gelu"
    wide = ARCHITECTURES["Tiny-8-quickgelu"].replace(embed_dim=64)
    monkeypatch.setitem(ARCHITECTURES, "Tiny-8-quickgelu", wide)
    with pytest.raises(CheckpointError, match=r"does not hold Tiny/8:test.*embed_dim: 64 != 48"):
        resolve(entry.name)


def test_resolve_hub_id_and_convert(tiny_registry, fake_hub, clip_kit, tmp_path):
    entry, repo = tiny_registry
    model, cfg = clip_kit.make_openclip(quick_gelu=False)
    oc = clip_kit.write_openclip_hub(model, cfg, tmp_path / "oc-repo")
    fake_hub.add_repo("someone/tiny-openclip", oc)
    ckpt = resolve("someone/tiny-openclip")
    assert ckpt.layout == "openclip" and ckpt.source == "hf://someone/tiny-openclip"
    assert ckpt.config.vision.activation == "gelu"
    assert not weights_dir().exists()  # hub ids are not copied into the weights directory
    out = convert("someone/tiny-openclip", tmp_path / "converted")
    assert read_native(out).config == ckpt.config
    out2 = convert(entry.name, tmp_path / "converted2")
    assert read_native(out2).config == ARCHITECTURES["Tiny-8-quickgelu"]
    assert not is_converted(entry.name)  # convert writes only where it is told
    fake_hub.network = False
    with pytest.raises(ModelNotAvailableError, match=r"someone/missing(.|\n)*hf download someone/missing"):
        resolve("someone/missing")


def test_unknown_names_and_missing_paths(fake_hub, tmp_path):
    with pytest.raises(UnknownModelError, match="did you mean 'ViT-B/16:openai'"):
        resolve("ViT-B/16:opena")
    with pytest.raises(UnknownModelError):
        resolve("ViT-B/17")  # a typo, not a repository id
    with pytest.raises(FileNotFoundError):
        resolve(str(tmp_path / "missing.safetensors"))
    with pytest.raises(FileNotFoundError):
        resolve("./nowhere")
    assert fake_hub.calls == []


def test_release_only_entry_says_where_the_file_is(fake_hub):
    e = get_entry("ViT-B/16:laion400m_e32")
    assert e.hub_repo is None
    with pytest.raises(ModelNotAvailableError) as err:
        resolve(e.name)
    msg = str(err.value)
    assert e.url in msg and str(weights_dir() / "ViT-B-16.laion400m_e32") in msg and "--activation gelu" in msg
    assert fake_hub.calls == []


def test_hub_id_of_a_registry_entry_is_that_entry(tiny_registry, fake_hub, tmp_path):
    """convert and resolve treat a registry model's repository id as the registry name:
    same files, the model's own folder, the same offline message."""
    from gem_jax.checkpoints import local_state

    entry, repo = tiny_registry
    target = weights_dir() / entry.local_name
    fake_hub.network = False
    messages = []
    for src in (entry.name, "test/tiny-clip", "Test/Tiny-CLIP"):
        with pytest.raises(ModelNotAvailableError) as err:
            convert(src)
        messages.append(str(err.value))
    assert messages[0] == messages[1] == messages[2]
    assert entry.name in messages[0] and str(target) in messages[0]
    assert "open_clip_config.json" not in messages[0]  # the entry's transformers files, not a layout guess
    fake_hub.network = True
    assert local_state(entry.name) == "missing"
    out = convert("test/tiny-clip")  # no --out: the registry folder
    assert out == target.absolute() and is_converted(entry.name) and local_state(entry.name) == "converted"
    meta = json.loads((target / "config.json").read_text())
    assert meta["name"] == entry.name and meta["hub_repo"] == "test/tiny-clip"
    assert resolve("test/tiny-clip").source == str(target)  # loads the converted copy, no download
    with pytest.raises(ValueError, match="--out"):
        convert(str(repo))  # a local directory is no registry model: it needs a target


def test_local_state_tells_converted_original_and_missing(tiny_registry, clip_kit, tmp_path):
    from gem_jax.checkpoints import local_state

    entry, repo = tiny_registry
    target = weights_dir() / entry.local_name
    assert local_state(entry.name) == "missing"
    target.mkdir(parents=True)
    (target / "notes.txt").write_text("not weights")
    assert local_state(entry.name) == "missing"
    for f in ("config.json", "model.safetensors"):  # the files as downloaded by `hf download`
        (target / f).write_bytes((repo / f).read_bytes())
    assert local_state(entry.name) == "original" and not is_converted(entry.name)
    assert resolve(entry.name).layout == "transformers"  # they load as they are
    before = sorted((p.name, p.read_bytes()) for p in target.iterdir())
    for force in (False, True):  # the originals are the source: never replaced, whatever --force says
        with pytest.raises(FileExistsError, match="original files"):
            convert(entry.name, force=force)
    assert sorted((p.name, p.read_bytes()) for p in target.iterdir()) == before
    copy = convert(entry.name, tmp_path / "native")
    assert is_native(copy) and local_state(entry.name) == "original"


def test_random_conversion_is_seeded_native_and_labelled(tmp_path, monkeypatch):
    from gem_jax.checkpoints import convert_random
    from gem_jax.config import CLIPConfig, TextConfig, VisionConfig

    tiny = CLIPConfig(vision=VisionConfig(image_size=32, patch_size=8, width=64, layers=2, heads=2),
                      text=TextConfig(width=32, layers=1, heads=2), embed_dim=32)
    monkeypatch.setitem(ARCHITECTURES, "Tiny-8", tiny)
    from gem_jax.models import init_params

    a = convert_random("Tiny-8", tmp_path / "a", seed=1)
    c = convert_random("Tiny-8", tmp_path / "c", seed=2)
    meta = json.loads((a / "config.json").read_text())
    assert meta["random_weights"] is True and meta["seed"] == 1 and meta["format"] == "gem-jax"
    assert (a / "bpe_simple_vocab_16e6.txt.gz").is_file()  # the tokenizer travels with it
    ka = read_native(a).params["visual"]["conv1"]["kernel"]
    assert np.array_equal(ka, np.asarray(init_params(tiny, seed=1)["visual"]["conv1"]["kernel"]))  # seeded
    assert not np.array_equal(ka, read_native(c).params["visual"]["conv1"]["kernel"])
    model = gem_jax.load(str(a))
    assert model.random_weights and read_native(a).config == tiny
    assert "RANDOM weights" in repr(model) and len(repr(model)) < 300  # a summary, not the parameters
    assert model.tokenizer(["a cat"]).shape == (1, 77)
    again = convert(str(a), tmp_path / "copy")  # a converted copy stays labelled
    assert gem_jax.load(str(again)).random_weights
    with pytest.raises(ValueError, match="unknown architecture"):
        convert_random("ViT-Q-99", tmp_path / "d")
    with pytest.raises(FileExistsError):
        convert_random("Tiny-8", tmp_path / "a")
