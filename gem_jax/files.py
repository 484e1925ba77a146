"""The one writer: every file gem-jax writes goes through here.

- Temporary names gem-jax recognises later (``.<name>.gemjax-<host>-<pid>-<random>.tmp``),
  removed by :func:`remove_stale` once their process is gone.
- Whole files only: written to a temporary name, flushed to disk, renamed into place
  (:func:`atomic_write`); without ``overwrite`` an existing file is never clobbered, not
  even by a race.
- The user's umask, for files and directories alike.
- Ownership: a command replaces or deletes only what it wrote. :class:`Ledger` is the
  record it keeps of that, one per directory (``.gem-jax-files.jsonl``); a file that is
  not in it (or was changed since) is in the way, and is never replaced, with ``--force``
  neither.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import pathlib
import re
import secrets
import shutil
import socket
import threading
import time
from typing import Callable, Iterable

#: Marks every temporary file and directory gem-jax creates, so a later run can tell its
#: own leftovers (from a killed process) from the user's files.
MARK = "gemjax"
#: A leftover from another machine (a shared file system) is only removed after this long.
FOREIGN_AGE_SECONDS = 24 * 3600
#: The ownership record kept in each directory gem-jax writes files into.
LEDGER = ".gem-jax-files.jsonl"

_TEMP = re.compile(rf"^\..+\.{MARK}-([0-9a-f]{{6}})-(\d+)-[0-9a-f]+\.(?:tmp|old)$")
_umask_lock = threading.Lock()


class OutputError(Exception):
    """An output that cannot be written as asked; the message names the file and, where one
    exists, a way out that deletes nothing gem-jax did not write."""


def _host_tag() -> str:
    return hashlib.sha1(socket.gethostname().encode()).hexdigest()[:6]


def temp_path(path, suffix: str = ".tmp") -> pathlib.Path:
    """A hidden name beside ``path`` that :func:`remove_stale` recognises:
    ``.<name>.gemjax-<host>-<pid>-<random>.tmp``."""
    path = pathlib.Path(path)
    return path.parent / f".{path.name}.{MARK}-{_host_tag()}-{os.getpid()}-{secrets.token_hex(4)}{suffix}"


def is_temp_name(name: str) -> bool:
    """Whether ``name`` is one of gem-jax's temporary names."""
    return _TEMP.match(name) is not None


def umask() -> int:
    """The process's umask (read without changing it for other threads for long)."""
    with _umask_lock:
        mask = os.umask(0o022)
        os.umask(mask)
    return mask


def file_mode() -> int:
    """The mode of an ordinary new file: 0o666 less the umask."""
    return 0o666 & ~umask()


def open_temp(path) -> tuple[int, str]:
    """Creates a new temporary file beside ``path`` with the usual mode (0o666 less the umask)."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0)
    for _ in range(100):
        temp = str(temp_path(path))
        try:
            return os.open(temp, flags, 0o666), temp
        except FileExistsError:
            continue
    raise FileExistsError(f"could not create a temporary file beside {path}")


def make_temp_dir(path) -> pathlib.Path:
    """Creates a new temporary directory beside ``path`` with the usual mode (0o777 less the umask)."""
    for _ in range(100):
        temp = temp_path(path)
        try:
            os.mkdir(temp, 0o777)
            return temp
        except FileExistsError:
            continue
    raise FileExistsError(f"could not create a temporary directory beside {path}")


def _exists(path) -> FileExistsError:
    return FileExistsError(errno.EEXIST, f"{path} already exists; refusing to overwrite it", str(path))


def publish(temp, path, overwrite: bool = True) -> None:
    """Moves a finished temporary file to ``path``; without ``overwrite`` never clobbers a
    file (a hard link fails if ``path`` appeared meanwhile, closing the race)."""
    if overwrite:
        os.replace(temp, path)
        return
    try:
        os.link(temp, path)
    except FileExistsError:
        raise _exists(path) from None
    except OSError:  # no hard links on this file system
        if os.path.lexists(path):
            raise _exists(path) from None
        os.replace(temp, path)
        return
    os.unlink(temp)


def atomic_write(path, write: Callable, *, overwrite: bool = True, fsync: bool = True,
                 record: bool = False) -> pathlib.Path:
    """Calls ``write(file)`` on a temporary binary file beside ``path``, then renames it to ``path``.

    A reader never sees half a file, a failure leaves nothing behind, and the file gets the
    user's umask. Without ``overwrite`` an existing ``path`` raises :class:`FileExistsError`.
    With ``record`` the file is noted in the directory's :class:`Ledger` as gem-jax's before
    it takes its name (a rename keeps the size and time the note holds), so a process killed
    at any moment never leaves a file of its own that the next run takes for the user's.
    The parent directory must exist. Returns ``path``.
    """
    path = pathlib.Path(path)
    if not overwrite and os.path.lexists(path):
        raise _exists(path)
    fd, temp = open_temp(path)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            if fsync:
                f.flush()
                os.fsync(f.fileno())
        if record:
            Ledger(path.parent).record_as(path, temp)
        publish(temp, path, overwrite)
    finally:
        with contextlib.suppress(OSError):
            os.unlink(temp)  # gone after a successful publish; else the partial file
    return path


def write_bytes(path, data: bytes, **kw) -> pathlib.Path:
    """:func:`atomic_write` of ``data``."""
    return atomic_write(path, lambda f: f.write(data), **kw)


def dump_json(doc) -> bytes:
    """``doc`` as indented UTF-8 JSON with a final newline."""
    return (json.dumps(doc, indent=2, ensure_ascii=False) + "\n").encode("utf-8")


def write_json(path, doc, **kw) -> pathlib.Path:
    """:func:`atomic_write` of ``doc`` as indented JSON."""
    return write_bytes(path, dump_json(doc), **kw)


def make_dirs(directory) -> list[pathlib.Path]:
    """Creates ``directory`` and its missing parents (user's umask); returns those it created,
    outermost first, so a failed command can remove what it made for nothing."""
    directory = pathlib.Path(directory)
    missing = []
    p = directory
    while not p.exists() and p != p.parent:
        missing.append(p)
        p = p.parent
    directory.mkdir(parents=True, exist_ok=True)
    return missing[::-1]


def remove_empty(dirs: Iterable[pathlib.Path]) -> None:
    """Removes the directories ``dirs`` (innermost last in the list) that are still empty."""
    for d in reversed(list(dirs)):
        try:
            d.rmdir()
        except OSError:
            break


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # exists, owned by someone else
        return True
    return True


def remove_stale(directory) -> list[pathlib.Path]:
    """Removes gem-jax's own temporaries in ``directory`` left by a process that died
    (``kill -9``, a power cut); returns what was removed.

    Only names made by :func:`temp_path` are considered: from this machine when their
    process is gone, from another machine (a shared file system) when older than
    :data:`FOREIGN_AGE_SECONDS`. Never raises.
    """
    removed = []
    try:
        entries = list(os.scandir(directory))
    except OSError:
        return removed
    here, now = _host_tag(), time.time()
    for entry in entries:
        m = _TEMP.match(entry.name)
        if m is None:
            continue
        host, pid = m.group(1), int(m.group(2))
        try:
            if host == here:
                if pid == os.getpid() or _pid_alive(pid):
                    continue
            elif now - entry.stat(follow_symlinks=False).st_mtime < FOREIGN_AGE_SECONDS:
                continue
            if entry.is_dir(follow_symlinks=False):
                shutil.rmtree(entry.path)
            else:
                os.unlink(entry.path)
            removed.append(pathlib.Path(entry.path))
        except OSError:
            continue
    return removed


def _stamp(path: pathlib.Path) -> dict | None:
    try:
        st = os.stat(path, follow_symlinks=False)
    except OSError:
        return None
    import stat

    if not stat.S_ISREG(st.st_mode):
        return None
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns}


class Ledger:
    """The record of the files gem-jax wrote in one directory (:data:`LEDGER`).

    An append-only list of JSON lines, one per file written (its name, size and
    modification time then) or deleted: a file is :meth:`owned` only while its size and
    time still match, so a file the user replaced or edited since is theirs again. Lines
    are appended whole (``O_APPEND``), so several processes may record at once.
    """

    def __init__(self, directory):
        self.directory = pathlib.Path(directory)
        self.path = self.directory / LEDGER
        self._cache: tuple | None = None

    def _entries(self) -> dict[str, list[dict]]:
        try:
            st = os.stat(self.path)
        except OSError:
            return {}
        key = (st.st_size, st.st_mtime_ns)
        if self._cache is not None and self._cache[0] == key:
            return self._cache[1]
        entries: dict[str, list[dict]] = {}
        try:
            with open(self.path, encoding="utf-8", errors="surrogateescape") as f:
                for line in f:
                    try:
                        doc = json.loads(line)
                        name = doc["name"]
                    except (ValueError, KeyError, TypeError):
                        continue  # a torn or foreign line: not a record
                    if doc.get("deleted"):
                        entries.pop(name, None)
                    elif isinstance(doc.get("size"), int) and isinstance(doc.get("mtime_ns"), int):
                        # every version gem-jax wrote under the name counts (a kill between the
                        # note of a new version and its rename leaves the old one in place)
                        entries.setdefault(name, []).append({"size": doc["size"], "mtime_ns": doc["mtime_ns"]})
        except OSError:
            return {}
        self._cache = (key, entries)
        return entries

    def owned(self, path) -> bool:
        """Whether ``path`` (in this directory) is a file gem-jax wrote and nobody changed since."""
        path = pathlib.Path(path)
        stamp = _stamp(path)
        return stamp is not None and stamp in self._entries().get(path.name, ())

    def recorded(self, path) -> bool:
        """Whether gem-jax recorded writing a file of this name here (changed since or not)."""
        return pathlib.Path(path).name in self._entries()

    def _append(self, docs: list[dict]) -> None:
        if not docs:
            return
        data = "".join(json.dumps(d, ensure_ascii=False) + "\n" for d in docs).encode("utf-8", "surrogateescape")
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
        try:
            os.write(fd, data)
        finally:
            os.close(fd)

    def record_as(self, path, source) -> None:
        """Notes ``path`` as gem-jax's with the size and time of ``source`` (the temporary file
        about to be renamed to it)."""
        stamp = _stamp(pathlib.Path(source))
        if stamp is not None:
            self._append([{"name": pathlib.Path(path).name, **stamp}])

    def forget(self, *paths) -> None:
        """Drops ``paths`` from the record (after deleting them)."""
        self._append([{"name": pathlib.Path(p).name, "deleted": True} for p in paths])

    def names(self) -> list[str]:
        """The recorded file names that are still owned."""
        return [n for n in self._entries() if self.owned(self.directory / n)]


def write_owned(path, write: Callable, *, force: bool, flag: str = "--force") -> pathlib.Path:
    """Writes an output file a command produces: refused if it exists and is not gem-jax's
    (or without ``force``; :func:`check_writable`), written whole (:func:`atomic_write`),
    then recorded in the directory's :class:`Ledger`."""
    path = pathlib.Path(path)
    check_writable(path, force=force, flag=flag)
    return atomic_write(path, write, record=True)


def check_writable(path, *, force: bool, flag: str = "--force") -> None:
    """Raises :class:`OutputError` when ``path`` may not be written: it is a directory, or it
    exists and either ``force`` is off (the message offers ``flag``) or gem-jax did not write
    it (the message offers no step that would delete it)."""
    path = pathlib.Path(path)
    if path.is_dir():
        raise OutputError(f"{path} is a directory, not a file")
    if not os.path.lexists(path):
        return
    if not Ledger(path.parent).owned(path):
        raise OutputError(f"{path} exists and was not written by gem-jax (or was changed since); it is left "
                          "alone: move it away or choose another output")
    if not force:
        raise OutputError(f"output file exists: {path}; pass {flag} to overwrite it")


def remove_owned(path) -> bool:
    """Deletes ``path`` if gem-jax wrote it (per the ledger) and forgets it; returns whether it did."""
    path = pathlib.Path(path)
    ledger = Ledger(path.parent)
    if not ledger.owned(path):
        return False
    path.unlink(missing_ok=True)
    ledger.forget(path)
    return True
