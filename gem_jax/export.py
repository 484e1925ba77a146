"""``gem-jax export``: the image program as a serialized ``jax.export`` artefact for serving.

The artefact is three files: ``F`` (the serialized :class:`jax.export.Exported`: StableHLO
for each requested platform), ``F.params.npz`` (the vision tower's parameters as a flat,
ordered list) and ``F.json`` (what the program expects and returns, and what it computes:
the model, the method and its options, as :meth:`gem_jax.GEM.describe` gives them). A
serving process needs only JAX and NumPy::

    exp = jax.export.deserialize(open(F, "rb").read())
    params = list(np.load(F + ".params.npz").values())
    logits, heatmaps = exp.call(params, pixels, text)   # inside jax.jit for several devices

``pixels`` are (B, H, W, 3) float32, CLIP-normalised; ``text`` is (P, D) float32, the
prompts' L2-normalised embeddings (``GEM.embed_text``; written to ``F.text.npy`` when
prompts are given). Both outputs are (B, P, H, W) float32, as :meth:`GEM.heatmaps`.
"""

from __future__ import annotations

import json
import pathlib
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from gem_jax import __version__, files, preprocess

PLATFORMS = ("cpu", "cuda", "rocm", "tpu")


def parse_platforms(text: str) -> list[str]:
    """``"cpu,cuda"`` -> ``["cpu", "cuda"]``, each once, in order; ValueError for unknown ones."""
    platforms = list(dict.fromkeys(p.strip().lower() for p in text.split(",") if p.strip()))
    bad = [p for p in platforms if p not in PLATFORMS]
    if bad or not platforms:
        raise ValueError(f"platforms must be some of {', '.join(PLATFORMS)}, got {text!r}")
    return platforms


def input_hw(gem) -> tuple[int, int]:
    """The fixed input size of an export of ``gem`` (its ``size``, default 448)."""
    if gem.short_side is not None:
        raise ValueError("export needs a fixed input size (size=...), not short_side")
    size = gem.size if gem.size is not None else 448
    hw = (size, size) if isinstance(size, int) else tuple(size)
    return preprocess.target_size(*hw, size=hw, patch_size=gem.model.config.vision.patch_size)


def image_program(gem, batch: int, prompts: int, platforms: Sequence[str] = ("cpu",)):
    """Exports ``gem``'s image program for ``platforms`` (which need not be present).

    The program maps (params leaves, pixels (B, H, W, 3) float32, text (P, D) float32) to
    (logits, heatmaps), each (B, P, H, W) float32, with the batch sharded over ``gem``'s
    devices. ``gem`` needs a fixed input size (``size``, not ``short_side``).

    Returns:
      ``(exported, leaves, hw)``: the :class:`jax.export.Exported`, the parameter leaves in
      the order the program takes them, and the input (H, W).
    """
    platforms = list(dict.fromkeys(platforms))
    bad = [p for p in platforms if p not in PLATFORMS]
    if bad or not platforms:
        raise ValueError(f"platforms must be some of {PLATFORMS}, got {list(platforms)}")
    n = gem.mesh.size
    if batch % n:
        raise ValueError(f"batch {batch} is not a multiple of the {n} devices")
    hw = input_hw(gem)
    leaves, tree = jax.tree_util.tree_flatten(gem.visual_params)
    replicated, data = NamedSharding(gem.mesh, P()), NamedSharding(gem.mesh, P("data"))

    def program(leaves, pixels, text):
        params = jax.tree_util.tree_unflatten(tree, leaves)
        per_image = jnp.broadcast_to(text, (pixels.shape[0], *text.shape))
        return gem.program(params, pixels, per_image, jnp.ones(per_image.shape[:2], bool))

    jitted = jax.jit(program, in_shardings=([replicated] * len(leaves), data, replicated),
                     out_shardings=(data, data))
    dim = gem.model.config.embed_dim
    specs = ([jax.ShapeDtypeStruct(x.shape, x.dtype) for x in leaves],
             jax.ShapeDtypeStruct((batch, *hw, 3), jnp.float32), jax.ShapeDtypeStruct((prompts, dim), jnp.float32))
    exported = jax.export.export(jitted, platforms=tuple(platforms))(*specs)
    return exported, leaves, hw


def artefact_paths(out) -> dict[str, pathlib.Path]:
    """The files :func:`write` makes for ``out``."""
    out = pathlib.Path(out)
    return {"program": out, "params": out.with_name(out.name + ".params.npz"),
            "meta": out.with_name(out.name + ".json"), "text": out.with_name(out.name + ".text.npy")}


def check_outputs(out, *, force: bool, with_text: bool) -> None:
    """Before any work: every artefact file may be written (:func:`gem_jax.files.check_writable`),
    and a ``F.text.npy`` that a new artefact without prompts would leave stale is gem-jax's
    (it is then removed) or refused."""
    paths = artefact_paths(out)
    for key, path in paths.items():
        if key == "text" and not with_text:
            if path.exists() and not files.Ledger(path.parent).owned(path):
                raise files.OutputError(f"{path} (another artefact's prompt embeddings?) was not written by "
                                        "gem-jax; it is left alone: move it away or choose another --out")
            if path.exists() and not force:
                raise files.OutputError(f"output file exists: {path}; pass --force to overwrite the artefact")
            continue
        files.check_writable(path, force=force)


def write(gem, out, *, batch: int, prompts: int | Sequence[str], platforms: Sequence[str],
          force: bool = False) -> dict[str, pathlib.Path]:
    """Exports the image program (:func:`image_program`) and writes the artefact files.

    ``prompts`` is a count, or the prompts themselves (their embeddings then go to
    ``F.text.npy``). Every file is written whole through the one writer and recorded as
    gem-jax's; an existing artefact is replaced only with ``force`` and only where gem-jax
    wrote it (a stale ``F.text.npy`` of an earlier artefact is removed).
    """
    texts = None if isinstance(prompts, int) else list(prompts)
    count = prompts if texts is None else len(texts)
    paths = artefact_paths(out)
    check_outputs(out, force=force, with_text=texts is not None)
    exported, leaves, hw = image_program(gem, batch, count, platforms)
    made = files.make_dirs(paths["program"].parent)
    arrays = {f"{i:05d}": np.asarray(jax.device_get(x)) for i, x in enumerate(leaves)}
    meta = {
        "format": "gem-jax-export", "version": 2, "gem_jax": __version__, "jax": jax.__version__,
        **gem.describe(),
        "platforms": list(exported.platforms), "devices": exported.nr_devices,
        "inputs": {"params": f"{len(leaves)} arrays, the values of {paths['params'].name} in order",
                   "pixels": [batch, *hw, 3],
                   "pixels_note": "float32, RGB resized (bicubic) and normalised: (x / 255 - mean) / std",
                   "mean": list(preprocess.OPENAI_MEAN), "std": list(preprocess.OPENAI_STD),
                   "text": [count, gem.model.config.embed_dim],
                   "text_note": "float32, L2-normalised prompt embeddings (GEM.embed_text)"},
        "outputs": {"logits": [batch, count, *hw], "heatmaps": [batch, count, *hw]},
        "prompts": texts,
    }
    try:
        files.write_owned(paths["program"], lambda f: f.write(exported.serialize()), force=force)
        files.write_owned(paths["params"], lambda f: np.savez(f, **arrays), force=force)
        if texts is not None:
            emb = gem.embed_text(texts).astype(np.float32)
            files.write_owned(paths["text"], lambda f: np.save(f, emb), force=force)
        else:
            files.remove_owned(paths.pop("text"))
        files.write_owned(paths["meta"], lambda f: f.write(files.dump_json(meta)), force=force)
    except BaseException:
        files.remove_empty(made)
        raise
    return paths


def read_meta(out) -> dict:
    """The metadata of an artefact (``F.json``)."""
    return json.loads(artefact_paths(out)["meta"].read_text("utf-8"))
