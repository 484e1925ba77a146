"""Checkpoints: reading every layout users download, the native format, the registry and the hub."""

from gem_jax.checkpoints.hub import ModelNotAvailableError, convert, is_converted, local_dir, resolve, weights_dir
from gem_jax.checkpoints.layouts import CheckpointError
from gem_jax.checkpoints.native import read_native, save_native
from gem_jax.checkpoints.readers import Checkpoint, read_checkpoint
from gem_jax.checkpoints.registry import (
    DEFAULT_MODEL,
    MODELS,
    ModelEntry,
    UnknownModelError,
    available_models,
    get_entry,
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
    "available_models",
    "get_entry",
    "is_converted",
    "local_dir",
    "DEFAULT_MODEL",
    "MODELS",
    "weights_dir",
]
