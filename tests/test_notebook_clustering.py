"""Runs notebooks/clustering_dynamics.ipynb top to bottom (tiny random model) and checks its figures."""

from __future__ import annotations

import pathlib

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

NOTEBOOK = pathlib.Path(__file__).resolve().parents[1] / "notebooks" / "clustering_dynamics.ipynb"


@pytest.mark.slow
def test_notebook_runs_and_draws_its_figures(monkeypatch):
    monkeypatch.delenv("GEM_JAX_MODEL", raising=False)  # the tiny random model, no download
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    nb = nbformat.read(NOTEBOOK, as_version=4)
    client = nbclient.NotebookClient(nb, timeout=300, kernel_name="python3",
                                     resources={"metadata": {"path": str(NOTEBOOK.parent)}})
    client.execute()  # raises CellExecutionError on the first failing cell

    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    pngs = [o for o in outputs if "image/png" in o.get("data", {})]
    # 1a: counts, attention, PCA; 1b: counts, PCA; 2: Lipschitz; 3: scenes, metrics; 4: calibration;
    # 5: every method's tokens, every method's metrics; 6: the toy model's maps, its attention by iteration
    assert len(pngs) == 13, len(pngs)
    text = "".join(o.get("text", "") for o in outputs)
    assert "mean number of clusters" in text and "C_v" in text and "held-out mIoU" in text
    assert "tiny model, RANDOM weights" in text
    assert all(m in text for m in ("maskclip", "clipsurgery", "sclip", "clearclip", "naclip"))
    # 6: the trained toy model, its pointing and AUROC for plain CLIP and GEM's iterations
    assert "Model('toy'" in text and "plain CLIP" in text and "GEM, K = 4" in text
    intro = nb.cells[0].source
    assert nb.cells[0].cell_type == "markdown" and "random weights" in intro.lower()
    assert "not the paper's results" in intro
