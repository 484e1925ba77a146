"""What every checkpoint reader shares: the in-memory :class:`Checkpoint`, and reading the
files checkpoints are made of (JSON, safetensors, PyTorch pickles)."""

from __future__ import annotations

import dataclasses
import json
import pathlib
import zipfile
from typing import Any, Mapping

import numpy as np

from gem_jax.checkpoints.layouts import CheckpointError
from gem_jax.config import CLIPConfig

#: Files a tokenizer may consist of (transformers' CLIP tokenizer, or open_clip's BPE file).
TOKENIZER_FILES = ("vocab.json", "merges.txt", "tokenizer.json", "tokenizer_config.json",
                   "special_tokens_map.json", "added_tokens.json", "bpe_simple_vocab_16e6.txt.gz")
#: Suffixes of the weights files gem-jax reads.
WEIGHT_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin")
_TORCH_HINT = 'reading .bin/.pt/.pth checkpoints needs PyTorch: pip install "gem-jax[torch]"'


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
      defaults: the settings the checkpoint recommends for :class:`gem_jax.GEM` (native
        checkpoints may carry them).
    """

    config: CLIPConfig
    params: dict
    layout: str
    tokenizer_dir: pathlib.Path | None
    source: str
    random_weights: bool = False
    defaults: Mapping[str, Any] | None = None


def has_tokenizer_files(directory: pathlib.Path) -> bool:
    """Whether ``directory`` holds a CLIP tokenizer (BPE vocabulary and merges)."""
    d = pathlib.Path(directory)
    return ((d / "vocab.json").is_file() and (d / "merges.txt").is_file()) or (d / "tokenizer.json").is_file() \
        or (d / "bpe_simple_vocab_16e6.txt.gz").is_file()


def read_json(path: pathlib.Path) -> dict:
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


def is_torchscript(path: pathlib.Path) -> bool:
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
    scripted = is_torchscript(path)
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
    return strip_module(state), scripted


def strip_module(state: Mapping[str, Any]) -> dict:
    return {k[len("module."):] if k.startswith("module.") else k: v for k, v in state.items()}
