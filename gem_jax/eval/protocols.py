"""Evaluation protocols as data: GEM's own and the sliding-window protocol of later training-free papers."""

from __future__ import annotations

import dataclasses
import types
from typing import Any, Mapping

# The same values as gem_jax.pipeline's; repeated so protocols stay plain data with no model imports.
DEFAULT_TEMPLATE = "a photo of a {}."
LOGIT_SCALE = 100.0


@dataclasses.dataclass(frozen=True)
class Protocol:
    """How images become predictions for a benchmark.

    Predictions are made at the protocol's input size, bilinearly resized to the
    annotation's size (the original image size), and scored there.

    Attributes:
      name: registry name.
      description: one line, with the source of the settings.
      short_side: the image's shorter side is resized to this, keeping the aspect.
      template: prompt template with ``{}``, or ``"imagenet"`` for CLIP's 80 templates.
      crop, stride: sliding-window inference over the resized image (``None``: the
        whole image in one pass).
      max_long_side: with sliding windows, the longer side is capped at this (mmseg's
        ``Resize(scale=(long, short), keep_ratio=True)``).
      logit_scale: multiplies the cosine logits before the softmax over prompts.
      background_threshold: for datasets with a background class, pixels whose top
        class probability is below this are background.
      area_threshold: for datasets with a background class, a class predicted on less
        than this fraction of the image's non-background pixels is suppressed (SCLIP's
        ``area_thd``); ``None`` turns it off.
      synonyms: prompt every name of a class and max-pool the probabilities into it
        (else only the first name).
      background_prompts: give the background class its own prompts (the dataset's
        background names) instead of predicting it only by threshold.
      point_threshold: heatmap level at which a point counts as "on" (p-mIoU).
      overrides: per dataset name, field values that replace the above.
    """

    name: str
    description: str
    short_side: int
    template: str = DEFAULT_TEMPLATE
    crop: int | None = None
    stride: int | None = None
    max_long_side: int | None = None
    logit_scale: float = LOGIT_SCALE
    background_threshold: float | None = None
    area_threshold: float | None = None
    synonyms: bool = False
    background_prompts: bool = False
    point_threshold: float = 0.5
    overrides: Mapping[str, Mapping[str, Any]] = dataclasses.field(default_factory=dict)

    def __post_init__(self):
        if (self.crop is None) != (self.stride is None):
            raise ValueError("crop and stride go together")
        if self.crop is not None and not (0 < self.stride <= self.crop):
            raise ValueError(f"stride must be in (0, crop], got crop={self.crop}, stride={self.stride}")
        if not isinstance(self.short_side, int) or self.short_side < 1:
            raise ValueError(f"short_side must be a positive int, got {self.short_side!r}")
        for f in ("background_threshold", "area_threshold"):
            v = getattr(self, f)
            if v is not None and not 0.0 <= v <= 1.0:
                raise ValueError(f"{f} must be in [0, 1], got {v!r}")
        fields = {f.name for f in dataclasses.fields(self)} - {"name", "overrides"}
        for ds, values in self.overrides.items():
            unknown = set(values) - fields
            if unknown:
                raise ValueError(f"protocol {self.name!r}: unknown override fields {sorted(unknown)} for {ds!r}")
        object.__setattr__(self, "overrides", types.MappingProxyType({k: dict(v) for k, v in self.overrides.items()}))

    @property
    def sliding(self) -> bool:
        return self.crop is not None

    def for_dataset(self, dataset_name: str) -> "Protocol":
        """This protocol with the overrides of ``dataset_name`` applied."""
        return dataclasses.replace(self, overrides={}, **self.overrides.get(dataset_name, {}))

    def settings(self) -> dict:
        """The fields as a JSON-able dict (for results files)."""
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        d["overrides"] = {k: dict(v) for k, v in self.overrides.items()}
        return d


#: GEM's evaluation (paper, Sec. 5): shorter side 448, the whole image at once, one
#: prompt template, CLIP's logit scale 100, background below 0.85 top probability (VOC).
GEM_PROTOCOL = Protocol(
    name="gem",
    description="GEM paper: short side 448, whole image, 'a photo of a {}.', softmax of 100*cos, "
                "background where the top probability < 0.85",
    short_side=448,
    template=DEFAULT_TEMPLATE,
    logit_scale=LOGIT_SCALE,
    background_threshold=0.85,
)

#: The protocol of later training-free papers (SCLIP's mmseg configs, reused by ClearCLIP,
#: NACLIP, ...): shorter side 336 (448 for COCO-Stuff, 560 for Cityscapes, longer side at
#: most 2048), 224 crops with stride 112 averaged, 80 ImageNet templates, class names with
#: synonyms, a background class with its own prompts and a probability threshold of 0.1,
#: logit scale 40 (65 for VOC, 50 for Context-60 and COCO-Object), and SCLIP's area
#: threshold 0.1 on VOC.
SCLIP_PROTOCOL = Protocol(
    name="sclip",
    description="SCLIP-style: short side 336, 224 crops stride 112, 80 ImageNet templates, synonyms, "
                "background prompts with probability threshold 0.1, logit scale 40 (per-dataset overrides)",
    short_side=336,
    template="imagenet",
    crop=224,
    stride=112,
    max_long_side=2048,
    logit_scale=40.0,
    background_threshold=0.1,
    synonyms=True,
    background_prompts=True,
    overrides={
        "voc": {"logit_scale": 65.0, "area_threshold": 0.1},
        "context60": {"logit_scale": 50.0},
        "coco_object": {"logit_scale": 50.0},
        "coco_stuff": {"short_side": 448},
        "cityscapes": {"short_side": 560},
    },
)

#: Protocols by name.
PROTOCOLS: dict[str, Protocol] = {p.name: p for p in (GEM_PROTOCOL, SCLIP_PROTOCOL)}


def get_protocol(name_or_protocol) -> Protocol:
    """A :class:`Protocol` by name (``"gem"``, ``"sclip"``), or the one given."""
    if isinstance(name_or_protocol, Protocol):
        return name_or_protocol
    if name_or_protocol not in PROTOCOLS:
        raise ValueError(f"unknown protocol {name_or_protocol!r}; choose one of {', '.join(PROTOCOLS)}")
    return PROTOCOLS[name_or_protocol]
