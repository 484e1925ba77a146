"""Shared fixtures: tiny random CLIPs of the real architectures, their on-disk layouts, a fake hub."""

from __future__ import annotations

import json
import pathlib
import shutil
import types

import numpy as np
import pytest


#: open_clip settings of the tiny test CLIP: 3 vision heads of width 32, 4 text heads.
TINY_OPENCLIP_CFG = dict(
    embed_dim=48,
    vision_cfg=dict(image_size=32, patch_size=8, width=96, layers=2, head_width=32, mlp_ratio=2.0),
    text_cfg=dict(context_length=16, vocab_size=100, width=64, heads=4, layers=2),
)
#: The tiny CLIP as OpenAI ``.pt`` files must be: heads are inferred as width / 64.
TINY_OPENAI_CFG = dict(
    embed_dim=48,
    vision_cfg=dict(image_size=32, patch_size=8, width=128, layers=2),
    text_cfg=dict(context_length=16, vocab_size=100, width=128, heads=2, layers=2),
)


def perturb_(model, seed: int = 0):
    """Moves a random torch CLIP away from its tidy init so layout mistakes show.

    LayerNorm gains spread around 1 (std 0.5), every bias nonzero, attention inputs
    and output projections scaled up.
    """
    import torch

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            if any(s in name for s in ("ln", "layer_norm", "layrnorm", "layernorm")) and name.endswith("weight"):
                p.copy_(1.0 + 0.5 * noise)
            elif name.endswith("bias"):
                p.copy_(0.2 * noise)
            elif any(s in name for s in ("in_proj_weight", "q_proj.weight", "k_proj.weight")):
                p.mul_(3.0)
            elif name.endswith(("proj", "projection", "projection.weight")):
                p.mul_(2.0)
            elif name.endswith(("class_embedding", "positional_embedding", "position_embedding.weight")):
                p.copy_(0.5 * noise)
    return model.eval()


def make_openclip(model_cfg: dict = TINY_OPENCLIP_CFG, quick_gelu: bool = True, seed: int = 0):
    """A perturbed random ``open_clip.model.CLIP`` and its ``model_cfg`` dict (open_clip_config.json)."""
    import torch
    from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg

    torch.manual_seed(seed)
    model = CLIP(model_cfg["embed_dim"], CLIPVisionCfg(**model_cfg["vision_cfg"]),
                 CLIPTextCfg(**model_cfg["text_cfg"]), quick_gelu=quick_gelu)
    cfg = json.loads(json.dumps(model_cfg))
    if quick_gelu:
        cfg["quick_gelu"] = True
    return perturb_(model, seed), cfg


def make_transformers(hidden_act: str = "quick_gelu", seed: int = 0):
    """A perturbed random transformers ``CLIPModel`` (vision 96 wide / 3 heads, text 64 / 4 heads)."""
    import torch
    from transformers import CLIPConfig, CLIPModel

    torch.manual_seed(seed)
    config = CLIPConfig(
        text_config=dict(hidden_size=64, intermediate_size=256, num_attention_heads=4, num_hidden_layers=2,
                         max_position_embeddings=16, vocab_size=100, hidden_act=hidden_act,
                         bos_token_id=98, eos_token_id=99, pad_token_id=0),
        vision_config=dict(hidden_size=96, intermediate_size=192, num_attention_heads=3, num_hidden_layers=2,
                           image_size=32, patch_size=8, hidden_act=hidden_act),
        projection_dim=48,
    )
    return perturb_(CLIPModel(config), seed)


def torch_state(model) -> dict:
    """The model's state dict as contiguous CPU tensors (safetensors wants them unshared)."""
    return {k: v.detach().cpu().contiguous().clone() for k, v in model.state_dict().items()}


def write_tokenizer_files(directory) -> None:
    """Placeholder tokenizer files (enough for a directory to count as having a tokenizer)."""
    d = pathlib.Path(directory)
    (d / "vocab.json").write_text(json.dumps({"a</w>": 0, "<|endoftext|>": 1}))
    (d / "merges.txt").write_text("#version: 0.2\n")


def write_openclip_hub(model, model_cfg: dict, directory, safetensors: bool = True) -> pathlib.Path:
    """The OpenCLIP hub layout: ``open_clip_config.json`` + ``open_clip_model.safetensors``
    (or ``open_clip_pytorch_model.bin``)."""
    import torch

    d = pathlib.Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    doc = {"model_cfg": model_cfg, "preprocess_cfg": {"mean": [0.48145466, 0.4578275, 0.40821073],
                                                      "std": [0.26862954, 0.26130258, 0.27577711]}}
    (d / "open_clip_config.json").write_text(json.dumps(doc, indent=2))
    state = torch_state(model)
    if safetensors:
        from safetensors.torch import save_file

        save_file(state, str(d / "open_clip_model.safetensors"))
    else:
        torch.save(state, d / "open_clip_pytorch_model.bin")
    return d


def write_transformers(model, directory, safetensors: bool = True, tokenizer: bool = True) -> pathlib.Path:
    """transformers' layout: ``config.json`` + ``model.safetensors`` (``save_pretrained``), or
    ``pytorch_model.bin`` as older transformers wrote it, ``position_ids`` buffers included."""
    import torch

    d = pathlib.Path(directory)
    if safetensors:
        model.save_pretrained(d)
    else:
        d.mkdir(parents=True, exist_ok=True)
        model.config.save_pretrained(d)
        state = torch_state(model)
        cfg = model.config
        state["vision_model.embeddings.position_ids"] = torch.arange(
            (cfg.vision_config.image_size // cfg.vision_config.patch_size) ** 2 + 1)[None]
        state["text_model.embeddings.position_ids"] = torch.arange(cfg.text_config.max_position_embeddings)[None]
        torch.save(state, d / "pytorch_model.bin")
    if tokenizer:
        write_tokenizer_files(d)
    return d


def write_openai_torchscript(model, path, image_size: int) -> pathlib.Path:
    """An OpenAI-style TorchScript ``.pt``: traced, fp16, with the scalar buffers OpenAI keeps."""
    import copy

    import torch

    model = copy.deepcopy(model)  # the traced copy is cast to fp16, not the caller's model

    class Archive(torch.nn.Module):
        def __init__(self):
            super().__init__()
            for k, v in model.named_children():
                setattr(self, k, v)
            for k, v in model.named_parameters(recurse=False):
                setattr(self, k, v)
            for k, v in model.named_buffers(recurse=False):
                self.register_buffer(k, v)
            for k, v in dict(input_resolution=image_size, context_length=model.context_length,
                             vocab_size=model.vocab_size).items():
                self.register_buffer(k, torch.tensor(v))

        def forward(self, x):
            return self.visual(x)

    traced = torch.jit.trace(Archive().eval(), (torch.zeros(1, 3, image_size, image_size),), check_trace=False)
    torch.jit.save(traced.half(), str(path))
    return pathlib.Path(path)


def write_state_dict_pt(model, path, nested: bool = True) -> pathlib.Path:
    """A plain fp16 state dict ``.pt``; ``nested``: as a training checkpoint (``state_dict``,
    ``module.`` prefixes)."""
    import torch

    state = {k: v.half() if v.is_floating_point() else v for k, v in torch_state(model).items()}
    if nested:
        state = {"epoch": 32, "state_dict": {f"module.{k}": v for k, v in state.items()}}
    torch.save(state, path)
    return pathlib.Path(path)


def round_to_fp16_(model):
    """Rounds the weights to fp16 and back, in place (the reference for fp16 files)."""
    import torch

    with torch.no_grad():
        for p in model.parameters():
            p.copy_(p.half().float())
    return model


def tiny_inputs(image_size: int = 32, context: int = 16, vocab: int = 100, seed: int = 0):
    """(2, 3, S, S) float32 pixels and (3, context) ids whose end token (vocab - 1) is the max."""
    rng = np.random.default_rng(seed)
    pixels = rng.standard_normal((2, 3, image_size, image_size)).astype(np.float32)
    ids = np.zeros((3, context), np.int64)
    for row, end in enumerate((4, 9, context - 1)):
        ids[row, 0] = vocab - 2
        ids[row, 1:end] = rng.integers(1, vocab - 2, end - 1)
        ids[row, end] = vocab - 1
    return pixels, ids


def l2n(x) -> np.ndarray:
    x = np.asarray(x, np.float64)
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def jax_embeddings(config, params, pixels_nchw, ids, posemb_method: str = "bicubic_aa"):
    """L2-normalised image and text embeddings of gem-jax's CLIP at full matmul precision."""
    import jax
    import jax.numpy as jnp

    from gem_jax.models import CLIP

    model = CLIP(config, posemb_method=posemb_method)
    variables = {"params": jax.tree_util.tree_map(jnp.asarray, params)}
    with jax.default_matmul_precision("highest"):
        img = model.apply(variables, jnp.asarray(pixels_nchw.transpose(0, 2, 3, 1)), method=CLIP.encode_image)
        txt = model.apply(variables, jnp.asarray(ids, jnp.int32), method=CLIP.encode_text)
    return l2n(img), l2n(txt)


class FakeHub:
    """Stands in for ``huggingface_hub.hf_hub_download``: serves files of local "repositories"
    through a fake cache, and records every call."""

    def __init__(self, root: pathlib.Path):
        self.repos: dict[str, pathlib.Path] = {}
        self.cache = root / "hf-cache"
        self.calls: list[tuple[str, str, bool]] = []
        self.network = True

    def add_repo(self, repo_id: str, directory) -> None:
        self.repos[repo_id] = pathlib.Path(directory)

    def hf_hub_download(self, repo_id, filename, *, local_files_only=False, **kwargs):
        from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError

        self.calls.append((repo_id, filename, local_files_only))
        cached = self.cache / repo_id.replace("/", "--") / filename
        if cached.is_file():
            return str(cached)
        if local_files_only or not self.network:
            raise LocalEntryNotFoundError(f"{repo_id}/{filename} is not cached and the network is off")
        src = self.repos.get(repo_id)
        if src is None or not (src / filename).is_file():
            raise EntryNotFoundError(f"{filename} not found in {repo_id}")
        cached.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src / filename, cached)
        return str(cached)

    def snapshot_download(self, *args, **kwargs):
        raise AssertionError("snapshot_download is not expected to be called")


@pytest.fixture(scope="session")
def clip_kit():
    """The builders above as one namespace: tiny models, layout writers, inputs, embeddings."""
    return types.SimpleNamespace(
        TINY_OPENCLIP_CFG=TINY_OPENCLIP_CFG, TINY_OPENAI_CFG=TINY_OPENAI_CFG, perturb_=perturb_,
        make_openclip=make_openclip, make_transformers=make_transformers, torch_state=torch_state,
        write_tokenizer_files=write_tokenizer_files, write_openclip_hub=write_openclip_hub,
        write_transformers=write_transformers, write_openai_torchscript=write_openai_torchscript,
        write_state_dict_pt=write_state_dict_pt, round_to_fp16_=round_to_fp16_, tiny_inputs=tiny_inputs,
        l2n=l2n, jax_embeddings=jax_embeddings,
    )


@pytest.fixture
def fake_hub(tmp_path, monkeypatch):
    """A :class:`FakeHub` patched into ``huggingface_hub``, with ``GEM_JAX_WEIGHTS`` set to an
    empty ``tmp_path/"weights"`` and ``HF_HUB_OFFLINE`` unset."""
    import huggingface_hub

    hub = FakeHub(tmp_path)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", hub.hf_hub_download)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", hub.snapshot_download)
    from gem_jax.checkpoints import hub as gem_hub

    monkeypatch.setattr(gem_hub, "_hub_reachable", lambda endpoint, timeout=None: True)  # the fake hub answers
    monkeypatch.setenv("GEM_JAX_WEIGHTS", str(tmp_path / "weights"))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    return hub


_PARITY: list[tuple[str, str, float]] = []


@pytest.fixture
def parity(request):
    """``parity(what, ours, reference) -> max abs difference``, also listed at the end of the run.

    The parity tests assert on the returned figure; the summary shows every figure
    measured, so the README's parity claims can be checked with the test command.
    """
    def record(what: str, ours, reference) -> float:
        ours, reference = np.asarray(ours, np.float64), np.asarray(reference, np.float64)
        assert ours.shape == reference.shape, (what, ours.shape, reference.shape)
        diff = float(np.max(np.abs(ours - reference)))
        # carried by the test's report, so the summary has it with pytest-xdist workers too
        request.node.user_properties.append(("parity", (request.node.nodeid.split("::", 1)[-1], what, diff)))
        return diff

    return record


def pytest_runtest_logreport(report):
    if report.when == "call":
        _PARITY.extend(tuple(value) for key, value in report.user_properties if key == "parity")


def pytest_terminal_summary(terminalreporter):
    if not _PARITY:
        return
    terminalreporter.write_sep("-", "parity: max abs difference from the reference, measured in this run")
    width = max(len(case) for case, _, _ in _PARITY)
    for case, what, diff in _PARITY:
        terminalreporter.write_line(f"{case:<{width}}  {what:<34} {diff:.2e}")


@pytest.fixture(scope="session", autouse=True)
def _private_caches(tmp_path_factory):
    """Every test (and every command a test starts) keeps gem-jax's on-disk caches in a
    directory of its own, never in the user's home."""
    import os

    root = tmp_path_factory.mktemp("gem-jax-cache")
    old = {k: os.environ.get(k) for k in ("GEM_JAX_CACHE", "GEM_JAX_COMPILE_CACHE")}
    os.environ["GEM_JAX_CACHE"] = str(root)
    # One XLA compilation cache for the run, in-process and for the commands tests start
    # (unless a test names its own): the same small programs compile once, not per test.
    os.environ["GEM_JAX_COMPILE_CACHE"] = str(root / "xla")
    from gem_jax.cli.common import enable_compile_cache

    enable_compile_cache(str(root / "xla"))
    yield root
    for k, v in old.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
