"""Evaluation protocols as data: GEM's own, and those of the official code of SCLIP, ClearCLIP, NACLIP and
MaskCLIP (per-dataset sizes, windows, templates, class names, logit scale, thresholds, PAMR)."""

from __future__ import annotations

import dataclasses
import types
from typing import Any, Mapping

from gem_jax.eval.images import IMAGE_STEPS
from gem_jax.eval.sliding import BORDERS
from gem_jax.postprocess import LOGIT_SCALE
from gem_jax.text import DEFAULT_TEMPLATE

#: The benchmarks of SCLIP, ClearCLIP and NACLIP (their configs/cfg_*.py), by gem-jax name.
EIGHT_BENCHMARKS = ("voc", "context60", "coco_object", "voc20", "cityscapes", "context", "ade20k", "coco_stuff")


@dataclasses.dataclass(frozen=True)
class Protocol:
    """How images become predictions for a benchmark.

    Predictions are made at the protocol's input size, bilinearly resized to the
    annotation's size (the original image size), and scored there.

    Attributes:
      name: registry name.
      description: one line, with the source of the settings.
      short_side: the image's shorter side is resized to this, keeping the aspect.
      template: prompt template with ``{}``, or a named set: ``"imagenet"`` (CLIP's 80
        templates), ``"imagenet85"`` (those and 5 scene templates).
      crop, stride: sliding-window inference over the resized image (``None``: the
        whole image in one pass).
      max_long_side: with sliding windows or a ``border`` other than ``"resize"``, the
        longer side is capped at this (mmseg's ``Resize(scale=(long, short), keep_ratio=True)``).
      border: what a window (or, without ``crop``, the whole resized image) whose sides are
        not patch multiples goes through the model as (:data:`gem_jax.eval.sliding.BORDERS`):
        ``"resize"`` (gem-jax's: resized to the nearest multiple; the whole-image path then
        snaps the image itself), ``"truncate"`` (SCLIP, NACLIP: only the whole patches are
        seen, their logits stretched over the window), ``"pad_center"`` (ClearCLIP: padded
        on all sides to the next multiple, logits cut back), ``"pad_corner"`` (MaskCLIP's
        mmseg ViT: padded at the bottom and right, logits of the padded input stretched
        over the window). Padding is zero after normalisation, as in the official code.
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
      class_names: a bundled class-name set (:data:`gem_jax.eval.class_names.NAME_SETS`) whose
        file for the dataset replaces the dataset's own prompts (every name on a line is
        prompted, the background too when its line is there); ``None`` for the dataset's.
      pamr_iterations, pamr_dilations: PAMR (:func:`gem_jax.postprocess.pamr`) on the
        cosine logits at the annotation size before the softmax, guided by the resized
        input image; 0 iterations is off.
      method: the method the protocol's source paper evaluates (a name of
        :func:`gem_jax.method_names`), recorded as data; the evaluated method is the GEM's.
      datasets: the datasets the source publishes settings for (``None``: any); others are
        refused.
      image_steps: how images are decoded, resized and normalised
        (:data:`gem_jax.eval.images.IMAGE_STEPS`): ``"gem"`` (Pillow, bicubic, CLIP's
        normalisation), ``"mmseg"`` (SCLIP, NACLIP, ClearCLIP: OpenCV decoding and bilinear
        resizing on uint8, their data preprocessor's mean and std), ``"mmseg_imagenet"``
        (MaskCLIP: the same with ImageNet's mean and std). Steps other than ``"gem"`` always
        go through :func:`gem_jax.eval.sliding.window_logits`.
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
    border: str = "resize"
    image_steps: str = "gem"
    class_names: str | None = None
    pamr_iterations: int = 0
    pamr_dilations: tuple[int, ...] = (8, 16)
    method: str | None = None
    datasets: tuple[str, ...] | None = None
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
        if self.border not in BORDERS:
            raise ValueError(f"border must be one of {BORDERS}, got {self.border!r}")
        if self.image_steps not in IMAGE_STEPS:
            raise ValueError(f"image_steps must be one of {tuple(IMAGE_STEPS)}, got {self.image_steps!r}")
        if not isinstance(self.pamr_iterations, int) or self.pamr_iterations < 0:
            raise ValueError(f"pamr_iterations must be a non-negative int, got {self.pamr_iterations!r}")
        object.__setattr__(self, "pamr_dilations", tuple(self.pamr_dilations))
        if not self.pamr_dilations or min(self.pamr_dilations) < 1:
            raise ValueError(f"pamr_dilations must be positive, got {self.pamr_dilations!r}")
        if self.logit_scale <= 0:
            raise ValueError(f"logit_scale must be positive, got {self.logit_scale!r}")
        fields = {f.name for f in dataclasses.fields(self)} - {"name", "overrides"}
        for ds, values in self.overrides.items():
            unknown = set(values) - fields
            if unknown:
                raise ValueError(f"protocol {self.name!r}: unknown override fields {sorted(unknown)} for {ds!r}")
        object.__setattr__(self, "overrides", types.MappingProxyType({k: dict(v) for k, v in self.overrides.items()}))

    @property
    def sliding(self) -> bool:
        """Whether the image goes through :func:`gem_jax.eval.sliding.window_logits` (windows, one
        whole-image window with a ``border`` rule, or image steps other than gem-jax's)."""
        return self.crop is not None or self.border != "resize" or self.image_steps != "gem"

    def for_dataset(self, dataset_name: str) -> "Protocol":
        """This protocol with the overrides of ``dataset_name`` applied.

        Raises ValueError for a dataset outside ``datasets``."""
        if self.datasets is not None and dataset_name not in self.datasets:
            raise ValueError(f"the {self.name} protocol has settings for {', '.join(self.datasets)} only, "
                             f"not {dataset_name}")
        return dataclasses.replace(self, overrides={}, **self.overrides.get(dataset_name, {}))

    def settings(self) -> dict:
        """The fields as a JSON-able dict (for results files)."""
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        d["pamr_dilations"] = list(self.pamr_dilations)
        d["datasets"] = None if self.datasets is None else list(self.datasets)
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
    # The toy scenes (docs/TOY_MODEL.md): the toy model's input size and prompt template.
    overrides={"toy": {"short_side": 64, "template": "a {}"}},
)

# The settings below are read from each official repository's per-dataset configs
# (configs/cfg_<dataset>.py, mmseg test pipelines and model arguments) and segmentor code;
# tests/test_protocols.py repeats them with the file each comes from.

#: SCLIP (wangf3014/SCLIP): shorter side 336 (448 for COCO-Stuff, 560 for Cityscapes; longer
#: side at most 2048), 224 crops with stride 112, only whole patches seen at the borders, 80
#: ImageNet templates, its class-name files (synonyms, 26 background stuff words), logit
#: scale 40 (65 VOC, 50 Context-60 and COCO-Object), background below probability 0.1, the
#: area threshold 0.1 on VOC, no PAMR.
SCLIP_PROTOCOL = Protocol(
    name="sclip",
    description="SCLIP's configs: short side 336 (COCO-Stuff 448, Cityscapes 560), 224 crops stride 112, "
                "80 ImageNet templates, its class-name files, logit scale 40 (VOC 65, Context-60 and "
                "COCO-Object 50), background below 0.1, area threshold 0.1 on VOC",
    short_side=336,
    template="imagenet",
    crop=224,
    stride=112,
    max_long_side=2048,
    logit_scale=40.0,
    background_threshold=0.1,
    synonyms=True,
    background_prompts=True,
    border="truncate",
    class_names="sclip",
    method="sclip",
    # configs/cfg_*.py test_pipeline: LoadImageFromFile, Resize(keep_ratio=True) (mmcv imrescale,
    # cv2 INTER_LINEAR); clip_segmentor.py SegDataPreProcessor(mean=[122.771, ...], std=[68.501, ...]).
    image_steps="mmseg",
    datasets=EIGHT_BENCHMARKS,
    overrides={
        "voc": {"logit_scale": 65.0, "area_threshold": 0.1},
        "context60": {"logit_scale": 50.0},
        "coco_object": {"logit_scale": 50.0},
        "coco_stuff": {"short_side": 448},
        "cityscapes": {"short_side": 560},
    },
)

#: NACLIP (sinahmr/NACLIP): shorter side 336 (560 for Cityscapes), 224 crops with stride 112
#: (VOC and VOC20: the whole image), whole patches at the borders, 80 ImageNet templates,
#: SCLIP's class-name files, logit scale 40, background below probability 0.1, PAMR with 10
#: iterations at dilations 8 and 16.
NACLIP_PROTOCOL = Protocol(
    name="naclip",
    description="NACLIP's configs: short side 336 (Cityscapes 560), 224 crops stride 112 (VOC, VOC20 whole "
                "image), 80 ImageNet templates, SCLIP's class-name files, logit scale 40, background below "
                "0.1, PAMR 10 iterations at dilations 8 and 16",
    short_side=336,
    template="imagenet",
    crop=224,
    stride=112,
    max_long_side=2048,
    logit_scale=40.0,
    background_threshold=0.1,
    synonyms=True,
    background_prompts=True,
    border="truncate",
    class_names="sclip",
    pamr_iterations=10,
    pamr_dilations=(8, 16),
    method="naclip",
    # configs/cfg_*.py test_pipeline as SCLIP's; naclip.py SegDataPreProcessor(mean=[122.771, ...], ...).
    image_steps="mmseg",
    datasets=EIGHT_BENCHMARKS,
    overrides={
        "voc": {"crop": None, "stride": None},
        "voc20": {"crop": None, "stride": None},
        "cityscapes": {"short_side": 560},
    },
)

#: ClearCLIP (mc-lan/ClearCLIP): shorter side 448, 448 crops with stride 224 (Cityscapes 224
#: and 224), crops zero-padded to the patch multiple, 80 ImageNet templates, plain class
#: names and a single "background", logit scale 50, background below probability 0.5 (VOC),
#: 0.15 (Context-60), 0.4 (COCO-Object).
CLEARCLIP_PROTOCOL = Protocol(
    name="clearclip",
    description="ClearCLIP's configs: short side 448, 448 crops stride 224 (Cityscapes 224 / 224) zero-padded "
                "to the patch multiple, 80 ImageNet templates, plain names and 'background', logit scale 50, "
                "background below 0.5 (VOC), 0.15 (Context-60), 0.4 (COCO-Object)",
    short_side=448,
    template="imagenet",
    crop=448,
    stride=224,
    max_long_side=2048,
    logit_scale=50.0,
    background_threshold=0.0,
    synonyms=True,
    background_prompts=True,
    border="pad_center",
    class_names="clearclip",
    method="clearclip",
    # configs/cfg_*.py test_pipeline as SCLIP's; clearclip_segmentor.py SegDataPreProcessor(mean=[122.771, ...]).
    image_steps="mmseg",
    datasets=EIGHT_BENCHMARKS,
    overrides={
        "voc": {"background_threshold": 0.5},
        "context60": {"background_threshold": 0.15},
        "coco_object": {"background_threshold": 0.4},
        "cityscapes": {"crop": 224, "stride": 224},
    },
)

#: MaskCLIP (chongzhou96/MaskCLIP, ViT-B/16 configs): the whole image in one pass, mmseg's
#: keep-ratio resize to (2048, 512) (Context-59 (520, 520), Cityscapes (1024, 512)), the ViT
#: padding the bottom and right to the patch multiple, 85 templates, its plain class names,
#: argmax over classes (no background class on its benchmarks).
MASKCLIP_PROTOCOL = Protocol(
    name="maskclip",
    description="MaskCLIP's ViT-B/16 configs: whole image, short side 512 (long side <= 2048; Context-59 long "
                "side 520; Cityscapes 1024x512), corner padding to the patch multiple, 85 templates, its "
                "plain class names, argmax",
    short_side=512,
    template="imagenet85",
    max_long_side=2048,
    logit_scale=LOGIT_SCALE,
    synonyms=True,
    border="pad_corner",
    class_names="maskclip",
    method="maskclip",
    # configs/_base_/datasets/*.py test_pipeline: LoadImageFromFile, Resize(keep_ratio=True),
    # Normalize(mean=[123.675, 116.28, 103.53], std=[58.395, 57.12, 57.375], to_rgb=True).
    image_steps="mmseg_imagenet",
    datasets=("voc20", "context", "coco_stuff", "cityscapes", "ade20k"),
    overrides={
        "context": {"short_side": 520, "max_long_side": 520},
        "cityscapes": {"max_long_side": 1024},
    },
)

#: Protocols by name.
PROTOCOLS: dict[str, Protocol] = {p.name: p for p in (GEM_PROTOCOL, SCLIP_PROTOCOL, CLEARCLIP_PROTOCOL,
                                                      NACLIP_PROTOCOL, MASKCLIP_PROTOCOL)}


def get_protocol(name_or_protocol) -> Protocol:
    """A :class:`Protocol` by name (``"gem"``, ``"sclip"``, ``"clearclip"``, ``"naclip"``,
    ``"maskclip"``), or the one given."""
    if isinstance(name_or_protocol, Protocol):
        return name_or_protocol
    if name_or_protocol not in PROTOCOLS:
        raise ValueError(f"unknown protocol {name_or_protocol!r}; choose one of {', '.join(PROTOCOLS)}")
    return PROTOCOLS[name_or_protocol]
