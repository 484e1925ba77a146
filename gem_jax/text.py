"""Prompts to text embeddings: templates, the text tower on the texts' own length, caches."""

from __future__ import annotations

import functools
import importlib.resources
import string
from typing import Sequence

import jax
import numpy as np

from gem_jax.models import TextTransformer
from gem_jax.models.layers import l2_normalize

DEFAULT_TEMPLATE = "a photo of a {}."
#: Named template sets: ``"imagenet"`` the 80 ImageNet templates (SCLIP, ClearCLIP, NACLIP),
#: ``"imagenet85"`` those plus the 5 scene templates of MaskCLIP and CLIP Surgery
#: ("there is a {} in the scene." and its kin).
TEMPLATE_SETS = ("imagenet", "imagenet85")
#: Token positions a chunk of texts runs on: its longest sequence rounded up to one of
#: these (then capped at the context length), so compiles stay few.
LENGTH_BUCKETS = (8, 16, 24, 32, 48, 64)
#: Texts per call of the text tower.
TEXT_CHUNK = 256


def _data_lines(name: str) -> tuple[str, ...]:
    text = importlib.resources.files("gem_jax").joinpath("data", name).read_text("utf-8")
    return tuple(line for line in text.splitlines() if line)


@functools.lru_cache(maxsize=1)
def imagenet_templates() -> tuple[str, ...]:
    """The 80 ImageNet prompt templates of CLIP's zero-shot evaluation."""
    return _data_lines("imagenet_templates.txt")


@functools.lru_cache(maxsize=None)
def template_set(name: str) -> tuple[str, ...]:
    """The templates of a named set (:data:`TEMPLATE_SETS`)."""
    if name == "imagenet":
        return imagenet_templates()
    if name == "imagenet85":
        return imagenet_templates() + _data_lines("scene_templates.txt")
    raise ValueError(f"unknown template set {name!r}; choose one of {', '.join(TEMPLATE_SETS)}")


def _template_fields(template: str) -> list[str] | None:
    """The replacement fields of a template (``[""]`` for one ``{}``), or None if it is malformed."""
    try:
        return [field for _, field, spec, conv in string.Formatter().parse(template) if field is not None
                for field in [field + (spec or "") + (conv or "")]]
    except ValueError:
        return None


def resolve_templates(template: str | Sequence[str]) -> tuple[str, ...]:
    """The templates of ``template``: a named set, one template, or a sequence of templates;
    each must hold exactly one ``{}`` (ValueError otherwise)."""
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


def bucket(n: int, smallest: int) -> int:
    """The next power of two >= n (and >= smallest): padded shapes that jit compiles once."""
    return max(smallest, 1 << max(n - 1, 0).bit_length())


def sequence_length(ids: np.ndarray) -> int:
    """Positions a batch of token rows needs: up to and including each row's end token (the
    largest id, where the text tower pools), rounded up to :data:`LENGTH_BUCKETS`, at most the
    context length. Positions after the end token change nothing: the tower is causal."""
    context = ids.shape[-1]
    used = int(np.max(np.argmax(ids, axis=-1))) + 1 if ids.size else 1
    for b in LENGTH_BUCKETS:
        if used <= b:
            return min(b, context)
    return context


class TextEncoder:
    """The text tower of a model, jitted: texts -> L2-normalised embeddings.

    Each chunk of texts runs on the positions it needs (:func:`sequence_length`), padded
    to a bucket of rows, so a handful of programs serve any vocabulary.
    """

    def __init__(self, model, dtype):
        self.model = model
        tower = TextTransformer(model.config.text, model.config.embed_dim, dtype=dtype)
        self._encode = jax.jit(lambda p, ids: l2_normalize(tower.apply({"params": p}, ids)))

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        """(N, D) float32 embeddings of ``texts`` (no template applied)."""
        ids = self.model.tokenizer(list(texts))
        out = []
        for i in range(0, len(ids), TEXT_CHUNK):
            part = ids[i:i + TEXT_CHUNK]
            length = sequence_length(part)
            padded = np.zeros((bucket(len(part), 8), length), ids.dtype)
            padded[:len(part)] = part[:, :length]
            out.append(np.asarray(self._encode(self.model.params["text"], padded))[:len(part)])
        if not out:
            return np.zeros((0, self.model.config.embed_dim), np.float32)
        return np.concatenate(out).astype(np.float32)

    def embed(self, prompts: Sequence[str], templates: Sequence[str]) -> np.ndarray:
        """(P, D) embeddings of ``prompts`` under ``templates``: with several templates, the
        normalised embeddings averaged and renormalised (CLIP's ensemble)."""
        templates = tuple(templates)
        texts = [t.format(p) for p in prompts for t in templates]
        emb = self.encode(texts).reshape(len(prompts), len(templates), -1)
        if len(templates) == 1:
            return emb[:, 0]
        emb = emb.mean(axis=1)
        return emb / np.maximum(np.linalg.norm(emb, axis=-1, keepdims=True), 1e-12)
