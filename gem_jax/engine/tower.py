"""The tower loop every method runs in, and the step from its tokens to cosine maps."""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from gem_jax.engine.attention import Context, largest_divisor, map_heads
from gem_jax.engine.methods import Method, as_method
from gem_jax.models.layers import l2_normalize, merge_heads, resize_2d, softmax_attention
from gem_jax.models.vision import VisionTransformer

#: On CPU, chunking over heads paid from 401 tokens per image up (ViT-B/16 at 320 and
#: above) and cost time at 197 tokens and below (ViT-B/16 at 224, ViT-B/32).
CPU_CHUNK_TOKENS = 256


@dataclasses.dataclass(frozen=True)
class Schedule:
    """How a forward pass is laid out in time and memory. Never changes what is computed.

    Attributes:
      head_chunk: at most this many (image, head) pairs have their N x N attention
        maps built at once (a ``lax.map`` over the rest); ``None`` builds all at once.
        Bounds memory at large inputs: each pair holds a few N x N float32 maps.
      image_chunk: at most this many images go through the tower per step (a
        ``lax.map`` over the batch); ``None`` runs the whole batch at once.
    """

    head_chunk: int | None = None
    image_chunk: int | None = None

    def __post_init__(self):
        for name in ("head_chunk", "image_chunk"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
                raise ValueError(f"{name} must be a positive int or None, got {value!r}")

    @classmethod
    def auto(cls, backend: str | None = None, tokens: int | None = None) -> "Schedule":
        """The schedule that measured fastest on ``backend`` (default: JAX's default)
        for ``tokens`` tokens per image (default: assume a large input).

        On CPU, inputs of :data:`CPU_CHUNK_TOKENS` tokens or more go one image at a
        time with four heads per step, which keeps the N x N maps in cache; smaller
        inputs, and accelerators, take everything at once (docs/PERFORMANCE.md has the
        measurements).
        """
        backend = backend or jax.default_backend()
        if backend == "cpu" and (tokens is None or tokens >= CPU_CHUNK_TOKENS):
            return cls(head_chunk=4, image_chunk=1)
        return cls()

    @classmethod
    def resolve(cls, schedule: "Schedule | str", tokens: int | None = None) -> "Schedule":
        """``schedule`` itself, or :meth:`auto` for ``tokens`` when it is ``"auto"``."""
        if isinstance(schedule, Schedule):
            return schedule
        if schedule == "auto":
            return cls.auto(tokens=tokens)
        raise ValueError(f"schedule must be a gem_jax.Schedule or 'auto', got {schedule!r}")


def _attend(blk, q, k, v, head_chunk):
    """The block's own softmax attention over split heads, chunked over (image, head)."""
    scale = blk.attn.head_dim ** -0.5
    return merge_heads(map_heads(lambda q, k, v: softmax_attention(q, k, v, scale), head_chunk, q, k, v))


def _block(blk, x, head_chunk):
    """A whole residual block, as ``blk(x)`` but with chunked attention."""
    q, k, v = blk.attn.qkv(blk.ln_1(x).astype(blk.dtype))
    x = x + blk.attn.out(_attend(blk, q, k, v, head_chunk)).astype(x.dtype)
    return blk.residual_mlp(x)


def run_paths(vit: VisionTransformer, pixels, paths: Mapping[str, Any], *, want_original: bool = True,
              head_chunk: int | None = None, inv_temps: Mapping[str, Any] | None = None,
              every_layer: bool = False) -> dict[str, list]:
    """The tower loop: one pass of the original blocks with each method's path beside them.

    Must run inside a bound module (``nn.apply``). Every path starts from the tokens
    entering its first modified block; in each modified block it takes the block's
    q, k, v of ``ln_1`` of the original tokens, adds (or with ``residual=False``
    becomes) ``out_proj(attention(q, k, v))``, then runs the MLP if the method says so.

    Args:
      vit: the bound tower.
      pixels: (B, H, W, 3) normalised pixels.
      paths: ``{name: Method | GEMOptions | str | None}`` (``None``: the original tokens).
        All must resample the positional embedding the same way.
      want_original: the original path's last block is needed (else it is skipped
        unless a path takes its class token).
      head_chunk: (image, head) pairs per attention step; never changes results.
      inv_temps: optional ``{name: 1/tau}`` overriding GEM's temperature of a path.
      every_layer: keep every block's output, not just the last.
    Returns:
      ``{name: [tokens (B, 1 + h*w, C) after each block]}`` before the head (only the
      last block's unless ``every_layer``); before its first modified block a path's
      tokens are the original ones.
    """
    methods = {name: as_method(spec) for name, spec in paths.items()}
    posembs = {m.posemb for m in methods.values() if m.blocks}
    if len(posembs) > 1:
        raise ValueError(f"paths resample the positional embedding differently ({sorted(posembs)}); run them apart")
    blocks = vit.resblocks
    n = len(blocks)
    for name, m in methods.items():
        if m.blocks > n:
            raise ValueError(f"method {m.name} with layers={m.blocks} exceeds the model's {n} vision blocks")
    inv_temps = dict(inv_temps or {})
    grid = vit.grid_shape(pixels)
    x = vit.embed(pixels, posembs.pop() if posembs else None)
    new: dict[str, Any] = {name: None for name, m in methods.items() if m.blocks}
    keep_last = want_original or any(m.class_token == "original" for m in methods.values())
    out: dict[str, list] = {name: [] for name in methods}
    for i, blk in enumerate(blocks):
        last = i == n - 1
        for name in new:
            if i == n - methods[name].blocks:
                new[name] = x
        active = [name for name in new if new[name] is not None]
        if not active:
            x = _block(blk, x, head_chunk)
        else:
            y = blk.ln_1(x).astype(vit.dtype)
            q, k, v = blk.attn.qkv(y)
            for name in active:
                m = methods[name]
                ctx = Context(y, grid, blk.attn.head_dim, head_chunk, inv_temps.get(name))
                o = blk.attn.out(merge_heads(m.attention(q, k, v, ctx))).astype(x.dtype)
                z = new[name] + o if m.residual else o
                new[name] = blk.residual_mlp(z) if m.mlp else z
            # With only the paths wanted, the original last block feeds nothing: skip it.
            if keep_last or not last:
                x = x + blk.attn.out(_attend(blk, q, k, v, head_chunk)).astype(x.dtype)
                x = blk.residual_mlp(x)
        if every_layer or last:
            for name, m in methods.items():
                tok = x if new.get(name) is None else new[name]
                if last and m.class_token == "original":
                    tok = tok.at[:, 0].set(x[:, 0])
                out[name].append(tok)
    return out


def vision_tokens(vit: VisionTransformer, params, pixels, method: Any = "gem", want_clip: bool = True,
                  schedule: Schedule | str = Schedule()):
    """One forward pass of the image tower with a method's path beside its last blocks.

    Args:
      vit: the tower module (unbound).
      params: its parameters (``params["visual"]`` of a CLIP tree).
      pixels: (B, H, W, 3) normalised pixels, H and W multiples of the patch size.
      method: a :class:`~gem_jax.engine.methods.Method`, a method name, GEM options, or
        ``None`` for plain CLIP only.
      want_clip: also return the plain CLIP tokens.
      schedule: how the pass is laid out (:class:`Schedule`, or ``"auto"`` for
        :meth:`Schedule.auto` at this input's token count); results do not depend on it.
    Returns:
      ``{"gem": (B, 1 + h*w, D) | None, "clip": (B, 1 + h*w, D) | None}``, all tokens
      after ``ln_post @ proj`` (class token first); ``"gem"`` holds the method's path
      (whatever the method), ``None`` for plain CLIP.
    """
    vit.grid_shape(pixels)  # validates the size
    schedule = Schedule.resolve(schedule, tokens=vit.config.tokens(pixels.shape[1:3]))
    method = as_method(method)
    plain = method.blocks == 0
    want_clip = want_clip or plain
    paths = {} if plain else {"path": method}
    if want_clip:
        paths["clip"] = None

    def run(module, pixels):
        res = run_paths(module, pixels, paths, want_original=want_clip, head_chunk=schedule.head_chunk)
        return {"gem": None if plain else module.head(res["path"][-1]),
                "clip": module.head(res["clip"][-1]) if want_clip else None}

    apply = nn.apply(run, vit)
    b = pixels.shape[0]
    if schedule.image_chunk is None or schedule.image_chunk >= b:
        return apply({"params": params}, pixels)
    # Images are independent: a loop over chunks of the batch keeps each step's
    # N x N maps in cache, where one wide step spills them.
    c = largest_divisor(b, schedule.image_chunk)
    out = jax.lax.map(lambda px: apply({"params": params}, px), pixels.reshape(b // c, c, *pixels.shape[1:]))
    return jax.tree_util.tree_map(lambda t: t.reshape(b, *t.shape[2:]), out)


def method_tokens(vit: VisionTransformer, params, pixels, method: Method, schedule: Schedule | str):
    """(B, 1 + h*w, D) tokens of the method's path (the plain tokens for a method that
    changes no block), after the head."""
    tokens = vision_tokens(vit, params, pixels, method, want_clip=method.blocks == 0, schedule=schedule)
    return tokens["clip"] if method.blocks == 0 else tokens["gem"]


def patch_logits(tokens, text, grid: tuple[int, int]):
    """Cosine similarity of patch tokens and text embeddings.

    Args:
      tokens: (B, 1 + h*w, D) image tokens (class token first), not normalised.
      text: (B, P, D) or (P, D) text embeddings, not normalised.
      grid: (h, w).
    Returns:
      (B, P, h, w) float32 cosine similarities.
    """
    patches = l2_normalize(tokens[:, 1:])
    text = l2_normalize(text)
    eq = "bnd,pd->bpn" if text.ndim == 2 else "bnd,bpd->bpn"
    sims = jnp.einsum(eq, patches, text)
    return sims.reshape(*sims.shape[:2], *grid)


def min_max(maps, axes=(-2, -1)):
    """Per-map min-max scaling to [0, 1] over the spatial ``axes`` (NumPy or JAX arrays;
    a constant map becomes zeros rather than NaN)."""
    xp = jnp if isinstance(maps, jax.Array) else np
    lo = xp.min(maps, axis=tuple(axes), keepdims=True)
    hi = xp.max(maps, axis=tuple(axes), keepdims=True)
    span = hi - lo
    return xp.where(span > 0, (maps - lo) / xp.where(span > 0, span, 1.0), 0.0)


def feature_surgery(image, text, redundant=None):
    """CLIP Surgery's feature surgery: similarities with the features shared by all
    prompts removed.

    Args:
      image: (B, N, D) L2-normalised image tokens, class token first.
      text: (T, D) L2-normalised text embeddings.
      redundant: optional (D,) or (1, D) embedding to subtract from every text
        embedding instead (CLIP Surgery's choice with a single prompt: the empty
        prompt's embedding).
    Returns:
      (B, N, T): without ``redundant``, ``w_t (f_i · g_t) - mean_t'(w_t' f_i · g_t')``
      with ``w = p / mean(p)``, ``p = softmax_t(2 f_cls · g_t)``; with it,
      ``f_i · (g_t - redundant)``.
    """
    image = jnp.asarray(image, jnp.float32)
    text = jnp.asarray(text, jnp.float32)
    hi = jax.lax.Precision.HIGHEST
    if redundant is not None:
        return jnp.einsum("bnd,td->bnt", image, text - jnp.reshape(redundant, (1, -1)), precision=hi)
    prob = jax.nn.softmax(2.0 * jnp.einsum("bd,td->bt", image[:, 0], text, precision=hi), axis=-1)
    w = prob / jnp.mean(prob, axis=-1, keepdims=True)
    sims = jnp.einsum("bnd,td->bnt", image, text, precision=hi) * w[:, None, :]
    return sims - jnp.mean(sims, axis=-1, keepdims=True)


def masked_feature_surgery(tokens, text, valid, redundant):
    """:func:`feature_surgery` of one image's patches against its valid prompts.

    Args:
      tokens: (1 + N, D) image tokens, class token first (normalised here).
      text: (P, D) text embeddings (normalised here); rows where ``valid`` is False
        are padding and take no part.
      valid: (P,) bool.
      redundant: (D,) the embedding subtracted when only one prompt is valid.
    Returns:
      (P, N) similarities of the patch tokens (padding rows are meaningless).
    """
    f, g = l2_normalize(tokens), l2_normalize(text)
    n = jnp.maximum(jnp.sum(valid), 1)
    hi = jax.lax.Precision.HIGHEST
    prob = jax.nn.softmax(jnp.where(valid, 2.0 * jnp.einsum("pd,d->p", g, f[0], precision=hi), -jnp.inf))
    sims = jnp.einsum("nd,pd->np", f, g, precision=hi) * (prob * n)  # w = p / mean over the valid prompts
    several = sims - jnp.sum(jnp.where(valid, sims, 0.0), axis=-1, keepdims=True) / n
    single = jnp.einsum("nd,pd->np", f, g - jnp.reshape(redundant, (1, -1)), precision=hi)
    return jnp.where(n > 1, several, single)[1:].T


def surgery_partials(cls, text, mask):
    """Feature surgery over prompt chunks, first pass: per image, ``log Σ exp(2 f_cls · g_t)``
    over one chunk's valid prompts (``-inf`` when none) and their count.

    Args:
      cls: (B, D) class tokens; text: (B, P, D) embeddings; mask: (B, P) valid prompts.
    Returns:
      ((B,) float32, (B,) int32).
    """
    f, g = l2_normalize(cls), l2_normalize(text)
    c = 2.0 * jnp.einsum("bd,bpd->bp", f, g, precision=jax.lax.Precision.HIGHEST)
    lse = jax.nn.logsumexp(jnp.where(mask, c, -jnp.inf), axis=-1)
    return lse, jnp.sum(mask, axis=-1).astype(jnp.int32)


def surgery_shared(tokens, text, mask, lse):
    """Second pass: ``Σ_t p_t (f_i · g_t)`` over one chunk's valid prompts, with
    ``p_t = exp(2 f_cls · g_t - lse)`` the softmax over *all* prompts: (B, 1 + N)."""
    f, g = l2_normalize(tokens), l2_normalize(text)
    hi = jax.lax.Precision.HIGHEST
    p = jnp.exp(2.0 * jnp.einsum("bd,bpd->bp", f[:, 0], g, precision=hi) - lse[:, None])
    p = jnp.where(mask, p, 0.0)
    return jnp.einsum("bnd,bpd,bp->bn", f, g, p, precision=hi)


def surgery_logits(tokens, text, mask, grid, lse, count, shared, redundant):
    """Last pass: one chunk's feature-surgery similarities (B, P, h, w) from the passes over all
    prompts: ``n p_t (f_i · g_t) - Σ_t' p_t' (f_i · g_t')`` (equal to :func:`masked_feature_surgery`
    over the whole set), or ``f_i · (g_t - redundant)`` when the image has one prompt; invalid
    prompts are zero."""
    f, g = l2_normalize(tokens), l2_normalize(text)
    hi = jax.lax.Precision.HIGHEST
    sims = jnp.einsum("bnd,bpd->bpn", f, g, precision=hi)
    p = jnp.exp(2.0 * jnp.einsum("bd,bpd->bp", f[:, 0], g, precision=hi) - lse[:, None])
    several = sims * (p * count[:, None])[:, :, None] - shared[:, None, :]
    single = jnp.einsum("bnd,bpd->bpn", f, g - jnp.reshape(redundant, (1, 1, -1)), precision=hi)
    out = jnp.where((count > 1)[:, None, None], several, single)[:, :, 1:]
    out = jnp.where(mask[:, :, None], out, 0.0)
    return out.reshape(*out.shape[:2], *grid)


def prompt_logits(tokens, text, mask, grid):
    """(B, 1 + h*w, D) tokens, text sets (B, P, D) and mask (B, P) -> (B, P, h, w) cosine
    logits; invalid prompts are zero."""
    sims = patch_logits(tokens, text, grid)
    return jnp.where(mask[:, :, None, None], sims, 0.0)


def upsampled_maps(grid_sims, hw):
    """(B, P, h, w) patch-grid logits -> (logits, heatmaps), each (B, P, H, W): upsampled
    bilinearly (half-pixel centres) to ``hw``, and min-max scaled."""
    maps = resize_2d(grid_sims, hw, "bilinear", axes=(-2, -1))
    return maps, min_max(maps)
