"""Reads a CLIP checkpoint in any supported on-disk layout into a config and NumPy params."""

from __future__ import annotations

import dataclasses
import pathlib
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
from gem_jax.checkpoints.native import FORMAT as NATIVE_FORMAT
from gem_jax.checkpoints.native import read_native
from gem_jax.checkpoints.storage import (
    WEIGHT_SUFFIXES,
    Checkpoint,
    has_tokenizer_files,
    load_safetensors,
    load_torch,
    read_json,
    strip_module,
)

_ACTIVATION_HINT = ("pass activation='quick_gelu' (OpenAI and MetaCLIP weights) or activation='gelu' "
                    "(LAION weights), or --activation on the command line")


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
        return read_directory(path, activation)
    return _read_file(path, activation)


def read_directory(d: pathlib.Path, activation, only: frozenset[str] | None = None) -> Checkpoint:
    # ``only``: consider just these file names (a hub cache directory may hold more)
    names = sorted(p.name for p in d.iterdir() if not p.name.startswith(".") and (only is None or p.name in only))
    if not names:
        raise CheckpointError(f"{d} is empty: expected a checkpoint (config.json + model.safetensors, "
                              "open_clip_config.json + open_clip_model.safetensors, or a weights file)")
    tok = d if has_tokenizer_files(d) else None
    if "config.json" in names:
        cfg = read_json(d / "config.json")
        if cfg.get("format") == NATIVE_FORMAT:
            return with_activation(read_native(d), activation)
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
    weights = [n for n in names if n.endswith(WEIGHT_SUFFIXES)]
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
    config = config_from_openclip(read_json(d / "open_clip_config.json"))
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
    state = strip_module(state)
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
        state = strip_module(state)
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


def with_activation(ckpt: Checkpoint, activation) -> Checkpoint:
    if activation is None or (ckpt.config.vision.activation == activation == ckpt.config.text.activation):
        return ckpt
    return dataclasses.replace(ckpt, config=ckpt.config.with_activation(activation))


def _looks_native(state: Mapping[str, Any]) -> bool:
    return bool(state) and all("/" in k for k in state)
