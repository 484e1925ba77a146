"""Loading a model: ``load()``, the :class:`Model` it returns, and the errors every command reports alike."""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import importlib.resources
import json
import pathlib
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from gem_jax import checkpoints
from gem_jax.config import CLIPConfig
from gem_jax.engine.methods import get_method
from gem_jax.tokenizer import Tokenizer

#: The title of every picture made from a model with random weights (``Model.random_weights``).
RANDOM_WEIGHTS_NOTE = "RANDOM weights: shows the mechanics, not real localisation"


#: The keyword arguments of :class:`gem_jax.GEM` a model may recommend (``Model.defaults``).
MODEL_DEFAULT_KEYS = ("method", "layers", "iterations", "temperature", "projections", "normalize", "mlp",
                      "residual", "sigma", "size", "short_side", "template")


class ModelLoadError(RuntimeError):
    """A model that cannot be loaded (not available offline, damaged or missing files): the
    message says why and what to do, in one paragraph."""


def example_image_path(model: str | None = None) -> pathlib.Path:
    """The bundled example image: "Chelsea the cat" (CC0), 451 x 300; or, for a model that
    ships inside the package with an example of its own (``toy``: a held-out scene,
    ``example.png`` beside its weights), that one."""
    folder = checkpoints.packaged_dir(model)
    if folder is not None and (folder / "example.png").is_file():
        return folder / "example.png"
    return pathlib.Path(str(importlib.resources.files("gem_jax").joinpath("data", "example.jpg")))


@dataclasses.dataclass(frozen=True, eq=False)
class Model:
    """A loaded CLIP: config, parameters (a pytree of arrays) and tokenizer.

    Attributes:
      config: the architecture.
      params: ``{"visual": ..., "text": ...}``.
      tokenizer: turns prompts into ids.
      name: where it came from (registry name, hub id or path).
      random_weights: the weights are random (``gem-jax convert --random``), not
        trained; pictures made from the model say so.
      defaults: settings the model recommends for :class:`gem_jax.GEM` (keyword
        arguments such as ``method``, ``layers``, ``size``, ``template``), used where the
        caller gives none.
    """

    config: CLIPConfig
    params: Any
    tokenizer: Tokenizer
    name: str = "model"
    random_weights: bool = False
    defaults: Mapping[str, Any] = dataclasses.field(default_factory=dict)

    def __repr__(self) -> str:
        v, t = self.config.vision, self.config.text
        count = sum(int(np.prod(np.shape(x))) for x in jax.tree_util.tree_leaves(self.params))
        return (f"Model({self.name!r}, vision {v.layers} blocks x {v.width} wide, patch {v.patch_size}, "
                f"{v.image_size}px; text {t.layers} x {t.width}; embed {self.config.embed_dim}; {v.activation}; "
                f"{count / 1e6:.1f}M parameters{'; RANDOM weights' if self.random_weights else ''})")

    @functools.cached_property
    def fingerprint(self) -> str:
        """sha256 of the parameter names, shapes, dtypes and a strided sample of every leaf's
        values: equal for the same weights however they were named or found."""
        h = hashlib.sha256()
        for path, leaf in jax.tree_util.tree_flatten_with_path(self.params)[0]:
            h.update(jax.tree_util.keystr(path).encode())
            h.update(f"{tuple(leaf.shape)}{leaf.dtype}".encode())
            # On the host: slicing on the device would compile a program per leaf shape.
            flat = np.asarray(jax.device_get(leaf)).reshape(-1)
            h.update(np.asarray(flat[::max(1, flat.size // 4096)], np.float32).tobytes())
        return h.hexdigest()

    @functools.cached_property
    def text_fingerprint(self) -> str:
        """sha256 of every value of the text tower and of the tokenizer's vocabulary: what
        prompt embeddings depend on (the key of :mod:`gem_jax.textcache`)."""
        h = hashlib.sha256()
        for path, leaf in jax.tree_util.tree_flatten_with_path(self.params["text"])[0]:
            arr = np.ascontiguousarray(jax.device_get(leaf))
            h.update(jax.tree_util.keystr(path).encode())
            h.update(f"{arr.shape}{arr.dtype}".encode())
            h.update(arr.tobytes())
        vocab = sorted(self.tokenizer.vocab.items(), key=lambda kv: kv[1])
        h.update(json.dumps([vocab, self.tokenizer.merges, self.tokenizer.context_length]).encode())
        return h.hexdigest()

    def describe(self) -> dict:
        """The model as result files record it: name, weights fingerprint, architecture, and
        whether its weights are random."""
        return {"name": self.name, "fingerprint": self.fingerprint, "random_weights": self.random_weights,
                "config": self.config.to_dict()}


def load(name_or_path: str | None = None, *, activation: str | None = None) -> Model:
    """Loads a CLIP model by registry name (``"ViT-B/16:openai"``), hub id, local
    directory or file (every layout in :mod:`gem_jax.checkpoints`).

    Registry models are downloaded once and converted into the weights directory;
    offline, a :class:`~gem_jax.checkpoints.ModelNotAvailableError` says what to
    download and where to put it. An unknown registry name raises
    :class:`~gem_jax.checkpoints.UnknownModelError`.
    """
    name = name_or_path or checkpoints.DEFAULT_MODEL
    ckpt = checkpoints.resolve(name, activation=activation)
    return model_from_checkpoint(ckpt, name)


def model_from_checkpoint(ckpt, name: str = "model") -> Model:
    """A :class:`Model` from a :class:`~gem_jax.checkpoints.Checkpoint`."""
    ctx = ckpt.config.text.context_length
    if ckpt.tokenizer_dir is not None and Tokenizer.has_files(ckpt.tokenizer_dir):
        tokenizer = Tokenizer.from_dir(ckpt.tokenizer_dir, context_length=ctx)
    else:
        tokenizer = Tokenizer.default(context_length=ctx)
    params = jax.tree_util.tree_map(jnp.asarray, ckpt.params)
    return Model(ckpt.config, params, tokenizer, name, random_weights=ckpt.random_weights,
                 defaults=dict(ckpt.defaults or {}))


def open_model(name: str | None = None) -> Model:
    """:func:`load` as every command uses it: an unknown registry name raises
    :class:`~gem_jax.checkpoints.UnknownModelError` (a usage mistake); anything else that
    stops the model from loading raises :class:`ModelLoadError` with the reason."""
    try:
        return load(name)
    except checkpoints.UnknownModelError:
        raise
    except (checkpoints.ModelNotAvailableError, checkpoints.CheckpointError) as e:
        raise ModelLoadError(str(e)) from None
    except OSError as e:
        raise ModelLoadError(f"cannot load model {name or checkpoints.DEFAULT_MODEL}: "
                             f"{e.strerror or e}{f': {e.filename}' if e.filename else ''}") from None
    except ValueError as e:  # a file of another kind, a bad config
        raise ModelLoadError(f"cannot load model {name or checkpoints.DEFAULT_MODEL}: {e}") from None


def with_model_defaults(given: dict, defaults) -> dict:
    """The settings of a :class:`gem_jax.GEM`: each given one (not ``None``), else the model's
    recommendation for it (:attr:`Model.defaults`). The recommended method options apply only
    to the recommended method (or when no other method is asked for), and only those the
    method has; the caller's sizing wins as a whole."""
    out = dict(given)
    defaults = {k: v for k, v in dict(defaults or {}).items() if k in MODEL_DEFAULT_KEYS}
    if not defaults:
        return out
    method = given["method"] if given["method"] is not None else defaults.get("method")
    own_method = given["method"] is None or given["method"] == defaults.get("method")
    has = set()
    if own_method and method is not None:
        try:
            has = set(get_method(method).options)
        except ValueError:
            has = set()
    for key, value in defaults.items():
        if out.get(key) is not None:
            continue
        if key in ("size", "short_side", "template"):
            if key in ("size", "short_side") and (given["size"] is not None or given["short_side"] is not None):
                continue  # the caller's sizing wins as a whole
            out[key] = value
        elif key == "method":
            out[key] = value
        elif key in has:
            out[key] = value
    return out
