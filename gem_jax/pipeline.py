"""The user-facing objects: ``load()`` and ``GEM(...).heatmaps / .segment``."""

from __future__ import annotations

import dataclasses
import functools
import importlib.resources
import pathlib
import string
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
from gem_jax.tokenizer import Tokenizer, first_duplicate

#: The title of every picture made from a model with random weights (``Model.random_weights``).
RANDOM_WEIGHTS_NOTE = "RANDOM weights: shows the mechanics, not real localisation"
DEFAULT_TEMPLATE = "a photo of a {}."
#: CLIP's logit scale, used for the class softmax of :meth:`GEM.segment`.
LOGIT_SCALE = 100.0

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
#: With ``short_side`` sizing the long side is capped at this many pixels, the aspect kept
#: (``GEM(max_long_side=None)`` lifts it): a 5 x 5000 strip at short side 448 would
#: otherwise ask for a 448 x 448000 input.
MAX_LONG_SIDE = 2048
#: Most prompts per forward call: larger sets go through in chunks (the image tower runs
#: once per chunk), so working memory stays flat in the number of prompts.
PROMPT_CHUNK = 128


class MemoryLimitError(RuntimeError):
    """A call would need more memory than is available; the message says how much and what to change."""


def estimate_memory(config: CLIPConfig, hw: tuple[int, int], images: int = 1, prompts: int = 1, *,
                    method: str = "gem", projections: Sequence[str] = gem_lib.PROJECTIONS,
                    schedule: gem_lib.Schedule | str = "auto") -> int:
    """Bytes of working memory (beyond the parameters) one forward call needs, roughly: the
    attention maps in flight, the tower's activations and the output maps.

    Args:
      config: the model's architecture.
      hw: model input size (H, W).
      images: images in the call (the padded batch).
      prompts: prompts per image in the call (at most :data:`PROMPT_CHUNK` are used at once).
      method, projections: as for :class:`GEM` (the GEM path keeps one N x N map per projection).
      schedule: a :class:`gem_jax.gem.Schedule` or ``"auto"``.
    Returns:
      An estimate in bytes, meant to be compared with the free memory before a call (it
      errs on the high side; compilation and the host copy of the outputs come on top).
    """
    v = config.vision
    h, w = hw
    n = v.tokens((h, w))
    sched = gem_lib.Schedule.resolve(schedule, tokens=n)
    tower_images = min(images, sched.image_chunk or images)
    pairs = tower_images * v.heads if sched.head_chunk is None else min(sched.head_chunk, tower_images * v.heads)
    # logits, weights, product; GEM keeps one more per projection, the other paths one
    maps_alive = 3 + (len(projections) if method == "gem" else 0 if method == "clip" else 1)
    attention = pairs * n * n * 4 * maps_alive
    activations = tower_images * n * v.width * 4 * 16  # residual, q/k/v, MLP hidden (4x) and their copies
    outputs = images * _bucket(min(prompts, PROMPT_CHUNK), 8) * h * w * 4 * 6  # logits, heatmaps, upsampling
    return attention + activations + outputs


def available_memory(device=None) -> int | None:
    """Free bytes on ``device`` (default: the first local one): the allocator's limit less its use
    on accelerators, ``MemAvailable`` of the host on CPU; None if unknown."""
    device = device or jax.local_devices()[0]
    try:
        stats = device.memory_stats()
    except Exception:
        stats = None
    if stats and "bytes_limit" in stats:
        return int(stats["bytes_limit"]) - int(stats.get("bytes_in_use", 0))
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def _data_lines(name: str) -> tuple[str, ...]:
    text = importlib.resources.files("gem_jax").joinpath("data", name).read_text("utf-8")
    return tuple(line for line in text.splitlines() if line)


@functools.lru_cache(maxsize=1)
def imagenet_templates() -> tuple[str, ...]:
    """The 80 ImageNet prompt templates of CLIP's zero-shot evaluation."""
    return _data_lines("imagenet_templates.txt")


#: Named template sets: ``"imagenet"`` the 80 ImageNet templates (SCLIP, ClearCLIP, NACLIP),
#: ``"imagenet85"`` those plus the 5 scene templates of MaskCLIP and CLIP Surgery
#: ("there is a {} in the scene." and its kin).
TEMPLATE_SETS = ("imagenet", "imagenet85")


@functools.lru_cache(maxsize=None)
def template_set(name: str) -> tuple[str, ...]:
    """The templates of a named set (:data:`TEMPLATE_SETS`)."""
    if name == "imagenet":
        return imagenet_templates()
    if name == "imagenet85":
        return imagenet_templates() + _data_lines("scene_templates.txt")
    raise ValueError(f"unknown template set {name!r}; choose one of {', '.join(TEMPLATE_SETS)}")


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
      random_weights: the weights are random (``gem-jax convert --random``), not
        trained; pictures made from the model say so.
    """

    config: CLIPConfig
    params: Any
    tokenizer: Tokenizer
    name: str = "model"
    random_weights: bool = False

    def __repr__(self) -> str:
        v, t = self.config.vision, self.config.text
        count = sum(int(np.prod(np.shape(x))) for x in jax.tree_util.tree_leaves(self.params))
        return (f"Model({self.name!r}, vision {v.layers} blocks x {v.width} wide, patch {v.patch_size}, "
                f"{v.image_size}px; text {t.layers} x {t.width}; embed {self.config.embed_dim}; {v.activation}; "
                f"{count / 1e6:.1f}M parameters{'; RANDOM weights' if self.random_weights else ''})")


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
    return Model(ckpt.config, params, tokenizer, name, random_weights=getattr(ckpt, "random_weights", False))


@dataclasses.dataclass(frozen=True)
class HeatmapOutput:
    """What :meth:`GEM.heatmaps` returns.

    Attributes:
      logits: raw cosine similarities upsampled to the model input size (or to each
        image's own size with ``output_size="original"``): (B, P, H, W) when every
        image shares a size and a prompt count, else a list of (P_i, H_i, W_i) arrays.
        With ``heatmaps(..., grid=True)``: the patch-grid logits (B, P, h, w) before
        upsampling (or a list of (P_i, h_i, w_i)).
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
    if prompts is None or not hasattr(prompts, "__iter__") or isinstance(prompts, (bytes, dict)):
        raise ValueError(f"prompts must be a string, a list of strings or a list of lists of strings, got "
                         f"{type(prompts).__name__}")
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


def _template_fields(template: str) -> list[str] | None:
    """The replacement fields of a template (``[""]`` for one ``{}``), or None if it is malformed."""
    try:
        return [field for _, field, spec, conv in string.Formatter().parse(template) if field is not None
                for field in [field + (spec or "") + (conv or "")]]
    except ValueError:
        return None


class GEM:
    """Open-vocabulary heatmaps and segmentation from a CLIP model with the GEM path.

    Holds only the options, the model and jitted callables. Images of one size go
    through the tower in padded batches (``batch_size`` at most, padded to powers of
    two) and prompt sets are padded to buckets with a validity mask, so new batch
    sizes and prompt counts rarely recompile.

    Args:
      model: a :class:`Model` from :func:`load`.
      method: one of :data:`gem_jax.gem.METHODS`: ``"gem"``, ``"clip"`` (the plain CLIP
        patch tokens), ``"maskclip"``, ``"clipsurgery"``, ``"sclip"``, ``"clearclip"``,
        ``"naclip"`` (:data:`gem_jax.methods.TABLE` says what each changes).
      layers: last blocks with the method's path (``gem`` and ``clipsurgery``,
        default 6; the other methods change the last block only).
      residual, mlp: keep the residual / run the MLP on the path (default: the
        method's own; ``mlp`` is also GEM's Table 6 variant).
      sigma: NACLIP's neighbourhood width in patches (default 5).
      feature_surgery: CLIP Surgery's feature surgery in place of the raw cosines,
        for any method (:func:`gem_jax.methods.masked_feature_surgery`; off by
        default, also for ``clipsurgery``, whose maintainers segment without it).
      iterations, temperature, projections, normalize: GEM's, see
        :class:`gem_jax.gem.GEMOptions`.
      size: model input size, an int (square) or (H, W); default 448 when
        ``short_side`` is not given.
      short_side: resize the shorter side to this, keeping the aspect (the paper's
        evaluation).
      template: prompt template with ``{}``; a sequence of templates is an
        ensemble (normalised embeddings averaged and renormalised); ``"imagenet"``
        is the 80 ImageNet templates, ``"imagenet85"`` those and 5 scene templates.
      batch_size: most images per forward pass.
      dtype: compute dtype, ``"float32"`` or ``"bfloat16"`` (LayerNorm, softmax and
        normalisation stay float32).
      schedule: a :class:`gem_jax.gem.Schedule` (chunking over images and heads; it
        never changes results), or ``"auto"`` for the fastest measured on this backend
        at each input size.
      devices: devices to spread image batches over (a ``jax.make_mesh`` data axis:
        images sharded, parameters and text replicated); default all local devices.
      max_long_side: with ``short_side`` sizing, cap the long side at this (see
        :data:`MAX_LONG_SIDE`); ``None`` for no cap.
      memory_limit: before each forward call, :func:`estimate_memory` is compared with
        this many bytes (``"auto"``: 90% of :func:`available_memory`) and a call that
        needs more raises :class:`MemoryLimitError`; ``None`` skips the check.
    """

    def __init__(self, model: Model, *, method: str = "gem", layers: int | None = None, iterations: int = 1,
                 temperature: float | None = None, projections: Sequence[str] = gem_lib.PROJECTIONS,
                 normalize: bool = True, mlp: bool | None = None, residual: bool | None = None,
                 sigma: float | None = None, feature_surgery: bool = False,
                 size: int | tuple[int, int] | None = None,
                 short_side: int | None = None, template: str | Sequence[str] = DEFAULT_TEMPLATE,
                 batch_size: int = 8, dtype: str = "float32", schedule: gem_lib.Schedule | str = "auto",
                 devices: Sequence[Any] | None = None, max_long_side: int | None = MAX_LONG_SIDE,
                 memory_limit: int | str | None = "auto"):
        from gem_jax import methods as methods_lib

        if method not in gem_lib.METHODS:
            raise ValueError(f"method must be one of {gem_lib.METHODS}, got {method!r}")
        if dtype not in _DTYPES:
            raise ValueError(f"dtype must be one of {tuple(_DTYPES)}, got {dtype!r}")
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        self.model = model
        self.method = method
        self.options = gem_lib.GEMOptions(layers=6 if layers is None else layers, iterations=iterations,
                                          temperature=temperature, projections=tuple(projections),
                                          normalize=normalize, mlp=bool(mlp))
        #: What the method does to the last blocks (a :class:`gem_jax.methods.Method`).
        self.spec = methods_lib.get_method(method, layers=layers, residual=residual, mlp=mlp, sigma=sigma,
                                           iterations=iterations, temperature=temperature,
                                           projections=tuple(projections), normalize=normalize)
        if self.spec.blocks > model.config.vision.layers:
            raise ValueError(f"layers={self.spec.blocks} exceeds the model's {model.config.vision.layers} "
                             "vision blocks")
        self.size, self.short_side = size, short_side
        self.max_long_side = max_long_side
        preprocess.target_size(224, 224, size=size, short_side=short_side, max_long_side=max_long_side,
                               patch_size=model.config.vision.patch_size)  # validates early
        if not (memory_limit in (None, "auto") or (isinstance(memory_limit, int) and memory_limit > 0)):
            raise ValueError(f"memory_limit must be a number of bytes, 'auto' or None, got {memory_limit!r}")
        self.memory_limit = memory_limit
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
        opts = None if method == "clip" else self.spec
        # Each device runs the plain single-device program on its share of the batch.
        self._encode_text = jax.jit(lambda p, ids: l2_normalize(self._text.apply({"params": p}, ids)))
        # CLIP Surgery's single-prompt case subtracts the empty prompt's embedding.
        surgery = jnp.asarray(self.embed_text([""])[0]) if feature_surgery else None
        self.feature_surgery = feature_surgery
        per_device = jax.shard_map(functools.partial(_image_maps, self._vit, opts, schedule, surgery=surgery),
                                   mesh=self.mesh,
                                   in_specs=(P(), P("data"), P("data"), P("data")),
                                   out_specs=(P("data"), P("data")))
        self._maps = jax.jit(per_device, in_shardings=(replicated, data, data, data), out_shardings=(data, data))
        per_device_grid = jax.shard_map(functools.partial(_grid_logits, self._vit, opts, schedule, surgery=surgery),
                                        mesh=self.mesh, in_specs=(P(), P("data"), P("data"), P("data")),
                                        out_specs=P("data"))
        self._grid = jax.jit(per_device_grid, in_shardings=(replicated, data, data, data), out_shardings=data)

    @staticmethod
    def _templates(template) -> tuple[str, ...]:
        if isinstance(template, str):
            templates = template_set(template) if template in TEMPLATE_SETS else (template,)
        else:
            templates = tuple(template)
        if not templates:
            raise ValueError("no prompt template given")
        for t in templates:
            if not isinstance(t, str) or _template_fields(t) != [""]:
                raise ValueError(f"a prompt template must be a string with exactly one {{}} and no other braces "
                                 f"(write {{{{ or }}}} for a literal brace), got {t!r}")
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
                                      max_long_side=self.max_long_side if short_side is not None else None,
                                      patch_size=self.model.config.vision.patch_size)

    def memory_estimate(self, hw: tuple[int, int], images: int = 1, prompts: int = 1) -> int:
        """:func:`estimate_memory` for this object's model, method and schedule."""
        return estimate_memory(self.model.config, hw, images, prompts, method=self.method,
                               projections=self.options.projections, schedule=self.schedule)

    def check_memory(self, hw: tuple[int, int], images: int = 1, prompts: int = 1) -> None:
        """Raises :class:`MemoryLimitError` if a call at input size ``hw`` would need more than
        ``memory_limit`` (per device: images are split over the devices)."""
        if self.memory_limit is None:
            return
        limit = self.memory_limit
        if limit == "auto":
            free = available_memory(self.mesh.devices.flat[0])
            if free is None:
                return
            limit = int(0.9 * free)
        per_device = -(-images // self.mesh.size)
        need = self.memory_estimate(hw, per_device, prompts)
        if need > limit:
            gib = 2 ** 30
            raise MemoryLimitError(
                f"input size {hw[0]}x{hw[1]} with {per_device} image(s) and {prompts} prompt(s) per call needs "
                f"about {need / gib:.1f} GiB, more than the {limit / gib:.1f} GiB available: use a smaller size or "
                f"short side, schedule=Schedule(head_chunk=1, image_chunk=1), a smaller batch_size, or pass "
                f"memory_limit=None to try anyway")

    def heatmaps(self, images, prompts, *, size=None, short_side=None, output_size: str = "input", grid: bool = False) -> HeatmapOutput:
        """Where each prompt is in each image.

        Args:
          images: a path, PIL image or array (H, W, 3); a batch array (B, H, W, 3); or
            a list of those. uint8, or float in [0, 1].
          prompts: one list of strings for all images, or one list per image (the
            lists may differ in length).
          size, short_side: override the object's sizing for this call.
          output_size: ``"input"``, maps at the model input size; ``"original"``, each
            image's maps resized (bilinearly) to that image's own height and width.
          grid: return the patch-grid logits (P, h, w) per image instead, without the
            upsampling to the input size (``heatmaps`` is then ``None``): a fraction of
            the memory with many prompts. Upsampling them bilinearly to the input size
            and min-max scaling gives the default output.
        Returns:
          :class:`HeatmapOutput` with raw cosine ``logits`` and min-max ``heatmaps``.
        """
        if output_size not in ("input", "original"):
            raise ValueError(f"output_size must be 'input' or 'original', got {output_size!r}")
        if grid and output_size != "input":
            raise ValueError("grid=True returns the patch grid; output_size applies to the upsampled maps")
        images = preprocess.as_image_list(images)
        sets = _prompt_sets(prompts, len(images))
        sizes = [self._input_size(im, size, short_side) for im in images]
        distinct = list(dict.fromkeys(p for s in sets for p in s))
        table = dict(zip(distinct, self.embed_text(distinct)))
        most = max(len(s) for s in sets)
        # Feature surgery weighs every prompt against all the others: one chunk holds them all.
        p_bucket = _bucket(most if self.feature_surgery else min(most, PROMPT_CHUNK), 8)
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
                self.check_memory(hw, b, p_bucket)
                pixels = np.zeros((b, *hw, 3), np.float32)
                for row, i in enumerate(idx):
                    pixels[row] = preprocess.normalize(preprocess.resize(images[i], hw))
                parts: dict[int, list] = {i: [] for i in idx}
                for p0 in range(0, max(len(sets[i]) for i in idx), p_bucket):  # one step unless many prompts
                    text = np.zeros((b, p_bucket, dim), np.float32)
                    mask = np.zeros((b, p_bucket), bool)
                    for row, i in enumerate(idx):
                        chunk = sets[i][p0:p0 + p_bucket]
                        if chunk:
                            text[row, :len(chunk)] = [table[p] for p in chunk]
                            mask[row, :len(chunk)] = True
                    if grid:
                        lg, hm = jax.device_get(self._grid(self._vparams, pixels, text, mask)), None
                    else:
                        lg, hm = jax.device_get(self._maps(self._vparams, pixels, text, mask))
                    if not np.isfinite(lg).all():  # never hand back NaN maps as if they were results
                        raise FloatingPointError("the model produced NaN or infinite similarities; check its "
                                                 "weights and the options (temperature, dtype)")
                    for row, i in enumerate(idx):
                        n = len(sets[i][p0:p0 + p_bucket])
                        parts[i].append((lg[row, :n], None if hm is None else hm[row, :n]))
                for i in idx:
                    logits[i] = np.concatenate([lg for lg, _ in parts[i]])
                    heat[i] = None if grid else np.concatenate([hm for _, hm in parts[i]])
        shapes = sizes
        if output_size == "original":
            shapes = [im.shape[:2] for im in images]
            logits = [resize_maps(x, hw) for x, hw in zip(logits, shapes)]
            heat = [resize_maps(x, hw) for x, hw in zip(heat, shapes)]
        if len(set(shapes)) == 1 and len({len(s) for s in sets}) == 1:
            logits = np.stack(logits)
            heat = None if grid else np.stack(heat)
        elif grid:
            heat = None
        return HeatmapOutput(logits, heat, sets, sizes)

    def pixel_logits(self, pixels, prompts: Sequence[str], *, grid: bool = True) -> np.ndarray:
        """Cosine logits of model inputs that are already normalised.

        For pipelines that prepare pixels their own way (the evaluation protocols resize
        and normalise as each official code does, and pad in normalised space).

        Args:
          pixels: float32 (B, H, W, 3), or (H, W, 3) for one image; H and W multiples of
            the patch size.
          prompts: one list of prompts for every image.
          grid: the patch-grid logits (B, P, H / patch, W / patch); ``False``, upsampled
            bilinearly to (H, W) as :meth:`heatmaps` returns them.
        Returns:
          float32 array, (B, P, h, w).
        """
        x = np.asarray(pixels, np.float32)
        if x.ndim == 3:
            x = x[None]
        patch = self.model.config.vision.patch_size
        if x.ndim != 4 or x.shape[-1] != 3 or x.shape[0] == 0:
            raise ValueError(f"pixels must be (B, H, W, 3), got shape {np.shape(pixels)}")
        if x.shape[1] % patch or x.shape[2] % patch or 0 in x.shape[1:3]:
            raise ValueError(f"pixel sides must be positive multiples of the patch size {patch}, got "
                             f"{x.shape[1]}x{x.shape[2]}")
        if not np.isfinite(x).all():
            raise ValueError("pixels contain NaN or infinite values")
        prompts = _prompt_sets(prompts, 1)[0]
        distinct = list(dict.fromkeys(prompts))
        table = dict(zip(distinct, self.embed_text(distinct)))
        p_bucket = _bucket(len(prompts) if self.feature_surgery else min(len(prompts), PROMPT_CHUNK), 8)
        dim, hw = self.model.config.embed_dim, x.shape[1:3]
        out = []
        for start in range(0, len(x), self.batch_size):
            part = x[start:start + self.batch_size]
            b = -(-_bucket(len(part), 1) // self.mesh.size) * self.mesh.size  # whole shards per device
            self.check_memory(hw, b, p_bucket)
            batch = np.zeros((b, *hw, 3), np.float32)
            batch[:len(part)] = part
            chunks = []
            for p0 in range(0, len(prompts), p_bucket):
                chunk = prompts[p0:p0 + p_bucket]
                text = np.zeros((b, p_bucket, dim), np.float32)
                text[:, :len(chunk)] = [table[p] for p in chunk]
                mask = np.zeros((b, p_bucket), bool)
                mask[:, :len(chunk)] = True
                if grid:
                    lg = jax.device_get(self._grid(self._vparams, batch, text, mask))
                else:
                    lg = jax.device_get(self._maps(self._vparams, batch, text, mask))[0]
                if not np.isfinite(lg).all():
                    raise FloatingPointError("the model produced NaN or infinite similarities; check its "
                                             "weights and the options (temperature, dtype)")
                chunks.append(np.asarray(lg[:len(part), :len(chunk)]))
            out.append(np.concatenate(chunks, axis=1))
        return np.concatenate(out).astype(np.float32, copy=False)

    def segment(self, image, class_names: Sequence[str], background_threshold: float | None = 0.85,
                *, size=None, short_side=None, logit_scale: float = LOGIT_SCALE,
                area_threshold: float | None = None, pamr_iterations: int = 0,
                pamr_dilations: Sequence[int] = (8, 16)) -> np.ndarray:
        """A label map (H, W) at the model input size: 0 is background, ``k + 1`` is
        ``class_names[k]``.

        The class probabilities are the softmax over classes of ``logit_scale * cosine``;
        a pixel whose top probability is below ``background_threshold`` is background
        (``None``: every pixel gets a class). A class may be a list of synonyms
        (``[["person", "man"], "dog"]``): each is prompted and the class probability is the
        max over them after the softmax over all prompts. Options of the official
        pipelines of GEM's siblings, off by default: ``pamr_iterations`` > 0 refines the
        logits with PAMR guided by the input image (:func:`gem_jax.postprocess.pamr`;
        NACLIP: 10 iterations, dilations 8 and 16); ``area_threshold`` drops classes that
        win at most that fraction of the pixels (SCLIP's area threshold).
        """
        if isinstance(class_names, str):
            class_names = [class_names]
        if not isinstance(class_names, (list, tuple)):
            raise ValueError(f"class names must be a list of strings (or of lists of synonyms), got "
                             f"{type(class_names).__name__}")
        groups = [[c] if isinstance(c, str) else list(c) for c in class_names]
        if not groups or not all(groups):
            raise ValueError("every class needs at least one name")
        prompts = _prompt_sets([n for g in groups for n in g], 1)[0]
        dup = first_duplicate(prompts)
        if dup:
            raise ValueError(f"class names {dup[0]!r} and {dup[1]!r} are the same to the model (it ignores case "
                             "and spacing): the copies would split the probability; give each class once")
        query_class = np.repeat(np.arange(len(groups)), [len(g) for g in groups])
        if background_threshold is not None and not 0.0 <= background_threshold <= 1.0:
            raise ValueError(f"background_threshold must be in [0, 1], got {background_threshold!r}")
        images = preprocess.as_image_list(image)
        if len(images) != 1:
            raise ValueError(f"segment takes one image, got {len(images)}")
        out = self.heatmaps(images, [prompts], size=size, short_side=short_side)
        return label_map(images[0], np.asarray(out.logits[0]), background_threshold, logit_scale=logit_scale,
                         area_threshold=area_threshold, pamr_iterations=pamr_iterations,
                         pamr_dilations=pamr_dilations,
                         query_class=query_class if len(groups) < len(prompts) else None)


def label_map(image: np.ndarray, logits: np.ndarray, background_threshold: float | None = 0.85, *,
              logit_scale: float = LOGIT_SCALE, area_threshold: float | None = None, pamr_iterations: int = 0,
              pamr_dilations: Sequence[int] = (8, 16), query_class: np.ndarray | None = None) -> np.ndarray:
    """The label map of :meth:`GEM.segment` from logits already computed: ``image`` the
    decoded image (H0, W0, 3), ``logits`` (P, H, W) at the model input size; PAMR (if
    asked) is guided by the image resized to (H, W), then :func:`labels_from_logits`."""
    if pamr_iterations:
        from gem_jax import postprocess

        guide = preprocess.normalize(preprocess.resize(image, logits.shape[-2:])).transpose(2, 0, 1)
        logits = np.asarray(postprocess.pamr(guide, logits, iterations=pamr_iterations, dilations=pamr_dilations))
    return labels_from_logits(logits, background_threshold, logit_scale=logit_scale, area_threshold=area_threshold,
                              query_class=query_class)


def resize_maps(maps: np.ndarray, hw: tuple[int, int]) -> np.ndarray:
    """(..., h, w) maps resized bilinearly to ``hw`` (half-pixel centres, as the upsampling
    of the patch logits); a heatmap in [0, 1] stays in [0, 1]."""
    from gem_jax.models.layers import resize_matrix

    maps = np.asarray(maps, np.float32)
    if maps.shape[-2:] == tuple(hw):
        return maps
    my = resize_matrix(maps.shape[-2], hw[0], "bilinear")
    mx = resize_matrix(maps.shape[-1], hw[1], "bilinear")
    return np.einsum("Hh,...hw,Ww->...HW", my, maps, mx).astype(np.float32)


def labels_from_logits(logits: np.ndarray, background_threshold: float | None = 0.85, *,
                       logit_scale: float = LOGIT_SCALE, area_threshold: float | None = None,
                       query_class: np.ndarray | None = None) -> np.ndarray:
    """(P, H, W) cosine logits -> (H, W) int32 labels, 0 background, ``k + 1`` class k.

    Probabilities are the softmax over prompts of ``logit_scale * logits``; with
    ``query_class`` (the class of each prompt) a class's probability is the max over its
    prompts; with ``area_threshold`` a class that wins at most that fraction of the pixels
    gets probability 0 before the argmax and the background threshold."""
    if not logit_scale > 0:
        raise ValueError(f"logit_scale must be positive, got {logit_scale!r}")
    if area_threshold is not None and not 0.0 <= area_threshold <= 1.0:
        raise ValueError(f"area_threshold must be in [0, 1], got {area_threshold!r}")
    scaled = logit_scale * logits.astype(np.float64)
    scaled -= scaled.max(axis=0, keepdims=True)
    probs = np.exp(scaled)
    probs /= probs.sum(axis=0, keepdims=True)
    if query_class is not None:
        query_class = np.asarray(query_class)
        probs = np.stack([probs[query_class == c].max(axis=0) for c in range(int(query_class.max()) + 1)])
    if area_threshold is not None:
        area = np.bincount(probs.argmax(axis=0).reshape(-1), minlength=len(probs))
        probs = probs * (area > area_threshold * area.sum())[:, None, None]
    labels = probs.argmax(axis=0).astype(np.int32) + 1
    if background_threshold is not None:
        labels[probs.max(axis=0) < background_threshold] = 0
    return labels


def _patch_sims(vit, opts, schedule, params, pixels, text, mask, surgery=None):
    """(B, H, W, 3) pixels, text sets (B, P, D) and mask (B, P) -> (B, P, h, w) patch-grid
    cosine logits (CLIP Surgery's feature surgery in their place with ``surgery``, the
    empty prompt's embedding); invalid prompts are zero."""
    grid = vit.grid_shape(pixels)
    tokens = gem_lib.vision_tokens(vit, params, pixels, opts, want_clip=opts is None, schedule=schedule)
    tokens = tokens["gem"] if opts is not None else tokens["clip"]

    def one_image(tok, txt, valid):
        if surgery is None:
            sims = gem_lib.patch_logits(tok[None], txt, grid)[0]  # (P, h, w)
        else:
            from gem_jax.methods import masked_feature_surgery

            sims = masked_feature_surgery(tok, txt, valid, surgery).reshape(-1, *grid)
        return jnp.where(valid[:, None, None], sims, 0.0)

    return jax.vmap(one_image)(tokens, text, mask)


_grid_logits = _patch_sims


def _image_maps(vit, opts, schedule, params, pixels, text, mask, surgery=None):
    """(B, H, W, 3) pixels and per-image text sets (B, P, D) with validity mask (B, P)
    -> (logits, heatmaps), each (B, P, H, W): :func:`_patch_sims` upsampled bilinearly to
    the input size, and min-max scaled; invalid prompts are zero."""
    sims = _patch_sims(vit, opts, schedule, params, pixels, text, mask, surgery)
    maps = resize_2d(sims, pixels.shape[1:3], "bilinear", axes=(-2, -1))
    return maps, gem_lib.min_max(maps)
