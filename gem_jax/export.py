"""``gem-jax export``: the image program as a serialized ``jax.export`` artefact for serving.

The artefact is three files: ``F`` (the serialized :class:`jax.export.Exported`: StableHLO
for each requested platform), ``F.params.npz`` (the vision tower's parameters as a flat,
ordered list) and ``F.json`` (what the program expects and returns). A serving process
needs only JAX and NumPy::

    exp = jax.export.deserialize(open(F, "rb").read())
    params = list(np.load(F + ".params.npz").values())
    logits, heatmaps = exp.call(params, pixels, text)   # inside jax.jit for several devices

``pixels`` are (B, H, W, 3) float32, CLIP-normalised; ``text`` is (P, D) float32, the
prompts' L2-normalised embeddings (``GEM.embed_text``; written to ``F.text.npy`` when
prompts are given). Both outputs are (B, P, H, W) float32, as :meth:`GEM.heatmaps`.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import tempfile
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

PLATFORMS = ("cpu", "cuda", "rocm", "tpu")


def image_program(gem, batch: int, prompts: int, platforms: Sequence[str] = ("cpu",)):
    """Exports ``gem``'s image program for ``platforms`` (which need not be present).

    The program maps (params leaves, pixels (B, H, W, 3) float32, text (P, D) float32) to
    (logits, heatmaps), each (B, P, H, W) float32, with the batch sharded over ``gem``'s
    devices. ``gem`` needs a fixed input size (``size``, not ``short_side``).

    Returns:
      ``(exported, leaves, hw)``: the :class:`jax.export.Exported`, the parameter leaves in
      the order the program takes them, and the input (H, W).
    """
    if gem.short_side is not None:
        raise ValueError("export needs a fixed input size (size=...), not short_side")
    bad = [p for p in platforms if p not in PLATFORMS]
    if bad or not platforms:
        raise ValueError(f"platforms must be some of {PLATFORMS}, got {list(platforms)}")
    n = gem.mesh.size
    if batch % n:
        raise ValueError(f"batch {batch} is not a multiple of the {n} devices")
    size = gem.size if gem.size is not None else 448
    hw = (size, size) if isinstance(size, int) else tuple(size)
    from gem_jax import preprocess

    hw = preprocess.target_size(*hw, size=hw, patch_size=gem.model.config.vision.patch_size)
    leaves, tree = jax.tree_util.tree_flatten(gem._vparams)
    replicated, data = NamedSharding(gem.mesh, P()), NamedSharding(gem.mesh, P("data"))

    def program(leaves, pixels, text):
        params = jax.tree_util.tree_unflatten(tree, leaves)
        per_image = jnp.broadcast_to(text, (pixels.shape[0], *text.shape))
        return gem._maps(params, pixels, per_image, jnp.ones(per_image.shape[:2], bool))

    jitted = jax.jit(program, in_shardings=([replicated] * len(leaves), data, replicated),
                     out_shardings=(data, data))
    dim = gem.model.config.embed_dim
    specs = ([jax.ShapeDtypeStruct(x.shape, x.dtype) for x in leaves],
             jax.ShapeDtypeStruct((batch, *hw, 3), jnp.float32), jax.ShapeDtypeStruct((prompts, dim), jnp.float32))
    exported = jax.export.export(jitted, platforms=tuple(platforms))(*specs)
    return exported, leaves, hw


def _write(path: pathlib.Path, write) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        pathlib.Path(tmp).unlink(missing_ok=True)
        raise


def artefact_paths(out) -> dict[str, pathlib.Path]:
    """The files :func:`write` makes for ``out``."""
    out = pathlib.Path(out)
    return {"program": out, "params": out.with_name(out.name + ".params.npz"),
            "meta": out.with_name(out.name + ".json"), "text": out.with_name(out.name + ".text.npy")}


def write(gem, out, *, batch: int, prompts: int | Sequence[str], platforms: Sequence[str],
          model_name: str = "model") -> dict[str, pathlib.Path]:
    """Exports the image program (:func:`image_program`) and writes the artefact files.

    ``prompts`` is a count, or the prompts themselves (their embeddings then go to
    ``F.text.npy``). Every file is written to a temporary name and renamed.
    """
    texts = None if isinstance(prompts, int) else list(prompts)
    count = prompts if texts is None else len(texts)
    exported, leaves, hw = image_program(gem, batch, count, platforms)
    paths = artefact_paths(out)
    paths["program"].parent.mkdir(parents=True, exist_ok=True)
    arrays = {f"{i:05d}": np.asarray(jax.device_get(x)) for i, x in enumerate(leaves)}

    def save_params(tmp):
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)

    from gem_jax import __version__, preprocess

    opts = gem.options
    meta = {
        "format": "gem-jax-export", "version": 1, "gem_jax": __version__, "jax": jax.__version__,
        "model": model_name, "method": gem.method,
        "options": dataclasses.asdict(opts) if dataclasses.is_dataclass(opts) else str(opts),
        "dtype": gem.dtype, "platforms": list(exported.platforms), "devices": exported.nr_devices,
        "inputs": {"params": f"{len(leaves)} arrays, the values of {paths['params'].name} in order",
                   "pixels": [batch, *hw, 3],
                   "pixels_note": "float32, RGB resized (bicubic) and normalised: (x / 255 - mean) / std",
                   "mean": list(preprocess.OPENAI_MEAN), "std": list(preprocess.OPENAI_STD),
                   "text": [count, gem.model.config.embed_dim],
                   "text_note": "float32, L2-normalised prompt embeddings (GEM.embed_text)"},
        "outputs": {"logits": [batch, count, *hw],
                    "heatmaps": [batch, count, *hw]},
        "templates": list(gem.templates), "prompts": texts,
    }
    _write(paths["program"], lambda tmp: pathlib.Path(tmp).write_bytes(exported.serialize()))
    _write(paths["params"], save_params)
    if texts is not None:
        emb = gem.embed_text(texts).astype(np.float32)

        def save_text(tmp):
            with open(tmp, "wb") as f:
                np.save(f, emb)

        _write(paths["text"], save_text)
    else:
        paths.pop("text")
    _write(paths["meta"], lambda tmp: pathlib.Path(tmp).write_text(json.dumps(meta, indent=2) + "\n"))
    return paths
