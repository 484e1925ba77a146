"""Class-name files with synonyms, as the official SCLIP / NACLIP / ClearCLIP / MaskCLIP pipelines read them.

A class-name file has one line per class, in the dataset's class order; a line may list
synonyms separated by ``", "`` (``"person, person in shirt, ..."``). Every name is prompted,
and a class's probability is the max over its names after the softmax over all names
(:func:`gem_jax.postprocess.merge_synonyms`). The bundled sets (``gem_jax/data/class_names``,
sources and licences in ``gem_jax/data/NOTICE.md``):

- ``"sclip"``: the lists of SCLIP's and NACLIP's configs (the two are identical): synonyms
  for a few classes, and for VOC / COCO-Object a background line of 26 stuff words.
- ``"clearclip"``: ClearCLIP's: the same lists except that VOC, VOC20 and COCO-Object use
  plain names ("person", "tvmonitor") and a single "background".
- ``"maskclip"``: MaskCLIP's plain names (VOC20, Context-59, COCO-Stuff, Cityscapes, ADE20K).
"""

from __future__ import annotations

import dataclasses
import importlib.resources
import pathlib

import numpy as np

#: The bundled name sets, and for each the datasets it has a file for. A set may take a
#: dataset's file from another set (``_INHERITS``) when the official files are the same.
NAME_SETS = ("sclip", "clearclip", "maskclip")
_INHERITS = {"clearclip": "sclip"}
SEPARATOR = ", "


@dataclasses.dataclass(frozen=True)
class ClassNames:
    """The names of each class of a dataset.

    Attributes:
      names: per class, its names (the first is the main one).
      source: where they were read from.
    """

    names: tuple[tuple[str, ...], ...]
    source: str = ""

    @property
    def num_classes(self) -> int:
        return len(self.names)

    def queries(self) -> tuple[tuple[str, ...], np.ndarray]:
        """Every name as a prompt, in file order, and the (P,) int32 class of each."""
        flat = [(n, c) for c, names in enumerate(self.names) for n in names]
        return tuple(n for n, _ in flat), np.asarray([c for _, c in flat], np.int32)


def parse_class_names(text: str, source: str = "") -> ClassNames:
    """Parses the text of a class-name file (one class a line, synonyms separated by ``", "``).

    Blank lines at the end are ignored; a blank line between classes is an error, as is an
    empty synonym.
    """
    lines = text.replace("\r\n", "\n").split("\n")
    while lines and not lines[-1].strip():
        lines.pop()
    if not lines:
        raise ValueError(f"no class names in {source or 'the text'}")
    names = []
    for i, line in enumerate(lines, 1):
        parts = tuple(p.strip() for p in line.split(","))
        if not all(parts):
            raise ValueError(f"{source or 'class names'} line {i}: empty class name in {line!r}")
        names.append(parts)
    return ClassNames(tuple(names), source)


def read_class_names(path) -> ClassNames:
    """Reads a class-name file (see :func:`parse_class_names`)."""
    path = pathlib.Path(path)
    try:
        text = path.read_text("utf-8")
    except OSError as e:
        raise ValueError(f"cannot read class names from {path}: {e.strerror or e}") from None
    return parse_class_names(text, str(path))


def _bundled(name_set: str, dataset: str):
    return importlib.resources.files("gem_jax").joinpath("data", "class_names", name_set, f"{dataset}.txt")


def available(name_set: str) -> tuple[str, ...]:
    """The datasets (``gem-jax eval --dataset`` names) a bundled set has names for."""
    if name_set not in NAME_SETS:
        raise ValueError(f"unknown class-name set {name_set!r}; choose one of {', '.join(NAME_SETS)}")
    found = set()
    s = name_set
    while s is not None:
        found |= {f.name[:-4] for f in importlib.resources.files("gem_jax").joinpath("data", "class_names", s).iterdir()
                  if f.name.endswith(".txt")}
        s = _INHERITS.get(s)
    return tuple(sorted(found))


def class_names(name_set: str, dataset: str) -> ClassNames:
    """The names of ``dataset``'s classes in a bundled set (:data:`NAME_SETS`).

    Raises ValueError when the set has no file for the dataset.
    """
    if name_set not in NAME_SETS:
        raise ValueError(f"unknown class-name set {name_set!r}; choose one of {', '.join(NAME_SETS)}")
    s = name_set
    while s is not None:
        res = _bundled(s, dataset)
        if res.is_file():
            return parse_class_names(res.read_text("utf-8"), f"{name_set}/{dataset}.txt")
        s = _INHERITS.get(s)
    raise ValueError(f"the {name_set!r} class names have no list for {dataset!r} "
                     f"(they cover {', '.join(available(name_set))})")
