"""Checkpoints: reading every layout users download, the native format, the registry and the hub."""

from gem_jax.checkpoints.hub import (
    ModelNotAvailableError,
    convert,
    convert_random,
    is_converted,
    local_dir,
    local_folders,
    local_state,
    resolve,
    weights_dir,
)
from gem_jax.checkpoints.layouts import CheckpointError
from gem_jax.checkpoints.native import read_native, save_native
from gem_jax.checkpoints.readers import Checkpoint, read_checkpoint
from gem_jax.checkpoints.registry import (
    DEFAULT_MODEL,
    MODELS,
    ModelEntry,
    UnknownModelError,
    available_models,
    canonical_name,
    get_entry,
    packaged_dir,
)

__all__ = [
    "Checkpoint",
    "CheckpointError",
    "ModelNotAvailableError",
    "UnknownModelError",
    "ModelEntry",
    "read_checkpoint",
    "save_native",
    "read_native",
    "resolve",
    "convert",
    "convert_random",
    "available_models",
    "canonical_name",
    "get_entry",
    "packaged_dir",
    "is_converted",
    "local_dir",
    "local_state",
    "local_folders",
    "DEFAULT_MODEL",
    "MODELS",
    "weights_dir",
]
