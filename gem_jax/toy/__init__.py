"""A tiny CLIP trained by gem-jax itself on synthetic scenes, shipped with the package.

``gem_jax.toy.scene(seed)`` makes a captioned scene with exact object masks
(:mod:`gem_jax.toy.scenes`); :mod:`gem_jax.toy.train` trains a small CLIP on such
scenes with the contrastive loss only (``gem-jax train-toy``);
:func:`gem_jax.toy.evaluate` measures where a method's maps land on held-out scenes;
:func:`model_path` is the shipped model's directory (native format, its own small
vocabulary). The model card is ``docs/TOY_MODEL.md``: the model is not CLIP, and
its figures say nothing about real photographs.
"""

from __future__ import annotations

import importlib.resources
import pathlib

from gem_jax.toy import scenes
from gem_jax.toy.scenes import BACKGROUNDS, COLOURS, PHRASES, SHAPES, Scene, class_names, scene

#: Registry name of the shipped model.
NAME = "toy"


def model_path() -> pathlib.Path:
    """The directory of the shipped toy model (``gem_jax/data/toy``), from a source checkout or an
    installed wheel."""
    return pathlib.Path(str(importlib.resources.files("gem_jax").joinpath("data", "toy")))


def load():
    """The shipped toy model as a :class:`gem_jax.Model`, read from the package (no network)."""
    from gem_jax.loading import load as load_model

    return load_model(NAME)


def evaluate(model, seeds=None, method: str = "gem", **gem_options) -> dict:
    """Pointing, AUROC and retrieval of ``method`` on held-out scenes (:func:`gem_jax.toy.measures.evaluate`)."""
    from gem_jax.toy import measures as _evaluate

    if seeds is None:
        seeds = _evaluate.HELD_OUT
    return _evaluate.evaluate(model, seeds, method, **gem_options)


__all__ = ["BACKGROUNDS", "COLOURS", "NAME", "PHRASES", "SHAPES", "Scene", "class_names", "evaluate", "load",
           "model_path", "scene", "scenes"]
