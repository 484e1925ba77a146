"""Metrics: confusion matrix and mIoU against mmseg's formula in NumPy, p-mIoU by hand, sharding."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gem_jax.eval import metrics

IGNORE = 255


def mmseg_reference(preds, labels, num_classes, ignore_index=IGNORE):
    """mmseg's ``intersect_and_union`` summed over images, then its IoU / aAcc / nanmean,
    written from the definition with histograms (no confusion matrix)."""
    total_i = np.zeros(num_classes)
    total_u = np.zeros(num_classes)
    total_l = np.zeros(num_classes)
    for pred, label in zip(preds, labels):
        mask = label != ignore_index
        pred, label = pred[mask], label[mask]
        intersect = pred[pred == label]
        area_i = np.histogram(intersect, bins=num_classes, range=(0, num_classes - 1))[0]
        area_p = np.histogram(pred, bins=num_classes, range=(0, num_classes - 1))[0]
        area_l = np.histogram(label, bins=num_classes, range=(0, num_classes - 1))[0]
        total_i += area_i
        total_u += area_p + area_l - area_i
        total_l += area_l
    with np.errstate(invalid="ignore", divide="ignore"):
        iou = total_i / total_u
    return iou, np.nanmean(iou), total_i.sum() / total_l.sum()


def random_maps(rng, num_classes, shapes, ignore_frac=0.2, absent=()):
    preds, labels = [], []
    present = [c for c in range(num_classes) if c not in absent]
    for shape in shapes:
        label = rng.choice(present, size=shape).astype(np.int32)
        # Correlate predictions with the labels so IoUs are not all tiny.
        pred = np.where(rng.random(shape) < 0.6, label, rng.choice(present, size=shape)).astype(np.int32)
        label[rng.random(shape) < ignore_frac] = IGNORE
        preds.append(pred)
        labels.append(label)
    return preds, labels


def test_miou_matches_mmseg_formula_with_ignore_and_absent_classes():
    rng = np.random.default_rng(0)
    c = 9
    preds, labels = random_maps(rng, c, [(37, 51), (64, 20), (5, 5), (90, 33)], absent=(4,))
    # Class 7 is predicted somewhere but never in the ground truth: IoU 0, not NaN.
    preds[0][0, :3] = 7
    for lab in labels:
        lab[lab == 7] = 0
    conf = metrics.new_confusion(c)
    for p, lab in zip(preds, labels):
        conf = metrics.update(conf, jnp.asarray(p), jnp.asarray(lab))
    iou, miou, aacc = mmseg_reference(preds, labels, c)
    got = metrics.iou_per_class(conf)
    np.testing.assert_array_equal(np.isnan(got), np.isnan(iou))
    assert np.isnan(got[4]) and got[7] == 0.0
    np.testing.assert_allclose(got[~np.isnan(got)], iou[~np.isnan(iou)], rtol=0, atol=1e-6)
    assert abs(metrics.mean_iou(conf) - miou) < 1e-6
    assert abs(metrics.pixel_accuracy(conf) - aacc) < 1e-6
    # The confusion matrix itself: rows ground truth, columns prediction.
    want = np.zeros((c, c), np.int64)
    for p, lab in zip(preds, labels):
        m = lab != IGNORE
        np.add.at(want, (lab[m], p[m]), 1)
    np.testing.assert_array_equal(np.asarray(conf), want)


def test_summary_is_json_in_percent_with_none_for_absent_classes():
    rng = np.random.default_rng(1)
    preds, labels = random_maps(rng, 4, [(20, 20)], absent=(2,))
    conf = metrics.update(metrics.new_confusion(4), preds[0], labels[0])
    s = metrics.summarize(conf, ["a", "b", "c", "d"])
    json.dumps(s)
    iou, miou, aacc = mmseg_reference(preds, labels, 4)
    assert s["per_class_iou"]["c"] is None
    assert abs(s["mIoU"] - 100 * miou) < 1e-4 and abs(s["aAcc"] - 100 * aacc) < 1e-4
    assert s["pixels"] == int((labels[0] != IGNORE).sum())
    with pytest.raises(ValueError):
        metrics.summarize(conf, ["a"])


def test_batched_update_equals_per_image_updates_and_bad_labels_are_ignored():
    rng = np.random.default_rng(2)
    preds, labels = random_maps(rng, 5, [(16, 24)] * 3)
    labels[1][0, :4] = [-1, 5, 99, IGNORE]  # out of range: not counted
    one = metrics.new_confusion(5)
    for p, lab in zip(preds, labels):
        one = metrics.update(one, p, lab)
    batch = metrics.update(metrics.new_confusion(5), np.stack(preds), np.stack(labels))
    np.testing.assert_array_equal(np.asarray(one), np.asarray(batch))
    assert int(np.asarray(batch).sum()) == sum(int(((lab >= 0) & (lab < 5)).sum()) for lab in labels)
    with pytest.raises(ValueError):
        metrics.update(metrics.new_confusion(5), preds[0], labels[0][:-1])


def test_update_stays_on_device():
    """No host round trip: accumulating device arrays needs no transfer at all."""
    rng = np.random.default_rng(3)
    preds, labels = random_maps(rng, 6, [(32, 32)] * 4)
    preds, labels = [jnp.asarray(p) for p in preds], [jnp.asarray(lab) for lab in labels]
    conf = metrics.new_confusion(6)
    conf = metrics.update(conf, preds[0], labels[0])  # compile outside the guard
    with jax.transfer_guard("disallow"):
        for p, lab in zip(preds[1:], labels[1:]):
            conf = metrics.update(conf, p, lab)
    assert isinstance(conf, jax.Array)
    want = mmseg_reference([np.asarray(p) for p in preds], [np.asarray(lab) for lab in labels], 6)[1]
    assert abs(metrics.mean_iou(conf) - want) < 1e-6


def test_empty_matrix_gives_nan_not_error():
    conf = metrics.new_confusion(3)
    assert np.isnan(metrics.mean_iou(conf)) and np.isnan(metrics.pixel_accuracy(conf))
    assert metrics.summarize(conf, ["a", "b", "c"])["mIoU"] is None
    with pytest.raises(ValueError):
        metrics.new_confusion(0)


def test_update_is_sharding_agnostic_on_two_devices():
    """Inputs split over a 2-device data mesh give the same counts as one device."""
    code = textwrap.dedent("""
        import jax, numpy as np
        from jax.sharding import AxisType, NamedSharding, PartitionSpec as P
        from gem_jax.eval import metrics
        assert jax.device_count() == 2, jax.devices()
        rng = np.random.default_rng(0)
        label = rng.integers(0, 7, (4, 30, 40)).astype(np.int32)
        label[rng.random(label.shape) < 0.2] = 255
        pred = rng.integers(0, 7, (4, 30, 40)).astype(np.int32)
        m = label != 255
        ref = np.zeros((7, 7), np.int64)
        np.add.at(ref, (label[m], pred[m]), 1)
        for kind in (AxisType.Explicit, AxisType.Auto):  # jax.make_mesh's default is Explicit
            mesh = jax.make_mesh((2,), ("data",), axis_types=(kind,))
            for spec_pred, spec_label in ((P("data"), P("data")), (P(None, "data"), P("data")), (P("data"), P())):
                sp = jax.device_put(pred, NamedSharding(mesh, spec_pred))
                sl = jax.device_put(label, NamedSharding(mesh, spec_label))
                conf = metrics.update(metrics.new_confusion(7), sp, sl)
                np.testing.assert_array_equal(np.asarray(conf), ref, err_msg=f"{kind} {spec_pred} {spec_label}")
        print("OK")
    """)
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2", JAX_PLATFORMS="cpu")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "OK" in out.stdout, out.stderr[-2000:]


# ----------------------------------------------------------------------------- p-mIoU


def test_points_on_maps_relative_coordinates_to_pixels():
    heat = np.zeros((4, 5))
    heat[0, 0] = 0.5  # exactly the threshold: on
    heat[3, 4] = 0.9
    heat[1, 2] = 0.49
    x = np.array([0.0, 1.0, 0.99, 0.5, 0.45])
    y = np.array([0.0, 1.0, 0.99, 0.3, 0.3])
    # (0,0) -> pixel (0,0); x=y=1 clamps to the last pixel; 0.5*5=2.5 -> col 2, 0.3*4=1.2 -> row 1.
    np.testing.assert_array_equal(metrics.points_on(heat, x, y), [True, True, True, False, False])


def test_p_miou_hand_computed_accumulates_over_images():
    counts = metrics.new_point_counts(3)
    # Image 1, class 0: yes points on, on, off; no point on  -> TP 2, FN 1, FP 1.
    counts = metrics.point_update(counts, np.array([0, 0, 0, 0]), np.array([1, 1, 0, 1], bool),
                                  np.array([1, 1, 1, 0], bool))
    # Image 2, class 0: a yes point on (TP 1), a no point off (nothing);
    # class 1: only no points, both off (no score); class 2: one yes point on (TP 1).
    counts = metrics.point_update(counts, np.array([0, 0, 1, 1, 2, 2]), np.array([1, 0, 0, 0, 1, 0], bool),
                                  np.array([1, 0, 0, 0, 1, 0], bool),
                                  valid=np.array([1, 1, 1, 1, 1, 0], bool))  # last entry is padding
    np.testing.assert_array_equal(np.asarray(counts), [[3, 1, 1], [0, 0, 0], [1, 0, 0]])
    iou = metrics.point_iou_per_class(counts)
    np.testing.assert_allclose(iou[[0, 2]], [3 / 5, 1.0])
    assert np.isnan(iou[1])
    assert metrics.point_miou(counts) == pytest.approx((0.6 + 1.0) / 2)
    # Not the mean of per-image IoUs (image 1: 2/4, image 2: 1/1 for class 0).
    assert metrics.point_miou(counts) != pytest.approx(((0.5 + 1.0) / 2 + 1.0) / 2)
    s = metrics.summarize_points(counts, ["/m/a", "/m/b", "/m/c"], ["A", "B", "C"])
    json.dumps(s)
    assert s["p-mIoU"] == pytest.approx(80.0) and s["per_class_iou"]["/m/b"] is None
    assert s["scored_classes"] == 2 and s["points"] == {"tp": 4, "fp": 1, "fn": 1}


def test_p_miou_false_positive_only_class_scores_zero():
    counts = metrics.point_update(metrics.new_point_counts(2), np.array([0, 1]), np.array([1, 1], bool),
                                  np.array([1, 0], bool))
    np.testing.assert_allclose(metrics.point_iou_per_class(counts), [1.0, 0.0])
    assert metrics.point_miou(counts) == pytest.approx(0.5)
