"""The tiny CLIP architecture most tests build random models of: fast, and big enough for
every code path (a 4 x 4 patch grid, three vision blocks, two heads)."""

from gem_jax.config import CLIPConfig, TextConfig, VisionConfig

TINY = CLIPConfig(
    vision=VisionConfig(image_size=32, patch_size=8, width=64, layers=3, heads=2),
    text=TextConfig(width=32, layers=1, heads=2),
    embed_dim=32,
)
