"""gem-jax: GEM (Grounding Everything Module) in JAX/Flax.

Training-free open-vocabulary localisation from a pretrained CLIP::

    import gem_jax
    model = gem_jax.load("ViT-B/16:openai")
    gem = gem_jax.GEM(model)
    out = gem.heatmaps("cat.jpg", ["cat", "sofa"])   # out.heatmaps: (1, 2, 448, 448)
"""

import importlib

__version__ = "0.1.0"

# Imported on first use, so `import gem_jax.config` (and the CLI's --help) stays light.
_LAZY = {
    "GEM": "gem_jax.pipeline",
    "HeatmapOutput": "gem_jax.pipeline",
    "Model": "gem_jax.pipeline",
    "load": "gem_jax.pipeline",
    "example_image_path": "gem_jax.pipeline",
    "available_models": "gem_jax.checkpoints",
    "METHODS": "gem_jax.config",
    "load_results": "gem_jax.batch",
}

__all__ = [*_LAZY, "__version__"]


def __getattr__(name):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'gem_jax' has no attribute {name!r}")


def __dir__():
    return sorted(__all__)
