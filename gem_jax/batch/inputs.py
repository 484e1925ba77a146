"""The job's input list: files, directories, globs, ``@list.txt`` and ``.tar`` shards, sorted; and shards."""

from __future__ import annotations

import dataclasses
import glob
import hashlib
import os
import pathlib
import tarfile
from typing import Sequence

from gem_jax.preprocess import IMAGE_EXTENSIONS

#: Joins a tar shard and a member in an input's ``path``: ``shards/000.tar::cat/001.jpg``.
TAR_SEPARATOR = "::"


class InputError(ValueError):
    """An input argument names nothing usable (missing file, empty directory, unreadable tar)."""


@dataclasses.dataclass(frozen=True, order=True)
class Item:
    """One image of the job.

    Attributes:
      path: the input path as given (a file), or ``TAR::MEMBER`` for a member of a tar shard.
      file: the file to read.
      offset, size: where the member's bytes are inside the tar (``None`` for a plain file).
      error: why the input cannot be used, known when listing it (a tar member whose name
        repeats); the job records it as an error row.
    """

    path: str
    file: str
    offset: int | None = None
    size: int | None = None
    error: str | None = None

    def open(self):
        """A binary file object with the image's bytes."""
        if self.offset is None:
            return open(self.file, "rb")
        import io

        with open(self.file, "rb") as f:
            f.seek(self.offset)
            data = f.read(self.size)
        if len(data) != self.size:
            raise OSError(f"tar member ends early ({len(data)} of {self.size} bytes)")
        return io.BytesIO(data)


def _is_image_name(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTENSIONS)


def _collect(path: str, found: list) -> None:
    """Appends ``path``'s items to ``found``: a tar shard's image members, or the image itself
    (other files are passed over)."""
    if _is_tar(path):
        found.extend(tar_members(path))
    elif _is_image_name(path):
        found.append(Item(path, path))


def _is_tar(name: str) -> bool:
    return name.lower().endswith(".tar")


def tar_members(path: str) -> list[Item]:
    """The image members of an uncompressed tar shard (WebDataset layout: ``KEY.jpg`` beside
    ``KEY.json`` and the like; only image extensions are taken). A member name that repeats
    is ambiguous (extracting the tar keeps the last copy): every copy becomes an error item."""
    try:
        with tarfile.open(path, "r:") as tar:
            members = [m for m in tar.getmembers() if m.isfile() and _is_image_name(m.name)]
    except (OSError, tarfile.TarError) as e:
        raise InputError(f"cannot read tar shard {path}: {e} (only uncompressed .tar is supported)") from None
    counts: dict[str, int] = {}
    for m in members:
        counts[m.name] = counts.get(m.name, 0) + 1
    out = []
    for m in members:
        error = None
        if counts[m.name] > 1:
            error = (f"the tar shard holds {counts[m.name]} members named {m.name!r} (extracting it keeps only the "
                     "last): give them distinct names")
        out.append(Item(f"{path}{TAR_SEPARATOR}{m.name}", path, m.offset_data, m.size, error))
    return out


def _expand_one(text: str, from_list: bool) -> list[Item]:
    path = pathlib.Path(text)
    if path.is_dir():
        found: list[Item] = []
        for root, dirs, names in os.walk(path):
            dirs.sort()
            for name in sorted(names):
                _collect(os.path.join(root, name), found)
        if not found:
            raise InputError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) or .tar shards in directory: {text}")
        return found
    if path.is_file():
        return tar_members(text) if _is_tar(text) else [Item(text, text)]
    if path.exists():
        raise InputError(f"input {text} is not a regular file or a directory (a device, socket or pipe)")
    if any(c in text for c in "*?["):
        matches = sorted(glob.glob(text, recursive=True))
        found = []
        for m in matches:
            if not os.path.isdir(m):
                _collect(m, found)
        if not found:
            raise InputError(f"no image files or .tar shards match the pattern: {text}")
        return found
    where = " (listed in a @file)" if from_list else ""
    raise InputError(f"input not found: {text}{where}")


def expand_inputs(args: Sequence[str]) -> list[Item]:
    """Every image named by ``args``, sorted by path, each file once (by its real path).

    An argument is an image file, a directory (searched recursively for images and
    ``.tar`` shards), a glob pattern (``**`` recurses), an uncompressed ``.tar`` shard
    (its image members) or ``@FILE``: a text file with one such argument per line
    (blank lines and lines starting with ``#`` skipped). Raises :class:`InputError`.
    """
    items: dict[tuple, Item] = {}
    for arg in args:
        arg = os.fspath(arg)
        if arg.startswith("@"):
            listing = arg[1:]
            try:
                lines = pathlib.Path(listing).read_text("utf-8").splitlines()
            except OSError as e:
                raise InputError(f"cannot read the input list {listing}: {e.strerror or e}") from None
            entries = [ln.strip() for ln in lines if ln.strip() and not ln.strip().startswith("#")]
            if not entries:
                raise InputError(f"the input list {listing} names no inputs")
            found = [it for entry in entries for it in _expand_one(entry, True)]
        else:
            found = _expand_one(arg, False)
        for it in found:
            items.setdefault((it.path, it.offset or 0), it)  # tar members of one name stay apart
    # the same file reached twice (a symlink, ``x/./a.jpg``, a directory symlink loop) once
    seen: set = set()
    out = []
    for key in sorted(items):
        it = items[key]
        real = (os.path.realpath(it.file), it.offset)
        if real in seen:
            continue
        seen.add(real)
        out.append(it)
    return out


def fingerprint(items: Sequence[Item]) -> str:
    """sha256 of the sorted input paths: two runs with the same list agree on every part."""
    h = hashlib.sha256()
    for it in items:
        h.update(it.path.encode("utf-8", "surrogateescape") + b"\n")
    return h.hexdigest()


def parse_shard(text: str) -> tuple[int, int]:
    """``"INDEX/COUNT"`` -> (index, count), with 0 <= index < count. Raises ValueError."""
    parts = text.split("/")
    if len(parts) != 2 or not all(p.strip().isdigit() for p in parts):
        raise ValueError(f"--shard must be INDEX/COUNT such as 0/4, got {text!r}")
    index, count = int(parts[0]), int(parts[1])
    if count < 1 or not 0 <= index < count:
        raise ValueError(f"--shard INDEX/COUNT needs 0 <= INDEX < COUNT, got {text!r}")
    return index, count


def part_ranges(n_items: int, part_size: int) -> list[range]:
    """Consecutive ranges of the sorted input list, ``part_size`` each (the last may be shorter)."""
    return [range(s, min(s + part_size, n_items)) for s in range(0, n_items, part_size)]


def shard_parts(n_parts: int, index: int, count: int) -> list[int]:
    """The parts shard ``index`` of ``count`` owns: every ``count``-th, starting at ``index``.

    Part numbering does not depend on the shard count, so the files of any number of
    hosts together are the files of one host.
    """
    return list(range(index, n_parts, count))
