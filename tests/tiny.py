"""The tiny CLIP architecture most tests build random models of: fast, and big enough for
every code path (a 4 x 4 patch grid, three vision blocks, two heads)."""

from gem_jax.config import CLIPConfig, TextConfig, VisionConfig

TINY = CLIPConfig(
    vision=VisionConfig(image_size=32, patch_size=8, width=64, layers=3, heads=2),
    text=TextConfig(width=32, layers=1, heads=2),
    embed_dim=32,
)


def save_tiny(directory, seed: int = 0, **metadata):
    """TINY with the random weights of ``seed``, written as a native checkpoint at ``directory``
    (``metadata``: extra ``config.json`` keys, such as ``random_weights=True``); returns its path."""
    from gem_jax.checkpoints import save_native
    from gem_jax.models import init_params

    return save_native(directory, TINY, init_params(TINY, seed=seed), metadata=metadata or None)
