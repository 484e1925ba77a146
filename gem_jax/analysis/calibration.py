"""Fitting GEM's temperature and background threshold to a few labelled images with optax (soft IoU)."""

from __future__ import annotations

import dataclasses
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from gem_jax import postprocess
from gem_jax.analysis.localization import as_pixels, layer_tokens, visual_tower
from gem_jax.engine.gem import adaptive_inverse_temperature
from gem_jax.engine.methods import GEMOptions
from gem_jax.engine.tower import patch_logits
from gem_jax.models import VisionTransformer
from gem_jax.models.layers import l2_normalize, resize_2d

__all__ = [
    "CalibrationResult",
    "adaptive_temperatures",
    "calibrate",
    "class_prototypes",
    "gem_logits",
    "hard_segmentation",
    "mean_iou",
    "soft_iou",
    "soft_segmentation",
]

#: CLIP's logit scale: class probabilities are ``softmax(100 * cosine)`` (the label rule's,
#: :func:`gem_jax.postprocess.label_rule`).
LOGIT_SCALE = postprocess.LOGIT_SCALE


def gem_logits(vit: VisionTransformer, params, pixels, text, opts: GEMOptions, inv_temp=None):
    """Cosine logits (B, P, H, W) of GEM patch tokens and text, upsampled to the pixels.

    Differentiable in ``inv_temp`` (1/tau, a scalar or (B, 1, 1, 1)); ``None`` uses
    ``opts``' own temperature (adaptive by default).
    """
    inv = {} if inv_temp is None else {"gem": inv_temp}
    tokens = layer_tokens(vit, params, pixels, {"gem": opts}, inv_temps=inv, every_layer=False)["gem"][0]
    sims = patch_logits(tokens, text, vit.grid_shape(pixels))
    return resize_2d(sims, pixels.shape[1:3], "bilinear", axes=(-2, -1))


def soft_segmentation(logits, threshold, sharpness: float = 0.02):
    """A differentiable relaxation of :func:`hard_segmentation`: (..., P, H, W) cosines
    -> (..., 1 + P, H, W) scores summing to 1 over classes, background first.

    Class probabilities ``p = softmax(100 * cosine)``; foreground weight
    ``f = sigmoid((max_k p_k - threshold) / sharpness)``; scores ``(1 - f, f * p)``.
    """
    probs = jax.nn.softmax(LOGIT_SCALE * logits, axis=-3)
    fg = jax.nn.sigmoid((jnp.max(probs, axis=-3, keepdims=True) - threshold) / sharpness)
    return jnp.concatenate([1.0 - fg, fg * probs], axis=-3)


def hard_segmentation(logits, threshold):
    """(..., P, H, W) cosines -> (..., H, W) int32 labels: 0 where the top class
    probability (``softmax(100 * cosine)``) is below ``threshold``, else ``1 + argmax``
    (the label rule, :func:`gem_jax.postprocess.decide`; ``threshold`` may be traced)."""
    probs = postprocess.class_probabilities(logits)
    flat = probs.reshape(-1, *probs.shape[-3:])
    labels = jax.vmap(lambda p: postprocess.decide(p, threshold))(flat)
    return labels.reshape(*probs.shape[:-3], *probs.shape[-2:])


def soft_iou(scores, labels):
    """Soft mean IoU over a set of images (classes present in the ground truth).

    Args:
      scores: (B, K, H, W) class scores in [0, 1] (background is class 0).
      labels: (B, H, W) int ground truth in 0..K-1.
    Returns:
      scalar: ``mean_c sum(s_c y_c) / sum(s_c + y_c - s_c y_c)`` with sums over all
      images and pixels, over the classes c that occur in ``labels``.
    """
    onehot = jax.nn.one_hot(labels, scores.shape[1], axis=1, dtype=scores.dtype)
    axes = (0, 2, 3)
    inter = jnp.sum(scores * onehot, axes)
    union = jnp.sum(scores, axes) + jnp.sum(onehot, axes) - inter
    present = jnp.sum(onehot, axes) > 0
    return jnp.sum(jnp.where(present, inter / jnp.maximum(union, 1e-12), 0.0)) / jnp.sum(present)


def mean_iou(pred, labels, n_classes: int) -> float:
    """Mean IoU of integer label maps over a set of images, in NumPy.

    Intersections and unions are summed over all images, then averaged over the
    classes (0..n_classes-1, background included) whose union is not empty.
    """
    pred = np.asarray(pred).reshape(-1)
    labels = np.asarray(labels).reshape(-1)
    ious = []
    for c in range(n_classes):
        p, t = pred == c, labels == c
        union = np.sum(p | t)
        if union:
            ious.append(np.sum(p & t) / union)
    return float(np.mean(ious))


@functools.partial(jax.jit, static_argnames=("vit", "layers"))
def _adaptive_taus(vit, params, pixels, layers: int):
    def run(module, pixels):
        x = module.embed(pixels)
        n = len(module.resblocks)
        taus = []
        for i, blk in enumerate(module.resblocks):
            if i >= n - layers:
                inv = adaptive_inverse_temperature(blk.ln_1(x), blk.attn.head_dim)
                taus.append(1.0 / inv.reshape(-1))
            if i < n - 1:
                x = blk(x)
        return jnp.stack(taus, axis=1)

    return nn.apply(run, vit)({"params": params}, pixels)


def adaptive_temperatures(model, pixels, layers: int = 6) -> np.ndarray:
    """GEM's adaptive temperatures tau (B, layers) at each of the last ``layers`` blocks."""
    vit, params = visual_tower(model)
    pixels = as_pixels(pixels, model.config.vision.patch_size)
    return np.asarray(_adaptive_taus(vit, params, pixels, min(layers, model.config.vision.layers)))


def class_prototypes(model, pixels, labels, n_classes: int, opts: GEMOptions | None = None) -> np.ndarray:
    """Stand-in "text" embeddings: the normalised mean GEM patch token of each class.

    For experiments where the text tower cannot name things (random weights). Class
    ``k`` (label ``k + 1``) averages the normalised GEM tokens (adaptive temperature)
    of patches whose centre pixel carries that label. Returns (n_classes, D).
    """
    vit, params = visual_tower(model)
    pixels = as_pixels(pixels, model.config.vision.patch_size)
    opts = opts or GEMOptions(layers=min(6, model.config.vision.layers))
    tokens = np.asarray(layer_tokens(vit, params, pixels, {"gem": opts}, every_layer=False)["gem"][0])
    patches = np.asarray(l2_normalize(jnp.asarray(tokens[:, 1:])))
    p = model.config.vision.patch_size
    centres = np.asarray(labels)[:, p // 2::p, p // 2::p].reshape(len(patches), -1)
    out = []
    for k in range(n_classes):
        sel = patches[centres == k + 1]
        if not len(sel):
            raise ValueError(f"class {k} (label {k + 1}) has no patch in the labels")
        m = sel.mean(axis=0)
        out.append(m / np.linalg.norm(m))
    return np.stack(out).astype(np.float32)


@dataclasses.dataclass(frozen=True)
class CalibrationResult:
    """What :func:`calibrate` returns.

    Attributes:
      temperature: fitted tau of the GEM path (used at every GEM block).
      background_threshold: fitted threshold on the top class probability.
      initial_temperature, initial_threshold: where the fit started.
      loss_before, loss_after: soft-IoU loss (1 - soft mIoU) on the fitting images.
      miou_before, miou_after: hard mIoU on the held-out images with the initial and
        the fitted values.
      miou_default: hard mIoU on the held-out images with GEM's adaptive temperature
        and the initial threshold (the method's defaults when that is 0.85).
      history: (steps,) loss at each optimiser step.
    """

    temperature: float
    background_threshold: float
    initial_temperature: float
    initial_threshold: float
    loss_before: float
    loss_after: float
    miou_before: float
    miou_after: float
    miou_default: float
    history: np.ndarray


def calibrate(model, pixels, labels, text, heldout_pixels, heldout_labels, *, layers: int = 6,
              iterations: int = 1, init_temperature: float | None = None, init_threshold: float = 0.85,
              steps: int = 100, learning_rate: float = 0.05, sharpness: float = 0.02) -> CalibrationResult:
    """Fits GEM's temperature and the background threshold by gradient descent on soft IoU.

    Only two scalars are trained, ``log(tau)`` and ``logit(threshold)``, with
    ``optax.adam``; the model's parameters enter the loss through
    ``jax.lax.stop_gradient`` and are never updated. The forward pass is the GEM
    path with a fixed (traced) temperature at every GEM block, class probabilities
    ``softmax(100 * cosine)`` and a sigmoid relaxation of the background threshold
    (:func:`soft_segmentation`); the loss is ``1 -`` :func:`soft_iou`.

    Args:
      model: a loaded model (``.config``, ``.params``).
      pixels, heldout_pixels: (B, H, W, 3) normalised pixels to fit on and to test on.
      labels, heldout_labels: (B, H, W) int label maps at the pixel size, 0 background,
        ``k + 1`` class k.
      text: (P, D) class embeddings (e.g. ``GEM(model).embed_text(names)``).
      layers, iterations: GEM options of the path.
      init_temperature: starting tau; ``None`` is the mean adaptive temperature of
        the fitting images over the GEM blocks.
      init_threshold: starting background threshold in (0, 1).
      steps, learning_rate: Adam steps and step size (on the log / logit scale).
      sharpness: width of the sigmoid of the soft threshold.
    Returns:
      :class:`CalibrationResult`.
    """
    cfg = model.config
    vit, params = visual_tower(model)
    layers = min(layers, cfg.vision.layers)
    opts = GEMOptions(layers=layers, iterations=iterations)
    pixels = as_pixels(pixels, cfg.vision.patch_size)
    heldout_pixels = as_pixels(heldout_pixels, cfg.vision.patch_size)
    labels = jnp.asarray(labels, jnp.int32)
    heldout_labels = np.asarray(heldout_labels)
    text = jnp.asarray(text, jnp.float32)
    n_classes = text.shape[0] + 1
    if labels.shape != pixels.shape[:3] or heldout_labels.shape != heldout_pixels.shape[:3]:
        raise ValueError("labels must be (B, H, W) at the size of their pixels")
    if not 0.0 < init_threshold < 1.0:
        raise ValueError(f"init_threshold must be in (0, 1), got {init_threshold}")
    if init_temperature is None:
        init_temperature = float(np.mean(adaptive_temperatures(model, pixels, layers)))
    if not init_temperature > 0:
        raise ValueError(f"init_temperature must be > 0, got {init_temperature}")

    def unpack(theta):
        return jnp.exp(theta["log_tau"]), jax.nn.sigmoid(theta["logit_threshold"])

    def loss_fn(theta, params, pixels, labels):
        params = jax.lax.stop_gradient(params)  # frozen: only the two scalars learn
        tau, threshold = unpack(theta)
        logits = gem_logits(vit, params, pixels, text, opts, 1.0 / tau)
        return 1.0 - soft_iou(soft_segmentation(logits, threshold, sharpness), labels)

    optimiser = optax.adam(learning_rate)

    @jax.jit
    def update(theta, state, params, pixels, labels):
        loss, grads = jax.value_and_grad(loss_fn)(theta, params, pixels, labels)
        updates, state = optimiser.update(grads, state, theta)
        return optax.apply_updates(theta, updates), state, loss

    @jax.jit
    def predict(params, pixels, inv_temp, threshold):
        return hard_segmentation(gem_logits(vit, params, pixels, text, opts, inv_temp), threshold)

    theta = {"log_tau": jnp.log(jnp.float32(init_temperature)),
             "logit_threshold": jnp.log(jnp.float32(init_threshold) / (1.0 - jnp.float32(init_threshold)))}
    state = optimiser.init(theta)
    history = []
    for _ in range(steps):
        theta, state, loss = update(theta, state, params, pixels, labels)
        history.append(loss)
    loss_before = float(history[0]) if history else float(jax.jit(loss_fn)(theta, params, pixels, labels))
    loss_after = float(jax.jit(loss_fn)(theta, params, pixels, labels))
    tau, threshold = (float(v) for v in unpack(theta))

    def held_miou(inv_temp, thr):
        pred = np.asarray(predict(params, heldout_pixels, inv_temp, thr))
        return mean_iou(pred, heldout_labels, n_classes)

    adaptive = jax.jit(lambda p, x: hard_segmentation(gem_logits(vit, p, x, text, opts), init_threshold))
    miou_default = mean_iou(np.asarray(adaptive(params, heldout_pixels)), heldout_labels, n_classes)
    return CalibrationResult(
        temperature=tau,
        background_threshold=threshold,
        initial_temperature=float(init_temperature),
        initial_threshold=float(init_threshold),
        loss_before=loss_before,
        loss_after=loss_after,
        miou_before=held_miou(1.0 / init_temperature, init_threshold),
        miou_after=held_miou(1.0 / tau, threshold),
        miou_default=miou_default,
        history=np.asarray(jax.device_get(history), np.float64),
    )
