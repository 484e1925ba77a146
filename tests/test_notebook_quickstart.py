"""Runs notebooks/quickstart.ipynb top to bottom against a small local random-weight checkpoint."""

from __future__ import annotations

import pathlib

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

from gem_jax.checkpoints import save_native  # noqa: E402
from gem_jax.config import CLIPConfig, TextConfig, VisionConfig  # noqa: E402
from gem_jax.models import init_params  # noqa: E402

NOTEBOOK = pathlib.Path(__file__).resolve().parents[1] / "notebooks" / "quickstart.ipynb"


def test_quickstart_runs_and_says_it_uses_random_weights(tmp_path, monkeypatch):
    config = CLIPConfig(vision=VisionConfig(image_size=32, patch_size=8, width=64, layers=6, heads=2),
                        text=TextConfig(width=32, layers=1, heads=2), embed_dim=32)
    save_native(tmp_path / "tiny", config, init_params(config, seed=0))
    monkeypatch.setenv("GEM_JAX_MODEL", str(tmp_path / "tiny"))
    monkeypatch.setenv("GEM_JAX_RANDOM_WEIGHTS", "1")
    monkeypatch.setenv("GEM_JAX_SIZE", "64")
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    nb = nbformat.read(NOTEBOOK, as_version=4)
    client = nbclient.NotebookClient(nb, timeout=300, kernel_name="python3",
                                     resources={"metadata": {"path": str(tmp_path)}})
    client.execute()  # raises CellExecutionError on the first failing cell

    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    text = "".join(o.get("text", "") for o in outputs)
    assert "RANDOM weights" in text
    assert "heatmaps (1, 4, 64, 64)" in text
    assert "per-set patch logits: (3, 2, 8, 8)" in text
    assert "ragged prompt lists: [(1, 64, 64), (3, 64, 64)]" in text
    pngs = [o for o in outputs if "image/png" in o.get("data", {})]
    assert len(pngs) == 3  # prompt grid, label map, plain CLIP vs GEM
