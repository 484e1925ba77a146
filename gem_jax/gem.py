"""The GEM self-self attention path beside CLIP's last ViT blocks, and the tower loop every method runs in."""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from gem_jax.config import METHODS  # noqa: F401  (the one list of method names, re-exported here)
from gem_jax.models.layers import l2_normalize, merge_heads, softmax_attention
from gem_jax.models.vision import VisionTransformer

PROJECTIONS = ("q", "k", "v")
#: Smallest accepted temperature tau, with a margin: much smaller ones (1e-30) underflow
#: every softmax weight of a row (a token's cosine with itself is 1 only up to rounding): 0/0.
MIN_TEMPERATURE = 1e-3
#: Most accepted self-self iterations: a bound on the run time of one call (the paper uses 1).
MAX_ITERATIONS = 100


@dataclasses.dataclass(frozen=True)
class GEMOptions:
    """How the self-self attention path runs (defaults are the paper's and the reference's).

    Attributes:
      layers: number of last ViT blocks with the parallel path (the reference's
        ``gem_depth`` is ``layers + 1``).
      iterations: self-self attention repetitions before the final assignment to v (K).
      temperature: ``None`` for the adaptive temperature; a float is the paper's tau
        (the reference's ``ss_attn_temp`` is ``1 / tau``).
      projections: which of q, k, v feed the ensemble (paper Table 1).
      normalize: L2 normalisation and adaptive temperature (Table 1's "norm + temp");
        without it the attention uses the usual ``1 / sqrt(head_dim)`` scale unless a
        temperature is given.
      mlp: also apply each block's MLP on the GEM path (Table 6's "with MLP" variant).
    """

    layers: int = 6
    iterations: int = 1
    temperature: float | None = None
    projections: tuple[str, ...] = PROJECTIONS
    normalize: bool = True
    mlp: bool = False

    def __post_init__(self):
        if not isinstance(self.layers, int) or self.layers < 1:
            raise ValueError(f"layers must be a positive int, got {self.layers!r}")
        if not isinstance(self.iterations, int) or self.iterations < 0:
            raise ValueError(f"iterations must be an int >= 0, got {self.iterations!r}")
        if not isinstance(self.iterations, bool) and self.iterations > MAX_ITERATIONS:
            raise ValueError(f"iterations must be at most {MAX_ITERATIONS}, "
                             f"got {self.iterations!r}")
        if self.temperature is not None:
            try:
                t = float(self.temperature)
            except (TypeError, ValueError):
                raise ValueError(f"temperature must be a number or None, got {self.temperature!r}") from None
            if not (math.isfinite(t) and t >= MIN_TEMPERATURE):
                raise ValueError(f"temperature must be a finite number >= {MIN_TEMPERATURE:g} (much smaller ones "
                                 f"underflow the attention weights to 0/0), got {self.temperature!r}")
        projections = tuple(self.projections)
        if not projections or any(p not in PROJECTIONS for p in projections) or len(set(projections)) != len(projections):
            raise ValueError(f"projections must be a non-empty subset of {PROJECTIONS}, got {self.projections!r}")
        # Canonical order, so equal options hash equal (they key jit caches).
        object.__setattr__(self, "projections", tuple(p for p in PROJECTIONS if p in projections))


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
        inputs, and accelerators, take everything at once (see the README's
        performance section for the measurements).
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
        raise ValueError(f"schedule must be a gem_jax.gem.Schedule or 'auto', got {schedule!r}")


#: On CPU, chunking over heads paid from 401 tokens per image up (ViT-B/16 at 320 and
#: above) and cost time at 197 tokens and below (ViT-B/16 at 224, ViT-B/32).
CPU_CHUNK_TOKENS = 256


def _largest_divisor(n: int, at_most: int) -> int:
    return max(d for d in range(1, min(n, at_most) + 1) if n % d == 0)


def map_heads(fn, chunk: int | None, *arrays):
    """Applies ``fn`` to (image, head) pairs ``chunk`` at a time.

    Args:
      fn: maps arrays (G, ...) to one array (G, ...), independently per leading row.
      chunk: most pairs per step; ``None`` calls ``fn`` once on everything.
      arrays: (B, H, ...) arrays, or arrays broadcastable to (B, H, 1, ...).
    Returns:
      ``fn``'s result, (B, H, ...).
    """
    b, h = arrays[0].shape[:2]
    if chunk is None or chunk >= b * h:
        return fn(*arrays)
    g = _largest_divisor(b * h, chunk)
    flat = []
    for a in arrays:
        a = jnp.asarray(a)
        a = jnp.broadcast_to(a, (b, h) + a.shape[2:]) if a.ndim >= 2 else jnp.broadcast_to(a, (b, h))
        flat.append(a.reshape(b * h // g, g, *a.shape[2:]))
    out = jax.lax.map(lambda xs: fn(*xs), tuple(flat))
    return out.reshape(b, h, *out.shape[2:])


def adaptive_inverse_temperature(y, head_dim: int):
    """GEM's adaptive 1/tau: mean token L2 norm of the block input ``y`` (B, N, C),
    over ``sqrt(head_dim)``; shape (B, 1, 1, 1) to broadcast over heads and tokens."""
    norms = jnp.sqrt(jnp.sum(jnp.square(y.astype(jnp.float32)), axis=-1))
    return (jnp.mean(norms, axis=-1) * head_dim ** -0.5)[:, None, None, None]


def _numerators(x, inv_temp, normalize: bool):
    """``(e, x')`` with ``softmax(x' x'^T / tau) = e / rowsum(e)``; ``x'`` is ``x``
    L2-normalised (``normalize``) or as float32."""
    if normalize:
        x = l2_normalize(x)
        # Cosines are at most 1 (the diagonal), so exp((cos - 1) / tau) is the
        # softmax numerator already shifted by its row maximum: no max pass needed.
        return jnp.exp((jnp.einsum("...nd,...md->...nm", x, x) - 1.0) * inv_temp), x
    x = x.astype(jnp.float32)
    logits = jnp.einsum("...nd,...md->...nm", x, x) * inv_temp
    return jnp.exp(logits - jnp.max(logits, axis=-1, keepdims=True)), x


def _weighted(e, values):
    """``(e / rowsum(e)) @ values``, normalising the (N, d) product instead of the (N, N) weights."""
    out = jnp.einsum("...nm,...md->...nd", e.astype(values.dtype), values)
    return out / jnp.sum(e, axis=-1, keepdims=True).astype(out.dtype)


def _iterate(p, inv_temp, iterations: int, normalize: bool):
    """K steps of ``p <- softmax(p p^T / tau) p`` (eq. 6), in float32."""
    def step(_, x):
        e, x = _numerators(x, inv_temp, normalize)
        return _weighted(e, x)

    p = p.astype(jnp.float32)
    if iterations <= 4:  # unrolled: lets XLA fuse across steps
        for i in range(iterations):
            p = step(i, p)
        return p
    return jax.lax.fori_loop(0, iterations, step, p)


def self_self_attention(p, v, inv_temp, iterations: int = 1, normalize: bool = True):
    """Paper eqs. 5-7: iterate ``p <- softmax(p p^T / tau) p`` (on L2-normalised p),
    then assign the values: ``softmax(p p^T / tau) v``.

    Args:
      p: projections (..., N, d), the tokens that attend to themselves.
      v: values (..., N, d).
      inv_temp: 1/tau, broadcastable to (..., N, N).
      iterations: K, repetitions before the assignment.
      normalize: L2-normalise p before each product.
    Returns:
      (..., N, d) in v's dtype.
    """
    e, _ = _numerators(_iterate(p, inv_temp, iterations, normalize), inv_temp, normalize)
    return _weighted(e, v).astype(v.dtype)


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
      paths: ``{name: Method | GEMOptions | None}`` (``None``: the original tokens).
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
    from gem_jax.methods import Context, as_method

    methods = {name: as_method(spec) for name, spec in paths.items()}
    posembs = {m.posemb for m in methods.values() if m.blocks}
    if len(posembs) > 1:
        raise ValueError(f"paths resample the positional embedding differently ({sorted(posembs)}); run them apart")
    blocks = vit.resblocks
    n = len(blocks)
    for name, m in methods.items():
        if m.blocks > n:
            raise ValueError(f"{m.name} layers={m.blocks} exceeds the model's {n} blocks")
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


def vision_tokens(vit: VisionTransformer, params, pixels, opts: Any = GEMOptions(),
                  want_clip: bool = True, schedule: Schedule | str = Schedule()):
    """One forward pass of the image tower with a method's path beside its last blocks.

    Args:
      vit: the tower module (unbound).
      params: its parameters (``params["visual"]`` of a CLIP tree).
      pixels: (B, H, W, 3) normalised pixels, H and W multiples of the patch size.
      opts: a :class:`gem_jax.methods.Method`, GEM options (the GEM method), or
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
    plain = opts is None or getattr(opts, "blocks", 1) == 0
    want_clip = want_clip or plain
    paths = {} if plain else {"path": opts}
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
    c = _largest_divisor(b, schedule.image_chunk)
    out = jax.lax.map(lambda px: apply({"params": params}, px), pixels.reshape(b // c, c, *pixels.shape[1:]))
    return jax.tree_util.tree_map(lambda t: t.reshape(b, *t.shape[2:]), out)


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


def min_max(maps, axes: Sequence[int] = (-2, -1)):
    """Per-map min-max scaling to [0, 1] over the spatial ``axes``."""
    lo = jnp.min(maps, axis=tuple(axes), keepdims=True)
    hi = jnp.max(maps, axis=tuple(axes), keepdims=True)
    span = hi - lo
    # A constant map has no extent to scale: report zeros rather than NaN.
    return jnp.where(span > 0, (maps - lo) / jnp.where(span > 0, span, 1.0), 0.0)
