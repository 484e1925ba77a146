"""State-dict layouts -> the Flax parameter tree: renames, transposes and a strict merge."""

from __future__ import annotations

import math
import re
from typing import Any, Callable, Mapping

import numpy as np

import jax

from gem_jax.config import CLIPConfig, TextConfig, VisionConfig, infer_config
from gem_jax.models import param_shapes

#: ``{source key or tuple of source keys: (param path, transform)}``. A tuple feeds one
#: parameter from several tensors; the transform then takes them positionally.
KeyMap = Mapping[str | tuple[str, ...], tuple[tuple[str, ...], Callable | None]]

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


def openclip_key_map(config: CLIPConfig) -> dict:
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


def _qkv_kernel(q, k, v):
    # separate torch (out, in) weights -> one Flax (in, 3*out) kernel, columns q, k, v
    return np.ascontiguousarray(np.concatenate([np.asarray(q).T, np.asarray(k).T, np.asarray(v).T], axis=1))


def _qkv_bias(q, k, v):
    return np.concatenate([np.asarray(q), np.asarray(k), np.asarray(v)])


def _transformers_block(src: str, dst: tuple) -> dict:
    m = {}
    m.update(_ln(f"{src}.layer_norm1", dst + ("ln_1",)))
    qkv = tuple(f"{src}.self_attn.{n}_proj" for n in "qkv")
    m[tuple(f"{p}.weight" for p in qkv)] = (dst + ("attn", "in_proj", "kernel"), _qkv_kernel)
    m[tuple(f"{p}.bias" for p in qkv)] = (dst + ("attn", "in_proj", "bias"), _qkv_bias)
    m.update(_dense(f"{src}.self_attn.out_proj", dst + ("attn", "out_proj")))
    m.update(_ln(f"{src}.layer_norm2", dst + ("ln_2",)))
    m.update(_dense(f"{src}.mlp.fc1", dst + ("mlp", "c_fc")))
    m.update(_dense(f"{src}.mlp.fc2", dst + ("mlp", "c_proj")))
    return m


def transformers_key_map(config: CLIPConfig) -> dict:
    """:data:`KeyMap` for transformers' ``CLIPModel`` state dicts.

    Like :func:`openclip_key_map`, but q, k and v come as separate projections
    (fused here into ``in_proj``) and both projections are stored transposed.
    """
    v, t = ("visual",), ("text",)
    m = {
        "vision_model.embeddings.class_embedding": (v + ("class_embedding",), None),
        "vision_model.embeddings.patch_embedding.weight": (v + ("conv1", "kernel"), _conv),
        "vision_model.embeddings.position_embedding.weight": (v + ("positional_embedding",), None),
        "visual_projection.weight": (v + ("proj",), _t),
        "text_model.embeddings.token_embedding.weight": (t + ("token_embedding", "embedding"), None),
        "text_model.embeddings.position_embedding.weight": (t + ("positional_embedding",), None),
        "text_projection.weight": (t + ("text_projection",), _t),
    }
    m.update(_ln("vision_model.pre_layrnorm", v + ("ln_pre",)))  # sic, as transformers spells it
    m.update(_ln("vision_model.post_layernorm", v + ("ln_post",)))
    m.update(_ln("text_model.final_layer_norm", t + ("ln_final",)))
    for i in range(config.vision.layers):
        m.update(_transformers_block(f"vision_model.encoder.layers.{i}", v + (f"resblocks_{i}",)))
    for i in range(config.text.layers):
        m.update(_transformers_block(f"text_model.encoder.layers.{i}", t + (f"resblocks_{i}",)))
    return m


# transformers names -> OpenCLIP names, enough for :func:`infer_config` to read the shapes
_TRANSFORMERS_SHAPE_RENAMES = [
    (re.compile(r"^vision_model\.embeddings\.patch_embedding\.weight$"), "visual.conv1.weight"),
    (re.compile(r"^vision_model\.embeddings\.position_embedding\.weight$"), "visual.positional_embedding"),
    (re.compile(r"^vision_model\.encoder\.layers\.(\d+)\.mlp\.fc1\.weight$"),
     r"visual.transformer.resblocks.\1.mlp.c_fc.weight"),
    (re.compile(r"^vision_model\.encoder\.layers\.(\d+)\.(.*)$"), r"visual.transformer.resblocks.\1.\2"),
    (re.compile(r"^text_model\.embeddings\.token_embedding\.weight$"), "token_embedding.weight"),
    (re.compile(r"^text_model\.embeddings\.position_embedding\.weight$"), "positional_embedding"),
    (re.compile(r"^text_model\.encoder\.layers\.(\d+)\.mlp\.fc1\.weight$"),
     r"transformer.resblocks.\1.mlp.c_fc.weight"),
    (re.compile(r"^text_model\.encoder\.layers\.(\d+)\.(.*)$"), r"transformer.resblocks.\1.\2"),
]


def config_from_shapes(shapes: Mapping[str, tuple[int, ...]], layout: str = "openclip",
                       activation: str = "quick_gelu", head_width: int = 64) -> CLIPConfig:
    """The config the tensor shapes imply (heads from ``head_width``; activation as given).

    ``layout`` is ``"openclip"`` (also OpenAI) or ``"transformers"``. Raises
    :class:`CheckpointError` when the shapes are not those of a CLIP ViT.
    """
    shapes = {k[len("module."):] if k.startswith("module.") else k: tuple(v) for k, v in shapes.items()}
    if layout == "transformers":
        renamed = {}
        for k, shape in shapes.items():
            if k == "text_projection.weight":
                renamed["text_projection"] = shape[::-1]
                continue
            for pattern, repl in _TRANSFORMERS_SHAPE_RENAMES:
                if pattern.match(k):
                    renamed[pattern.sub(repl, k)] = shape
                    break
        shapes = renamed
    elif layout != "openclip":
        raise ValueError(f"unknown layout {layout!r}")
    try:
        return infer_config(shapes, activation, head_width=head_width)
    except (ValueError, TypeError) as e:
        raise CheckpointError(f"the tensors are not those of a CLIP ViT ({layout} layout): {e}") from None


def config_diff(a: CLIPConfig, b: CLIPConfig, ignore: tuple[str, ...] = ()) -> list[str]:
    """Fields where two configs differ, as ``"vision.width: 768 != 1024"`` (``ignore``: field names)."""
    out = []
    for tower in ("vision", "text"):
        ta, tb = getattr(a, tower), getattr(b, tower)
        for f in ta.__dataclass_fields__:
            if f in ignore:
                continue
            x, y = getattr(ta, f), getattr(tb, f)
            same = math.isclose(x, y, rel_tol=1e-6) if isinstance(x, float) or isinstance(y, float) else x == y
            if not same:
                out.append(f"{tower}.{f}: {x!r} != {y!r}")
    if "embed_dim" not in ignore and a.embed_dim != b.embed_dim:
        out.append(f"embed_dim: {a.embed_dim!r} != {b.embed_dim!r}")
    return out


_HIDDEN_ACT = {"quick_gelu": "quick_gelu", "gelu": "gelu", "gelu_python": "gelu"}
# transformers' CLIPTextConfig / CLIPVisionConfig defaults: old config.json files omit them
_HF_TEXT_DEFAULTS = dict(vocab_size=49408, hidden_size=512, intermediate_size=2048, num_hidden_layers=12,
                         num_attention_heads=8, max_position_embeddings=77, hidden_act="quick_gelu",
                         layer_norm_eps=1e-5)
_HF_VISION_DEFAULTS = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                           num_channels=3, image_size=224, patch_size=32, hidden_act="quick_gelu",
                           layer_norm_eps=1e-5)


def _square(value, field):
    if isinstance(value, (list, tuple)):
        if len(value) != 2 or value[0] != value[1]:
            raise CheckpointError(f"{field} = {value!r}: only square images and patches are supported")
        value = value[0]
    if not isinstance(value, int) or isinstance(value, bool):
        raise CheckpointError(f"{field} = {value!r} is not an integer")
    return value


def _field(d: Mapping, key: str, defaults: Mapping, where: str):
    value = d.get(key, defaults.get(key))
    if value is None:
        raise CheckpointError(f"{where}.{key} is missing")
    return value


def config_from_transformers(config_json: Mapping[str, Any]) -> CLIPConfig:
    """The :class:`CLIPConfig` of a transformers ``CLIPModel`` ``config.json`` (as a dict).

    ``hidden_act`` gives the activation (``"quick_gelu"`` or exact ``"gelu"``); fields
    an old file omits take transformers' defaults. Unsupported settings raise
    :class:`CheckpointError` naming the field.
    """
    d = config_json
    model_type = d.get("model_type")
    if model_type not in (None, "clip"):
        raise CheckpointError(f"config.json model_type is {model_type!r}; only 'clip' (CLIPModel) is supported")
    towers = {}
    for name, defaults in (("vision", _HF_VISION_DEFAULTS), ("text", _HF_TEXT_DEFAULTS)):
        sub, legacy = d.get(f"{name}_config"), d.get(f"{name}_config_dict")
        if not isinstance(sub, Mapping) and not isinstance(legacy, Mapping):
            raise CheckpointError(f"config.json has no {name}_config: not a CLIPModel config")
        # older files also carry *_config_dict, which transformers lets override *_config
        sub = {**(sub if isinstance(sub, Mapping) else {}), **(legacy if isinstance(legacy, Mapping) else {})}
        where = f"{name}_config"
        act = _field(sub, "hidden_act", defaults, where)
        if act not in _HIDDEN_ACT:
            raise CheckpointError(f"{where}.hidden_act = {act!r} is not supported (quick_gelu or gelu)")
        eps = _field(sub, "layer_norm_eps", defaults, where)
        if not math.isclose(float(eps), 1e-5):
            raise CheckpointError(f"{where}.layer_norm_eps = {eps!r} is not supported (1e-5)")
        width = _field(sub, "hidden_size", defaults, where)
        common = dict(width=width, layers=_field(sub, "num_hidden_layers", defaults, where),
                      heads=_field(sub, "num_attention_heads", defaults, where),
                      mlp_ratio=_field(sub, "intermediate_size", defaults, where) / width,
                      activation=_HIDDEN_ACT[act])
        try:
            if name == "vision":
                if _field(sub, "num_channels", defaults, where) != 3:
                    raise CheckpointError(f"{where}.num_channels = {sub['num_channels']!r}: only RGB is supported")
                towers[name] = VisionConfig(image_size=_square(_field(sub, "image_size", defaults, where),
                                                               f"{where}.image_size"),
                                            patch_size=_square(_field(sub, "patch_size", defaults, where),
                                                               f"{where}.patch_size"), **common)
            else:
                towers[name] = TextConfig(context_length=_field(sub, "max_position_embeddings", defaults, where),
                                          vocab_size=_field(sub, "vocab_size", defaults, where), **common)
        except (ValueError, TypeError) as e:
            if isinstance(e, CheckpointError):
                raise
            raise CheckpointError(f"config.json {where}: {e}") from None
    embed = d.get("projection_dim", 512)
    if not isinstance(embed, int) or embed <= 0:
        raise CheckpointError(f"config.json projection_dim = {embed!r} is not a positive integer")
    return CLIPConfig(vision=towers["vision"], text=towers["text"], embed_dim=embed)


# open_clip CLIPVisionCfg / CLIPTextCfg settings that change the architecture, with the
# only values this implementation has
_OPENCLIP_FIXED = {
    "vision_cfg": dict(ls_init_value=None, attentional_pool=False, no_ln_pre=False, pos_embed_type="learnable",
                       final_ln_after_pool=False, pool_type="tok", act_kwargs=None, norm_kwargs=None,
                       input_patchnorm=False),
    "text_cfg": dict(ls_init_value=None, embed_cls=False, no_causal_mask=False, final_ln_after_pool=False,
                     pool_type="argmax", proj_bias=False, act_kwargs=None, norm_kwargs=None),
}


def config_from_openclip(config_json: Mapping[str, Any]) -> CLIPConfig:
    """The :class:`CLIPConfig` of an ``open_clip_config.json`` (or its ``model_cfg``).

    Missing fields take open_clip's defaults (vision head width 64, MLP ratio 4,
    context 77, vocabulary 49408, text width 512 with 8 heads); the activation is
    QuickGELU iff ``quick_gelu`` is true. Towers this implementation does not have
    (timm or Hugging Face towers, ResNets, layer scale, ...) raise :class:`CheckpointError`.
    """
    m = config_json.get("model_cfg", config_json)
    if not isinstance(m, Mapping):
        raise CheckpointError("open_clip_config.json model_cfg is not an object")
    vc, tc = m.get("vision_cfg"), m.get("text_cfg")
    if not isinstance(vc, Mapping) or not isinstance(tc, Mapping):
        raise CheckpointError("open_clip_config.json needs model_cfg.vision_cfg and model_cfg.text_cfg")
    if vc.get("timm_model_name"):
        raise CheckpointError(f"vision_cfg.timm_model_name = {vc['timm_model_name']!r}: timm image towers "
                              "are not supported (only OpenCLIP ViTs)")
    if tc.get("hf_model_name"):
        raise CheckpointError(f"text_cfg.hf_model_name = {tc['hf_model_name']!r}: Hugging Face text towers "
                              "are not supported (only the CLIP text transformer)")
    if isinstance(vc.get("layers"), (list, tuple)):
        raise CheckpointError(f"vision_cfg.layers = {vc['layers']!r}: ResNet image towers are not supported "
                              "(only ViTs)")
    if m.get("custom_text"):
        raise CheckpointError("model_cfg.custom_text is set: CustomTextCLIP checkpoints are not supported")
    for section, fixed in _OPENCLIP_FIXED.items():
        cfg = m[section]
        for key, only in fixed.items():
            if key in cfg and cfg[key] != only and not (only is None and cfg[key] in ({}, None)):
                raise CheckpointError(f"{section}.{key} = {cfg[key]!r} is not supported (only {only!r})")
    quick = m.get("quick_gelu", False)
    if not isinstance(quick, bool):
        raise CheckpointError(f"model_cfg.quick_gelu = {quick!r} is not a boolean")
    act = "quick_gelu" if quick else "gelu"
    try:
        width = vc.get("width", 768)
        head_width = vc.get("head_width", 64)
        vision = VisionConfig(image_size=_square(vc.get("image_size", 224), "vision_cfg.image_size"),
                              patch_size=_square(vc.get("patch_size", 16), "vision_cfg.patch_size"),
                              width=width, layers=vc.get("layers", 12), heads=max(width // head_width, 1),
                              mlp_ratio=float(vc.get("mlp_ratio", 4.0)), activation=act)
        text = TextConfig(context_length=tc.get("context_length", 77), vocab_size=tc.get("vocab_size", 49408),
                          width=tc.get("width", 512), layers=tc.get("layers", 12), heads=tc.get("heads", 8),
                          mlp_ratio=float(tc.get("mlp_ratio", 4.0)), activation=act)
        embed = m.get("embed_dim")
        if not isinstance(embed, int) or embed <= 0:
            raise CheckpointError(f"model_cfg.embed_dim = {embed!r} is not a positive integer")
        return CLIPConfig(vision=vision, text=text, embed_dim=embed)
    except CheckpointError:
        raise
    except (ValueError, TypeError) as e:
        raise CheckpointError(f"open_clip_config.json: {e}") from None


def expected_leaves(config: CLIPConfig) -> dict[tuple[str, ...], tuple[int, ...]]:
    """Every parameter of ``config`` by its path in the tree, with its shape."""
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


def to_params(state: Mapping[str, np.ndarray], config: CLIPConfig, key_map: KeyMap,
              source: str = "checkpoint", dtype=np.float32) -> dict:
    """Maps a state dict onto the Flax parameter tree of ``config``, strictly.

    Every tensor must be used (or match :data:`EXEMPT_KEYS`), every parameter filled
    and every shape equal to what ``config`` expects; otherwise one
    :class:`CheckpointError` lists all the offending keys. A key-map entry keyed by a
    tuple of source keys feeds one parameter from all of them (its transform takes
    them in order). Values become ``dtype`` NumPy arrays (fp16 checkpoints are upcast).
    """
    expected = expected_leaves(config)
    used = set()
    missing, flat, bad_shapes, nonfinite = [], {}, [], []
    for src, (path, fn) in key_map.items():
        keys = (src,) if isinstance(src, str) else tuple(src)
        used.update(keys)
        absent = [k for k in keys if k not in state]
        if absent:
            missing.extend(absent)
            continue
        arrays = [np.asarray(state[k]) for k in keys]
        name = " + ".join(keys)
        shapes = " ".join(str(tuple(a.shape)) for a in arrays)
        want = expected.get(path)
        if want is None:
            raise AssertionError(f"key map names unknown parameter {'/'.join(path)}")
        try:
            value = fn(*arrays) if fn is not None else arrays[0]
        except (ValueError, IndexError) as e:  # e.g. a wrong rank, or q/k/v that do not stack
            bad_shapes.append(f"{name} {shapes} (expected {want} after layout change; {e})")
            continue
        if tuple(value.shape) != want:
            bad_shapes.append(f"{name} {shapes} (expected {want} after layout change)")
            continue
        flat[path] = value.astype(dtype, copy=False)
        if not np.isfinite(flat[path]).all():
            nonfinite.append(name)
    unused = [k for k in state if k not in used and not EXEMPT_KEYS.search(k)]
    targets = {path for path, _ in key_map.values()}
    unfilled = [p for p in expected if p not in targets]  # a key map that misses a parameter
    problems = []
    if missing:
        problems.append(f"missing {len(missing)} tensor(s): {_summarise(missing)}")
    if unused:
        problems.append(f"unexpected {len(unused)} tensor(s): {_summarise(unused)}")
    if bad_shapes:
        problems.append(f"wrong shape for {len(bad_shapes)} tensor(s): {_summarise(bad_shapes, 4)}")
    if nonfinite:
        problems.append(f"NaN or infinite values in {len(nonfinite)} tensor(s): {_summarise(nonfinite)}")
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


def params_from_transformers(state: Mapping[str, np.ndarray], config: CLIPConfig,
                             source: str = "checkpoint") -> dict:
    """Flax params from a transformers ``CLIPModel`` state dict (NumPy values)."""
    return to_params(state, config, transformers_key_map(config), source)
