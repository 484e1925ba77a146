"""How well a model grounds the toy scenes' phrases: pointing, AUROC and retrieval on held-out scenes.

For each object of each scene, its *probability map* is the softmax, at logit scale 100
(as :meth:`gem_jax.GEM.segment` uses), over the scene's object phrases and its
background's name, of the method's cosine maps at the input size. Then:

- pointing: the map's maximum lies inside the object's visible mask;
- AUROC: how well the map separates the object's pixels from all the others (the
  Mann-Whitney statistic, ties counted half);
- retrieval, text -> image top-1: each scene's caption picks, among the scenes'
  images, the one whose class-token embedding is closest; a hit when that image's
  content (background and set of object phrases) is the caption's.

The maps are ranked by their log-probabilities (computed in float64), so the argmax
and the ranks are exact even where the probabilities round to 1.
"""

from __future__ import annotations

import json
import pathlib
from typing import Sequence

import jax
import numpy as np

from gem_jax.models import TextTransformer, VisionTransformer
from gem_jax.models.layers import l2_normalize
from gem_jax.pipeline import GEM
from gem_jax.postprocess import resize_maps
from gem_jax.preprocess import normalize
from gem_jax.toy import scenes as scenes_lib

#: The scenes of the model card's figures: seeds the model never saw (training scenes
#: use seeds from :data:`gem_jax.toy.train.TRAIN_SEED_BASE`).
HELD_OUT = range(200)
LOGIT_SCALE = 100.0


def auroc(scores: np.ndarray, positive: np.ndarray) -> float:
    """Area under the ROC curve of ``scores`` for the boolean labels ``positive`` (ties count half)."""
    scores = np.asarray(scores, np.float64).ravel()
    positive = np.asarray(positive, bool).ravel()
    n_pos = int(positive.sum())
    n_neg = positive.size - n_pos
    if n_pos == 0 or n_neg == 0:
        raise ValueError("AUROC needs positive and negative pixels")
    order = np.argsort(scores, kind="stable")
    sorted_scores = scores[order]
    ranks = np.empty(scores.size, np.float64)
    # average ranks over ties
    _, first, counts = np.unique(sorted_scores, return_index=True, return_counts=True)
    avg = first + (counts - 1) / 2.0 + 1.0
    ranks[order] = np.repeat(avg, counts)
    return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def log_probabilities(logits: np.ndarray, logit_scale: float = LOGIT_SCALE) -> np.ndarray:
    """(P, H, W) cosines -> (P, H, W) log softmax over the prompts of ``logit_scale`` x cosine."""
    x = logit_scale * np.asarray(logits, np.float64)
    m = x.max(axis=0, keepdims=True)
    return x - (m + np.log(np.exp(x - m).sum(axis=0, keepdims=True)))


def localisation(logits: np.ndarray, masks: Sequence[np.ndarray], logit_scale: float = LOGIT_SCALE):
    """Pointing hits and AUROCs of the objects of one scene.

    Args:
      logits: (P, H, W) cosine maps of the scene's prompts: its object phrases in the
        order of ``masks``, then any others (its background's name).
      masks: (H, W) bool visible mask of each object.
    Returns:
      (hits, aurocs): a bool and a float per object.
    """
    logp = log_probabilities(logits, logit_scale)
    hits, aucs = [], []
    for k, mask in enumerate(masks):
        flat = logp[k].ravel()
        hits.append(bool(mask.ravel()[int(np.argmax(flat))]))
        aucs.append(auroc(flat, mask))
    return hits, aucs


def _content(scene) -> tuple:
    return scene.background, frozenset(scene.phrases)


def retrieval(image_emb: np.ndarray, text_emb: np.ndarray, contents: Sequence) -> dict:
    """Top-1 accuracies of text -> image and image -> text between normalised embeddings, a hit
    when the retrieved item has the same content."""
    sims = np.asarray(text_emb, np.float64) @ np.asarray(image_emb, np.float64).T  # (texts, images)
    t2i = np.argmax(sims, axis=1)
    i2t = np.argmax(sims, axis=0)
    return {"text_to_image_top1": float(np.mean([contents[j] == contents[i] for i, j in enumerate(t2i)])),
            "image_to_text_top1": float(np.mean([contents[j] == contents[i] for i, j in enumerate(i2t)]))}


def image_embeddings(model, images: np.ndarray, batch: int = 64) -> np.ndarray:
    """L2-normalised class-token embeddings (N, D) of uint8 images (N, S, S, 3) at their size."""

    cfg = model.config
    vit = VisionTransformer(cfg.vision, cfg.embed_dim)
    fn = jax.jit(lambda p, x: l2_normalize(vit.apply({"params": p}, x)[0][:, 0]))
    out = []
    for i in range(0, len(images), batch):
        part = normalize(images[i:i + batch])
        n = len(part)
        if n < batch:
            part = np.concatenate([part, np.zeros((batch - n, *part.shape[1:]), part.dtype)])
        out.append(np.asarray(fn(model.params["visual"], part))[:n])
    return np.concatenate(out)


def text_embeddings(model, texts: Sequence[str]) -> np.ndarray:
    """L2-normalised embeddings (N, D) of ``texts`` as written (no template)."""

    cfg = model.config
    tt = TextTransformer(cfg.text, cfg.embed_dim)
    fn = jax.jit(lambda p, ids: l2_normalize(tt.apply({"params": p}, ids)))
    ids = model.tokenizer(list(texts))
    return np.asarray(fn(model.params["text"], ids))


def stored_defaults(directory) -> dict:
    """The recommended GEM settings written in a native checkpoint's ``config.json`` (``"defaults"``)."""
    doc = json.loads((pathlib.Path(directory) / "config.json").read_text("utf-8"))
    return dict(doc.get("defaults") or {})


def evaluate(model, seeds: Sequence[int] = HELD_OUT, method: str = "gem", *, scenes=None,
             retrieval_too: bool = True, **gem_options) -> dict:
    """Pointing, AUROC and retrieval of ``method`` on the scenes of ``seeds``.

    Args:
      model: a :class:`gem_jax.Model`.
      seeds: scene seeds (default: the 200 held-out scenes of the model card).
      method: a registered method's name.
      scenes: the scenes themselves, if already made (else made from ``seeds``).
      retrieval_too: also measure retrieval (the method does not change it).
      gem_options: keyword arguments of :class:`gem_jax.GEM` (``layers``, ``size``,
        ``template``, ...); unset ones are the model's recommendation, as ``GEM`` applies it.
    Returns:
      ``{"method", "scenes", "objects", "pointing", "auroc", "text_to_image_top1",
      "image_to_text_top1", "options"}`` (retrieval keys only with ``retrieval_too``;
      ``options``: :meth:`gem_jax.GEM.describe` of what ran).
    """
    if scenes is None:
        scenes = scenes_lib.scenes(seeds)
    gem = GEM(model, method=method, **gem_options)
    images = [s.image for s in scenes]
    prompts = [s.phrases + [s.background] for s in scenes]
    out = gem.heatmaps(images, prompts)
    hits, aucs = [], []
    for sc, logits in zip(scenes, out.logits):
        logits = np.asarray(logits)
        if logits.shape[-2:] != sc.image.shape[:2]:
            logits = resize_maps(logits, sc.image.shape[:2])
        h, a = localisation(logits, [m for _, m in sc.objects])
        hits += h
        aucs += a
    result = {"method": method, "scenes": len(scenes), "objects": len(hits), "pointing": float(np.mean(hits)),
              "auroc": float(np.mean(aucs)), "options": gem.describe()}
    if retrieval_too:
        img = image_embeddings(model, np.stack(images))
        txt = text_embeddings(model, [s.caption for s in scenes])
        result.update(retrieval(img, txt, [_content(s) for s in scenes]))
    return result
