"""gem-jax: GEM (Grounding Everything Module) in JAX/Flax.

Training-free open-vocabulary localisation from a pretrained CLIP::

    import gem_jax
    model = gem_jax.load("ViT-B/16:openai")
    gem = gem_jax.GEM(model)
    out = gem.heatmaps("cat.jpg", ["cat", "sofa"])   # out.heatmaps: (1, 2, 448, 448)

``docs/ARCHITECTURE.md`` maps the package.
"""

import importlib

__version__ = "0.2.0"

# Imported on first use, so `import gem_jax.config` (and the CLI's --help) stays light.
_LAZY = {
    "GEM": "gem_jax.pipeline",
    "HeatmapOutput": "gem_jax.pipeline",
    "Model": "gem_jax.loading",
    "load": "gem_jax.loading",
    "example_image_path": "gem_jax.loading",
    "available_models": "gem_jax.checkpoints",
    "Method": "gem_jax.engine.methods",
    "GEMOptions": "gem_jax.engine.methods",
    "get_method": "gem_jax.engine.methods",
    "method_names": "gem_jax.engine.methods",
    "register_method": "gem_jax.engine.methods",
    "Schedule": "gem_jax.engine.tower",
    "MemoryLimitError": "gem_jax.engine.cost",
    "load_results": "gem_jax.batch.store",
}

__all__ = [*_LAZY, "__version__"]


def __getattr__(name):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'gem_jax' has no attribute {name!r}")


def __dir__():
    return sorted(__all__)
