"""``GEM``: open-vocabulary heatmaps and segmentation from a loaded CLIP model.

A :class:`GEM` holds a model, a method (:mod:`gem_jax.engine.methods`) and jitted
programs; its public surface (:meth:`GEM.heatmaps`, :meth:`GEM.segment`, and the
lower-level :meth:`GEM.tokens`, :meth:`GEM.grid_logits`, :meth:`GEM.maps`,
:meth:`GEM.input_size`, :meth:`GEM.describe`) is what every command uses.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from gem_jax import checks, postprocess, preprocess, textcache
from gem_jax.engine import cost, tower
from gem_jax.engine.methods import Method, get_method
from gem_jax.loading import MODEL_DEFAULT_KEYS, Model, with_model_defaults
from gem_jax.models import VisionTransformer
from gem_jax.text import DEFAULT_TEMPLATE, TextEncoder, bucket, resolve_templates

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
#: With ``short_side`` sizing the long side is capped at this many pixels, the aspect kept
#: (``GEM(max_long_side=None)`` lifts it): a 5 x 5000 strip at short side 448 would
#: otherwise ask for a 448 x 448000 input.
MAX_LONG_SIDE = 2048
#: Most prompts whose maps exist at once: larger sets go through the logits step in chunks
#: over the tokens the tower computed once, so working memory stays flat in the number of
#: prompts.
PROMPT_CHUNK = 128


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


class GEM:
    """Open-vocabulary heatmaps and segmentation from a CLIP model with a method's path.

    Holds only the options, the model and jitted callables. Images of one size go
    through the tower in padded batches (``batch_size`` at most, padded to powers of
    two), once per image; their tokens then meet the prompts in padded chunks with a
    validity mask, so new batch sizes and prompt counts rarely recompile.

    Options left out (``None``) take the model's recommendation (``Model.defaults``),
    then the method's own. An option the chosen method does not have is refused
    (:class:`~gem_jax.engine.methods.OptionError`, a ``ValueError``).

    Args:
      model: a :class:`~gem_jax.loading.Model` from :func:`gem_jax.load`.
      method: a registered method's name (:func:`gem_jax.method_names`: ``"gem"``,
        ``"clip"`` (the plain CLIP patch tokens), ``"maskclip"``, ``"clipsurgery"``,
        ``"sclip"``, ``"clearclip"``, ``"naclip"``, and any registered with
        :func:`gem_jax.register_method`), or a :class:`~gem_jax.Method`.
      layers: last blocks with the method's path (``gem`` and ``clipsurgery``, default 6).
      residual, mlp: keep the residual / run the MLP on the path (one-block methods;
        ``mlp`` is also GEM's Table 6 variant).
      sigma: NACLIP's neighbourhood width in patches (default 5).
      iterations, temperature, projections, normalize: GEM's, see
        :class:`~gem_jax.engine.attention.GEMAttention`.
      feature_surgery: CLIP Surgery's feature surgery in place of the raw cosines, for
        any method (off by default, also for ``clipsurgery``, whose maintainers segment
        without it).
      size: model input size, an int (square) or (H, W); default 448 when
        ``short_side`` is not given.
      short_side: resize the shorter side to this, keeping the aspect (the paper's
        evaluation).
      template: prompt template with ``{}``; a sequence of templates is an ensemble
        (normalised embeddings averaged and renormalised); ``"imagenet"`` is the 80
        ImageNet templates, ``"imagenet85"`` those and 5 scene templates.
      batch_size: most images per forward pass.
      dtype: compute dtype, ``"float32"`` or ``"bfloat16"`` (LayerNorm, softmax and
        normalisation stay float32).
      schedule: a :class:`~gem_jax.Schedule` (chunking over images and heads; it never
        changes results), or ``"auto"`` for the fastest measured on this backend at each
        input size.
      devices: devices to spread image batches over (a ``jax.make_mesh`` data axis:
        images sharded, parameters and text replicated); default all local devices.
      max_long_side: with ``short_side`` sizing, cap the long side at this (see
        :data:`MAX_LONG_SIDE`); ``None`` for no cap.
      memory_limit: before each forward call, the estimate of
        :func:`gem_jax.engine.cost.estimate_memory` is compared with this many bytes
        (``"auto"``: 90% of the free memory) and a call that needs more raises
        :class:`~gem_jax.engine.cost.MemoryLimitError`; ``None`` skips the check.
      text_cache: keep prompt embeddings on disk between processes
        (:mod:`gem_jax.textcache`; ``True`` for the default location, a directory, or
        ``False``).
      **method_options: options of a registered method's attention (its fields), by name.
    """

    def __init__(self, model: Model, *, method: str | Method | None = None, layers: int | None = None,
                 iterations: int | None = None, temperature: float | None = None,
                 projections: Sequence[str] | None = None, normalize: bool | None = None, mlp: bool | None = None,
                 residual: bool | None = None, sigma: float | None = None, feature_surgery: bool = False,
                 size: int | tuple[int, int] | None = None, short_side: int | None = None,
                 template: str | Sequence[str] | None = None, batch_size: int = 8, dtype: str = "float32",
                 schedule: tower.Schedule | str = "auto", devices: Sequence[Any] | None = None,
                 max_long_side: int | None = MAX_LONG_SIDE, memory_limit: int | str | None = "auto",
                 text_cache: bool | str | None = True, **method_options):
        if not isinstance(model, Model):
            raise TypeError(f"GEM takes a model from gem_jax.load(), got {type(model).__name__}")
        if dtype not in _DTYPES:
            raise ValueError(f"dtype must be one of {tuple(_DTYPES)}, got {dtype!r}")
        if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        self.model = model
        given = dict(method=method, layers=layers, iterations=iterations, temperature=temperature,
                     projections=projections, normalize=normalize, mlp=mlp, residual=residual, sigma=sigma,
                     size=size, short_side=short_side, template=template, **method_options)
        settings = with_model_defaults(given, model.defaults)
        #: What the method does to the last blocks (a :class:`~gem_jax.Method`).
        self.method: Method = get_method(settings.pop("method") or "gem",
                                         **{k: settings.pop(k) for k in list(settings)
                                            if k not in ("size", "short_side", "template")})
        n = model.config.vision.layers
        if self.method.blocks > n:
            raise ValueError(f"layers={self.method.blocks} exceeds the model's {n} vision blocks")
        size, short_side = settings["size"], settings["short_side"]
        self.size, self.short_side = size, short_side
        self.max_long_side = max_long_side
        preprocess.target_size(224, 224, size=size, short_side=short_side, max_long_side=max_long_side,
                               patch_size=model.config.vision.patch_size)  # validates early
        if not (memory_limit in (None, "auto") or (isinstance(memory_limit, int) and memory_limit > 0)):
            raise ValueError(f"memory_limit must be a number of bytes, 'auto' or None, got {memory_limit!r}")
        self.memory_limit = memory_limit
        self.templates = resolve_templates(settings["template"] or DEFAULT_TEMPLATE)
        self.batch_size = batch_size
        self.dtype = dtype
        self.feature_surgery = bool(feature_surgery)
        tower.Schedule.resolve(schedule)  # validates
        self.schedule = schedule
        compute = _DTYPES[dtype]
        devices = list(jax.local_devices() if devices is None else devices)
        if not devices:
            raise ValueError("no devices given")
        self.mesh = jax.make_mesh((len(devices),), ("data",), axis_types=(jax.sharding.AxisType.Auto,),
                                  devices=devices)
        self._text = TextEncoder(model, compute)
        self._text_memory: dict[str, np.ndarray] = {}
        self._text_disk = textcache.open_cache(text_cache)
        replicated, data = NamedSharding(self.mesh, P()), NamedSharding(self.mesh, P("data"))
        #: The image tower's parameters, replicated over the devices.
        self.visual_params = jax.device_put(model.params["visual"], replicated)
        vit = VisionTransformer(model.config.vision, model.config.embed_dim, dtype=compute)
        # CLIP Surgery's single-prompt case subtracts the empty prompt's embedding.
        self._surgery = jnp.asarray(self.embed_text([""])[0]) if self.feature_surgery else None

        def shard(fn, in_specs, out_specs):
            # Each device runs the plain single-device program on its share of the batch.
            return jax.shard_map(fn, mesh=self.mesh, in_specs=in_specs, out_specs=out_specs)

        tokens = functools.partial(_token_grid, vit, self.method, schedule)
        self._tokens = jax.jit(shard(tokens, (P(), P("data")), P("data")), in_shardings=(replicated, data),
                               out_shardings=data)
        patch = model.config.vision.patch_size
        self._grid = jax.jit(shard(_grid_of_tokens, (P("data"),) * 3, P("data")), in_shardings=(data,) * 3,
                             out_shardings=data)
        self._maps = jax.jit(shard(functools.partial(_maps_of_tokens, patch), (P("data"),) * 3,
                                   (P("data"), P("data"))), in_shardings=(data,) * 3, out_shardings=(data, data))
        # Feature surgery weighs each prompt against all the others: two passes over every
        # chunk of prompts gather what they share, then each chunk's similarities follow.
        self._s_partials = jax.jit(shard(_surgery_partials, (P("data"),) * 3, (P("data"), P("data"))),
                                   in_shardings=(data,) * 3, out_shardings=(data, data))
        self._s_shared = jax.jit(shard(_surgery_shared, (P("data"),) * 4, P("data")), in_shardings=(data,) * 4,
                                 out_shardings=data)
        surgery_specs = ((P("data"),) * 6 + (P(),), (data,) * 6 + (replicated,))
        self._s_grid = jax.jit(shard(_surgery_grid, surgery_specs[0], P("data")), in_shardings=surgery_specs[1],
                               out_shardings=data)
        self._s_maps = jax.jit(shard(functools.partial(_surgery_maps, patch), surgery_specs[0],
                                     (P("data"), P("data"))), in_shardings=surgery_specs[1],
                               out_shardings=(data, data))

    def __repr__(self) -> str:
        return (f"GEM({self.model.name!r}, method={self.method.name!r}, options={self.method.option_values()}, "
                f"size={self.size!r}, short_side={self.short_side!r}, templates={len(self.templates)}, "
                f"dtype={self.dtype!r}{', RANDOM weights' if self.model.random_weights else ''})")

    # ------------------------------------------------------------------ description
    def describe(self) -> dict:
        """What this object computes, as JSON values: the model (name, weights fingerprint,
        random or not), the method (:meth:`~gem_jax.Method.describe`), feature surgery, the
        templates, sizing and dtype. Result files, export metadata, batch manifests and
        evaluation fingerprints all record this."""
        return {"model": {k: v for k, v in self.model.describe().items() if k != "config"},
                "method": self.method.describe(), "feature_surgery": self.feature_surgery,
                "templates": list(self.templates), "size": _json_size(self.size), "short_side": self.short_side,
                "max_long_side": self.max_long_side, "dtype": self.dtype}

    # ------------------------------------------------------------------ text
    def embed_text(self, prompts: Sequence[str]) -> np.ndarray:
        """L2-normalised text embeddings (P, D) of ``prompts`` under the template(s).

        Each distinct prompt is encoded once per object (and, with ``text_cache``, once
        per machine). A prompt longer than the model's context is cut, with a
        :class:`~gem_jax.checks.PromptTruncatedWarning`."""
        prompts = list(prompts)
        todo = [p for p in dict.fromkeys(prompts) if p not in self._text_memory]
        if todo:
            checks.warn_truncated(self.model.tokenizer, todo, self.templates)  # once per prompt
            found = self._text_disk.get(self, todo) if self._text_disk is not None else {}
            self._text_memory.update(found)
            rest = [p for p in todo if p not in found]
            if rest:
                emb = self._text.embed(rest, self.templates)
                self._text_memory.update(zip(rest, emb))
                if self._text_disk is not None:
                    self._text_disk.put(self, dict(zip(rest, emb)))
        if not prompts:
            return np.zeros((0, self.model.config.embed_dim), np.float32)
        return np.stack([self._text_memory[p] for p in prompts])

    def text_key(self) -> dict:
        """What text embeddings depend on: the text weights, the templates and the dtype."""
        return {"model": self.model.fingerprint, "templates": list(self.templates), "dtype": self.dtype}

    # ------------------------------------------------------------------ sizes and memory
    def input_size(self, image, size=None, short_side=None) -> tuple[int, int]:
        """The model input (H, W) for an image (an array, or its (H, W)): this object's
        sizing, or ``size`` / ``short_side`` for this call."""
        hw = image if isinstance(image, tuple) and len(image) == 2 else np.shape(image)[:2]
        if size is None and short_side is None:
            size, short_side = self.size, self.short_side
        return preprocess.target_size(*hw, size=size, short_side=short_side,
                                      max_long_side=self.max_long_side if short_side is not None else None,
                                      patch_size=self.model.config.vision.patch_size)

    def padded_batch(self, n: int) -> int:
        """The batch a call with ``n`` images runs as: a power of two, whole shards per device."""
        return -(-bucket(n, 1) // self.mesh.size) * self.mesh.size

    def memory_estimate(self, hw: tuple[int, int], images: int = 1, prompts: int = 1, *,
                        upsampled: bool = True, display: tuple[int, int] | None = None,
                        display_prompts: int = 0) -> int:
        """:func:`gem_jax.engine.cost.estimate_memory` for this model, method and schedule
        (per device: images are split over the devices)."""
        per_device = -(-images // self.mesh.size)
        chunk = PROMPT_CHUNK
        return cost.estimate_memory(self.model.config, hw, per_device, prompts, method=self.method,
                                    schedule=self.schedule, prompt_chunk=chunk, upsampled=upsampled,
                                    display=display, display_prompts=display_prompts)

    def check_memory(self, hw: tuple[int, int], images: int = 1, prompts: int = 1, **kw) -> None:
        """The memory guard: raises :class:`~gem_jax.engine.cost.MemoryLimitError` if a call at
        input size ``hw`` would need more than ``memory_limit`` (keywords as
        :meth:`memory_estimate`)."""
        if self.memory_limit is None:
            return
        per_device = -(-images // self.mesh.size)
        what = f"input size {hw[0]}x{hw[1]} with {per_device} image(s) and {prompts} prompt(s) per call"
        if kw.get("display"):
            what += f", pictures of {kw['display'][0]}x{kw['display'][1]}"
        cost.check_memory(self.memory_estimate(hw, images, prompts, **kw), self.memory_limit, what,
                          device=self.mesh.devices.flat[0])

    # ------------------------------------------------------------------ programs
    def tokens(self, pixels):
        """(B, H, W, 3) normalised pixels -> the method's tokens after the head, on the
        devices (B a multiple of the device count): ``{"cls": (B, D), "patches": (B, h, w, D)}``."""
        return self._tokens(self.visual_params, pixels)

    def surgery_stats(self, tokens, chunks):
        """What feature surgery needs from *all* of an image's prompts, gathered over the
        prompt ``chunks`` (``[(text (B, P, D), mask (B, P)), ...]``): pass it to
        :meth:`grid_logits` and :meth:`maps` for every chunk. ``None`` without feature surgery."""
        if not self.feature_surgery:
            return None
        lse = count = None
        for text, mask in chunks:
            part, n = self._s_partials(tokens["cls"], text, mask)
            lse, count = (part, n) if lse is None else (jnp.logaddexp(lse, part), count + n)
        shared = sum(self._s_shared(tokens, text, mask, lse) for text, mask in chunks)
        return lse, count, shared

    def grid_logits(self, tokens, text, mask, stats=None):
        """:meth:`tokens`, text sets (B, P, D) and mask (B, P) -> (B, P, h, w) patch-grid
        cosine logits; invalid prompts are zero. With feature surgery on, its similarities
        instead, weighed against every prompt of :meth:`surgery_stats` (default: this chunk's)."""
        if not self.feature_surgery:
            return self._grid(tokens, text, mask)
        stats = stats if stats is not None else self.surgery_stats(tokens, [(text, mask)])
        return self._s_grid(tokens, text, mask, *stats, self._surgery)

    def maps(self, tokens, text, mask, stats=None):
        """:meth:`grid_logits` upsampled bilinearly to the input size, and min-max scaled:
        (logits, heatmaps), each (B, P, H, W)."""
        if not self.feature_surgery:
            return self._maps(tokens, text, mask)
        stats = stats if stats is not None else self.surgery_stats(tokens, [(text, mask)])
        return self._s_maps(tokens, text, mask, *stats, self._surgery)

    def program(self, params, pixels, text, mask, *, grid: bool = False):
        """The whole image program as one function of the visual parameters (for export):
        :meth:`tokens` then :meth:`maps` (or :meth:`grid_logits` with ``grid``)."""
        tokens = self._tokens(params, pixels)
        return self.grid_logits(tokens, text, mask) if grid else self.maps(tokens, text, mask)

    def compiled_programs(self) -> int | None:
        """How many programs this object has compiled (None if JAX does not say)."""
        sizes = [getattr(f, "_cache_size", None) for f in (self._tokens, self._grid, self._maps, self._s_partials,
                                                            self._s_shared, self._s_grid, self._s_maps)]
        return sum(s() for s in sizes) if all(callable(s) for s in sizes) else None

    # ------------------------------------------------------------------ the calls users make
    def heatmaps(self, images, prompts, *, size=None, short_side=None, output_size: str = "input",
                 grid: bool = False) -> HeatmapOutput:
        """Where each prompt is in each image.

        Args:
          images: a path, PIL image or array (H, W, 3); a batch array (B, H, W, 3); or
            a list of those. uint8, or float in [0, 1].
          prompts: one list of strings for all images, or one list per image (the
            lists may differ in length). A prompt longer than the model's context is cut,
            with a :class:`~gem_jax.checks.PromptTruncatedWarning`.
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
        sets = checks.prompt_sets(prompts, len(images))
        sizes = [self.input_size(im, size, short_side) for im in images]
        distinct = list(dict.fromkeys(p for s in sets for p in s))
        table = dict(zip(distinct, self.embed_text(distinct)))
        p_bucket = bucket(min(max(len(s) for s in sets), PROMPT_CHUNK), 8)

        logits: list = [None] * len(images)
        heat: list = [None] * len(images)
        by_size: dict[tuple[int, int], list[int]] = {}
        for i, hw in enumerate(sizes):
            by_size.setdefault(hw, []).append(i)
        for hw, members in by_size.items():
            for start in range(0, len(members), self.batch_size):
                idx = members[start:start + self.batch_size]
                b = self.padded_batch(len(idx))
                self.check_memory(hw, b, p_bucket, upsampled=not grid)
                pixels = np.zeros((b, *hw, 3), np.float32)
                for row, i in enumerate(idx):
                    pixels[row] = preprocess.normalize(preprocess.resize(images[i], hw))
                for i, (lg, hm) in zip(idx, self._run_batch(pixels, [sets[i] for i in idx], table, p_bucket, grid)):
                    logits[i], heat[i] = lg, hm
        shapes = sizes
        if output_size == "original":
            shapes = [im.shape[:2] for im in images]
            logits = [postprocess.resize_maps(x, hw) for x, hw in zip(logits, shapes)]
            heat = [postprocess.resize_maps(x, hw) for x, hw in zip(heat, shapes)]
        if len(set(shapes)) == 1 and len({len(s) for s in sets}) == 1:
            logits = np.stack(logits)
            heat = None if grid else np.stack(heat)
        elif grid:
            heat = None
        return HeatmapOutput(logits, heat, sets, sizes)

    def _run_batch(self, pixels, row_sets, table, p_bucket: int, grid: bool):
        """One padded batch of pixels through the tower (once), then its rows' prompts in chunks
        of ``p_bucket``; returns (logits, heatmaps or None) per row of ``row_sets``."""
        b, dim = pixels.shape[0], self.model.config.embed_dim
        tokens = self.tokens(pixels)  # once per image, whatever the prompt count
        chunks = []
        for p0 in range(0, max(len(s) for s in row_sets), p_bucket):  # one step unless many prompts
            text = np.zeros((b, p_bucket, dim), np.float32)
            mask = np.zeros((b, p_bucket), bool)
            for row, prompts in enumerate(row_sets):
                chunk = prompts[p0:p0 + p_bucket]
                if chunk:
                    text[row, :len(chunk)] = [table[p] for p in chunk]
                    mask[row, :len(chunk)] = True
            chunks.append((p0, text, mask))
        stats = self.surgery_stats(tokens, [(t, m) for _, t, m in chunks])
        parts: list[list] = [[] for _ in row_sets]
        for p0, text, mask in chunks:
            if grid:
                lg, hm = jax.device_get(self.grid_logits(tokens, text, mask, stats)), None
            else:
                lg, hm = jax.device_get(self.maps(tokens, text, mask, stats))
            if not np.isfinite(lg).all():  # never hand back NaN maps as if they were results
                raise FloatingPointError("the model produced NaN or infinite similarities; check its "
                                         "weights and the options (temperature, dtype)")
            for row, prompts in enumerate(row_sets):
                n = len(prompts[p0:p0 + p_bucket])
                parts[row].append((lg[row, :n], None if hm is None else hm[row, :n]))
        return [(np.concatenate([lg for lg, _ in rows]), None if grid else np.concatenate([hm for _, hm in rows]))
                for rows in parts]

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
        prompts = checks.prompt_sets(prompts, 1)[0]
        distinct = list(dict.fromkeys(prompts))
        table = dict(zip(distinct, self.embed_text(distinct)))
        p_bucket = bucket(min(len(prompts), PROMPT_CHUNK), 8)
        hw = x.shape[1:3]
        out = []
        for start in range(0, len(x), self.batch_size):
            part = x[start:start + self.batch_size]
            b = self.padded_batch(len(part))
            self.check_memory(hw, b, p_bucket, upsampled=not grid)
            batch = np.zeros((b, *hw, 3), np.float32)
            batch[:len(part)] = part
            rows = self._run_batch(batch, [prompts] * len(part), table, p_bucket, grid)
            out.extend(lg for lg, _ in rows)
        return np.stack(out).astype(np.float32, copy=False)

    def segment(self, image, class_names: Sequence[str], background_threshold: float | None = 0.85,
                *, size=None, short_side=None, logit_scale: float = postprocess.LOGIT_SCALE,
                area_threshold: float | None = None, pamr_iterations: int = 0,
                pamr_dilations: Sequence[int] = postprocess.PAMR_DILATIONS) -> np.ndarray:
        """A label map (H, W) at the model input size: 0 is background, ``k + 1`` is
        ``class_names[k]``.

        The label rule of :func:`gem_jax.postprocess.label_rule`: class probabilities are
        the softmax over classes of ``logit_scale * cosine``; a pixel whose top probability
        is below ``background_threshold`` is background (``None``: every pixel gets a
        class). A class may be a list of synonyms (``[["person", "man"], "dog"]``): each is
        prompted and the class probability is the max over them after the softmax over all
        prompts. Options of the official pipelines of GEM's siblings, off by default:
        ``pamr_iterations`` > 0 refines the logits with PAMR guided by the input image
        (:func:`gem_jax.postprocess.pamr`; NACLIP: 10 iterations, dilations 8 and 16);
        ``area_threshold`` drops classes that win at most that fraction of the pixels
        (SCLIP's area threshold).
        """
        if isinstance(class_names, str):
            class_names = [class_names]
        if not isinstance(class_names, (list, tuple)):
            raise ValueError(f"class names must be a list of strings (or of lists of synonyms), got "
                             f"{type(class_names).__name__}")
        groups = [[c] if isinstance(c, str) else list(c) for c in class_names]
        if not groups or not all(groups):
            raise ValueError("every class needs at least one name")
        prompts = checks.prompt_sets([n for g in groups for n in g], 1)[0]
        # Classes the model cannot tell apart would split their probability: refused.
        checks.distinguishable(self.model.tokenizer, prompts, self.templates, "class name")
        query_class = np.repeat(np.arange(len(groups)), [len(g) for g in groups])
        if background_threshold is not None and not 0.0 <= background_threshold <= 1.0:
            raise ValueError(f"background_threshold must be in [0, 1], got {background_threshold!r}")
        images = preprocess.as_image_list(image)
        if len(images) != 1:
            raise ValueError(f"segment takes one image, got {len(images)}")
        out = self.heatmaps(images, [prompts], size=size, short_side=short_side)
        return postprocess.label_map(images[0], np.asarray(out.logits[0]), background_threshold,
                                     logit_scale=logit_scale, area_threshold=area_threshold,
                                     pamr_iterations=pamr_iterations, pamr_dilations=pamr_dilations,
                                     query_class=query_class if len(groups) < len(prompts) else None)


def _json_size(size):
    return list(size) if isinstance(size, tuple) else size


def _token_grid(vit, method, schedule, params, pixels):
    """The method's tokens as ``{"cls": (B, D), "patches": (B, h, w, D)}``: the patch grid
    in the shape, so later steps know it."""
    grid = vit.grid_shape(pixels)
    tokens = tower.method_tokens(vit, params, pixels, method, schedule)
    return {"cls": tokens[:, 0], "patches": tokens[:, 1:].reshape(tokens.shape[0], *grid, tokens.shape[-1])}


def _flat_tokens(tokens):
    patches = tokens["patches"]
    b, h, w, d = patches.shape
    return jnp.concatenate([tokens["cls"][:, None], patches.reshape(b, h * w, d)], axis=1), (h, w)


def _grid_of_tokens(tokens, text, mask):
    flat, grid = _flat_tokens(tokens)
    return tower.prompt_logits(flat, text, mask, grid)


def _maps_of_tokens(patch_size: int, tokens, text, mask):
    _, h, w, _ = tokens["patches"].shape
    return tower.upsampled_maps(_grid_of_tokens(tokens, text, mask), (h * patch_size, w * patch_size))


def _surgery_partials(cls, text, mask):
    return tower.surgery_partials(cls, text, mask)


def _surgery_shared(tokens, text, mask, lse):
    return tower.surgery_shared(_flat_tokens(tokens)[0], text, mask, lse)


def _surgery_grid(tokens, text, mask, lse, count, shared, redundant):
    flat, grid = _flat_tokens(tokens)
    return tower.surgery_logits(flat, text, mask, grid, lse, count, shared, redundant)


def _surgery_maps(patch_size: int, tokens, text, mask, lse, count, shared, redundant):
    _, h, w, _ = tokens["patches"].shape
    return tower.upsampled_maps(_surgery_grid(tokens, text, mask, lse, count, shared, redundant),
                                (h * patch_size, w * patch_size))
