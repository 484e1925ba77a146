"""Prompt embeddings kept on disk between processes, so the text tower runs once per machine.

Entries are keyed by the text tower's weights (a hash of every value), the prompt
templates, the compute dtype and the prompt. The cache lives in ``$GEM_JAX_CACHE/text``
(default: the platform's cache directory, ``~/.cache/gem_jax`` on Linux), is written
through the one writer (whole files, the user's umask), and is bounded: past
:data:`DEFAULT_MAX_BYTES` (``$GEM_JAX_TEXT_CACHE_BYTES``) the least recently used files go.
Turn it off with ``--no-text-cache`` or ``GEM(text_cache=False)``.
"""

from __future__ import annotations

import hashlib
import json
import os
import pathlib
import sys
import threading
from typing import Mapping, Sequence

import numpy as np

from gem_jax import files

DEFAULT_MAX_BYTES = 1 << 30
_lock = threading.Lock()


def cache_root() -> pathlib.Path:
    """``$GEM_JAX_CACHE``, else the platform's cache directory for gem_jax."""
    env = os.environ.get("GEM_JAX_CACHE")
    if env:
        return pathlib.Path(env).expanduser()
    if sys.platform == "darwin":
        return pathlib.Path.home() / "Library" / "Caches" / "gem_jax"
    if os.name == "nt":
        return pathlib.Path(os.environ.get("LOCALAPPDATA", pathlib.Path.home())) / "gem_jax" / "cache"
    return pathlib.Path(os.environ.get("XDG_CACHE_HOME") or pathlib.Path.home() / ".cache") / "gem_jax"


def _max_bytes() -> int:
    try:
        return int(os.environ.get("GEM_JAX_TEXT_CACHE_BYTES", DEFAULT_MAX_BYTES))
    except ValueError:
        return DEFAULT_MAX_BYTES


class TextCache:
    """One directory of cached prompt embeddings (see the module doc)."""

    def __init__(self, root, max_bytes: int | None = None):
        self.root = pathlib.Path(root).expanduser() / "text"
        self.max_bytes = _max_bytes() if max_bytes is None else int(max_bytes)

    def _dir(self, gem) -> pathlib.Path:
        key = {"text_weights": gem.model.text_fingerprint, "templates": list(gem.templates), "dtype": gem.dtype}
        digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()
        return self.root / digest[:2] / digest

    def get(self, gem, prompts: Sequence[str]) -> dict[str, np.ndarray]:
        """The cached embeddings of those ``prompts`` that are cached (never raises: an
        unreadable cache is an empty one)."""
        d = self._dir(gem)
        wanted = set(prompts)
        found: dict[str, np.ndarray] = {}
        try:
            chunks = sorted(d.glob("*.npz"))
        except OSError:
            return found
        for f in chunks:
            try:
                with np.load(f, allow_pickle=False) as z:
                    names = [str(s) for s in z["prompts"]]
                    hits = [i for i, n in enumerate(names) if n in wanted and n not in found]
                    if hits:
                        emb = z["embeddings"]
                        found.update((names[i], np.asarray(emb[i], np.float32)) for i in hits)
                if hits:
                    os.utime(f)  # recently used: evicted last
            except Exception:  # damaged or foreign file: not an entry
                continue
            if len(found) == len(wanted):
                break
        return found

    def put(self, gem, embeddings: Mapping[str, np.ndarray]) -> None:
        """Stores ``embeddings`` (prompt -> (D,) float32) as one file; never raises (a cache
        that cannot be written is skipped, with a warning)."""
        if not embeddings:
            return
        names = list(embeddings)
        emb = np.stack([np.asarray(embeddings[n], np.float32) for n in names])
        d = self._dir(gem)
        digest = hashlib.sha256("\n".join(names).encode("utf-8", "surrogatepass")).hexdigest()[:24]
        try:
            with _lock:
                files.make_dirs(d)
                files.remove_stale(d)
                files.atomic_write(d / f"{digest}.npz", lambda f: np.savez(f, prompts=np.array(names),
                                                                           embeddings=emb), fsync=False)
            self._evict()
        except Exception as e:  # a full disk or a read-only home must not stop the work
            import warnings

            warnings.warn(f"gem-jax: could not write the text-embedding cache in {self.root} ({e}); "
                          "pass --no-text-cache (or text_cache=False) to silence this", stacklevel=3)

    def _evict(self) -> None:
        entries = []
        for f in self.root.glob("*/*/*.npz"):
            try:
                st = f.stat()
            except OSError:
                continue
            entries.append((st.st_mtime, st.st_size, f))
        total = sum(size for _, size, _ in entries)
        if total <= self.max_bytes:
            return
        for _, size, f in sorted(entries):  # oldest first
            try:
                f.unlink()
            except OSError:
                continue
            total -= size
            if total <= 0.9 * self.max_bytes:
                break

    def clear(self) -> None:
        """Removes every cached embedding."""
        import shutil

        shutil.rmtree(self.root, ignore_errors=True)


def open_cache(setting) -> TextCache | None:
    """The cache a ``text_cache`` setting asks for: ``True`` the default location, a path
    that directory, ``False``/``None`` none."""
    if setting is None or setting is False:
        return None
    if setting is True:
        return TextCache(cache_root())
    return TextCache(setting)
