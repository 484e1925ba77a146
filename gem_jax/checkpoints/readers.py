"""Reads a CLIP checkpoint in any supported on-disk layout into a config and NumPy params."""

from __future__ import annotations

import dataclasses
import json
import pathlib
import zipfile
from typing import Any, Mapping

import numpy as np

from gem_jax.config import ACTIVATIONS, CLIPConfig
from gem_jax.checkpoints.layouts import (
    CheckpointError,
    config_diff,
    config_from_openclip,
    config_from_shapes,
    config_from_transformers,
    openclip_key_map,
    to_params,
    transformers_key_map,
)

#: Files a tokenizer may consist of (transformers' CLIP tokenizer, or open_clip's BPE file).
TOKENIZER_FILES = ("vocab.json", "merges.txt", "tokenizer.json", "tokenizer_config.json",
                   "special_tokens_map.json", "added_tokens.json", "bpe_simple_vocab_16e6.txt.gz")
_WEIGHT_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin")
_TORCH_HINT = 'reading .bin/.pt/.pth checkpoints needs PyTorch: pip install "gem-jax[torch]"'
_ACTIVATION_HINT = ("pass activation='quick_gelu' (OpenAI and MetaCLIP weights) or activation='gelu' "
                    "(LAION weights), or --activation on the command line")


@dataclasses.dataclass(frozen=True, eq=False)
class Checkpoint:
    """A checkpoint read into memory.

    Attributes:
      config: the architecture, checked against the tensors.
      params: ``{"visual": ..., "text": ...}`` of float32 NumPy arrays.
      layout: ``"native"``, ``"transformers"``, ``"openclip"`` or ``"openai"`` (TorchScript).
      tokenizer_dir: a directory holding tokenizer files, if the checkpoint has them.
      source: where it was read from (a path, or a description of it).
      random_weights: the weights are random (``gem-jax convert --random``), not trained.
    """

    config: CLIPConfig
    params: dict
    layout: str
    tokenizer_dir: pathlib.Path | None
    source: str
    random_weights: bool = False


def has_tokenizer_files(directory: pathlib.Path) -> bool:
    """Whether ``directory`` holds a CLIP tokenizer (BPE vocabulary and merges)."""
    d = pathlib.Path(directory)
    return ((d / "vocab.json").is_file() and (d / "merges.txt").is_file()) or (d / "tokenizer.json").is_file() \
        or (d / "bpe_simple_vocab_16e6.txt.gz").is_file()


def read_checkpoint(path, activation: str | None = None) -> Checkpoint:
    """Reads a checkpoint directory or file, detecting its layout.

    Directories: the native format (``config.json`` with ``"format": "gem-jax"``),
    transformers (``config.json`` + ``model.safetensors`` or ``pytorch_model.bin``),
    the OpenCLIP hub layout (``open_clip_config.json`` + ``open_clip_model.safetensors``
    or ``open_clip_pytorch_model.bin``), or a directory holding exactly one weights file.
    Files: an OpenAI ``.pt`` (TorchScript archive or plain state dict; QuickGELU
    unless ``activation`` says otherwise), or an OpenCLIP-layout ``.safetensors``,
    ``.bin`` or ``.pth`` state dict, whose activation must be given.

    ``activation`` (``"quick_gelu"`` or ``"gelu"``), when given, overrides what the
    checkpoint records. Anything unreadable or inconsistent raises one
    :class:`CheckpointError` naming the offending file, keys or fields.
    """
    if activation is not None and activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
    path = pathlib.Path(path).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"no such checkpoint file or directory: {path}")
    if path.is_dir():
        return _read_dir(path, activation)
    return _read_file(path, activation)


def _read_dir(d: pathlib.Path, activation, only: frozenset[str] | None = None) -> Checkpoint:
    # ``only``: consider just these file names (a hub cache directory may hold more)
    names = sorted(p.name for p in d.iterdir() if not p.name.startswith(".") and (only is None or p.name in only))
    if not names:
        raise CheckpointError(f"{d} is empty: expected a checkpoint (config.json + model.safetensors, "
                              "open_clip_config.json + open_clip_model.safetensors, or a weights file)")
    tok = d if has_tokenizer_files(d) else None
    if "config.json" in names:
        cfg = _read_json(d / "config.json")
        if cfg.get("format") == "gem-jax":
            from gem_jax.checkpoints.native import read_native

            ckpt = read_native(d)
            return _with_activation(ckpt, activation)
        is_clip = "vision_config" in cfg or "text_config" in cfg or cfg.get("model_type") == "clip"
        # a repository may hold both layouts; without transformers weights use the OpenCLIP one
        has_weights = "model.safetensors" in names or "pytorch_model.bin" in names
        if is_clip and (has_weights or "open_clip_config.json" not in names):
            return _read_transformers(d, cfg, names, activation, tok)
        if "open_clip_config.json" not in names:
            raise CheckpointError(f"{d / 'config.json'} is neither a gem-jax nor a transformers CLIPModel "
                                  f"config (model_type={cfg.get('model_type')!r})")
    if "open_clip_config.json" in names:
        return _read_openclip_hub(d, names, activation, tok)
    weights = [n for n in names if n.endswith(_WEIGHT_SUFFIXES)]
    if len(weights) == 1:
        ckpt = _read_file(d / weights[0], activation)
        return dataclasses.replace(ckpt, tokenizer_dir=tok)
    found = ", ".join(names[:10]) + (" ..." if len(names) > 10 else "")
    what = f"{len(weights)} weights files and no config to choose" if weights else "no checkpoint"
    raise CheckpointError(f"{d} holds {what} (found: {found}); expected config.json + model.safetensors "
                          "(transformers or gem-jax), open_clip_config.json + open_clip_model.safetensors "
                          "(OpenCLIP), or a single .safetensors/.pt/.pth/.bin file")


def _read_transformers(d, cfg, names, activation, tok) -> Checkpoint:
    config = config_from_transformers(cfg)
    if "model.safetensors" in names:
        weights = d / "model.safetensors"
        state = load_safetensors(weights)
    elif "pytorch_model.bin" in names:
        weights = d / "pytorch_model.bin"
        state = load_torch(weights)[0]
    else:
        sharded = " (sharded checkpoints are not supported)" if any(n.endswith(".index.json") for n in names) else ""
        raise CheckpointError(f"{d} has a transformers config.json but no model.safetensors or "
                              f"pytorch_model.bin{sharded}")
    if activation is not None:
        config = config.with_activation(activation)
    params = _checked_params(state, config, "transformers", str(weights), "config.json")
    return Checkpoint(config, params, "transformers", tok, str(d))


def _read_openclip_hub(d, names, activation, tok) -> Checkpoint:
    config = config_from_openclip(_read_json(d / "open_clip_config.json"))
    if "open_clip_model.safetensors" in names:
        weights = d / "open_clip_model.safetensors"
        state = load_safetensors(weights)
    elif "open_clip_pytorch_model.bin" in names:
        weights = d / "open_clip_pytorch_model.bin"
        state = load_torch(weights)[0]
    else:
        raise CheckpointError(f"{d} has open_clip_config.json but no open_clip_model.safetensors or "
                              "open_clip_pytorch_model.bin")
    if activation is not None:
        config = config.with_activation(activation)
    params = _checked_params(state, config, "openclip", str(weights), "open_clip_config.json")
    return Checkpoint(config, params, "openclip", tok, str(d))


def _read_file(path: pathlib.Path, activation) -> Checkpoint:
    suffix = path.suffix.lower()
    if path.name in ("config.json", "open_clip_config.json"):
        raise CheckpointError(f"{path} is a config file: pass the directory that holds it and the weights")
    if suffix == ".safetensors":
        state = load_safetensors(path)
        if _looks_native(state):
            raise CheckpointError(f"{path} is the tensor file of a gem-jax native checkpoint: pass its directory "
                                  f"({path.parent})")
        layout, default_act = "openclip", None
    elif suffix in (".pt", ".pth", ".bin"):
        state, scripted = load_torch(path)
        layout = "openai" if scripted else "openclip"
        # OpenAI publishes .pt files, all QuickGELU; other pickles carry no hint.
        default_act = "quick_gelu" if suffix == ".pt" else None
    else:
        raise CheckpointError(f"{path}: unknown checkpoint file type {suffix or '(no suffix)'!r}; expected a "
                              "directory, or a .safetensors/.pt/.pth/.bin file")
    state = _strip_module(state)
    if any(k.startswith(("vision_model.", "text_model.")) for k in state):
        raise CheckpointError(f"{path} holds transformers-layout tensors; put it in a directory with its "
                              "config.json and pass the directory")
    act = activation or default_act
    if act is None:
        raise CheckpointError(f"{path} does not record its activation (QuickGELU or exact GELU); "
                              + _ACTIVATION_HINT)
    config = config_from_shapes({k: np.shape(v) for k, v in state.items()}, "openclip", act)
    params = to_params(state, config, openclip_key_map(config), source=str(path))
    return Checkpoint(config, params, layout, None, str(path))


def _checked_params(state, config: CLIPConfig, layout: str, source: str, config_name: str) -> dict:
    """``to_params``, and on failure also the config fields the tensors contradict."""
    key_map = transformers_key_map(config) if layout == "transformers" else openclip_key_map(config)
    if layout == "openclip":
        state = _strip_module(state)
    try:
        return to_params(state, config, key_map, source=source)
    except CheckpointError as e:
        try:
            implied = config_from_shapes({k: np.shape(v) for k, v in state.items()}, layout, config.vision.activation)
        except CheckpointError:
            raise e from None
        diff = config_diff(config, implied, ignore=("heads", "activation"))
        if not diff:
            raise
        fields = "; ".join(d.replace(" != ", " in the config, ", 1) + " in the tensors" for d in diff)
        raise CheckpointError(f"{config_name} disagrees with the tensors of {source}: {fields}. {e}") from None


def _with_activation(ckpt: Checkpoint, activation) -> Checkpoint:
    if activation is None or (ckpt.config.vision.activation == activation == ckpt.config.text.activation):
        return ckpt
    return dataclasses.replace(ckpt, config=ckpt.config.with_activation(activation))


def _looks_native(state: Mapping[str, Any]) -> bool:
    return bool(state) and all("/" in k for k in state)


def _strip_module(state: Mapping[str, Any]) -> dict:
    return {k[len("module."):] if k.startswith("module.") else k: v for k, v in state.items()}


def _read_json(path: pathlib.Path) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            d = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"cannot read {path}: {e}") from None
    if not isinstance(d, dict):
        raise CheckpointError(f"{path} is not a JSON object")
    return d


def load_safetensors(path) -> dict[str, np.ndarray]:
    """All tensors of a ``.safetensors`` file as NumPy arrays (bfloat16 upcast to float32).

    A truncated or corrupt file raises :class:`CheckpointError`.
    """
    from safetensors import safe_open

    path = pathlib.Path(path)
    out = {}
    try:
        with safe_open(str(path), framework="numpy") as f:
            for key in f.keys():
                if f.get_slice(key).get_dtype() == "BF16":  # NumPy has no bfloat16
                    out[key] = _load_bf16(path, key)
                else:
                    out[key] = f.get_tensor(key)
    except CheckpointError:
        raise
    except Exception as e:  # SafetensorError, OSError, ...: the rust binding raises several types
        raise CheckpointError(f"cannot read {path}: not a valid safetensors file, truncated or corrupt? "
                              f"({type(e).__name__}: {e})") from None
    return out


def _load_bf16(path, key):
    from safetensors import safe_open

    with safe_open(str(path), framework="flax") as f:
        return np.asarray(f.get_tensor(key).astype("float32"))


def _is_torchscript(path: pathlib.Path) -> bool:
    try:
        with zipfile.ZipFile(path) as z:
            return any(n.endswith("/constants.pkl") or "/code/" in n for n in z.namelist())
    except (zipfile.BadZipFile, OSError):
        return False


def load_torch(path) -> tuple[dict[str, np.ndarray], bool]:
    """A ``.pt``/``.pth``/``.bin`` state dict as NumPy float32 arrays, and whether it was TorchScript.

    TorchScript archives (OpenAI's releases) go through ``torch.jit.load``; anything
    else through ``torch.load(weights_only=True)``, so no arbitrary pickle runs. A
    training checkpoint's ``"state_dict"`` is used and ``module.`` prefixes dropped.
    """
    path = pathlib.Path(path)
    try:
        import torch
    except ImportError:
        raise CheckpointError(f"{path}: {_TORCH_HINT}") from None
    scripted = _is_torchscript(path)
    try:
        if scripted:
            obj = torch.jit.load(str(path), map_location="cpu").state_dict()
        else:
            obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:  # UnpicklingError, RuntimeError, EOFError, ...: one message for all
        raise CheckpointError(f"cannot read {path} with torch: truncated, corrupt or not a state dict? "
                              f"({type(e).__name__}: {e})") from None
    if isinstance(obj, Mapping) and isinstance(obj.get("state_dict"), Mapping):
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{path} does not hold a state dict (got {type(obj).__name__})")
    state, bad = {}, []
    for k, v in obj.items():
        if not isinstance(v, torch.Tensor):
            bad.append(str(k))
            continue
        v = v.detach().cpu()
        state[str(k)] = (v.float() if v.is_floating_point() else v).numpy()
    if bad:
        raise CheckpointError(f"{path}: entries that are not tensors: {', '.join(sorted(bad)[:8])}")
    return _strip_module(state), scripted
