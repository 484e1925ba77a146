"""The user-facing objects: ``load()`` and ``GEM(...).heatmaps / .segment``."""

from __future__ import annotations

import dataclasses
import functools
import importlib.resources
import pathlib
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from gem_jax import gem as gem_lib
from gem_jax import preprocess
from gem_jax.config import CLIPConfig
from gem_jax.models import TextTransformer, VisionTransformer
from gem_jax.models.layers import l2_normalize, resize_2d
from gem_jax.tokenizer import Tokenizer

DEFAULT_TEMPLATE = "a photo of a {}."
#: CLIP's logit scale, used for the class softmax of :meth:`GEM.segment`.
LOGIT_SCALE = 100.0

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


@functools.lru_cache(maxsize=1)
def imagenet_templates() -> tuple[str, ...]:
    """The 80 ImageNet prompt templates of CLIP's zero-shot evaluation."""
    text = importlib.resources.files("gem_jax").joinpath("data", "imagenet_templates.txt").read_text("utf-8")
    return tuple(line for line in text.splitlines() if line)


def example_image_path() -> pathlib.Path:
    """The bundled example image: "Chelsea the cat" (CC0), 451 x 300."""
    return pathlib.Path(str(importlib.resources.files("gem_jax").joinpath("data", "example.jpg")))


@dataclasses.dataclass(frozen=True, eq=False)
class Model:
    """A loaded CLIP: config, parameters (a pytree of arrays) and tokenizer.

    Attributes:
      config: the architecture.
      params: ``{"visual": ..., "text": ...}``.
      tokenizer: turns prompts into ids.
      name: where it came from (registry name, hub id or path).
    """

    config: CLIPConfig
    params: Any
    tokenizer: Tokenizer
    name: str = "model"


def load(name_or_path: str | None = None, *, activation: str | None = None) -> Model:
    """Loads a CLIP model by registry name (``"ViT-B/16:openai"``), hub id, local
    directory or file (every layout in :mod:`gem_jax.checkpoints`).

    Registry models are downloaded once and converted into the weights directory;
    offline, a :class:`~gem_jax.checkpoints.ModelNotAvailableError` says what to
    download and where to put it.
    """
    from gem_jax import checkpoints

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
    return Model(ckpt.config, params, tokenizer, name)


@dataclasses.dataclass(frozen=True)
class HeatmapOutput:
    """What :meth:`GEM.heatmaps` returns.

    Attributes:
      logits: raw cosine similarities upsampled to the model input size:
        (B, P, H, W) when every image shares a size and a prompt count, else a list
        of (P_i, H_i, W_i) arrays. With ``heatmaps(..., grid=True)``: the patch-grid
        logits (B, P, h, w) before upsampling (or a list of (P_i, h_i, w_i)).
      heatmaps: ``logits`` min-max scaled per image and prompt, same layout
        (``None`` with ``grid=True``).
      prompts: the prompts of each image.
      sizes: the model input size (H, W) of each image.
    """

    logits: Any
    heatmaps: Any
    prompts: list[list[str]]
    sizes: list[tuple[int, int]]


def _bucket(n: int, smallest: int) -> int:
    """The next power of two >= n (and >= smallest): padded shapes that jit compiles once."""
    return max(smallest, 1 << max(n - 1, 0).bit_length())


def _prompt_sets(prompts, n_images: int) -> list[list[str]]:
    if isinstance(prompts, str):
        prompts = [prompts]
    prompts = list(prompts)
    if not prompts:
        raise ValueError("no prompts given")
    if all(isinstance(p, str) for p in prompts):
        sets = [prompts] * n_images
    elif all(isinstance(p, (list, tuple)) for p in prompts):
        if len(prompts) != n_images:
            raise ValueError(f"got {len(prompts)} prompt lists for {n_images} images; give one list per image "
                             "or one list for all")
        sets = [list(p) for p in prompts]
    else:
        raise ValueError("prompts must be a list of strings or a list of lists of strings")
    for i, s in enumerate(sets):
        if not s:
            raise ValueError(f"image {i} has an empty prompt list")
        for p in s:
            if not isinstance(p, str) or not p.strip():
                raise ValueError(f"prompts must be non-empty strings, got {p!r}")
    return sets


class GEM:
    """Open-vocabulary heatmaps and segmentation from a CLIP model with the GEM path.

    Holds only the options, the model and jitted callables. Images of one size go
    through the tower in padded batches (``batch_size`` at most, padded to powers of
    two) and prompt sets are padded to buckets with a validity mask, so new batch
    sizes and prompt counts rarely recompile.

    Args:
      model: a :class:`Model` from :func:`load`.
      method: ``"gem"`` or ``"clip"`` (the plain CLIP patch tokens).
      layers, iterations, temperature, projections, normalize, mlp: see
        :class:`gem_jax.gem.GEMOptions`.
      size: model input size, an int (square) or (H, W); default 448 when
        ``short_side`` is not given.
      short_side: resize the shorter side to this, keeping the aspect (the paper's
        evaluation).
      template: prompt template with ``{}``; a sequence of templates is an
        ensemble (normalised embeddings averaged and renormalised); ``"imagenet"``
        is the 80 ImageNet templates.
      batch_size: most images per forward pass.
      dtype: compute dtype, ``"float32"`` or ``"bfloat16"`` (LayerNorm, softmax and
        normalisation stay float32).
      schedule: a :class:`gem_jax.gem.Schedule` (chunking over images and heads; it
        never changes results), or ``"auto"`` for the fastest measured on this backend
        at each input size.
      devices: devices to spread image batches over (a ``jax.make_mesh`` data axis:
        images sharded, parameters and text replicated); default all local devices.
    """

    def __init__(self, model: Model, *, method: str = "gem", layers: int = 6, iterations: int = 1,
                 temperature: float | None = None, projections: Sequence[str] = gem_lib.PROJECTIONS,
                 normalize: bool = True, mlp: bool = False, size: int | tuple[int, int] | None = None,
                 short_side: int | None = None, template: str | Sequence[str] = DEFAULT_TEMPLATE,
                 batch_size: int = 8, dtype: str = "float32", schedule: gem_lib.Schedule | str = "auto",
                 devices: Sequence[Any] | None = None):
        if method not in gem_lib.METHODS:
            raise ValueError(f"method must be one of {gem_lib.METHODS}, got {method!r}")
        if dtype not in _DTYPES:
            raise ValueError(f"dtype must be one of {tuple(_DTYPES)}, got {dtype!r}")
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        self.model = model
        self.method = method
        self.options = gem_lib.GEMOptions(layers=layers, iterations=iterations, temperature=temperature,
                                          projections=tuple(projections), normalize=normalize, mlp=mlp)
        if method == "gem" and self.options.layers > model.config.vision.layers:
            raise ValueError(f"layers={layers} exceeds the model's {model.config.vision.layers} vision blocks")
        self.size, self.short_side = size, short_side
        preprocess.target_size(224, 224, size=size, short_side=short_side,
                               patch_size=model.config.vision.patch_size)  # validates early
        self.templates = self._templates(template)
        self.batch_size = batch_size
        self.dtype = dtype
        compute = _DTYPES[dtype]
        cfg = model.config
        self._vit = VisionTransformer(cfg.vision, cfg.embed_dim, dtype=compute)
        self._text = TextTransformer(cfg.text, cfg.embed_dim, dtype=compute)
        self._text_cache: dict[str, np.ndarray] = {}
        gem_lib.Schedule.resolve(schedule)  # validates
        self.schedule = schedule
        devices = list(jax.local_devices() if devices is None else devices)
        if not devices:
            raise ValueError("no devices given")
        self.mesh = jax.make_mesh((len(devices),), ("data",), axis_types=(jax.sharding.AxisType.Auto,),
                                  devices=devices)
        replicated, data = NamedSharding(self.mesh, P()), NamedSharding(self.mesh, P("data"))
        self._vparams = jax.device_put(model.params["visual"], replicated)
        opts = self.options if method == "gem" else None
        # Each device runs the plain single-device program on its share of the batch.
        per_device = jax.shard_map(functools.partial(_image_maps, self._vit, opts, schedule), mesh=self.mesh,
                                   in_specs=(P(), P("data"), P("data"), P("data")),
                                   out_specs=(P("data"), P("data")))
        self._maps = jax.jit(per_device, in_shardings=(replicated, data, data, data), out_shardings=(data, data))
        per_device_grid = jax.shard_map(functools.partial(_grid_logits, self._vit, opts, schedule), mesh=self.mesh,
                                        in_specs=(P(), P("data"), P("data"), P("data")), out_specs=P("data"))
        self._grid = jax.jit(per_device_grid, in_shardings=(replicated, data, data, data), out_shardings=data)
        self._encode_text = jax.jit(lambda p, ids: l2_normalize(self._text.apply({"params": p}, ids)))

    @staticmethod
    def _templates(template) -> tuple[str, ...]:
        if isinstance(template, str):
            templates = imagenet_templates() if template == "imagenet" else (template,)
        else:
            templates = tuple(template)
        if not templates:
            raise ValueError("no prompt template given")
        for t in templates:
            if not isinstance(t, str) or "{}" not in t:
                raise ValueError(f"a prompt template must be a string containing '{{}}', got {t!r}")
        return templates

    def embed_text(self, prompts: Sequence[str]) -> np.ndarray:
        """L2-normalised text embeddings (P, D) of ``prompts`` under the template(s).

        Each distinct prompt is encoded once and cached on this object.
        """
        todo = list(dict.fromkeys(p for p in prompts if p not in self._text_cache))
        if todo:
            texts = [t.format(p) for p in todo for t in self.templates]
            emb = self._encode_texts(texts).reshape(len(todo), len(self.templates), -1)
            if len(self.templates) > 1:
                emb = emb.mean(axis=1)
                emb = emb / np.maximum(np.linalg.norm(emb, axis=-1, keepdims=True), 1e-12)
            else:
                emb = emb[:, 0]
            self._text_cache.update(zip(todo, emb))
        return np.stack([self._text_cache[p] for p in prompts])

    def _encode_texts(self, texts: list[str], chunk: int = 256) -> np.ndarray:
        ids = self.model.tokenizer(texts)
        out = []
        for i in range(0, len(ids), chunk):
            part = ids[i:i + chunk]
            padded = np.zeros((_bucket(len(part), 8), ids.shape[1]), ids.dtype)
            padded[:len(part)] = part
            out.append(np.asarray(self._encode_text(self.model.params["text"], padded))[:len(part)])
        return np.concatenate(out).astype(np.float32)

    def _input_size(self, image: np.ndarray, size, short_side) -> tuple[int, int]:
        if size is None and short_side is None:
            size, short_side = self.size, self.short_side
        return preprocess.target_size(*image.shape[:2], size=size, short_side=short_side,
                                      patch_size=self.model.config.vision.patch_size)

    def heatmaps(self, images, prompts, *, size=None, short_side=None, grid: bool = False) -> HeatmapOutput:
        """Where each prompt is in each image.

        Args:
          images: a path, PIL image or array (H, W, 3); a batch array (B, H, W, 3); or
            a list of those. uint8, or float in [0, 1].
          prompts: one list of strings for all images, or one list per image (the
            lists may differ in length).
          size, short_side: override the object's sizing for this call.
          grid: return the patch-grid logits (P, h, w) per image instead, without the
            upsampling to the input size (``heatmaps`` is then ``None``): a fraction of
            the memory with many prompts. Upsampling them bilinearly to the input size
            and min-max scaling gives the default output.
        Returns:
          :class:`HeatmapOutput` with raw cosine ``logits`` and min-max ``heatmaps``.
        """
        images = preprocess.as_image_list(images)
        sets = _prompt_sets(prompts, len(images))
        sizes = [self._input_size(im, size, short_side) for im in images]
        distinct = list(dict.fromkeys(p for s in sets for p in s))
        table = dict(zip(distinct, self.embed_text(distinct)))
        p_bucket = _bucket(max(len(s) for s in sets), 8)
        dim = self.model.config.embed_dim

        logits: list = [None] * len(images)
        heat: list = [None] * len(images)
        by_size: dict[tuple[int, int], list[int]] = {}
        for i, hw in enumerate(sizes):
            by_size.setdefault(hw, []).append(i)
        for hw, members in by_size.items():
            for start in range(0, len(members), self.batch_size):
                idx = members[start:start + self.batch_size]
                b = -(-_bucket(len(idx), 1) // self.mesh.size) * self.mesh.size  # whole shards per device
                pixels = np.zeros((b, *hw, 3), np.float32)
                text = np.zeros((b, p_bucket, dim), np.float32)
                mask = np.zeros((b, p_bucket), bool)
                for row, i in enumerate(idx):
                    pixels[row] = preprocess.normalize(preprocess.resize(images[i], hw))
                    text[row, :len(sets[i])] = [table[p] for p in sets[i]]
                    mask[row, :len(sets[i])] = True
                if grid:
                    lg, hm = jax.device_get(self._grid(self._vparams, pixels, text, mask)), None
                else:
                    lg, hm = jax.device_get(self._maps(self._vparams, pixels, text, mask))
                for row, i in enumerate(idx):
                    logits[i] = lg[row, :len(sets[i])]
                    heat[i] = None if hm is None else hm[row, :len(sets[i])]
        if len(set(sizes)) == 1 and len({len(s) for s in sets}) == 1:
            logits = np.stack(logits)
            heat = None if grid else np.stack(heat)
        elif grid:
            heat = None
        return HeatmapOutput(logits, heat, sets, sizes)

    def segment(self, image, class_names: Sequence[str], background_threshold: float | None = 0.85,
                *, size=None, short_side=None) -> np.ndarray:
        """A label map (H, W) at the model input size: 0 is background, ``k + 1`` is
        ``class_names[k]``.

        The class probabilities are the softmax over classes of ``100 * cosine``; a
        pixel whose top probability is below ``background_threshold`` is background
        (``None``: every pixel gets a class).
        """
        if isinstance(class_names, str):
            class_names = [class_names]
        if background_threshold is not None and not 0.0 <= background_threshold <= 1.0:
            raise ValueError(f"background_threshold must be in [0, 1], got {background_threshold!r}")
        images = preprocess.as_image_list(image)
        if len(images) != 1:
            raise ValueError(f"segment takes one image, got {len(images)}")
        out = self.heatmaps(images, [list(class_names)], size=size, short_side=short_side)
        return labels_from_logits(np.asarray(out.logits[0]), background_threshold)


def labels_from_logits(logits: np.ndarray, background_threshold: float | None = 0.85) -> np.ndarray:
    """(P, H, W) cosine logits -> (H, W) int32 labels, 0 background, ``k + 1`` class k."""
    scaled = LOGIT_SCALE * logits.astype(np.float64)
    scaled -= scaled.max(axis=0, keepdims=True)
    probs = np.exp(scaled)
    probs /= probs.sum(axis=0, keepdims=True)
    labels = probs.argmax(axis=0).astype(np.int32) + 1
    if background_threshold is not None:
        labels[probs.max(axis=0) < background_threshold] = 0
    return labels


def _grid_logits(vit, opts, schedule, params, pixels, text, mask):
    """(B, H, W, 3) pixels, text sets (B, P, D) and mask (B, P) -> (B, P, h, w) patch-grid
    cosine logits; invalid prompts are zero."""
    grid = vit.grid_shape(pixels)
    tokens = gem_lib.vision_tokens(vit, params, pixels, opts, want_clip=opts is None, schedule=schedule)
    tokens = tokens["gem"] if opts is not None else tokens["clip"]
    sims = gem_lib.patch_logits(tokens, text, grid)
    return jnp.where(mask[:, :, None, None], sims, 0.0)


def _image_maps(vit, opts, schedule, params, pixels, text, mask):
    """(B, H, W, 3) pixels and per-image text sets (B, P, D) with validity mask (B, P)
    -> (logits, heatmaps), each (B, P, H, W); invalid prompts are zero."""
    grid = vit.grid_shape(pixels)
    tokens = gem_lib.vision_tokens(vit, params, pixels, opts, want_clip=opts is None, schedule=schedule)
    tokens = tokens["gem"] if opts is not None else tokens["clip"]

    def one_image(tok, txt, valid):
        sims = gem_lib.patch_logits(tok[None], txt, grid)[0]  # (P, h, w)
        maps = resize_2d(sims, pixels.shape[1:3], "bilinear", axes=(-2, -1))
        maps = jnp.where(valid[:, None, None], maps, 0.0)
        return maps, gem_lib.min_max(maps)

    return jax.vmap(one_image)(tokens, text, mask)
