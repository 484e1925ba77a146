"""CLIP's ViT image tower."""

from __future__ import annotations

import functools

import flax.linen as nn
import jax.numpy as jnp

from gem_jax.config import VisionConfig
from gem_jax.models.layers import Dtype, LayerNorm, ResidualAttentionBlock, resample_posemb


class VisionTransformer(nn.Module):
    """The image tower; submodules are named after the OpenCLIP/OpenAI checkpoint keys.

    ``__call__`` returns ``(tokens, intermediates)``: all tokens after ``ln_post @ proj``
    (B, 1 + h*w, embed_dim), and a dict with the input of every block
    (``"block_00"``, ...) and the encoder output (``"encoded"``). The GEM path
    (:mod:`gem_jax.engine.tower`) calls the finer methods below instead.

    Attributes:
      config: the tower's architecture.
      embed_dim: width of the joint image-text space.
      dtype: compute dtype (LayerNorm and softmax stay float32).
      param_dtype: parameter storage dtype.
      posemb_method: how the positional embedding is resampled for other input
        sizes: ``"bicubic_aa"`` (open_clip, GEM) or ``"bicubic"`` (transformers).
    """

    config: VisionConfig
    embed_dim: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    posemb_method: str = "bicubic_aa"

    def setup(self):
        c = self.config
        scale = c.width ** -0.5
        self.conv1 = nn.Conv(c.width, (c.patch_size, c.patch_size), strides=(c.patch_size, c.patch_size),
                             padding="VALID", use_bias=False, dtype=self.dtype, param_dtype=self.param_dtype)
        normal = nn.initializers.normal(stddev=scale)
        self.class_embedding = self.param("class_embedding", normal, (c.width,), self.param_dtype)
        self.positional_embedding = self.param("positional_embedding", normal, (c.grid ** 2 + 1, c.width),
                                               self.param_dtype)
        self.ln_pre = LayerNorm(param_dtype=self.param_dtype)
        self.resblocks = [
            ResidualAttentionBlock(c.width, c.heads, c.mlp_width, c.activation, dtype=self.dtype,
                                   param_dtype=self.param_dtype)
            for _ in range(c.layers)
        ]
        self.ln_post = LayerNorm(param_dtype=self.param_dtype)
        self.proj = self.param("proj", normal, (c.width, self.embed_dim), self.param_dtype)

    def grid_shape(self, pixels) -> tuple[int, int]:
        """The patch grid (h, w) of (B, H, W, 3) pixels; H and W must be multiples of the patch."""
        p = self.config.patch_size
        _, h, w, _ = pixels.shape
        if h % p or w % p:
            raise ValueError(f"input size {h}x{w} is not a multiple of the patch size {p}")
        return h // p, w // p

    def embed(self, pixels, posemb_method: str | None = None):
        """(B, H, W, 3) normalised pixels -> (B, 1 + h*w, C) tokens after ``ln_pre``;
        ``posemb_method`` overrides the module's resampling of the positional embedding."""
        grid = self.grid_shape(pixels)
        x = self.conv1(pixels.astype(self.dtype))
        b = x.shape[0]
        x = x.reshape(b, -1, x.shape[-1])  # row-major over the grid
        cls = jnp.broadcast_to(self.class_embedding.astype(x.dtype), (b, 1, x.shape[-1]))
        x = jnp.concatenate([cls, x], axis=1)
        g = self.config.grid
        pos = resample_posemb(self.positional_embedding, (g, g), grid, posemb_method or self.posemb_method)
        x = x + pos.astype(x.dtype)
        return self.ln_pre(x).astype(self.dtype)

    def head(self, x):
        """``ln_post(x) @ proj`` on all tokens."""
        return jnp.matmul(self.ln_post(x).astype(self.dtype), self.proj.astype(self.dtype))

    def __call__(self, pixels):
        x = self.embed(pixels)
        inter = {}
        for i, blk in enumerate(self.resblocks):
            inter[f"block_{i:02d}"] = x
            x = blk(x)
        inter["encoded"] = x
        return self.head(x), inter
