"""The engine: what every method computes, as pure functions over arrays and frozen values.

- :mod:`~gem_jax.engine.gem`: GEM's self-self attention (paper eqs. 5-7).
- :mod:`~gem_jax.engine.attention`: the attention kinds a method's path can use, each
  describing its options, FLOPs and memory.
- :mod:`~gem_jax.engine.methods`: :class:`Method`, the registry of methods and
  :func:`register_method`.
- :mod:`~gem_jax.engine.tower`: the tower loop every method runs in, and the step from
  tokens to cosine maps.
- :mod:`~gem_jax.engine.cost`: FLOP counts, memory estimates and the memory guard.
"""

from gem_jax.engine.attention import AttentionBase, Context, GEMAttention, SelfSelf, ValueOnly
from gem_jax.engine.cost import MemoryLimitError, count_flops, estimate_memory
from gem_jax.engine.gem import PROJECTIONS, self_self_attention
from gem_jax.engine.methods import (GEMOptions, Method, OptionError, as_method, get_method, method_names,
                                    register_method)
from gem_jax.engine.tower import Schedule, run_paths, vision_tokens

__all__ = ["AttentionBase", "Context", "GEMAttention", "GEMOptions", "MemoryLimitError", "Method", "OptionError",
           "PROJECTIONS", "Schedule", "SelfSelf", "ValueOnly", "as_method", "count_flops", "estimate_memory",
           "get_method", "method_names", "register_method", "run_paths", "self_self_attention", "vision_tokens"]
