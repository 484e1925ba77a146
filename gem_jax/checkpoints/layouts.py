"""State-dict layouts -> the Flax parameter tree: renames, transposes and a strict merge."""

from __future__ import annotations

import re
from typing import Callable, Mapping

import numpy as np

from gem_jax.config import CLIPConfig

# Tensors a checkpoint may carry that the model does not use.
EXEMPT_KEYS = re.compile(
    r"(^|\.)(position_ids|attn_mask|logit_scale|logit_bias|input_resolution|context_length|vocab_size)$"
)


class CheckpointError(ValueError):
    """A checkpoint that does not match the model: names the offending keys."""


def _t(x):
    return np.ascontiguousarray(np.asarray(x).T)


def _conv(x):
    # torch (out, in, kh, kw) -> Flax (kh, kw, in, out)
    return np.ascontiguousarray(np.asarray(x).transpose(2, 3, 1, 0))


def _ln(prefix: str, dst: tuple) -> dict:
    return {f"{prefix}.weight": (dst + ("scale",), None), f"{prefix}.bias": (dst + ("bias",), None)}


def _dense(prefix: str, dst: tuple) -> dict:
    return {f"{prefix}.weight": (dst + ("kernel",), _t), f"{prefix}.bias": (dst + ("bias",), None)}


# ---- OpenCLIP / OpenAI -------------------------------------------------------------

def _openclip_block(src: str, dst: tuple) -> dict:
    m = {}
    m.update(_ln(f"{src}.ln_1", dst + ("ln_1",)))
    m[f"{src}.attn.in_proj_weight"] = (dst + ("attn", "in_proj", "kernel"), _t)
    m[f"{src}.attn.in_proj_bias"] = (dst + ("attn", "in_proj", "bias"), None)
    m.update(_dense(f"{src}.attn.out_proj", dst + ("attn", "out_proj")))
    m.update(_ln(f"{src}.ln_2", dst + ("ln_2",)))
    m.update(_dense(f"{src}.mlp.c_fc", dst + ("mlp", "c_fc")))
    m.update(_dense(f"{src}.mlp.c_proj", dst + ("mlp", "c_proj")))
    return m


def openclip_key_map(config: CLIPConfig) -> dict[str, tuple[tuple[str, ...], Callable | None]]:
    """``{state-dict key: (param path, transform)}`` for the OpenCLIP/OpenAI layout."""
    v = ("visual",)
    t = ("text",)
    m = {
        "visual.conv1.weight": (v + ("conv1", "kernel"), _conv),
        "visual.class_embedding": (v + ("class_embedding",), None),
        "visual.positional_embedding": (v + ("positional_embedding",), None),
        "visual.proj": (v + ("proj",), None),
        "token_embedding.weight": (t + ("token_embedding", "embedding"), None),
        "positional_embedding": (t + ("positional_embedding",), None),
        "text_projection": (t + ("text_projection",), None),
    }
    m.update(_ln("visual.ln_pre", v + ("ln_pre",)))
    m.update(_ln("visual.ln_post", v + ("ln_post",)))
    m.update(_ln("ln_final", t + ("ln_final",)))
    for i in range(config.vision.layers):
        m.update(_openclip_block(f"visual.transformer.resblocks.{i}", v + (f"resblocks_{i}",)))
    for i in range(config.text.layers):
        m.update(_openclip_block(f"transformer.resblocks.{i}", t + (f"resblocks_{i}",)))
    return m


# ---- strict merge ------------------------------------------------------------------

def _expected_leaves(config: CLIPConfig) -> dict[tuple[str, ...], tuple[int, ...]]:
    import jax

    from gem_jax.models import param_shapes

    flat = jax.tree_util.tree_flatten_with_path(param_shapes(config))[0]
    return {tuple(k.key for k in path): tuple(leaf.shape) for path, leaf in flat}


def _unflatten(flat: Mapping[tuple[str, ...], np.ndarray]) -> dict:
    tree: dict = {}
    for path, value in flat.items():
        node = tree
        for k in path[:-1]:
            node = node.setdefault(k, {})
        node[path[-1]] = value
    return tree


def _summarise(keys, limit=8) -> str:
    keys = sorted(keys)
    more = f" (+{len(keys) - limit} more)" if len(keys) > limit else ""
    return ", ".join(keys[:limit]) + more


def to_params(state: Mapping[str, np.ndarray], config: CLIPConfig,
              key_map: Mapping[str, tuple[tuple[str, ...], Callable | None]],
              source: str = "checkpoint", dtype=np.float32) -> dict:
    """Maps a state dict onto the Flax parameter tree of ``config``, strictly.

    Every tensor must be used (or match :data:`EXEMPT_KEYS`), every parameter filled
    and every shape equal to what ``config`` expects; otherwise one
    :class:`CheckpointError` lists all the offending keys. Values become ``dtype``
    NumPy arrays (fp16 checkpoints are upcast).
    """
    expected = _expected_leaves(config)
    unused = [k for k in state if k not in key_map and not EXEMPT_KEYS.search(k)]
    missing = [k for k in key_map if k not in state]
    flat, bad_shapes = {}, []
    for key, (path, fn) in key_map.items():
        if key not in state:
            continue
        value = np.asarray(state[key])
        value = fn(value) if fn is not None else value
        want = expected.get(path)
        if want is None:
            raise AssertionError(f"key map names unknown parameter {'/'.join(path)}")
        if tuple(value.shape) != want:
            bad_shapes.append(f"{key} {tuple(np.asarray(state[key]).shape)} (expected {want} after layout change)")
            continue
        flat[path] = value.astype(dtype)
    targets = {path for path, _ in key_map.values()}
    unfilled = [p for p in expected if p not in targets]  # a key map that misses a parameter
    problems = []
    if missing:
        problems.append(f"missing {len(missing)} tensor(s): {_summarise(missing)}")
    if unused:
        problems.append(f"unexpected {len(unused)} tensor(s): {_summarise(unused)}")
    if bad_shapes:
        problems.append(f"wrong shape for {len(bad_shapes)} tensor(s): {_summarise(bad_shapes, 4)}")
    if unfilled:
        problems.append("parameters with no source: " + _summarise("/".join(p) for p in unfilled))
    if problems:
        raise CheckpointError(f"{source} does not match the model: " + "; ".join(problems))
    return _unflatten(flat)


def params_from_openclip(state: Mapping[str, np.ndarray], config: CLIPConfig,
                         source: str = "checkpoint") -> dict:
    """Flax params from an OpenCLIP/OpenAI-layout state dict (NumPy values)."""
    state = {k[len("module."):] if k.startswith("module.") else k: v for k, v in state.items()}
    return to_params(state, config, openclip_key_map(config), source)
