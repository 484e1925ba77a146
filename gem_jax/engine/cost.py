"""What a forward call costs: FLOPs by part, and the working memory, checked before any work."""

from __future__ import annotations

from typing import Any, Mapping

import jax

from gem_jax.config import CLIPConfig
from gem_jax.engine.attention import attention_flops, attention_maps
from gem_jax.engine.methods import Method, as_method
from gem_jax.engine.tower import Schedule
from gem_jax.text import bucket


def count_flops(config: CLIPConfig, size: tuple[int, int], method: Any, prompts: int) -> dict:
    """Multiply-adds x 2 of one image's heatmaps, by part (GFLOP).

    ``method`` is any :class:`~gem_jax.engine.methods.Method` (or a name, or GEM options).
    Counts matrix products only (elementwise work, softmax and LayerNorm are small beside
    them): patch embedding, the blocks before the method's path, the original blocks
    beside it (their q/k/v projections, attention and MLP, except the last block's
    attention output and MLP when the path does not use them), the path's attention
    (its own count, :meth:`~gem_jax.engine.attention.AttentionBase.flops`) with its output
    projection and MLP, ``ln_post @ proj``, the text similarity and the bilinear
    upsampling. The keys keep GEM's names for every method.
    """
    method = as_method(method)
    v = config.vision
    p = v.patch_size
    h, w = size[0] // p, size[1] // p
    n, c, m, d = v.tokens(size), v.width, v.mlp_width, config.embed_dim
    qkv, attn, out, mlp = 2 * n * c * 3 * c, 2 * 2 * n * n * c, 2 * n * c * c, 2 * 2 * n * c * m
    k = method.blocks
    mixing = attention_flops(method.attention, n, c) if k else 0.0
    last_original = 1 if method.class_token == "original" else 0
    parts = {
        "patch_embed": 2 * h * w * c * 3 * p * p,
        "blocks": (v.layers - k) * (qkv + attn + out + mlp),
        "gem_blocks_original": k * qkv + max(k - 1 + last_original, 0) * (attn + out + mlp),
        "self_self_attention": k * (mixing + out + (mlp if method.mlp else 0)),
        "head": 2 * n * c * d,
        "similarity": 2 * h * w * d * prompts,
        "upsample": 2 * prompts * (size[0] * h * w + size[0] * w * size[1]),
    }
    parts = {key: x / 1e9 for key, x in parts.items()}
    parts["total"] = sum(parts.values())
    return parts


def estimate_memory(config: CLIPConfig, hw: tuple[int, int], images: int = 1, prompts: int = 1, *,
                    method: Any = "gem", schedule: Schedule | str = "auto", prompt_chunk: int | None = None,
                    upsampled: bool = True, display: tuple[int, int] | None = None,
                    display_prompts: int = 0) -> int:
    """Bytes of working memory (beyond the parameters) one forward call needs, roughly: the
    attention maps in flight, the tower's activations, the output maps and, with
    ``display``, the pictures drawn from them.

    Args:
      config: the model's architecture.
      hw: model input size (H, W).
      images: images in the call (the padded batch).
      prompts: prompts per image in the call.
      method: the method (its attention says how many N x N maps it keeps).
      schedule: a :class:`~gem_jax.engine.tower.Schedule` or ``"auto"``.
      prompt_chunk: most prompts whose maps exist at once (``None``: all).
      upsampled: the maps are upsampled to the input size (else only the patch grid).
      display: (H, W) of the pictures drawn per image (overlays, label maps), if any.
      display_prompts: how many overlays are drawn per image at ``display`` size.
    Returns:
      An estimate in bytes, meant to be compared with the free memory before a call (it
      errs on the high side; compilation and the host copy of the outputs come on top).
    """
    method = as_method(method)
    v = config.vision
    h, w = hw
    n = v.tokens((h, w))
    sched = Schedule.resolve(schedule, tokens=n)
    tower_images = min(images, sched.image_chunk or images)
    pairs = tower_images * v.heads if sched.head_chunk is None else min(sched.head_chunk, tower_images * v.heads)
    maps_alive = 3 + (attention_maps(method.attention) if method.blocks else 0)
    attention = pairs * n * n * 4 * maps_alive
    activations = tower_images * n * v.width * 4 * 16  # residual, q/k/v, MLP hidden (4x) and their copies
    live = bucket(min(prompts, prompt_chunk or prompts), 8)
    grid = (h // v.patch_size) * (w // v.patch_size)
    per_map = h * w * 4 * 6 if upsampled else grid * 4 * 2  # logits, heatmaps, upsampling
    outputs = images * live * per_map
    drawn = 0
    if display is not None:
        dh, dw = display
        # per overlay: the heatmap at display size (float32), its colours (float32 RGB) and
        # the blended uint8 picture; plus the decoded image and one label map (int32)
        drawn = images * (dh * dw * (4 + 12 + 3) * max(1, min(display_prompts, 2)) + dh * dw * (3 + 4 + 12))
    return attention + activations + outputs + drawn


def available_memory(device=None) -> int | None:
    """Free bytes on ``device`` (default: the first local one): the allocator's limit less its use
    on accelerators, ``MemAvailable`` of the host on CPU; None if unknown."""
    device = device or jax.local_devices()[0]
    try:
        stats = device.memory_stats()
    except Exception:
        stats = None
    if stats and "bytes_limit" in stats:
        return int(stats["bytes_limit"]) - int(stats.get("bytes_in_use", 0))
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


#: How the API and the demo name the ways out of a refusal (:class:`MemoryLimitError`); each
#: command of the command line gives its own flags (:func:`gem_jax.cli.common.memory_refusal`).
WAYS_OUT: Mapping[str, Mapping[str, str | None]] = {
    "api": {"size": "a smaller size or short_side", "batch": "a smaller batch_size",
            "schedule": "schedule=Schedule(head_chunk=1, image_chunk=1)",
            "limit": "memory_limit=None to try anyway"},
    "demo": {"size": "a smaller model input size", "batch": None, "schedule": None, "limit": None},
}


class MemoryLimitError(RuntimeError):
    """A call would need more memory than is available.

    Attributes:
      need, limit: bytes.
      what: the call, in words ("input size 4096x4096 with 1 image(s) and 2 prompt(s)").
      ways: the ways out that apply (keys of :data:`WAYS_OUT`'s tables).
    """

    def __init__(self, need: int, limit: int, what: str, ways=("size", "batch", "schedule", "limit"),
                 interface: str = "api"):
        self.need, self.limit, self.what, self.ways = int(need), int(limit), what, tuple(ways)
        super().__init__(self.message(interface))

    def message(self, interface: str | Mapping[str, str | None] = "api") -> str:
        """The refusal in the words of ``interface``: ``"api"``, ``"demo"``, or a table of
        what each way out is called (``{"size": ..., "batch": ..., "limit": ...}``)."""
        gib = 2 ** 30
        table = WAYS_OUT[interface] if isinstance(interface, str) else interface
        words = [table.get(w) for w in self.ways]
        words = [w for w in words if w]
        out = ", ".join(words[:-1]) + (" or " if len(words) > 1 else "") + words[-1] if words else ""
        return (f"{self.what} needs about {self.need / gib:.1f} GiB, more than the {self.limit / gib:.1f} GiB "
                f"available" + (f": use {out}" if out else ""))


def resolve_limit(memory_limit, device=None) -> int | None:
    """Bytes a call may use: ``memory_limit`` itself, 90% of :func:`available_memory` for
    ``"auto"``, ``None`` (no check) for ``None`` or an unknown free memory."""
    if memory_limit is None:
        return None
    if memory_limit == "auto":
        free = available_memory(device)
        return None if free is None else int(0.9 * free)
    return int(memory_limit)


def check_memory(need: int, memory_limit, what: str, *, device=None,
                 ways=("size", "batch", "schedule", "limit")) -> None:
    """The memory guard every command goes through: raises :class:`MemoryLimitError` when
    ``need`` bytes exceed the limit (:func:`resolve_limit`)."""
    limit = resolve_limit(memory_limit, device)
    if limit is not None and need > limit:
        raise MemoryLimitError(need, limit, what, ways)
