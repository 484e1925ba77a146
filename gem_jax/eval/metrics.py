"""Segmentation metrics: a confusion matrix accumulated on device, mIoU as mmseg, and point-label p-mIoU."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from gem_jax.eval.datasets import IGNORE_INDEX


def _count_dtype():
    # uint32 holds 4.29e9 pixels per cell: more than any benchmark split puts in one cell
    # (COCO-Stuff val is ~1.5e9 pixels in all). int64 when x64 is on.
    return jnp.int64 if jax.config.jax_enable_x64 else jnp.uint32


def new_confusion(num_classes: int) -> jax.Array:
    """A zero (num_classes, num_classes) confusion matrix: rows ground truth, columns prediction."""
    if not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")
    return jnp.zeros((num_classes, num_classes), _count_dtype())


def _local_counts(pred, label, c: int, ignore_index: int):
    """(c, c) int32 counts of the pixels of one array (or one shard)."""
    pred = pred.reshape(-1).astype(jnp.int32)
    label = label.reshape(-1).astype(jnp.int32)
    valid = (label != ignore_index) & (label >= 0) & (label < c) & (pred >= 0) & (pred < c)
    # Invalid pixels go to one extra bin that is dropped.
    flat = jnp.where(valid, label * c + pred, c * c)
    return jnp.bincount(flat, length=c * c + 1)[:-1].reshape(c, c)


def _mesh_axes(spec) -> tuple[str, ...]:
    names = []
    for part in spec:
        if part is None:
            continue
        names.extend(part if isinstance(part, tuple) else (part,))
    return tuple(names)


@functools.partial(jax.jit, static_argnames=("ignore_index",))
def update(conf: jax.Array, pred: jax.Array, label: jax.Array, ignore_index: int = IGNORE_INDEX) -> jax.Array:
    """Adds one batch of pixels to the confusion matrix, on device.

    Args:
      conf: (C, C) counts from :func:`new_confusion` or a previous update.
      pred: predicted classes in [0, C), any shape (a map, or a batch of maps).
      label: ground truth of the same shape; pixels equal to ``ignore_index`` or
        outside [0, C) are not counted (padding can be marked with ``ignore_index``).
    Returns:
      The updated matrix. Sharding-agnostic: unsharded or auto-sharded inputs are
      counted by XLA wherever they live; inputs sharded over explicit mesh axes (the
      default of ``jax.make_mesh``) are counted shard by shard and summed with ``psum``.
    """
    c = conf.shape[0]
    pred, label = jnp.asarray(pred), jnp.asarray(label)
    if pred.shape != label.shape:
        raise ValueError(f"pred and label differ in shape: {pred.shape} vs {label.shape}")
    sharding = jax.typeof(label).sharding
    axes = _mesh_axes(getattr(sharding, "spec", ()))
    if not axes:  # the label may be replicated while the prediction is sharded
        sharding = jax.typeof(pred).sharding
        axes = _mesh_axes(getattr(sharding, "spec", ()))
    if not axes:
        counts = _local_counts(pred, label, c, ignore_index)
    else:
        pred, label = jax.sharding.reshard(pred, sharding), jax.sharding.reshard(label, sharding)
        counts = jax.shard_map(
            lambda p, lab: jax.lax.psum(_local_counts(p, lab, c, ignore_index), axes),
            mesh=sharding.mesh, in_specs=(sharding.spec, sharding.spec), out_specs=jax.sharding.PartitionSpec(),
        )(pred, label)
    return conf + counts.astype(conf.dtype)


def _as_f64(conf) -> np.ndarray:
    conf = np.asarray(jax.device_get(conf)).astype(np.float64)
    if conf.ndim != 2 or conf.shape[0] != conf.shape[1]:
        raise ValueError(f"expected a square confusion matrix, got shape {conf.shape}")
    return conf


def iou_per_class(conf) -> np.ndarray:
    """Per-class IoU ``TP / (TP + FP + FN)`` (float64, in [0, 1]); NaN for a class that is
    neither in the ground truth nor predicted (union 0), as in mmseg."""
    conf = _as_f64(conf)
    tp = np.diag(conf)
    union = conf.sum(0) + conf.sum(1) - tp
    with np.errstate(invalid="ignore", divide="ignore"):
        return tp / union


def mean_iou(conf) -> float:
    """mmseg's mIoU: the mean of :func:`iou_per_class` over classes whose union is not 0
    (NaN entries skipped); NaN when no pixel was counted."""
    iou = iou_per_class(conf)
    return float(np.nanmean(iou)) if np.isfinite(iou).any() else float("nan")


def pixel_accuracy(conf) -> float:
    """Correct pixels over counted pixels (mmseg's aAcc); NaN when none were counted."""
    conf = _as_f64(conf)
    total = conf.sum()
    return float(np.trace(conf) / total) if total else float("nan")


def accuracy_per_class(conf) -> np.ndarray:
    """Per-class recall ``TP / (TP + FN)``; NaN for classes absent from the ground truth."""
    conf = _as_f64(conf)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.diag(conf) / conf.sum(1)


def _nan_to_none(x):
    return None if not np.isfinite(x) else float(x)


def summarize(conf, class_names) -> dict:
    """The metrics of a confusion matrix as a JSON-able dict, in percent as papers report:
    ``mIoU``, ``aAcc``, ``mAcc``, ``per_class_iou`` (``None`` for classes with union 0)."""
    iou = iou_per_class(conf)
    if len(class_names) != len(iou):
        raise ValueError(f"{len(class_names)} class names for a {len(iou)}-class matrix")
    acc = accuracy_per_class(conf)
    return {
        "mIoU": _nan_to_none(100 * mean_iou(conf)),
        "aAcc": _nan_to_none(100 * pixel_accuracy(conf)),
        "mAcc": _nan_to_none(100 * np.nanmean(acc)) if np.isfinite(acc).any() else None,
        "per_class_iou": {name: _nan_to_none(100 * v) for name, v in zip(class_names, iou)},
        "pixels": int(np.asarray(jax.device_get(conf)).sum(dtype=np.int64)),
    }


# ----------------------------------------------------------------------------- point labels


def new_point_counts(num_classes: int) -> jax.Array:
    """Zero (num_classes, 3) counts of true positives, false positives, false negatives."""
    if not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")
    return jnp.zeros((num_classes, 3), _count_dtype())


@jax.jit
def point_update(counts: jax.Array, classes: jax.Array, predicted: jax.Array, positive: jax.Array,
                 valid: jax.Array | None = None) -> jax.Array:
    """Adds a batch of labelled points to the per-class TP/FP/FN counts, on device.

    Args:
      counts: (C, 3) from :func:`new_point_counts`.
      classes: (N,) class of each point.
      predicted: (N,) bool, whether the class's map is "on" (>= threshold) at the point.
      positive: (N,) bool, the label: True for a "yes" point, False for a "no" point.
      valid: (N,) bool mask for padding; ``None`` counts every point.
    """
    c = counts.shape[0]
    classes = jnp.asarray(classes).astype(jnp.int32)
    predicted, positive = jnp.asarray(predicted, bool), jnp.asarray(positive, bool)
    ok = (classes >= 0) & (classes < c)
    if valid is not None:
        ok &= jnp.asarray(valid, bool)
    kind = jnp.where(positive & predicted, 0, jnp.where(~positive & predicted, 1, jnp.where(positive, 2, 3)))
    flat = jnp.where(ok & (kind < 3), classes * 3 + kind, c * 3)
    add = jnp.bincount(flat, length=c * 3 + 1)[:-1].reshape(c, 3)
    return counts + add.astype(counts.dtype)


def point_iou_per_class(counts) -> np.ndarray:
    """Per-class point IoU ``TP / (TP + FP + FN)``; NaN where the class had no positive
    point and no false positive (nothing to score)."""
    counts = np.asarray(jax.device_get(counts)).astype(np.float64)
    tp, fp, fn = counts[:, 0], counts[:, 1], counts[:, 2]
    with np.errstate(invalid="ignore", divide="ignore"):
        return tp / (tp + fp + fn)


def point_miou(counts) -> float:
    """p-mIoU, the mean of :func:`point_iou_per_class` over the classes it is defined for.

    The aggregation, exactly: for every image and every class with point labels in it,
    the class's heatmap (min-max scaled to [0, 1] per image and class) is read at each
    point and called "on" where it is >= 0.5. Over all images of the split, each point
    adds to its class: TP (yes point, on), FN (yes point, off), FP (no point, on); a no
    point that is off adds nothing. Class IoU is TP / (TP + FP + FN) over the whole split
    (as mIoU accumulates pixels), and p-mIoU the unweighted mean over classes with
    TP + FP + FN > 0.
    """
    iou = point_iou_per_class(counts)
    return float(np.nanmean(iou)) if np.isfinite(iou).any() else float("nan")


def points_on(heatmap: np.ndarray, x: np.ndarray, y: np.ndarray, threshold: float = 0.5) -> np.ndarray:
    """Whether a (H, W) heatmap in [0, 1] is >= ``threshold`` at relative points (x, y) in [0, 1].

    A point maps to the pixel that contains it: column ``floor(x * W)`` and row
    ``floor(y * H)``, clamped to the map (so x = 1 is the last column).
    """
    heatmap = np.asarray(heatmap)
    h, w = heatmap.shape
    cols = np.clip(np.floor(np.asarray(x, np.float64) * w).astype(np.int64), 0, w - 1)
    rows = np.clip(np.floor(np.asarray(y, np.float64) * h).astype(np.int64), 0, h - 1)
    return heatmap[rows, cols] >= threshold


def summarize_points(counts, class_names, display_names=None) -> dict:
    """p-mIoU and per-class point IoU as a JSON-able dict, in percent."""
    iou = point_iou_per_class(counts)
    counts = np.asarray(jax.device_get(counts)).astype(np.int64)
    per_class = {name: _nan_to_none(100 * v) for name, v in zip(class_names, iou)}
    out = {
        "p-mIoU": _nan_to_none(100 * point_miou(counts)),
        "per_class_iou": per_class,
        "scored_classes": int(np.isfinite(iou).sum()),
        "points": {"tp": int(counts[:, 0].sum()), "fp": int(counts[:, 1].sum()), "fn": int(counts[:, 2].sum())},
    }
    if display_names is not None:
        out["display_names"] = dict(zip(class_names, display_names))
    return out
