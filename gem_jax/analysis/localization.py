"""Per-layer localisation metrics of plain CLIP, a CLIP Surgery-like v-v path and GEM (sections 4.5 and 11)."""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from gem_jax import preprocess
from gem_jax.engine.attention import GEMAttention
from gem_jax.engine.methods import GEMOptions, Method, as_method, builtin_names, get_method
from gem_jax.engine.tower import run_paths
from gem_jax.models import VisionTransformer
from gem_jax.models.layers import l2_normalize

__all__ = [
    "LocalizationMetrics",
    "as_pixels",
    "default_paths",
    "layer_tokens",
    "localization_metrics",
    "mask_to_patches",
    "method_paths",
    "method_tokens",
    "object_background_contrast",
    "patch_similarity",
    "text_object_background_contrast",
    "toy_scenes",
    "visual_tower",
]


def method_paths(n_blocks: int, names: Sequence[str] | None = None) -> dict[str, Method]:
    """``{name: Method}`` of the named methods (default the built-in ones) with their official
    defaults, the multi-block ones on at most ``n_blocks`` blocks."""
    out = {}
    for name in names or builtin_names():
        m = get_method(name)
        out[name] = m.configure(layers=min(m.blocks, n_blocks)) if m.blocks > n_blocks else m
    return out


def default_paths(n_blocks: int, layers: int = 6) -> dict[str, GEMOptions | None]:
    """The three paths compared: ``"clip"`` (``None``, the original tokens),
    ``"surgery"`` (CLIP Surgery-like: v-v attention at the usual ``1/sqrt(d)`` scale,
    no normalisation, no iteration, no MLP) and ``"gem"`` (the paper's defaults), the
    parallel paths beside the last ``min(layers, n_blocks)`` blocks."""
    layers = min(layers, n_blocks)
    return {
        "clip": None,
        "surgery": GEMOptions(layers=layers, iterations=0, projections=("v",), normalize=False),
        "gem": GEMOptions(layers=layers),
    }


def as_pixels(image, patch_size: int, *, size=None):
    """Normalised model input (B, H, W, 3) float32.

    With ``size=None``, a float array of shape (B, H, W, 3) or (H, W, 3) is taken
    as pixels already normalised with CLIP's mean and std. Otherwise ``image`` is
    anything :mod:`gem_jax.preprocess` reads (path, PIL image, uint8 or [0, 1] array,
    or a list of those), resized to ``size`` (int or (H, W), snapped to the patch).
    """
    if size is None:
        arr = image if isinstance(image, jax.Array) else np.asarray(image)
        if arr.dtype.kind != "f" or arr.ndim not in (3, 4) or arr.shape[-1] != 3:
            raise ValueError("without size, image must be normalised float pixels (B, H, W, 3) or (H, W, 3); "
                             f"got {arr.dtype} {arr.shape}. Pass size= to preprocess raw images.")
        arr = jnp.asarray(arr, jnp.float32)
        arr = arr[None] if arr.ndim == 3 else arr
        if arr.shape[1] % patch_size or arr.shape[2] % patch_size:
            raise ValueError(f"pixels {arr.shape[1]}x{arr.shape[2]} are not a multiple of the patch {patch_size}")
        return arr
    images = preprocess.as_image_list(image)
    out = []
    for im in images:
        hw = preprocess.target_size(*im.shape[:2], size=size, short_side=None, patch_size=patch_size)
        out.append(preprocess.normalize(preprocess.resize(im, hw)))
    if len({o.shape for o in out}) != 1:
        raise ValueError("images resized to different sizes; give a fixed (H, W) size")
    return jnp.asarray(np.stack(out), jnp.float32)


def visual_tower(model) -> tuple[VisionTransformer, Any]:
    """The image tower module and its parameters of a loaded model (``.config``, ``.params``)."""
    cfg = model.config
    return VisionTransformer(cfg.vision, cfg.embed_dim), model.params["visual"]


@functools.partial(jax.jit, static_argnames=("vit", "paths", "every_layer", "head"))
def _layer_tokens(vit, paths, params, pixels, inv_temps, every_layer: bool, head: bool):
    """``{name: (L, B, 1 + h*w, D)}`` of paths that share a pos-embed resampling, one pass."""
    paths = dict(paths)

    def run(module, pixels):
        res = run_paths(module, pixels, paths, inv_temps=inv_temps, every_layer=every_layer)
        fn = module.head if head else (lambda t: t)
        return {name: jnp.stack([fn(t) for t in toks]) for name, toks in res.items()}

    return nn.apply(run, vit)({"params": params}, pixels)


def layer_tokens(vit: VisionTransformer, params, pixels, paths: Mapping[str, Any] | None = None,
                 *, inv_temps: Mapping[str, Any] | None = None, every_layer: bool = True, head: bool = True):
    """Tokens of several paths after every block, one forward pass per pos-embed resampling.

    Args:
      vit: the image tower module (unbound).
      params: its parameters (``params["visual"]``).
      pixels: (B, H, W, 3) normalised pixels.
      paths: ``{name: Method | GEMOptions | None}`` (:mod:`gem_jax.engine.methods`; GEM
        options are the GEM method with them; ``None`` is the original CLIP path).
        Default :func:`default_paths`.
      inv_temps: optional ``{name: 1/tau}`` overriding a GEM path's temperature with a
        (possibly traced, hence differentiable) scalar or (B, 1, 1, 1) array.
      every_layer: keep every block's output (else only the last).
      head: apply ``ln_post @ proj`` (the joint image-text space) to every layer's tokens.
    Returns:
      ``{name: (L, B, 1 + h*w, D)}``, L the number of blocks (1 if not ``every_layer``).
      At blocks before a path starts, its tokens equal CLIP's (of the same pass: at
      sizes other than the checkpoint's grid, each method's own pos-embed resampling).
    """
    if paths is None:
        paths = default_paths(vit.config.layers)
    specs = {name: as_method(spec) for name, spec in paths.items()}
    unknown = set(inv_temps or {}) - {name for name, m in specs.items() if isinstance(m.attention, GEMAttention)}
    if unknown:
        raise ValueError(f"inv_temps names no GEM path: {sorted(unknown)}")
    groups: dict[str, dict] = {}
    for name, spec in paths.items():  # "clip" rides along with the first group
        key = specs[name].posemb if specs[name].blocks else None
        groups.setdefault(key, {})[name] = spec
    if None in groups and len(groups) > 1:
        plain = groups.pop(None)
        groups.setdefault("bicubic_aa", {}).update(plain)
    out = {}
    for group in groups.values():
        temps = {k: v for k, v in (inv_temps or {}).items() if k in group}
        out.update(_layer_tokens(vit, tuple(group.items()), params, pixels, temps, every_layer, head))
    return {name: out[name] for name in paths}


def method_tokens(model, image, names: Sequence[str] | None = None, *, size=None) -> dict[str, np.ndarray]:
    """Every named method's patch tokens on the same image(s), in the joint space.

    Args:
      model: a loaded model (``.config``, ``.params``).
      image: see :func:`as_pixels`.
      names: methods (default the built-in ones), each with its official defaults
        (:func:`method_paths`).
      size: model input size for raw images.
    Returns:
      ``{name: (B, h, w, D)}`` float32: the last block's tokens after
      ``ln_post @ proj``, class token dropped, on the patch grid.
    """
    cfg = model.config
    pixels = as_pixels(image, cfg.vision.patch_size, size=size)
    vit, params = visual_tower(model)
    toks = layer_tokens(vit, params, pixels, method_paths(cfg.vision.layers, names), every_layer=False)
    h, w = vit.grid_shape(pixels)
    return {name: np.asarray(t[0, :, 1:]).reshape(t.shape[1], h, w, -1) for name, t in toks.items()}


def _pair_cosines(patches):
    pn = l2_normalize(patches)
    return jnp.einsum("...nd,...md->...nm", pn, pn, precision=jax.lax.Precision.HIGHEST)


def patch_similarity(patches):
    """Mean cosine between distinct patch tokens, per image.

    Args:
      patches: (..., P, D) patch tokens (no class token).
    Returns:
      (...,) ``sum_{i != j} cos(x_i, x_j) / (P (P - 1))``.
    """
    s = _pair_cosines(patches)
    p = s.shape[-1]
    off = 1.0 - jnp.eye(p, dtype=s.dtype)
    return jnp.sum(s * off, axis=(-2, -1)) / (p * (p - 1))


def object_background_contrast(patches, object_mask):
    """Object-background contrast: how much more alike object patches are to each
    other than to the background, per image.

    ``mean_{i != j in O} cos(x_i, x_j) - mean_{i in O, j in B} cos(x_i, x_j)``, O the
    object patches, B the background patches. NaN when O has fewer than two patches
    or B is empty.

    Args:
      patches: (..., P, D) patch tokens.
      object_mask: (..., P) bool or {0, 1}, True on object patches.
    """
    s = _pair_cosines(patches)
    o = object_mask.astype(s.dtype)
    b = 1.0 - o
    within = o[..., :, None] * o[..., None, :] * (1.0 - jnp.eye(s.shape[-1], dtype=s.dtype))
    across = o[..., :, None] * b[..., None, :]
    mean_within = jnp.sum(s * within, axis=(-2, -1)) / jnp.sum(within, axis=(-2, -1))
    mean_across = jnp.sum(s * across, axis=(-2, -1)) / jnp.sum(across, axis=(-2, -1))
    return mean_within - mean_across


def text_object_background_contrast(patches, text, object_mask):
    """Text-object-background contrast: mean cosine between the text and the object
    patches minus that between the text and the background patches, per image.

    Args:
      patches: (..., P, D) patch tokens in the joint space (after ``ln_post @ proj``).
      text: (..., D) text embedding of the object's class.
      object_mask: (..., P) bool or {0, 1}.
    Returns:
      (...,), NaN when the object or the background is empty.
    """
    cos = jnp.einsum("...pd,...d->...p", l2_normalize(patches), l2_normalize(text),
                     precision=jax.lax.Precision.HIGHEST)
    o = object_mask.astype(cos.dtype)
    b = 1.0 - o
    return jnp.sum(cos * o, -1) / jnp.sum(o, -1) - jnp.sum(cos * b, -1) / jnp.sum(b, -1)


def toy_scenes(n: int, size: int = 64, n_classes: int = 2, *, seed: int = 0):
    """Synthetic images with known masks, for experiments without a dataset.

    Each image is a smooth noisy background with one or two textured rectangles, each
    of a class with its own colour; rectangles may overlap (the later one wins).

    Returns:
      ``(images, pixels, labels)``: images (n, size, size, 3) float in [0, 1] for
      display; pixels, the same centred and scaled to unit-order values as model
      input (``(image - 0.5) / 0.25``, close to CLIP's normalisation); labels
      (n, size, size) int32, 0 background, ``k + 1`` class k.
    """
    rng = np.random.default_rng(seed)
    palette = rng.uniform(0.1, 0.9, (n_classes + 1, 3))
    yy, xx = np.mgrid[0:size, 0:size] / size
    images = np.empty((n, size, size, 3), np.float32)
    labels = np.zeros((n, size, size), np.int32)
    for i in range(n):
        fx, fy, ph = rng.uniform(1, 4), rng.uniform(1, 4), rng.uniform(0, 2 * np.pi)
        wave = 0.1 * np.sin(2 * np.pi * (fx * xx + fy * yy) + ph)[..., None]
        img = palette[0] + wave + 0.05 * rng.standard_normal((size, size, 3))
        for _ in range(rng.integers(1, 3)):
            k = rng.integers(n_classes)
            h, w = rng.integers(size // 4, size // 2 + 1, 2)
            top, left = rng.integers(0, size - h + 1), rng.integers(0, size - w + 1)
            texture = 0.08 * np.sign(np.sin(2 * np.pi * (k + 3) * (xx + yy)))[..., None]
            patch = palette[k + 1] + texture + 0.05 * rng.standard_normal((size, size, 3))
            region = (slice(top, top + h), slice(left, left + w))
            img[region] = patch[region]
            labels[i][region] = k + 1
        images[i] = np.clip(img, 0.0, 1.0)
    return images, (images - 0.5) / 0.25, labels


def mask_to_patches(mask, patch_size: int, threshold: float = 0.5):
    """Pixel masks (..., H, W) -> patch masks (..., h*w) bool, row-major like the tokens.

    A patch is object when at least ``threshold`` of its pixels are.
    """
    mask = np.asarray(mask, np.float32)
    *lead, h, w = mask.shape
    if h % patch_size or w % patch_size:
        raise ValueError(f"mask {h}x{w} is not a multiple of the patch size {patch_size}")
    blocks = mask.reshape(*lead, h // patch_size, patch_size, w // patch_size, patch_size)
    frac = blocks.mean(axis=(-3, -1))
    return (frac >= threshold).reshape(*lead, -1)


@dataclasses.dataclass(frozen=True)
class LocalizationMetrics:
    """Per-layer localisation metrics of several paths.

    Attributes:
      paths: path names, in the order of the first axis.
      layers: (L,) block indices (the metric is on each block's output).
      patch_similarity: (n_paths, L, B) mean cosine between distinct patches.
      object_background: (n_paths, L, B) object-background contrast.
      text_object_background: (n_paths, L, B) text-object-background contrast,
        all-NaN when no text was given.
      start_layer: ``{name: first block with the parallel path}`` (None for CLIP).
    """

    paths: tuple[str, ...]
    layers: np.ndarray
    patch_similarity: np.ndarray
    object_background: np.ndarray
    text_object_background: np.ndarray
    start_layer: dict[str, int | None]

    def mean(self) -> dict[str, np.ndarray]:
        """Image-averaged metrics: ``{metric: (n_paths, L)}`` (NaN images skipped)."""
        out = {}
        for name in ("patch_similarity", "object_background", "text_object_background"):
            values = getattr(self, name)
            valid = ~np.isnan(values)
            total = np.where(valid, values, 0.0).sum(axis=-1)
            count = valid.sum(axis=-1)
            out[name] = np.where(count > 0, total / np.maximum(count, 1), np.nan)
        return out


@jax.jit
def _metrics(tokens, masks, text):
    """tokens (L, B, 1 + P, D), masks (B, P), text (B, D) -> three (L, B) arrays."""
    patches = tokens[:, :, 1:]
    return (patch_similarity(patches),
            object_background_contrast(patches, masks[None]),
            text_object_background_contrast(patches, text[None], masks[None]))


def localization_metrics(model, pixels, masks, text=None, paths: Mapping[str, Any] | None = None,
                         *, mask_threshold: float = 0.5) -> LocalizationMetrics:
    """Per-layer localisation metrics of several paths (default CLIP, a Surgery-like v-v
    path and GEM; :func:`method_paths` gives every method).

    All three metrics are computed on every block's output tokens after
    ``ln_post @ proj`` (the space where patches meet text), patches only.

    Args:
      model: a loaded model (``.config``, ``.params``).
      pixels: (B, H, W, 3) normalised pixels (see :func:`as_pixels`).
      masks: (B, H, W) object masks at the pixel size (bool, or label maps where
        nonzero is object).
      text: (B, D) or (D,) embedding of each image's object class; None skips the
        text metric.
      paths: as in :func:`layer_tokens`; default :func:`default_paths`.
      mask_threshold: fraction of object pixels that makes a patch object.
    Returns:
      :class:`LocalizationMetrics`.
    """
    cfg = model.config
    pixels = as_pixels(pixels, cfg.vision.patch_size)
    masks = np.asarray(masks)
    if masks.ndim == 2:
        masks = masks[None]
    if masks.shape != pixels.shape[:3]:
        raise ValueError(f"masks {masks.shape} must match the pixels' (B, H, W) {pixels.shape[:3]}")
    patch_masks = mask_to_patches(masks != 0, cfg.vision.patch_size, mask_threshold)
    if paths is None:
        paths = default_paths(cfg.vision.layers)
    vit, params = visual_tower(model)
    toks = layer_tokens(vit, params, pixels, paths)
    b = pixels.shape[0]
    has_text = text is not None
    txt = jnp.broadcast_to(jnp.asarray(text, jnp.float32), (b, cfg.embed_dim)) if has_text \
        else jnp.ones((b, cfg.embed_dim), jnp.float32)
    names = tuple(paths)
    per = [jax.device_get(_metrics(toks[name], jnp.asarray(patch_masks), txt)) for name in names]
    sim, obc, tobc = (np.stack([p[i] for p in per]) for i in range(3))
    if not has_text:
        tobc = np.full_like(tobc, np.nan)
    n = cfg.vision.layers
    return LocalizationMetrics(
        paths=names,
        layers=np.arange(n),
        patch_similarity=sim,
        object_background=obc,
        text_object_background=tobc,
        start_layer={name: n - as_method(o).blocks if as_method(o).blocks else None for name, o in paths.items()},
    )
