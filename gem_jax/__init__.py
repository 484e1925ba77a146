"""gem-jax: GEM (Grounding Everything Module) in JAX/Flax."""

__version__ = "0.1.0"
