"""Flax linen modules of CLIP: both towers and the pair."""

from __future__ import annotations

import dataclasses
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp

from gem_jax.config import CLIPConfig
from gem_jax.models.layers import Dtype
from gem_jax.models.text import TextTransformer
from gem_jax.models.vision import VisionTransformer


class CLIP(nn.Module):
    """Both towers; parameters are ``{"visual": ..., "text": ...}``.

    Attributes:
      config: the architecture.
      dtype: compute dtype (LayerNorm, softmax and normalisation stay float32).
      param_dtype: parameter storage dtype.
      posemb_method: see :class:`VisionTransformer`.
    """

    config: CLIPConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    posemb_method: str = "bicubic_aa"

    def setup(self):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        self.visual = VisionTransformer(self.config.vision, self.config.embed_dim,
                                        posemb_method=self.posemb_method, **kw)
        self.text = TextTransformer(self.config.text, self.config.embed_dim, **kw)

    def encode_image(self, pixels):
        """(B, H, W, 3) -> (B, embed_dim) class-token embeddings (not normalised)."""
        return self.visual(pixels)[0][:, 0]

    def encode_text(self, ids):
        """(P, context_length) -> (P, embed_dim) (not normalised)."""
        return self.text(ids)

    def __call__(self, pixels, ids):
        return self.encode_image(pixels), self.encode_text(ids)


def init_params(config: CLIPConfig, seed: int = 0, param_dtype=jnp.float32):
    """Randomly initialised parameters of ``config`` (for tests and shapes)."""
    model = CLIP(config, param_dtype=param_dtype)
    s = config.vision.image_size
    pixels = jnp.zeros((1, s, s, 3), jnp.float32)
    ids = jnp.zeros((1, config.text.context_length), jnp.int32)
    return jax.jit(model.init)(jax.random.PRNGKey(seed), pixels, ids)["params"]


def param_shapes(config: CLIPConfig, param_dtype=jnp.float32):
    """The expected parameter tree as ``jax.ShapeDtypeStruct`` leaves, without allocating."""
    # A fresh tree of containers each call, so callers may edit it; the tracing is cached.
    return jax.tree_util.tree_map(lambda leaf: leaf, _param_shapes(config, jnp.dtype(param_dtype)))


@functools.lru_cache(maxsize=16)
def _param_shapes(config: CLIPConfig, param_dtype):
    # Every residual block of a tower has the same parameters, so one block per
    # tower is traced and its subtree repeated: tracing all of them took ~1 s of
    # every checkpoint load for ViT-B/16.
    one = dataclasses.replace(config, vision=dataclasses.replace(config.vision, layers=1),
                              text=dataclasses.replace(config.text, layers=1))
    model = CLIP(one, param_dtype=param_dtype)
    s = config.vision.image_size
    pixels = jax.ShapeDtypeStruct((1, s, s, 3), jnp.float32)
    ids = jax.ShapeDtypeStruct((1, config.text.context_length), jnp.int32)
    params = dict(jax.eval_shape(model.init, jax.random.PRNGKey(0), pixels, ids)["params"])
    for tower, layers in (("visual", config.vision.layers), ("text", config.text.layers)):
        tree = dict(params[tower])
        block = tree.pop("resblocks_0")
        tree.update({f"resblocks_{i}": block for i in range(layers)})
        params[tower] = tree
    return params


__all__ = ["CLIP", "VisionTransformer", "TextTransformer", "init_params", "param_shapes"]
