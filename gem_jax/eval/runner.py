"""The evaluation loop: predictions per protocol, metrics on device, resumable state, saved label maps."""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import logging
import pathlib
import sys
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

from gem_jax import files, postprocess, preprocess
from gem_jax.engine.tower import min_max
from gem_jax.eval import class_names, metrics
from gem_jax.eval.datasets import IGNORE_INDEX, Dataset, DatasetError, voc_palette
from gem_jax.eval.images import get_image_steps, require_opencv
from gem_jax.eval.protocols import Protocol, get_protocol
from gem_jax.eval.sliding import bilinear_matrix, rescaled_size, window_logits
from gem_jax.loading import Model
from gem_jax.pipeline import GEM
from gem_jax.text import resolve_templates

log = logging.getLogger(__name__)

#: Label maps and logits are padded up to multiples of this, so the post-processing
#: step compiles once per size bucket rather than once per image size.
SIZE_BUCKET = 128
#: Most prompts x images whose logits one forward call returns at once (host memory).
MAX_MAPS_PER_CALL = 256
STATE_VERSION = 1


class EvaluationError(RuntimeError):
    """An evaluation that cannot go on: a failing image with ``on_error="fail"``, or a state
    file that belongs to another evaluation."""


class StateFileError(EvaluationError):
    """The state file cannot be used: damaged, not a state file, or another evaluation's."""


@dataclasses.dataclass(frozen=True)
class Queries:
    """The prompts of a semantic evaluation and the class each one votes for.

    Attributes:
      names: prompt names, in order.
      classes: (P,) int32 dataset class of each prompt.
    """

    names: tuple[str, ...]
    classes: np.ndarray


def build_queries(dataset: Dataset, protocol: Protocol) -> Queries:
    """The prompts a protocol uses for a dataset: each class's first name (every name
    with ``synonyms``); the background class only with ``background_prompts``. The names
    come from the protocol's ``class_names`` set when it has one, else from the dataset."""
    table = dataset.prompts
    if protocol.class_names is not None:
        loaded = class_names.class_names(protocol.class_names, dataset.name)
        if loaded.num_classes != dataset.num_classes:
            raise ValueError(f"the {protocol.class_names!r} class names list {loaded.num_classes} classes for "
                             f"{dataset.name}, which has {dataset.num_classes}")
        table = loaded.names
    names, classes = [], []
    for c, prompts in enumerate(table):
        if c == dataset.background and not protocol.background_prompts:
            continue
        for name in (prompts if protocol.synonyms else prompts[:1]):
            names.append(name)
            classes.append(c)
    if dataset.background is not None and not protocol.background_prompts and protocol.background_threshold is None:
        raise ValueError(f"{dataset.name} has a background class: the protocol needs background prompts or a "
                         "background threshold")
    return Queries(tuple(names), np.asarray(classes, np.int32))


def _bucket(n: int) -> int:
    return -(-n // SIZE_BUCKET) * SIZE_BUCKET


def _padded_resize(in_size: int, out_size: int) -> np.ndarray:
    """The bilinear (out, in) resize matrix (torch's, :func:`gem_jax.eval.sliding.bilinear_matrix`),
    zero-padded to (bucket(out), bucket(in))."""
    m = np.zeros((_bucket(out_size), _bucket(in_size)), np.float32)
    m[:out_size, :in_size] = bilinear_matrix(in_size, out_size)
    return m


@functools.partial(jax.jit, static_argnames=("num_classes", "background", "logit_scale", "threshold",
                                             "area_threshold", "ignore_index", "pamr_iterations",
                                             "pamr_dilations"))
def _semantic_step(conf, logits, rows, cols, hw, label, query_class, guide=None, *, num_classes, background,
                   logit_scale, threshold, area_threshold, ignore_index, pamr_iterations=0, pamr_dilations=(8, 16)):
    """Logits (P, hb, wb) at the model size -> labels at the annotation size -> confusion update.

    ``rows`` (Hb, hb) and ``cols`` (Wb, wb) are padded bilinear resize matrices; ``hw`` the
    true annotation size inside the (Hb, Wb) bucket; ``label`` is padded with the ignore value.
    ``guide`` (3, hb, wb), the normalised input image at the logits' size, guides PAMR.
    """
    # SCLIP, ClearCLIP forward_slide, NACLIP predict, MaskCLIP whole_inference: the logits at the
    # resized image's size, interpolate(..., size=ori_shape, mode='bilinear') (align_corners=False).
    x = jnp.einsum("Hh,phw,Ww->pHW", rows, logits, cols, precision=jax.lax.Precision.HIGHEST)
    if pamr_iterations:
        # NACLIP predict: img = interpolate(inputs, size=ori_shape, mode='bilinear') with inputs the
        # normalised model input (not the uint8 picture), then self.pamr(img, seg_logits).
        image = jnp.einsum("Hh,khw,Ww->kHW", rows, guide, cols, precision=jax.lax.Precision.HIGHEST)
        x = postprocess.pamr(image, x, iterations=pamr_iterations, dilations=pamr_dilations, valid_hw=hw)
    # The one label rule: softmax over prompts, synonyms max-pooled into their class (classes
    # without prompts, a background decided by threshold, get 0), then the area and
    # background thresholds with the background class exempt from the first.
    cls = postprocess.class_probabilities(x, logit_scale=logit_scale, query_class=query_class,
                                          num_classes=num_classes)
    if background is None:
        pred = postprocess.decide(cls, None) - 1
    else:
        valid = (jnp.arange(cls.shape[1])[:, None] < hw[0]) & (jnp.arange(cls.shape[2])[None, :] < hw[1])
        pred = postprocess.decide(cls, threshold, area_threshold=area_threshold, background=background, valid=valid)
    return metrics.update(conf, pred, label, ignore_index=ignore_index), pred


def labels_at(logits: np.ndarray, out_hw: tuple[int, int], query_class: np.ndarray, num_classes: int,
              background: int | None, protocol: Protocol, image: np.ndarray | None = None) -> np.ndarray:
    """The (H, W) int32 prediction the runner scores for (P, h, w) logits at size ``out_hw``
    (``image``: the uint8 (h, w, 3) input the logits are of, needed for PAMR; normalised
    with the protocol's image steps)."""
    conf = metrics.new_confusion(num_classes)
    label = np.full((_bucket(out_hw[0]), _bucket(out_hw[1])), IGNORE_INDEX, np.int32)
    pixels = None if image is None else get_image_steps(protocol.image_steps).normalize(image)
    _, pred = _run_step(conf, logits, out_hw, label, query_class, num_classes, background, protocol, pixels)
    return np.asarray(pred)[:out_hw[0], :out_hw[1]]


def _run_step(conf, logits, out_hw, label_padded, query_class, num_classes, background, protocol, pixels=None):
    """``pixels``: the normalised (h, w, 3) model input the logits are of (PAMR's guide)."""
    p, h, w = logits.shape
    padded = np.zeros((p, _bucket(h), _bucket(w)), np.float32)
    padded[:, :h, :w] = logits
    guide = None
    if protocol.pamr_iterations:
        if pixels is None or pixels.shape[:2] != (h, w):
            raise ValueError(f"PAMR needs the input image at the logits' size {h}x{w}")
        guide = np.zeros((3, _bucket(h), _bucket(w)), np.float32)
        guide[:, :h, :w] = np.asarray(pixels, np.float32).transpose(2, 0, 1)
    return _semantic_step(conf, padded, _padded_resize(h, out_hw[0]), _padded_resize(w, out_hw[1]),
                          np.asarray(out_hw, np.int32), label_padded, query_class, guide, num_classes=num_classes,
                          background=background, logit_scale=float(protocol.logit_scale),
                          threshold=protocol.background_threshold, area_threshold=protocol.area_threshold,
                          ignore_index=IGNORE_INDEX, pamr_iterations=protocol.pamr_iterations,
                          pamr_dilations=protocol.pamr_dilations)


# ----------------------------------------------------------------------------- state and outputs


def _owned_write(path: pathlib.Path, write) -> None:
    """Writes a file of the evaluation's through the one writer and records it as gem-jax's
    (a file in the way that gem-jax did not write is refused: :class:`EvaluationError`)."""
    path = pathlib.Path(path)
    files.make_dirs(path.parent)
    try:
        files.write_owned(path, write, force=True)
    except files.OutputError as e:
        raise EvaluationError(str(e)) from None


def write_json(path, data: dict) -> None:
    """Writes ``data`` as indented JSON, atomically (a reader never sees half a file); removes
    gem-jax temporaries a killed run left beside it."""
    files.remove_stale(pathlib.Path(path).parent)
    _owned_write(pathlib.Path(path), lambda f: f.write(files.dump_json(data)))


def save_label_png(path, labels: np.ndarray) -> None:
    """Writes an (H, W) label map with values 0..255 as a palette PNG (VOC colours), atomically."""
    labels = np.asarray(labels)
    if labels.size and (labels.min() < 0 or labels.max() > 255):
        raise ValueError("label values must be in 0..255 to be saved as PNG")
    im = Image.fromarray(np.ascontiguousarray(labels, dtype=np.uint8))
    im.putpalette(voc_palette().reshape(-1).tolist())  # "L" becomes "P", the values kept
    _owned_write(pathlib.Path(path), lambda f: im.save(f, format="PNG"))


def prediction_path(directory, sample_id: str) -> pathlib.Path:
    """Where the prediction of ``sample_id`` is saved: ``directory/<id>.png`` (ids may hold ``/``)."""
    directory = pathlib.Path(directory)
    path = directory / f"{sample_id}.png"
    if ".." in pathlib.PurePosixPath(sample_id).parts or pathlib.PurePosixPath(sample_id).is_absolute():
        raise ValueError(f"sample id {sample_id!r} would be written outside {directory}")
    return path


@dataclasses.dataclass
class _State:
    counts: Any
    done: list[str]
    skipped: list[dict]


def _fingerprint(gem: GEM, dataset: Dataset, protocol: Protocol, queries: Queries | None) -> dict:
    """What decides an evaluation's counts: a state file of another evaluation is refused."""
    described = gem.describe()
    templates = hashlib.sha1("\n".join(described.pop("templates")).encode()).hexdigest()[:16]
    described["model"] = {"fingerprint": described["model"]["fingerprint"]}  # the weights, not their name
    return {
        "version": STATE_VERSION,
        "dataset": dataset.name, "split": dataset.split, "root": str(pathlib.Path(dataset.root).resolve()),
        "classes": hashlib.sha1("\n".join(dataset.classes).encode()).hexdigest()[:16],
        "protocol": protocol.settings(),
        "gem": described, "templates": templates,
        "prompts": list(queries.names) if queries is not None else None,
    }


def _save_state(path: pathlib.Path, fingerprint: dict, state: _State) -> None:
    counts = np.asarray(jax.device_get(state.counts)).astype(np.int64)
    arrays = {
        "fingerprint": np.array(json.dumps(fingerprint, sort_keys=True)),
        "counts": counts,
        "done": np.array(state.done, dtype=str) if state.done else np.zeros((0,), "<U1"),
        "skipped": np.array(json.dumps(state.skipped)),
    }
    _owned_write(path, lambda f: np.savez(f, **arrays))


def _load_state(path: pathlib.Path, fingerprint: dict, shape) -> _State | None:
    if not path.exists():
        return None
    start_over = "delete it or pass --restart to start over, or --state FILE to keep it"
    try:
        with np.load(path, allow_pickle=False) as z:
            saved = json.loads(str(z["fingerprint"]))
            counts, done, skipped = z["counts"], [str(s) for s in z["done"]], json.loads(str(z["skipped"]))
        if not isinstance(saved, dict) or not isinstance(skipped, list):
            raise ValueError("unexpected contents")
    except Exception as e:  # truncated (BadZipFile, EOFError), another program's file (KeyError, ValueError), ...
        raise StateFileError(f"the state file {path} is damaged or is not a gem-jax evaluation state "
                             f"({type(e).__name__}); {start_over}") from None
    mine = json.loads(json.dumps(fingerprint, sort_keys=True))
    if saved != mine:
        differ = sorted(k for k in set(saved) | set(mine) if saved.get(k) != mine.get(k))
        raise StateFileError(f"the state file {path} belongs to another evaluation (differs in: "
                             f"{', '.join(differ)}); {start_over}")
    if counts.shape != tuple(shape):
        raise StateFileError(f"the state file {path} holds counts of shape {counts.shape}, expected {shape}; "
                             f"{start_over}")
    return _State(jnp.asarray(counts.astype(np.asarray(metrics.new_confusion(1)).dtype)), done, skipped)


# ----------------------------------------------------------------------------- the loop


def _progress(total, initial, enabled, desc):
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, disable=not enabled, unit="img", desc=desc, file=sys.stderr,
                dynamic_ncols=True, smoothing=0.1)


def evaluate(gem_or_model, dataset: Dataset, protocol="gem", limit: int | None = None,
             save_predictions=None, state_file=None, on_error: str = "fail", *, batch_size: int | None = None,
             save_every: int | None = None, save_interval: float = 60.0, progress: bool = True) -> dict:
    """Evaluates a model on a benchmark and returns the results as a JSON-able dict.

    Args:
      gem_or_model: a :class:`~gem_jax.pipeline.GEM` (its method, options and templates are
        used as they are; the protocol sets the sizes) or a :class:`~gem_jax.loading.Model`
        (wrapped in a GEM with the protocol's template).
      dataset: from :mod:`gem_jax.eval.datasets`.
      protocol: a :class:`~gem_jax.eval.protocols.Protocol` or its name.
      limit: evaluate only the first ``limit`` samples.
      save_predictions: directory for the predicted label maps, ``<id>.png`` palette PNGs at
        the annotation's size holding class indices (written atomically).
      state_file: a ``.npz`` holding the counts so far and the ids done; written every
        ``save_interval`` seconds (and every ``save_every`` images, if given) and when the
        loop stops for any reason. If it exists (and was written by the same evaluation),
        the run continues from it; a damaged or foreign one raises :class:`StateFileError`.
        gem-jax temporaries left beside it by a killed run are removed.
      on_error: ``"fail"`` raises :class:`EvaluationError` on an image or annotation that
        cannot be read; ``"skip"`` logs it and goes on. Skipped samples are listed in the
        results with their reasons and counted in ``num_skipped``; ``complete`` is False
        unless every sample was evaluated.
      batch_size: images per forward call (default: the GEM's, fewer when there are many
        prompts).
      progress: show a progress bar (images/s) on stderr.
    Returns:
      For label-map datasets ``mIoU``, ``aAcc``, ``mAcc``, ``per_class_iou`` (percent;
      ``None`` for classes neither present nor predicted), for point datasets ``p-mIoU``;
      plus ``num_images``, ``evaluated``, ``num_skipped``, ``skipped``, ``complete``, the
      protocol settings, model, method, options and prompts.
    """
    if on_error not in ("fail", "skip"):
        raise ValueError(f"on_error must be 'fail' or 'skip', got {on_error!r}")
    if limit is not None and (not isinstance(limit, int) or limit < 1):
        raise ValueError(f"limit must be a positive int, got {limit!r}")
    if save_every is not None and (not isinstance(save_every, int) or save_every < 1):
        raise ValueError(f"save_every must be a positive int or None, got {save_every!r}")
    if not (isinstance(save_interval, (int, float)) and save_interval >= 0):
        raise ValueError(f"save_interval must be a number of seconds >= 0, got {save_interval!r}")
    if batch_size is not None and (not isinstance(batch_size, int) or batch_size < 1):
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    protocol = get_protocol(protocol).for_dataset(dataset.name)
    if get_image_steps(protocol.image_steps).needs_opencv:
        require_opencv()  # before any work
    if isinstance(gem_or_model, GEM):
        gem = gem_or_model
        wanted = resolve_templates(protocol.template)
        if gem.templates != wanted:
            log.warning("the GEM's %d prompt template(s) differ from the %s protocol's %d; using the GEM's",
                        len(gem.templates), protocol.name, len(wanted))
    elif isinstance(gem_or_model, Model):
        gem = GEM(gem_or_model, template=protocol.template, short_side=protocol.short_side)
    else:
        raise TypeError(f"expected a GEM or a Model, got {type(gem_or_model).__name__}")
    points = dataset.kind == "points"
    if points and save_predictions is not None:
        raise ValueError("save_predictions applies to label-map datasets; OpenImages has point labels")

    queries = None if points else build_queries(dataset, protocol)
    samples = dataset.samples[:limit] if limit else dataset.samples
    fingerprint = _fingerprint(gem, dataset, protocol, queries)
    counts_shape = (dataset.num_classes, 3) if points else (dataset.num_classes, dataset.num_classes)
    state_path = pathlib.Path(state_file) if state_file is not None else None
    if state_path is not None:
        files.remove_stale(state_path.parent)
    state = _load_state(state_path, fingerprint, counts_shape) if state_path is not None else None
    if state is None:
        fresh = metrics.new_point_counts if points else metrics.new_confusion
        state = _State(fresh(dataset.num_classes), [], [])
    finished = set(state.done)
    todo = [s for s in samples if s.id not in finished]
    n_prompts = 1 if points else len(queries.names)
    per_call = batch_size or max(1, min(gem.batch_size, MAX_MAPS_PER_CALL // n_prompts))
    pred_dir = pathlib.Path(save_predictions) if save_predictions is not None else None
    if pred_dir is not None:
        files.remove_stale(pred_dir)

    run = _Run(gem, dataset, protocol, queries, state, on_error, pred_dir)
    bar = _progress(len(samples), len(samples) - len(todo), progress, f"{dataset.name}/{protocol.name}")
    start, since_save, evaluated_now = time.perf_counter(), 0, 0
    saved_at = time.monotonic()
    try:
        for i in range(0, len(todo), per_call):
            chunk = todo[i:i + per_call]
            before = len(state.done)
            run.chunk(chunk)
            n = len(state.done) - before
            evaluated_now += n
            since_save += n
            bar.update(n)
            due = time.monotonic() - saved_at >= save_interval or (save_every is not None and since_save >= save_every)
            if state_path is not None and due:
                _save_state(state_path, fingerprint, state)
                since_save, saved_at = 0, time.monotonic()
    finally:
        bar.close()
        if state_path is not None:
            _save_state(state_path, fingerprint, state)
    elapsed = time.perf_counter() - start

    skipped_ids = {s["id"] for s in state.skipped}
    in_scope = {s.id for s in samples}
    skipped = [s for s in state.skipped if s["id"] in in_scope]
    evaluated = sum(1 for d in state.done if d in in_scope and d not in skipped_ids)
    if points:
        summary = metrics.summarize_points(state.counts, dataset.classes, [p[0] for p in dataset.prompts])
        metric = "p-mIoU"
    else:
        summary = metrics.summarize(state.counts, dataset.classes)
        metric = "mIoU"
    result = {
        "dataset": dataset.name,
        "split": dataset.split,
        "root": str(dataset.root),
        "metric": metric,
        "units": "percent",
        **summary,
        "num_images": len(samples),
        "evaluated": evaluated,
        "num_skipped": len(skipped),
        "skipped": skipped,
        "complete": evaluated == len(samples),
        "protocol": protocol.name,
        "protocol_settings": protocol.settings(),
        "model": gem.model.name,
        "random_weights": gem.model.random_weights,
        "method": gem.method.name,
        "gem": {k: v for k, v in gem.describe().items() if k != "templates"},
        "num_templates": len(gem.templates),
        "prompts": ({dataset.classes[c]: [n for n, k in zip(queries.names, queries.classes) if k == c]
                     for c in range(dataset.num_classes) if c in set(queries.classes.tolist())}
                    if queries is not None else None),
        "seconds": round(elapsed, 3),
        "images_per_second": round(evaluated_now / elapsed, 3) if elapsed > 0 and evaluated_now else None,
    }
    if len(state.done) > len(in_scope & set(state.done)):
        # The state file covers more samples than this run's limit: the counts include them.
        result["note"] = "the state file holds samples beyond --limit; the metrics include them"
    return result


class _Run:
    """One evaluation's moving parts: forward passes, post-processing, bookkeeping."""

    def __init__(self, gem, dataset, protocol, queries, state, on_error, pred_dir):
        self.gem, self.dataset, self.protocol, self.queries = gem, dataset, protocol, queries
        self.state, self.on_error, self.pred_dir = state, on_error, pred_dir
        self.query_class = None if queries is None else jnp.asarray(queries.classes)
        self.steps = get_image_steps(protocol.image_steps)

    def fail(self, sample, error: Exception) -> None:
        reason = f"{type(error).__name__}: {error}"
        if self.on_error == "fail":
            raise EvaluationError(f"sample {sample.id!r}: {error} (pass on_error='skip' / --on-error skip to "
                                  "skip such samples)") from error
        log.warning("skipped %s: %s", sample.id, error)
        self.state.skipped.append({"id": sample.id, "reason": reason})
        self.state.done.append(sample.id)

    def load(self, sample):
        # The protocol's decoder: Pillow, or OpenCV as mmcv's LoadImageFromFile (EXIF applied by both).
        image = np.asarray(self.steps.read(sample.image))
        label = None
        if self.dataset.kind == "semantic":
            label = self.dataset.load_label(sample, image.shape[:2])
        return image, label

    def chunk(self, chunk) -> None:
        loaded = []
        for sample in chunk:
            try:
                loaded.append((sample, *self.load(sample)))
            except (preprocess.ImageError, DatasetError) as e:
                self.fail(sample, e)
        if not loaded:
            return
        try:
            outputs = self.forward([img for _, img, _ in loaded], [s for s, _, _ in loaded])
        except preprocess.ImageError:
            # One bad image spoils a batch: retry one by one to name it.
            outputs = []
            keep = []
            for item in loaded:
                try:
                    outputs.extend(self.forward([item[1]], [item[0]]))
                    keep.append(item)
                except preprocess.ImageError as e:
                    self.fail(item[0], e)
            loaded = keep
        for (sample, image, label), (maps, pixels) in zip(loaded, outputs):
            if self.dataset.kind == "semantic":
                self.score_labels(sample, label, maps, pixels)
            else:
                self.score_points(sample, maps)

    def prompts_of(self, sample) -> list[str]:
        if self.queries is not None:
            return list(self.queries.names)
        return [self.dataset.prompts[c][0] for c in sample.points.present()]

    def forward(self, images, samples) -> list[tuple[np.ndarray, np.ndarray | None]]:
        """Per image: logits (semantic) or min-max heatmaps (points), (P, h, w), and (with
        PAMR) the normalised model input at (h, w), PAMR's guide."""
        p, steps = self.protocol, self.steps
        sets = [self.prompts_of(s) for s in samples]
        pamr = p.pamr_iterations > 0 and self.queries is not None
        if p.sliding:
            out = []
            for img, prompts in zip(images, sets):
                # mmseg Resize(scale=(max_long_side, short_side), keep_ratio=True) -> mmcv imrescale.
                resized = steps.resize_to(img, rescaled_size(*img.shape[:2], p.short_side, p.max_long_side))
                maps = window_logits(self.gem, resized, prompts, crop=p.crop, stride=p.stride, border=p.border,
                                     steps=steps)
                out.append((maps if self.queries is not None else min_max(maps),
                            steps.normalize(resized) if pamr else None))
            return out
        res = self.gem.heatmaps(images, sets, short_side=p.short_side)
        maps = res.logits if self.queries is not None else res.heatmaps
        # GEM.heatmaps resizes with Pillow bicubic to the model size and normalises as the gem steps.
        return [(np.asarray(maps[i]),
                 steps.normalize(steps.resize_to(images[i], maps[i].shape[-2:])) if pamr else None)
                for i in range(len(images))]

    def score_labels(self, sample, label: np.ndarray, logits: np.ndarray, pixels: np.ndarray | None = None) -> None:
        hw = label.shape
        padded = np.full((_bucket(hw[0]), _bucket(hw[1])), IGNORE_INDEX, np.int32)
        padded[:hw[0], :hw[1]] = label
        conf, pred = _run_step(self.state.counts, logits, hw, padded, self.query_class, self.dataset.num_classes,
                               self.dataset.background, self.protocol, pixels)
        if self.pred_dir is not None:
            save_label_png(prediction_path(self.pred_dir, sample.id), np.asarray(pred)[:hw[0], :hw[1]])
        self.state.counts = conf
        self.state.done.append(sample.id)

    def score_points(self, sample, heatmaps: np.ndarray) -> None:
        pts = sample.points
        present = pts.present()
        on = np.zeros(len(pts.classes), bool)
        for k, c in enumerate(present):
            sel = pts.classes == c
            on[sel] = metrics.points_on(heatmaps[k], pts.x[sel], pts.y[sel], self.protocol.point_threshold)
        n = len(on)
        size = max(8, 1 << max(n - 1, 0).bit_length())  # padded: one compilation per power of two
        pad = lambda a, fill: np.concatenate([a, np.full(size - n, fill, a.dtype)])
        valid = np.arange(size) < n
        counts = metrics.point_update(self.state.counts, pad(pts.classes, 0), pad(on, False),
                                      pad(pts.positive, False), valid)
        self.state.counts = counts
        self.state.done.append(sample.id)
