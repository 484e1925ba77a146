"""Finds a model by name, path or hub id: downloads once, converts once, then loads locally."""

from __future__ import annotations

import functools
import os
import pathlib
import re
import importlib.resources
import threading
import warnings

import gem_jax
from gem_jax.checkpoints.layouts import CheckpointError, config_diff
from gem_jax.checkpoints.native import NotReplaceableError, check_target, is_native, save_native
from gem_jax.checkpoints.readers import read_checkpoint, read_directory, with_activation
from gem_jax.checkpoints.registry import (
    HUB_TOKENIZER_FILES,
    MODELS,
    ModelEntry,
    UnknownModelError,
    canonical_name,
    get_entry,
    suggestion,
)
from gem_jax.checkpoints.storage import WEIGHT_SUFFIXES, Checkpoint
from gem_jax.config import ARCHITECTURES, architecture
from gem_jax.models import init_params

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*$")
_TRUE = {"1", "ON", "YES", "TRUE"}


class ModelNotAvailableError(RuntimeError):
    """The weights are neither converted locally nor downloadable now; says what to fetch and where."""


def weights_dir() -> pathlib.Path:
    """Where converted checkpoints live.

    ``$GEM_JAX_WEIGHTS`` if set; else the ``weights/`` directory of a source checkout
    (next to the package); else ``~/.cache/gem_jax/weights``.
    """
    env = os.environ.get("GEM_JAX_WEIGHTS")
    if env:
        return pathlib.Path(env).expanduser()
    checkout = pathlib.Path(gem_jax.__file__).resolve().parents[1] / "weights"
    if checkout.is_dir():
        return checkout
    cache = os.environ.get("XDG_CACHE_HOME") or "~/.cache"
    return pathlib.Path(cache).expanduser() / "gem_jax" / "weights"


def local_dir(name: str) -> pathlib.Path:
    """The directory a registry model is converted into (``weights_dir()/"ViT-B-16.openai"``)."""
    return weights_dir() / get_entry(name).local_name


def is_converted(name: str) -> bool:
    """Whether a registry model has a native copy in :func:`weights_dir`."""
    return is_native(local_dir(name))


def local_state(name: str) -> str:
    """What :func:`local_dir` holds for a registry model: ``"converted"`` (a native copy),
    ``"original"`` (its weights file in the published layout, read as is) or ``"missing"``;
    ``"packaged"`` for a model that ships inside gem-jax."""
    entry = get_entry(name)
    if entry.packaged is not None:
        return "packaged"
    local = weights_dir() / entry.local_name
    if is_native(local):
        return "converted"
    names = {n for n in (entry.filename, entry.fallback_filename) if n}
    if local.is_dir() and any(p.is_file() and (p.name in names or p.suffix in WEIGHT_SUFFIXES)
                              for p in local.iterdir()):
        return "original"
    return "missing"


def local_folders() -> list[tuple[pathlib.Path, str]]:
    """Every model folder under :func:`weights_dir` that is not a registry model's, with what
    it holds: ``"converted"`` (a native checkpoint), ``"random weights"`` (a native one from
    ``convert --random``), ``"original files"`` (another layout gem-jax reads) or
    ``"unreadable"``."""
    root = weights_dir()
    registry = {e.local_name for e in MODELS.values()}
    out = []
    try:
        entries = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    except OSError:
        return out
    for d in entries:
        if d.name in registry:
            continue
        if is_native(d):
            import json

            try:
                doc = json.loads((d / "config.json").read_text("utf-8"))
            except (OSError, ValueError):
                doc = {}
            out.append((d, "random weights" if doc.get("random_weights") is True else "converted"))
        elif any(p.is_file() and p.suffix in WEIGHT_SUFFIXES for p in d.iterdir()):
            out.append((d, "original files"))
        elif any(d.iterdir()):
            out.append((d, "unreadable"))
    return out


def resolve(name_or_path, *, offline: bool | None = None, activation: str | None = None) -> Checkpoint:
    """The :class:`Checkpoint` of a local path, registry name or Hugging Face repo id.

    - an existing directory or file: read as is (:func:`read_checkpoint`);
    - a registry name ("ViT-B/16:openai"): the copy in ``weights_dir()`` if present,
      else its files are downloaded from the hub and converted there once, so later
      loads need neither torch nor the network;
    - ``org/repo``: its config, weights and tokenizer files are downloaded and read.

    ``offline`` (default: ``$HF_HUB_OFFLINE``) only uses the Hugging Face cache. What
    cannot be had raises :class:`ModelNotAvailableError` saying what to download and
    where to put it. ``activation`` overrides the checkpoint's activation.
    """
    src = os.fspath(name_or_path)
    path = pathlib.Path(src).expanduser()
    if path.exists():
        return read_checkpoint(path, activation)
    offline = _offline(offline)
    entry = _registry_entry(src)
    if entry is not None:
        return _resolve_entry(entry, offline, activation)
    return _resolve_other(src, offline, activation)


def convert(source, out=None, *, force: bool = False, activation: str | None = None,
            offline: bool | None = None) -> pathlib.Path:
    """Reads ``source`` (path, registry name or hub id, any layout) and writes it to ``out``
    in the native format; returns ``out``.

    A registry name, or the hub id of a registry entry, is that entry: the same files,
    and by default (``out=None``) its folder in :func:`weights_dir`, where
    :func:`resolve` looks. Refuses an existing non-empty ``out`` without ``force``
    (:class:`FileExistsError`); a failed conversion leaves nothing behind.
    """
    src = os.fspath(source)
    entry = None if pathlib.Path(src).expanduser().exists() else _registry_entry(src)
    if out is None:
        if entry is None:
            if not pathlib.Path(src).expanduser().exists() and _looks_like_path(src):
                raise FileNotFoundError(f"no such checkpoint file or directory: {src}")
            raise ValueError(f"{src} is not a registry model: give the output directory (--out DIR)")
        out = weights_dir() / entry.local_name
    out = pathlib.Path(out).expanduser()
    if entry is not None and local_state(entry.name) == "original" and \
            out.absolute() == (weights_dir() / entry.local_name).absolute():
        # The source is the target: replacing it would delete the files the user downloaded.
        raise NotReplaceableError(f"{out} holds {entry.name}'s original files, which load as they are; to "
                                  f"convert them into the native format, give another directory (--out DIR)")
    check_target(out.absolute(), force)  # fail before any download
    offline = _offline(offline)
    if entry is not None:
        local = weights_dir() / entry.local_name
        if local.is_dir() and any(local.iterdir()):
            ckpt = _read_local(entry, local, activation)
        else:
            ckpt = _download_entry(entry, offline, activation or entry.activation)
    elif pathlib.Path(src).expanduser().exists():
        ckpt = read_checkpoint(src, activation)
    else:
        ckpt = _resolve_other(src, offline, activation)
    meta = {"source": src, "source_layout": ckpt.layout}
    if ckpt.random_weights:
        meta["random_weights"] = True
    if entry is not None:
        meta.update(name=entry.name, hub_repo=entry.hub_repo)
    return save_native(out, ckpt.config, ckpt.params, ckpt.tokenizer_dir, force=force, metadata=meta)


def _offline(offline: bool | None) -> bool:
    if offline is not None:
        return bool(offline)
    return os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in _TRUE


def _registry_entry(src: str) -> ModelEntry | None:
    """The entry of a registry name, or of its Hugging Face repository id."""
    hit = canonical_name(src)
    if hit is not None:
        return MODELS[hit]
    repo = src.strip().lower()
    return next((e for e in MODELS.values() if e.hub_repo and e.hub_repo.lower() == repo), None)


def convert_random(arch: str, out, *, seed: int = 0, force: bool = False) -> pathlib.Path:
    """Writes seeded random weights of architecture ``arch`` (a key of
    :data:`gem_jax.config.ARCHITECTURES`, or a registry name) to ``out`` in the native
    format, with the bundled tokenizer; returns ``out``.

    For trying every command without real weights: the config records
    ``"random_weights": true``, and pictures made from such a model say so.
    """
    arch_name = arch.replace("/", "-")
    entry = None if arch_name in ARCHITECTURES else _registry_entry(arch)
    arch_name = entry.architecture if entry is not None else arch_name
    config = architecture(arch_name)  # ValueError naming the known ones
    out = pathlib.Path(out).expanduser()
    check_target(out.absolute(), force)
    params = init_params(config, seed=seed)
    tokenizer_dir = pathlib.Path(str(importlib.resources.files("gem_jax").joinpath("data")))
    meta = {"source": f"random:{arch_name}", "source_layout": "random", "random_weights": True, "seed": seed}
    return save_native(out, config, params, tokenizer_dir, force=force, metadata=meta)


def _resolve_entry(entry: ModelEntry, offline: bool, activation) -> Checkpoint:
    if entry.packaged is not None:  # ships inside the package: read where it is
        return read_checkpoint(entry.package_dir(), activation)
    local = weights_dir() / entry.local_name
    if local.is_dir() and any(local.iterdir()):
        return _read_local(entry, local, activation)
    ckpt = _download_entry(entry, offline, entry.activation)
    meta = {"source": f"hf://{entry.hub_repo}", "source_layout": ckpt.layout, "name": entry.name,
            "hub_repo": entry.hub_repo}
    try:
        save_native(local, ckpt.config, ckpt.params, ckpt.tokenizer_dir, metadata=meta)
    except FileExistsError:
        pass  # another process converted it meanwhile
    except OSError as e:
        warnings.warn(f"could not save the converted {entry.name} into {local} ({e}); it will be downloaded "
                      "and converted again next time (set GEM_JAX_WEIGHTS to a writable directory)", stacklevel=3)
        return with_activation(ckpt, activation)
    return _read_local(entry, local, activation)


def _read_local(entry: ModelEntry, local: pathlib.Path, activation) -> Checkpoint:
    # converted copies and files the user downloaded into ``local`` alike
    ckpt = read_checkpoint(local, activation or entry.activation)
    _check_architecture(entry, ckpt, ignore_activation=activation is not None)
    return ckpt


def _check_architecture(entry: ModelEntry, ckpt: Checkpoint, ignore_activation: bool = False) -> None:
    ignore = ("activation",) if ignore_activation else ()
    diff = config_diff(architecture(entry.architecture), ckpt.config, ignore=ignore)
    if diff:
        raise CheckpointError(f"{ckpt.source} does not hold {entry.name} ({entry.architecture}): "
                              + "; ".join(diff) + " (registry != checkpoint)")


def _download_entry(entry: ModelEntry, offline: bool, activation) -> Checkpoint:
    """Fetches an entry's files into the Hugging Face cache and reads them."""
    if entry.hub_repo is None:
        raise _release_only(entry)
    repo = entry.hub_repo
    try:
        files = {}
        if entry.config_filename:
            cfg = _fetch(repo, entry.config_filename, offline)
            if cfg is None and entry.layout == "transformers":
                raise _Unavailable(f"the repository has no {entry.config_filename}")
            if cfg is not None:
                files[entry.config_filename] = cfg
        weights = _fetch_first(repo, [entry.filename, entry.fallback_filename], offline)
        files[weights.name] = weights
        for name in HUB_TOKENIZER_FILES:
            _fetch_optional(repo, name, offline, files)
    except _Unavailable as e:
        raise _entry_unavailable(entry, str(e), offline) from None
    ckpt = _read_fetched(files, activation, f"hf://{repo}")
    _check_architecture(entry, ckpt)
    return ckpt


def _looks_like_path(src: str) -> bool:
    return src.startswith((".", "/", "~")) or src.endswith(WEIGHT_SUFFIXES + (".json",))


def _resolve_other(src: str, offline: bool, activation) -> Checkpoint:
    if _looks_like_path(src):
        raise FileNotFoundError(f"no such checkpoint file or directory: {src}")
    if ":" in src or not _HUB_ID.match(src) or _near_registry_name(src):
        raise UnknownModelError(f"unknown model {src!r}{suggestion(src)} (`gem-jax models` lists the registry; "
                                "a local path or a Hugging Face repo id like 'openai/clip-vit-base-patch16' "
                                "also works)")
    try:
        files = {}
        for name in ("open_clip_config.json", "config.json"):
            _fetch_optional(src, name, offline, files, strict=True)
        if "open_clip_config.json" in files:
            candidates = ["open_clip_model.safetensors", "open_clip_pytorch_model.bin"]
            files.pop("config.json", None)
        elif "config.json" in files:
            candidates = ["model.safetensors", "pytorch_model.bin"]
        else:
            raise _Unavailable("it has neither open_clip_config.json nor config.json")
        weights = _fetch_first(src, candidates, offline)
        files[weights.name] = weights
        for name in HUB_TOKENIZER_FILES:
            _fetch_optional(src, name, offline, files)
    except _Unavailable as e:
        target = weights_dir() / src.replace("/", "--")
        raise ModelNotAvailableError(
            f"there is no local file or directory {src}, and as a Hugging Face repository it is not "
            f"available{' offline' if offline else ''}: {e}.\n"
            f"Download it where there is network access:\n"
            f"    hf download {src} --include '*.json' '*.txt' '*.safetensors' --local-dir {target}\n"
            f"(`huggingface-cli download` in older huggingface_hub) and load {target} instead.") from None
    return _read_fetched(files, activation, f"hf://{src}")


def _near_registry_name(src: str) -> bool:
    # "ViT-B/17" is a typo of a registry model, not a repository id
    import difflib

    models = {n.split(":", 1)[0] for n in MODELS}
    return bool(difflib.get_close_matches(src, models, n=1, cutoff=0.8))


def _read_fetched(files: dict[str, pathlib.Path], activation, source: str) -> Checkpoint:
    parents = {p.parent for p in files.values()}
    if len(parents) != 1:
        raise CheckpointError(f"downloaded files of {source} are spread over {sorted(map(str, parents))}")
    d = parents.pop()
    ckpt = read_directory(d, activation, only=frozenset(files))
    return Checkpoint(ckpt.config, ckpt.params, ckpt.layout, ckpt.tokenizer_dir, source)


class _Unavailable(Exception):
    pass


def _hub_errors():
    try:
        from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError, RepositoryNotFoundError
    except ImportError:  # huggingface_hub < 0.23
        from huggingface_hub.utils import EntryNotFoundError, LocalEntryNotFoundError, RepositoryNotFoundError
    return EntryNotFoundError, LocalEntryNotFoundError, RepositoryNotFoundError


#: Seconds to wait for the hub to answer one request before taking the machine as offline.
REACH_TIMEOUT = 3.0


@functools.lru_cache(maxsize=None)
def _hub_reachable(endpoint: str, timeout: float = REACH_TIMEOUT) -> bool:
    """Whether ``endpoint`` answers within ``timeout`` s (any HTTP status counts; proxies from the
    environment are used). Asked once per process, so offline machines do not wait through the
    hub client's retries."""
    import urllib.error
    import urllib.request

    answer = []

    def probe():
        try:
            urllib.request.urlopen(urllib.request.Request(endpoint, method="HEAD"), timeout=timeout).close()
            answer.append(True)
        except urllib.error.HTTPError:
            answer.append(True)  # it answered
        except Exception:
            answer.append(False)

    thread = threading.Thread(target=probe, daemon=True)  # name resolution ignores the socket timeout
    thread.start()
    thread.join(timeout)
    return bool(answer and answer[0])


def _fetch(repo: str, filename: str, offline: bool) -> pathlib.Path | None:
    """The local path of one file (downloaded or cached); None if the repository lacks it."""
    import huggingface_hub
    from huggingface_hub import constants

    EntryNotFound, LocalEntryNotFound, RepoNotFound = _hub_errors()
    unreachable = not offline and not _hub_reachable(constants.ENDPOINT)
    try:
        return pathlib.Path(huggingface_hub.hf_hub_download(repo, filename, local_files_only=offline or unreachable))
    except LocalEntryNotFound:
        if offline:
            raise _Unavailable(f"{filename} is not in the Hugging Face cache and downloads are off "
                               "(HF_HUB_OFFLINE)") from None
        if unreachable:
            raise _Unavailable(f"{filename} is not in the Hugging Face cache and the hub ({constants.ENDPOINT}) "
                               f"cannot be reached (no network?)") from None
        raise _Unavailable(f"{filename} could not be downloaded (no network?) and is not cached") from None
    except EntryNotFound:
        return None
    except RepoNotFound:
        raise _Unavailable("the repository does not exist or needs a login (`hf auth login`)") from None
    except (OSError, ValueError) as e:  # connection and HTTP errors
        raise _Unavailable(f"downloading {filename} failed ({type(e).__name__}: {e})") from None


def _fetch_first(repo: str, candidates, offline: bool) -> pathlib.Path:
    names = [c for c in candidates if c]
    for name in names:
        p = _fetch(repo, name, offline)
        if p is not None:
            return p
    raise _Unavailable(f"the repository has none of {', '.join(names)}")


def _fetch_optional(repo, name, offline, files, strict=False) -> None:
    # strict: a network failure still counts (used for the files that pick the layout)
    try:
        p = _fetch(repo, name, offline)
    except _Unavailable:
        if strict:
            raise
        return
    if p is not None:
        files[name] = p


def _entry_unavailable(entry: ModelEntry, reason: str, offline: bool) -> ModelNotAvailableError:
    target = weights_dir() / entry.local_name
    files = " ".join(f for f in (entry.config_filename, entry.filename) if f)
    return ModelNotAvailableError(
        f"{entry.name} is not available{' offline' if offline else ''}: {entry.hub_repo}: {reason}"
        f"{'' if offline else ' (HF_HUB_OFFLINE=1 skips the connection attempts)'}.\n"
        f"Download it once where there is network access:\n"
        f"    hf download {entry.hub_repo} {files} --local-dir {target}\n"
        f"(`huggingface-cli download` with the same arguments in older huggingface_hub); gem-jax then "
        f"reads it from {target}. Or copy a {entry.local_name}/ directory converted elsewhere (`gem-jax convert "
        f"{entry.name}`) into {weights_dir()}, or point GEM_JAX_WEIGHTS at a directory holding one.")


def _release_only(entry: ModelEntry) -> ModelNotAvailableError:
    target = weights_dir() / entry.local_name
    return ModelNotAvailableError(
        f"{entry.name} has no known Hugging Face repository, so it cannot be fetched automatically. "
        f"Its weights are published at {entry.url}.\nDownload that file into {target}/, e.g.\n"
        f"    mkdir -p {target} && curl -L -o {target}/{entry.filename} {entry.url}\n"
        f"gem-jax then reads it from there (reading .pt files needs torch: pip install \"gem-jax[torch]\"); "
        f"or convert it once: gem-jax convert FILE --out {target} --activation {entry.activation}")


__all__ = ["ModelNotAvailableError", "weights_dir", "local_dir", "is_converted", "local_state", "resolve",
           "convert", "convert_random", "get_entry"]
