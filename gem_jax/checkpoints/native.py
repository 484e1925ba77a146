"""The native gem-jax checkpoint: ``model.safetensors`` of flat params plus ``config.json``."""

from __future__ import annotations

import json
import os
import pathlib
import shutil
from typing import Any, Mapping

import numpy as np

from gem_jax import files
from gem_jax.checkpoints.layouts import CheckpointError, expected_leaves, to_params
from gem_jax.checkpoints.storage import TOKENIZER_FILES, Checkpoint, has_tokenizer_files, load_safetensors, read_json
from gem_jax.config import CLIPConfig

FORMAT = "gem-jax"
VERSION = 1
WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"


def flatten_params(params: Mapping, prefix: str = "") -> dict[str, np.ndarray]:
    """``{"visual": {"conv1": {"kernel": x}}}`` -> ``{"visual/conv1/kernel": x}`` (float32 NumPy)."""
    out = {}
    for k, v in params.items():
        key = f"{prefix}/{k}" if prefix else str(k)
        if isinstance(v, Mapping):
            out.update(flatten_params(v, key))
        else:
            out[key] = np.ascontiguousarray(np.asarray(v, dtype=np.float32))
    return out


def _write_tensors(tensors: dict[str, np.ndarray], path: pathlib.Path) -> None:
    from safetensors.numpy import save_file

    save_file(tensors, str(path), metadata={"format": FORMAT})


def save_native(directory, config: CLIPConfig, params: Mapping, tokenizer_dir=None, *, force: bool = False,
                metadata: Mapping[str, Any] | None = None) -> pathlib.Path:
    """Writes ``config`` and ``params`` as a native checkpoint directory; returns its path.

    Files: ``model.safetensors`` (params flattened with ``/``-joined keys),
    ``config.json`` (``{"format": "gem-jax", "version": 1, "clip": ..., **metadata}``)
    and the tokenizer files of ``tokenizer_dir``, if given. The directory is built
    as a temporary sibling and renamed into place, so a failure leaves nothing
    behind; it gets the user's umask. An existing non-empty ``directory`` is
    replaced only with ``force=True``, and only if it is a native checkpoint holding
    nothing but the files above (else :class:`FileExistsError`): the old one is
    renamed aside, the new one renamed in, then the old one deleted.
    """
    target = pathlib.Path(directory).expanduser().absolute()
    meta = dict(metadata or {})
    clash = {"format", "version", "clip"} & set(meta)
    if clash:
        raise ValueError(f"metadata may not set {sorted(clash)}")
    check_target(target, force)
    created = _make_parents(target.parent)
    files.remove_stale(target.parent)
    tmp = None
    try:
        tmp = files.make_temp_dir(target)
        _write_tensors(flatten_params(params), tmp / WEIGHTS_FILE)
        doc = {"format": FORMAT, "version": VERSION, "clip": config.to_dict(), **meta}
        (tmp / CONFIG_FILE).write_text(json.dumps(doc, indent=2, sort_keys=False) + "\n", encoding="utf-8")
        if tokenizer_dir is not None:
            src = pathlib.Path(tokenizer_dir)
            for name in TOKENIZER_FILES:
                if (src / name).is_file():
                    shutil.copyfile(src / name, tmp / name)
        mode = 0o666 & ~files.umask()  # safetensors writes 0o600
        ledger = files.Ledger(tmp)  # the record --force goes by: what this call wrote
        for f in sorted(tmp.iterdir()):
            os.chmod(f, mode)
            ledger.record_as(f, f)
        _move_into_place(tmp, target, force)
    except BaseException:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        for d in reversed(created):  # parents this call made, innermost first, if still empty
            try:
                d.rmdir()
            except OSError:
                break
        raise
    return target


class NotReplaceableError(FileExistsError):
    """``force`` was given, but the existing output is not a checkpoint gem-jax wrote."""


def _own_files() -> frozenset[str]:
    return frozenset((WEIGHTS_FILE, CONFIG_FILE, *TOKENIZER_FILES))


def check_target(target: pathlib.Path, force: bool) -> None:
    if target.exists() and not target.is_dir():
        raise FileExistsError(f"{target} exists and is not a directory")
    if not target.is_dir() or not any(target.iterdir()):
        return
    check_replaceable(target)  # a directory gem-jax did not write is never offered for --force
    if not force:
        raise FileExistsError(f"{target} already exists (a gem-jax checkpoint); pass --force to replace it")


def check_replaceable(target: pathlib.Path) -> None:
    """Refuses to replace anything but a native checkpoint directory holding only our files."""
    cwd = pathlib.Path.cwd().resolve()
    real = target.resolve()
    if real == cwd or real in cwd.parents:
        raise NotReplaceableError(f"refusing to replace {target}: it is (or holds) the current directory")
    if not is_native(target):
        raise NotReplaceableError(f"refusing to replace {target}: it is not a gem-jax checkpoint directory "
                                  "(--force only replaces a directory gem-jax converted); choose another "
                                  "output directory")
    own, ledger = _own_files(), files.Ledger(target)
    foreign = sorted(p.name for p in target.iterdir() if p.name != files.LEDGER and (
        p.name not in own or p.is_symlink() or not p.is_file() or not ledger.owned(p)))
    if foreign:
        more = f" and {len(foreign) - 1} more" if len(foreign) > 1 else ""
        raise NotReplaceableError(f"refusing to replace {target}: it holds {foreign[0]}{more}, which gem-jax has no "
                                  "record of writing (or which changed since); move those away or choose another "
                                  "output directory")


def _make_parents(parent: pathlib.Path) -> list[pathlib.Path]:
    missing = []
    p = parent
    while not p.exists():
        missing.append(p)
        p = p.parent
    parent.mkdir(parents=True, exist_ok=True)
    return missing[::-1]


def _move_into_place(tmp: pathlib.Path, target: pathlib.Path, force: bool) -> None:
    check_target(target, force)  # again: another process may have written it meanwhile
    if not target.exists():
        os.replace(tmp, target)
        return
    if not any(target.iterdir()):
        target.rmdir()
        os.replace(tmp, target)
        return
    # force: swap the old directory out, the new one in, then delete the old one
    old = files.temp_path(target, suffix=".old")
    os.replace(target, old)
    try:
        os.replace(tmp, target)
    except BaseException:
        os.replace(old, target)
        raise
    shutil.rmtree(old, ignore_errors=True)


def is_native(directory) -> bool:
    """Whether ``directory`` holds a native checkpoint (by its ``config.json``)."""
    cfg = pathlib.Path(directory) / CONFIG_FILE
    if not cfg.is_file() or not (pathlib.Path(directory) / WEIGHTS_FILE).is_file():
        return False
    try:
        return json.loads(cfg.read_text(encoding="utf-8")).get("format") == FORMAT
    except (OSError, UnicodeDecodeError, ValueError, AttributeError):
        return False


def read_native(directory):
    """Reads a native checkpoint directory into a :class:`~gem_jax.checkpoints.Checkpoint`.

    Strict against ``param_shapes(config)``: missing, unexpected or misshapen tensors
    raise :class:`CheckpointError`. Needs neither torch nor the network.
    """
    d = pathlib.Path(directory).expanduser()
    if not (d / CONFIG_FILE).is_file():
        raise CheckpointError(f"{d} is not a gem-jax checkpoint: no {CONFIG_FILE}")
    doc = read_json(d / CONFIG_FILE)
    if doc.get("format") != FORMAT:
        raise CheckpointError(f"{d / CONFIG_FILE} is not a gem-jax config (format={doc.get('format')!r})")
    version = doc.get("version")
    if version != VERSION:
        raise CheckpointError(f"{d} is gem-jax format version {version!r}; this gem-jax reads version {VERSION} "
                              "(convert it again, or upgrade gem-jax)")
    try:
        config = CLIPConfig.from_dict(doc["clip"])
    except (KeyError, ValueError, TypeError) as e:
        raise CheckpointError(f"{d / CONFIG_FILE}: bad 'clip' config: {e}") from None
    if not (d / WEIGHTS_FILE).is_file():
        raise CheckpointError(f"{d} has a gem-jax config.json but no {WEIGHTS_FILE}")
    state = load_safetensors(d / WEIGHTS_FILE)
    key_map = {"/".join(path): (path, None) for path in _param_paths(config)}
    params = to_params(state, config, key_map, source=str(d / WEIGHTS_FILE))
    tok = d if has_tokenizer_files(d) else None
    defaults = doc.get("defaults")
    if defaults is not None and not isinstance(defaults, dict):
        raise CheckpointError(f"{d / CONFIG_FILE}: 'defaults' must be an object of GEM settings, got {defaults!r}")
    return Checkpoint(config, params, "native", tok, str(d), random_weights=doc.get("random_weights") is True,
                      defaults=defaults)


def _param_paths(config: CLIPConfig) -> list[tuple[str, ...]]:
    return list(expected_leaves(config))
