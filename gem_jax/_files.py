"""Files written safely: temporary names we can recognise later, the user's umask, atomic renames."""

from __future__ import annotations

import hashlib
import os
import pathlib
import re
import secrets
import shutil
import socket
import threading
import time

#: Marks every temporary file and directory gem-jax creates, so a later run can tell its
#: own leftovers (from a killed process) from the user's files.
MARK = "gemjax"
#: A leftover from another machine (a shared file system) is only removed after this long.
FOREIGN_AGE_SECONDS = 24 * 3600

_TEMP = re.compile(rf"^\..+\.{MARK}-([0-9a-f]{{6}})-(\d+)-[0-9a-f]+\.(?:tmp|old)$")
_umask_lock = threading.Lock()


def _host_tag() -> str:
    return hashlib.sha1(socket.gethostname().encode()).hexdigest()[:6]


def temp_path(path, suffix: str = ".tmp") -> pathlib.Path:
    """A hidden name beside ``path`` that :func:`remove_stale` recognises:
    ``.<name>.gemjax-<host>-<pid>-<random>.tmp``."""
    path = pathlib.Path(path)
    return path.parent / f".{path.name}.{MARK}-{_host_tag()}-{os.getpid()}-{secrets.token_hex(4)}{suffix}"


def umask() -> int:
    """The process's umask (read without changing it for other threads for long)."""
    with _umask_lock:
        mask = os.umask(0o022)
        os.umask(mask)
    return mask


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


def atomic_write(path, write) -> None:
    """Calls ``write(file)`` on a temporary file beside ``path``, then renames it to ``path``.

    A reader never sees half a file, a failure leaves nothing behind, and the file gets the
    user's umask. The parent directory must exist.
    """
    path = pathlib.Path(path)
    fd, temp = open_temp(path)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
        os.replace(temp, path)
    except BaseException:
        pathlib.Path(temp).unlink(missing_ok=True)
        raise


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
