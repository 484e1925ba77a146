"""Frozen configs for CLIP's towers and the table of standard architectures."""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Literal, Mapping

Activation = Literal["quick_gelu", "gelu"]
ACTIVATIONS = ("quick_gelu", "gelu")


def _check_positive(cfg, *names):
    for n in names:
        v = getattr(cfg, n)
        if not isinstance(v, int) or v <= 0:
            raise ValueError(f"{type(cfg).__name__}.{n} must be a positive int, got {v!r}")


def _check_activation(a):
    if a not in ACTIVATIONS:
        raise ValueError(f"unknown activation {a!r}; expected one of {ACTIVATIONS}")


@dataclasses.dataclass(frozen=True)
class VisionConfig:
    """The ViT image tower.

    Attributes:
      image_size: side of the square input the positional embedding was trained
        for; other sizes are served by resampling the embedding at call time.
      patch_size: side of the square patches.
      width: token width C.
      layers: number of residual blocks.
      heads: attention heads per block.
      mlp_ratio: MLP hidden width over ``width``.
      activation: ``"quick_gelu"`` (OpenAI, MetaCLIP) or ``"gelu"`` (exact, LAION).
    """

    image_size: int = 224
    patch_size: int = 16
    width: int = 768
    layers: int = 12
    heads: int = 12
    mlp_ratio: float = 4.0
    activation: Activation = "quick_gelu"

    def __post_init__(self):
        _check_positive(self, "image_size", "patch_size", "width", "layers", "heads")
        _check_activation(self.activation)
        if self.width % self.heads:
            raise ValueError(f"vision width {self.width} is not divisible by heads {self.heads}")
        if self.image_size % self.patch_size:
            raise ValueError(f"image_size {self.image_size} is not a multiple of patch_size {self.patch_size}")

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size

    @property
    def mlp_width(self) -> int:
        return int(round(self.width * self.mlp_ratio))

    def tokens(self, size: tuple[int, int]) -> int:
        """Tokens per image at input ``size`` (H, W): the class token and the patch grid."""
        return 1 + (size[0] // self.patch_size) * (size[1] // self.patch_size)


@dataclasses.dataclass(frozen=True)
class TextConfig:
    """The causal text transformer.

    Attributes:
      context_length: number of token positions (77 for CLIP).
      vocab_size: rows of the token embedding (49408 for CLIP BPE).
      width: token width.
      layers: number of residual blocks.
      heads: attention heads per block.
      mlp_ratio: MLP hidden width over ``width``.
      activation: as in :class:`VisionConfig`.
    """

    context_length: int = 77
    vocab_size: int = 49408
    width: int = 512
    layers: int = 12
    heads: int = 8
    mlp_ratio: float = 4.0
    activation: Activation = "quick_gelu"

    def __post_init__(self):
        _check_positive(self, "context_length", "vocab_size", "width", "layers", "heads")
        _check_activation(self.activation)
        if self.width % self.heads:
            raise ValueError(f"text width {self.width} is not divisible by heads {self.heads}")

    @property
    def mlp_width(self) -> int:
        return int(round(self.width * self.mlp_ratio))


@dataclasses.dataclass(frozen=True)
class CLIPConfig:
    """Both towers and the joint embedding size."""

    vision: VisionConfig = dataclasses.field(default_factory=VisionConfig)
    text: TextConfig = dataclasses.field(default_factory=TextConfig)
    embed_dim: int = 512

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "CLIPConfig":
        try:
            return cls(
                vision=VisionConfig(**d["vision"]),
                text=TextConfig(**d["text"]),
                embed_dim=int(d["embed_dim"]),
            )
        except (KeyError, TypeError) as e:
            raise ValueError(f"malformed CLIP config {dict(d)!r}: {e}") from None

    def replace(self, **kw) -> "CLIPConfig":
        return dataclasses.replace(self, **kw)

    def with_activation(self, activation: Activation) -> "CLIPConfig":
        return CLIPConfig(
            vision=dataclasses.replace(self.vision, activation=activation),
            text=dataclasses.replace(self.text, activation=activation),
            embed_dim=self.embed_dim,
        )


def _arch(image, patch, width, layers, text_width, embed, vision_heads=None, text_heads=None):
    # open_clip and OpenAI derive heads from a head width of 64.
    return CLIPConfig(
        vision=VisionConfig(image_size=image, patch_size=patch, width=width, layers=layers,
                            heads=vision_heads or width // 64, activation="gelu"),
        text=TextConfig(width=text_width, heads=text_heads or text_width // 64, activation="gelu"),
        embed_dim=embed,
    )


_BASE = {
    "ViT-B-32": _arch(224, 32, 768, 12, 512, 512),
    "ViT-B-16": _arch(224, 16, 768, 12, 512, 512),
    "ViT-B-16-plus-240": _arch(240, 16, 896, 12, 640, 640),
    "ViT-L-14": _arch(224, 14, 1024, 24, 768, 768),
    "ViT-L-14-336": _arch(336, 14, 1024, 24, 768, 768),
}

#: The standard architectures, by open_clip name. Plain names use exact GELU (as
#: open_clip does); ``-quickgelu`` names use QuickGELU (OpenAI, MetaCLIP weights).
ARCHITECTURES: dict[str, CLIPConfig] = {}
for _name, _cfg in _BASE.items():
    ARCHITECTURES[_name] = _cfg
    ARCHITECTURES[_name + "-quickgelu"] = _cfg.with_activation("quick_gelu")
del _name, _cfg


def architecture(name: str) -> CLIPConfig:
    """The config of a standard architecture; ``/`` is accepted for ``-`` ("ViT-B/16")."""
    key = name.replace("/", "-")
    if key not in ARCHITECTURES:
        import difflib

        close = difflib.get_close_matches(key, ARCHITECTURES, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise ValueError(f"unknown architecture {name!r}{hint} Known: {', '.join(ARCHITECTURES)}")
    return ARCHITECTURES[key]


def infer_config(shapes: Mapping[str, tuple[int, ...]], activation: Activation = "quick_gelu",
                 head_width: int = 64) -> CLIPConfig:
    """Infers a :class:`CLIPConfig` from the tensor shapes of an OpenCLIP/OpenAI-layout
    state dict (``{key: shape}``; a leading ``module.`` is not expected).

    Head counts are not in the shapes: like open_clip and OpenAI, heads = width / 64.
    The activation is not in the shapes either and must be supplied.
    """
    try:
        width, _, patch, patch2 = shapes["visual.conv1.weight"]
        n_pos = shapes["visual.positional_embedding"][0]
        grid = math.isqrt(n_pos - 1)
        if grid * grid != n_pos - 1 or patch != patch2:
            raise ValueError(f"visual.positional_embedding has {n_pos} rows: not 1 + a square grid")
        v_layers = _count_blocks(shapes, "visual.transformer.resblocks.")
        v_mlp = shapes["visual.transformer.resblocks.0.mlp.c_fc.weight"][0]
        ctx, t_width = shapes["positional_embedding"]
        vocab = shapes["token_embedding.weight"][0]
        t_layers = _count_blocks(shapes, "transformer.resblocks.")
        t_mlp = shapes["transformer.resblocks.0.mlp.c_fc.weight"][0]
        embed = shapes["text_projection"][1]
    except KeyError as e:
        raise ValueError(f"cannot infer the CLIP config: tensor {e.args[0]!r} is missing") from None
    return CLIPConfig(
        vision=VisionConfig(image_size=grid * patch, patch_size=patch, width=width, layers=v_layers,
                            heads=max(width // head_width, 1), mlp_ratio=v_mlp / width,
                            activation=activation),
        text=TextConfig(context_length=ctx, vocab_size=vocab, width=t_width, layers=t_layers,
                        heads=max(t_width // head_width, 1), mlp_ratio=t_mlp / t_width,
                        activation=activation),
        embed_dim=embed,
    )


def _count_blocks(shapes, prefix):
    idx = {int(k[len(prefix):].split(".", 1)[0]) for k in shapes if k.startswith(prefix)}
    if not idx:
        raise KeyError(prefix + "0")
    if idx != set(range(len(idx))):
        raise ValueError(f"blocks under {prefix!r} are not numbered 0..{len(idx) - 1}: {sorted(idx)}")
    return len(idx)
