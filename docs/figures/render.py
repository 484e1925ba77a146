"""Executes the notebooks on small random-weight models and writes their figures here.

    python docs/figures/render.py

The notebooks are committed without outputs; this renders what a reader would see
into ``docs/figures/*.png`` and ``docs/notebooks.md`` (linked from the README). The
models have RANDOM weights (no pretrained CLIP is needed or claimed), and the page and
the figure titles say so. The same runs are the notebook tests (tests/test_notebook_*.py).
"""

from __future__ import annotations

import base64
import os
import pathlib
import sys
import tempfile

import nbclient
import nbformat

ROOT = pathlib.Path(__file__).resolve().parents[2]
FIGURES = ROOT / "docs" / "figures"
NOTEBOOKS = {
    # notebook: (what it shows, environment)
    "quickstart": ("heatmaps, a label map and plain CLIP against GEM on the bundled cat photo, with a "
                   "ViT-B/16-shaped tower of random weights at 224 x 224", {"GEM_JAX_SIZE": "224"}),
    "clustering_dynamics": ("clustering dynamics, Lipschitz constants, localisation metrics and "
                            "calibration with the notebook's own tiny random model", {}),
}


def random_model(directory: pathlib.Path) -> pathlib.Path:
    from gem_jax.checkpoints import convert_random

    return convert_random("ViT-B-16", directory / "random-b16", seed=0)


def execute(name: str, env: dict[str, str], workdir: pathlib.Path) -> nbformat.NotebookNode:
    os.environ.update(env)
    nb = nbformat.read(ROOT / "notebooks" / f"{name}.ipynb", as_version=4)
    nbclient.NotebookClient(nb, timeout=1800, kernel_name="python3",
                            resources={"metadata": {"path": str(workdir)}}).execute()
    for key in env:
        os.environ.pop(key)
    return nb


def save_small(data: bytes, path: pathlib.Path) -> None:
    """Writes a PNG with a 256-colour palette (a third of the size, the same to the eye)."""
    import io

    from PIL import Image

    Image.open(io.BytesIO(data)).convert("RGB").quantize(256).save(path, optimize=True)


def main() -> int:
    lines = ["# The notebooks' figures", "",
             "Rendered by `python docs/figures/render.py` from `notebooks/`. **All of them come from models with "
             "RANDOM weights**: they show what each cell draws (shapes, layout, the machinery), not what GEM "
             "finds with a trained CLIP. Run the notebooks with `GEM_JAX_MODEL` set to real weights for that.", ""]
    with tempfile.TemporaryDirectory() as tmp:
        tmp = pathlib.Path(tmp)
        model = random_model(tmp)
        for name, (what, env) in NOTEBOOKS.items():
            env = dict(env, JAX_PLATFORMS="cpu")
            if name == "quickstart":
                env.update(GEM_JAX_MODEL=str(model), GEM_JAX_RANDOM_WEIGHTS="1")
            print(f"executing {name}", file=sys.stderr)
            nb = execute(name, env, tmp)
            lines += [f"## [{name}.ipynb](../notebooks/{name}.ipynb)", "", f"{what[0].upper()}{what[1:]}.", ""]
            n = 0
            for cell in nb.cells:
                for out in cell.get("outputs", []):
                    data = out.get("data", {})
                    if "image/png" in data:
                        n += 1
                        png = FIGURES / f"{name}-{n}.png"
                        save_small(base64.b64decode(data["image/png"]), png)
                        lines += [f"![{name}, figure {n} (random weights)](figures/{png.name})", ""]
    (ROOT / "docs" / "notebooks.md").write_text("\n".join(lines), encoding="utf-8")
    print(f"wrote docs/notebooks.md and the figures in {FIGURES}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
