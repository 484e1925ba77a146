"""CLIP's causal text tower."""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

from gem_jax.config import TextConfig
from gem_jax.models.layers import Dtype, LayerNorm, ResidualAttentionBlock


class TextTransformer(nn.Module):
    """Token ids (P, context_length) -> text embeddings (P, embed_dim), not normalised.

    Pools the token at ``argmax(ids)`` (the end token, which has the largest id).

    Attributes:
      config: the tower's architecture.
      embed_dim: width of the joint image-text space.
      dtype: compute dtype (LayerNorm and softmax stay float32).
      param_dtype: parameter storage dtype.
    """

    config: TextConfig
    embed_dim: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    def setup(self):
        c = self.config
        self.token_embedding = nn.Embed(c.vocab_size, c.width, dtype=self.dtype, param_dtype=self.param_dtype,
                                        embedding_init=nn.initializers.normal(stddev=0.02))
        self.positional_embedding = self.param("positional_embedding", nn.initializers.normal(stddev=0.01),
                                               (c.context_length, c.width), self.param_dtype)
        self.resblocks = [
            ResidualAttentionBlock(c.width, c.heads, c.mlp_width, c.activation, dtype=self.dtype,
                                   param_dtype=self.param_dtype)
            for _ in range(c.layers)
        ]
        self.ln_final = LayerNorm(param_dtype=self.param_dtype)
        self.text_projection = self.param("text_projection", nn.initializers.normal(stddev=c.width ** -0.5),
                                          (c.width, self.embed_dim), self.param_dtype)

    def __call__(self, ids):
        n = ids.shape[-1]
        if n > self.config.context_length:
            raise ValueError(f"{n} token positions exceed the context length {self.config.context_length}")
        x = self.token_embedding(ids) + self.positional_embedding[:n].astype(self.dtype)
        causal = jnp.where(jnp.tril(jnp.ones((n, n), bool)), 0.0, -jnp.inf).astype(jnp.float32)
        for blk in self.resblocks:
            x = blk(x, causal)
        x = self.ln_final(x)
        pooled = jnp.take_along_axis(x, jnp.argmax(ids, axis=-1)[:, None, None], axis=1)[:, 0]
        return jnp.matmul(pooled.astype(self.dtype), self.text_projection.astype(self.dtype))
