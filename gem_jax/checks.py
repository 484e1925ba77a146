"""The input checks every command and the API share: prompts, image lists, outputs.

A check raises a ``ValueError`` subclass with one sentence naming what is wrong; the
commands turn it into a usage error, the demo into a message.
"""

from __future__ import annotations

import os
import pathlib
import warnings
from typing import Iterable, Sequence

from gem_jax.tokenizer import first_duplicate


class PromptError(ValueError):
    """Prompts that cannot be used as given."""


class PromptTruncatedWarning(UserWarning):
    """A prompt longer than the model's context was cut (its end is not seen by the model)."""


def clean_prompts(prompts: Iterable[str], what: str = "prompt") -> list[str]:
    """``prompts`` with surrounding spaces removed; an empty one is refused."""
    out = []
    for p in prompts:
        if not isinstance(p, str):
            raise PromptError(f"{what}s must be strings, got {p!r}")
        p = p.strip()
        if not p:
            raise PromptError(f"a {what} is empty; give text such as cat")
        out.append(p)
    return out


def prompt_sets(prompts, n_images: int) -> list[list[str]]:
    """One prompt list per image from a string, a list of strings (the same for all images)
    or a list of lists (one per image)."""
    if isinstance(prompts, str):
        prompts = [prompts]
    if prompts is None or not hasattr(prompts, "__iter__") or isinstance(prompts, (bytes, dict)):
        raise PromptError(f"prompts must be a string, a list of strings or a list of lists of strings, got "
                          f"{type(prompts).__name__}")
    prompts = list(prompts)
    if not prompts:
        raise PromptError("no prompts given")
    if all(isinstance(p, str) for p in prompts):
        sets = [prompts] * n_images
    elif all(isinstance(p, (list, tuple)) for p in prompts):
        if len(prompts) != n_images:
            raise PromptError(f"got {len(prompts)} prompt lists for {n_images} images; give one list per image "
                              "or one list for all")
        sets = [list(p) for p in prompts]
    else:
        raise PromptError("prompts must be a list of strings or a list of lists of strings")
    for i, s in enumerate(sets):
        if not s:
            raise PromptError(f"image {i} has an empty prompt list")
        for p in s:
            if not isinstance(p, str) or not p.strip():
                raise PromptError(f"prompts must be non-empty strings, got {p!r}")
    return sets


def _ids(tokenizer, texts: Sequence[str]):
    return [tuple(row) for row in tokenizer(list(texts)).tolist()]


def distinguishable(tokenizer, prompts: Sequence[str], templates: Sequence[str] = ("{}",),
                    what: str = "prompt") -> None:
    """Refuses prompts the model cannot tell apart: equal token ids, after the tokenizer's
    cleaning and its truncation at the context length, under every template (their
    embeddings, logits and maps would be identical, and a label map would lose one of them)."""
    templates = tuple(templates) or ("{}",)
    first = _ids(tokenizer, [templates[0].format(p) for p in prompts])
    seen: dict[tuple, int] = {}
    for i, key in enumerate(first):
        j = seen.setdefault(key, i)
        if j == i:
            continue
        a, b = prompts[j], prompts[i]
        if len(templates) > 1 and _ids(tokenizer, [t.format(a) for t in templates]) != \
                _ids(tokenizer, [t.format(b) for t in templates]):
            continue
        if a == b:
            raise PromptError(f"the {what} {_short(a)} is given twice; give each {what} once")
        cut = len(first[i]) and first[i][-1] == tokenizer.eot_token_id  # the row is full: cut
        why = "the tokenizer ignores case and spacing" + (
            f", and cuts texts at {tokenizer.context_length} tokens" if cut else "")
        raise PromptError(f"{what}s {_short(a)} and {_short(b)} are the same to the model ({why}): they would "
                          f"give identical maps; give each {what} once")


def same_after_cleaning(prompts: Sequence[str], what: str = "prompt") -> None:
    """The part of :func:`distinguishable` that needs no model: prompts equal after the CLIP
    tokenizer's cleaning (case, spacing, HTML entities) are refused."""
    dup = first_duplicate(prompts)
    if dup is None:
        return
    a, b = dup
    if a == b:
        raise PromptError(f"the {what} {_short(a)} is given twice; give each {what} once")
    raise PromptError(f"{what}s {_short(a)} and {_short(b)} are the same to the model (the tokenizer ignores case "
                      f"and spacing): they would give identical maps; give each {what} once")


def _short(text: str) -> str:
    return repr(text if len(text) <= 60 else text[:57] + "...")


def truncated(tokenizer, prompts: Sequence[str], templates: Sequence[str] = ("{}",)) -> list[str]:
    """The prompts that do not fit the model's context under some template: the tokenizer
    cuts them, keeping the end token, so their end is not seen."""
    limit = tokenizer.context_length - 2
    longest = max(templates, key=lambda t: len(tokenizer.encode(t.format(""))))
    return [p for p in prompts if len(tokenizer.encode(longest.format(p))) > limit]


def vet(tokenizer, prompts: Sequence[str], classes: Sequence[str] | None, templates: Sequence[str],
        note=None) -> None:
    """The checks every command makes once the model's tokenizer is known: prompts, and class
    names, the model cannot tell apart are refused (:class:`PromptError`); each text cut at the
    context length is reported through ``note`` (a function taking one message)."""
    distinguishable(tokenizer, prompts, templates)
    if classes:
        distinguishable(tokenizer, classes, templates, "class name")
    if note is not None:
        for p in truncated(tokenizer, list(dict.fromkeys([*prompts, *(classes or [])])), templates):
            note(truncation_message(tokenizer, p))


def truncation_message(tokenizer, prompt: str) -> str:
    """What gem-jax says of a prompt cut at the context length."""
    return (f"the prompt {_short(prompt)} is longer than the model's context of {tokenizer.context_length} tokens; "
            "it is cut, and the model does not see its end")


def warn_truncated(tokenizer, prompts: Sequence[str], templates: Sequence[str] = ("{}",)) -> list[str]:
    """:func:`truncated`, with a :class:`PromptTruncatedWarning` naming each cut prompt."""
    cut = truncated(tokenizer, prompts, templates)
    for p in cut:
        warnings.warn(PromptTruncatedWarning(truncation_message(tokenizer, p)), stacklevel=3)
    return cut


def unique_real_paths(paths: Iterable) -> list:
    """``paths`` without the ones whose real file (symlinks and ``.`` / ``..`` resolved) came
    earlier, in order."""
    seen, out = set(), []
    for p in paths:
        real = os.path.realpath(os.fspath(p))
        if real not in seen:
            seen.add(real)
            out.append(p)
    return out


def output_directory(path, flag: str = "--out") -> pathlib.Path:
    """Checks that ``path`` can be an output directory (before any slow work): not a file,
    not under a file, writable where it exists or would be created. Raises
    :class:`OutputPathError`."""
    path = pathlib.Path(path).expanduser()
    if path.exists() and not path.is_dir():
        raise OutputPathError(f"{flag} must be a directory, {path} is a file")
    parent = path
    while not parent.exists():
        if parent == parent.parent:
            break
        parent = parent.parent
    if parent.exists() and not parent.is_dir():
        raise OutputPathError(f"{flag} {path}: {parent} is a file, not a directory")
    if parent.exists() and not os.access(parent, os.W_OK | os.X_OK):
        raise OutputPathError(f"{flag} {path}: {parent} is not writable")
    return path


def output_file(path, flag: str, *, suffix: str | None = None) -> pathlib.Path:
    """Checks that ``path`` can be an output file (before any slow work): not a directory,
    the right suffix, its directory not a file and writable. Raises :class:`OutputPathError`."""
    path = pathlib.Path(path).expanduser()
    if path.is_dir():
        raise OutputPathError(f"{flag} must name a file, {path} is a directory")
    if suffix is not None and not path.name.endswith(suffix):
        raise OutputPathError(f"{flag} must name a {suffix} file, got {str(path)!r}")
    output_directory(path.parent, flag)
    return path


class OutputPathError(ValueError):
    """An output path that cannot be used (a file where a directory is needed, not writable...)."""
