"""Random, perturbed open_clip models of the real architectures, and their gem-jax twins."""

from __future__ import annotations

import numpy as np

from gem_jax.checkpoints.layouts import params_from_openclip
from gem_jax.config import infer_config


def perturb_(model, seed: int = 0, attn_gain: float = 3.0):
    """Moves a randomly initialised torch CLIP away from near-uniform attention.

    LayerNorm gains spread around 1, biases nonzero and the attention input
    projections scaled up, so a wrong transpose, order or scale shows in the outputs.
    """
    import torch

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            if ("ln" in name or "layer_norm" in name or "layrnorm" in name) and name.endswith("weight"):
                p.copy_(1.0 + 0.5 * noise)
            elif name.endswith("bias"):
                p.add_(0.1 * noise)
            elif "in_proj_weight" in name or any(s in name for s in ("q_proj.weight", "k_proj.weight")):
                p.mul_(attn_gain)
            elif name.endswith("proj") or name.endswith("projection"):
                p.mul_(2.0)
    return model.eval()


def openclip_model(vision: dict, text: dict | None = None, embed_dim: int = 64, quick_gelu: bool = True,
                   seed: int = 0):
    """A perturbed random ``open_clip.model.CLIP`` with the given tower settings."""
    import torch
    from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg

    torch.manual_seed(seed)
    text = text or dict(width=64, heads=2, layers=2)
    model = CLIP(embed_dim=embed_dim, vision_cfg=CLIPVisionCfg(**vision), text_cfg=CLIPTextCfg(**text),
                 quick_gelu=quick_gelu)
    return perturb_(model, seed)


def openclip_named(name: str, seed: int = 0):
    """A perturbed random open_clip model of a standard architecture ("ViT-B-16")."""
    import open_clip
    import torch

    torch.manual_seed(seed)
    return perturb_(open_clip.create_model(name, pretrained=None), seed)


def state_dict_numpy(model) -> dict[str, np.ndarray]:
    return {k: v.detach().cpu().float().numpy().copy() for k, v in model.state_dict().items()}


def twin(model, quick_gelu: bool, head_width: int = 64):
    """The gem-jax :class:`~gem_jax.pipeline.Model` holding the same weights."""
    import jax.numpy as jnp
    import jax

    from gem_jax.loading import Model
    from gem_jax.tokenizer import Tokenizer

    sd = state_dict_numpy(model)
    config = infer_config({k: v.shape for k, v in sd.items()}, "quick_gelu" if quick_gelu else "gelu",
                          head_width=head_width)
    params = jax.tree_util.tree_map(jnp.asarray, params_from_openclip(sd, config))
    return Model(config, params, Tokenizer.default(config.text.context_length), "random")
