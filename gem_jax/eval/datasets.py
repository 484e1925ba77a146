"""Readers for the on-disk layouts of the segmentation benchmarks, with their class names as data."""

from __future__ import annotations

import csv
import dataclasses
import functools
import pathlib
from typing import Callable, Sequence

import numpy as np
from PIL import Image, UnidentifiedImageError

#: Label value excluded from every metric.
IGNORE_INDEX = 255


class DatasetError(ValueError):
    """A dataset that is missing, laid out differently from what its reader expects, or malformed."""


# ----------------------------------------------------------------------------- class names (facts)

VOC_CLASSES = (
    "background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor",
)

CONTEXT59_CLASSES = (
    "aeroplane", "bag", "bed", "bedclothes", "bench", "bicycle", "bird", "boat", "book", "bottle", "building",
    "bus", "cabinet", "car", "cat", "ceiling", "chair", "cloth", "computer", "cow", "cup", "curtain", "dog",
    "door", "fence", "floor", "flower", "food", "grass", "ground", "horse", "keyboard", "light", "motorbike",
    "mountain", "mouse", "person", "plate", "platform", "pottedplant", "road", "rock", "sheep", "shelves",
    "sidewalk", "sign", "sky", "snow", "sofa", "table", "track", "train", "tree", "truck", "tvmonitor", "wall",
    "water", "window", "wood",
)

ADE20K_CLASSES = (
    "wall", "building", "sky", "floor", "tree", "ceiling", "road", "bed", "windowpane", "grass", "cabinet",
    "sidewalk", "person", "earth", "door", "table", "mountain", "plant", "curtain", "chair", "car", "water",
    "painting", "sofa", "shelf", "house", "sea", "mirror", "rug", "field", "armchair", "seat", "fence", "desk",
    "rock", "wardrobe", "lamp", "bathtub", "railing", "cushion", "base", "box", "column", "signboard",
    "chest of drawers", "counter", "sand", "sink", "skyscraper", "fireplace", "refrigerator", "grandstand",
    "path", "stairs", "runway", "case", "pool table", "pillow", "screen door", "stairway", "river", "bridge",
    "bookcase", "blind", "coffee table", "toilet", "flower", "book", "hill", "bench", "countertop", "stove",
    "palm", "kitchen island", "computer", "swivel chair", "boat", "bar", "arcade machine", "hovel", "bus",
    "towel", "light", "truck", "tower", "chandelier", "awning", "streetlight", "booth", "television receiver",
    "airplane", "dirt track", "apparel", "pole", "land", "bannister", "escalator", "ottoman", "bottle",
    "buffet", "poster", "stage", "van", "ship", "fountain", "conveyer belt", "canopy", "washer", "plaything",
    "swimming pool", "stool", "barrel", "basket", "waterfall", "tent", "bag", "minibike", "cradle", "oven",
    "ball", "food", "step", "tank", "trade name", "microwave", "pot", "animal", "bicycle", "lake",
    "dishwasher", "screen", "blanket", "sculpture", "hood", "sconce", "vase", "traffic light", "tray",
    "ashcan", "fan", "pier", "crt screen", "plate", "monitor", "bulletin board", "shower", "radiator", "glass",
    "clock", "flag",
)

COCO_THINGS = (
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat", "traffic light",
    "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat", "dog", "horse", "sheep", "cow",
    "elephant", "bear", "zebra", "giraffe", "backpack", "umbrella", "handbag", "tie", "suitcase", "frisbee",
    "skis", "snowboard", "sports ball", "kite", "baseball bat", "baseball glove", "skateboard", "surfboard",
    "tennis racket", "bottle", "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple",
    "sandwich", "orange", "broccoli", "carrot", "hot dog", "pizza", "donut", "cake", "chair", "couch",
    "potted plant", "bed", "dining table", "toilet", "tv", "laptop", "mouse", "remote", "keyboard",
    "cell phone", "microwave", "oven", "toaster", "sink", "refrigerator", "book", "clock", "vase", "scissors",
    "teddy bear", "hair drier", "toothbrush",
)

COCO_STUFF = (
    "banner", "blanket", "branch", "bridge", "building-other", "bush", "cabinet", "cage", "cardboard",
    "carpet", "ceiling-other", "ceiling-tile", "cloth", "clothes", "clouds", "counter", "cupboard", "curtain",
    "desk-stuff", "dirt", "door-stuff", "fence", "floor-marble", "floor-other", "floor-stone", "floor-tile",
    "floor-wood", "flower", "fog", "food-other", "fruit", "furniture-other", "grass", "gravel", "ground-other",
    "hill", "house", "leaves", "light", "mat", "metal", "mirror-stuff", "moss", "mountain", "mud", "napkin",
    "net", "paper", "pavement", "pillow", "plant-other", "plastic", "platform", "playingfield", "railing",
    "railroad", "river", "road", "rock", "roof", "rug", "salad", "sand", "sea", "shelf", "sky-other",
    "skyscraper", "snow", "solid-other", "stairs", "stone", "straw", "structural-other", "table", "tent",
    "textile-other", "towel", "tree", "vegetable", "wall-brick", "wall-concrete", "wall-other", "wall-panel",
    "wall-stone", "wall-tile", "wall-wood", "water-other", "waterdrops", "window-blind", "window-other", "wood",
)

COCO_STUFF_CLASSES = COCO_THINGS + COCO_STUFF
COCO_OBJECT_CLASSES = ("background",) + COCO_THINGS

CITYSCAPES_CLASSES = (
    "road", "sidewalk", "building", "wall", "fence", "pole", "traffic light", "traffic sign", "vegetation",
    "terrain", "sky", "person", "rider", "car", "truck", "bus", "train", "motorcycle", "bicycle",
)

# Prompt names where the dataset's class name is not plain English. The first name of
# each tuple is the prompt of the single-name protocols; the others are synonyms whose
# probabilities are max-pooled into the class by protocols that use synonyms.
_PERSON = ("person", "person in shirt", "person in jeans", "person in dress", "person in sweater",
           "person in skirt", "person in jacket")
# Background as a set of stuff words (the device of SCLIP's name files for VOC and COCO-Object).
BACKGROUND_STUFF = (
    "sky", "wall", "tree", "wood", "grass", "road", "sea", "river", "mountain", "sands", "desk", "bed",
    "building", "cloud", "lamp", "door", "window", "wardrobe", "ceiling", "shelf", "curtain", "stair", "floor",
    "hill", "rail", "fence",
)
_VOC_PROMPTS = {
    "background": BACKGROUND_STUFF,
    "aeroplane": ("aeroplane", "airplane"),
    "boat": ("boat", "ship"),
    "diningtable": ("dining table", "table"),
    "motorbike": ("motorbike", "motorcycle"),
    "person": _PERSON,
    "pottedplant": ("potted plant",),
    "tvmonitor": ("tv monitor", "television monitor", "monitor", "television", "screen"),
}
_CONTEXT_PROMPTS = {
    "bedclothes": ("bedclothes", "bed clothes"),
    "pottedplant": ("potted plant",),
    "tvmonitor": ("tv monitor", "television monitor", "monitor", "television", "screen"),
    "person": _PERSON,
}
_ADE_PROMPTS = {
    "windowpane": ("windowpane", "window"),
    "ashcan": ("ashcan", "trash can"),
    "crt screen": ("crt screen",),
    "person": _PERSON,
}
_COCO_PROMPTS = {
    "background": BACKGROUND_STUFF,
    "person": _PERSON + ("body",),
    "tv": ("tv", "television"),
    "building-other": ("building",),
    "ceiling-other": ("ceiling",),
    "ceiling-tile": ("tile ceiling",),
    "desk-stuff": ("desk",),
    "door-stuff": ("door",),
    "floor-marble": ("marble floor",),
    "floor-other": ("floor",),
    "floor-stone": ("stone floor",),
    "floor-tile": ("tile floor",),
    "floor-wood": ("wooden floor",),
    "food-other": ("food",),
    "furniture-other": ("furniture",),
    "ground-other": ("ground",),
    "mirror-stuff": ("mirror",),
    "plant-other": ("plant",),
    "playingfield": ("playing field",),
    "sky-other": ("sky",),
    "solid-other": ("solid",),
    "structural-other": ("structure",),
    "textile-other": ("textile",),
    "wall-brick": ("brick wall",),
    "wall-concrete": ("concrete wall",),
    "wall-other": ("wall",),
    "wall-panel": ("panel wall",),
    "wall-stone": ("stone wall",),
    "wall-tile": ("tile wall",),
    "wall-wood": ("wooden wall",),
    "water-other": ("water",),
    "waterdrops": ("water drops",),
    "window-blind": ("window blind",),
    "window-other": ("window",),
}


def _prompts(classes: Sequence[str], table: dict[str, tuple[str, ...]]) -> tuple[tuple[str, ...], ...]:
    return tuple(tuple(table.get(c, (c,))) for c in classes)


@functools.lru_cache(maxsize=1)
def voc_palette() -> np.ndarray:
    """The (256, 3) uint8 PASCAL VOC colour map (index 255, the void border, is (224, 224, 192))."""
    pal = np.zeros((256, 3), np.uint8)
    for i in range(256):
        c, r, g, b = i, 0, 0, 0
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        pal[i] = (r, g, b)
    pal.setflags(write=False)
    return pal


# ----------------------------------------------------------------------------- samples and datasets


@dataclasses.dataclass(frozen=True)
class Points:
    """Point labels of one image (OpenImages V7).

    Attributes:
      classes: (N,) int32 index into the dataset's classes.
      x, y: (N,) float32 coordinates in [0, 1], relative to the image width and height.
      positive: (N,) bool, True for "yes" points (class present there), False for "no" points.
    """

    classes: np.ndarray
    x: np.ndarray
    y: np.ndarray
    positive: np.ndarray

    def present(self) -> np.ndarray:
        """The sorted distinct classes with at least one point."""
        return np.unique(self.classes)


@dataclasses.dataclass(frozen=True)
class Sample:
    """One evaluation item.

    Attributes:
      id: unique within the dataset; may contain ``/`` (Cityscapes ``city/stem``).
      image: path of the image file.
      label: path of the label map (semantic datasets), else ``None``.
      points: point labels (OpenImages), else ``None``.
    """

    id: str
    image: pathlib.Path
    label: pathlib.Path | None = None
    points: Points | None = None


@dataclasses.dataclass(frozen=True, eq=False)
class Dataset:
    """A benchmark split: its samples, class names and label conventions.

    Labels returned by :meth:`load_label` are int32 maps whose values index ``classes``,
    with :data:`IGNORE_INDEX` (255) for pixels that no metric counts.

    Attributes:
      name: registry name (``"voc"``, ``"context"``, ...).
      root: the directory the reader was given.
      split: the split read.
      classes: class names, in label order.
      prompts: per class, the names to prompt with; the first is the default, the
        rest synonyms.
      background: index of the background class (predicted by thresholding, or from
        its own prompts), or ``None`` when every class is a real category.
      kind: ``"semantic"`` (label maps, mIoU) or ``"points"`` (point labels, p-mIoU).
      samples: the items, in a fixed order.
      reduce_zero_label: mmseg's convention: raw 0 becomes 255 (ignored) and every
        other raw value k becomes k - 1.
      palette: for palette PNGs, the colour each raw index must have (VOC); ``None``
        skips the check.
    """

    name: str
    root: pathlib.Path
    split: str
    classes: tuple[str, ...]
    prompts: tuple[tuple[str, ...], ...]
    background: int | None
    kind: str
    samples: tuple[Sample, ...]
    reduce_zero_label: bool = False
    palette: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.samples)

    def __iter__(self):
        return iter(self.samples)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def load_label(self, sample: Sample, image_shape: tuple[int, int] | None = None) -> np.ndarray:
        """The (H, W) int32 label map of ``sample`` in class-index space (255 ignored).

        Raises :class:`DatasetError` if the file cannot be read, is not a single-channel
        index image, has the wrong palette, holds values outside the classes, or does not
        match ``image_shape`` (H, W).
        """
        if sample.label is None:
            raise DatasetError(f"{self.name} sample {sample.id!r} has no label map")
        raw = read_index_png(sample.label, self.palette)
        if image_shape is not None and raw.shape != tuple(image_shape[:2]):
            raise DatasetError(f"annotation {sample.label} is {raw.shape[1]}x{raw.shape[0]} (WxH) but its image "
                               f"is {image_shape[1]}x{image_shape[0]}")
        label = raw.astype(np.int32)
        if self.reduce_zero_label:
            label = np.where(raw == 0, IGNORE_INDEX, label - 1)
            label[raw == IGNORE_INDEX] = IGNORE_INDEX
        bad = (label != IGNORE_INDEX) & ((label < 0) | (label >= self.num_classes))
        if bad.any():
            values = np.unique(raw[bad])[:8].tolist()
            raise DatasetError(f"annotation {sample.label} holds label values {values} outside the {self.name} "
                               f"classes (raw 0..{self.num_classes - 1 + self.reduce_zero_label} and "
                               f"{IGNORE_INDEX})")
        return label


def read_index_png(path: pathlib.Path, palette: np.ndarray | None = None) -> np.ndarray:
    """A single-channel index PNG (palette or greyscale) as an (H, W) array of raw values.

    With ``palette`` (N, 3), a palette image must give each index it uses that colour
    (so a colour-coded image saved with some other palette is not misread).
    """
    try:
        with Image.open(path) as im:
            im.load()
            mode = im.mode
            arr = np.asarray(im)
            pal = im.getpalette() if mode == "P" else None
    except FileNotFoundError:
        raise DatasetError(f"annotation not found: {path}") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise DatasetError(f"cannot read annotation {path}: {e}") from None
    if mode in ("RGB", "RGBA", "LA", "CMYK", "YCbCr"):
        raise DatasetError(f"annotation {path} is a {mode} colour image; expected a single-channel label PNG "
                           "(palette 'P' or greyscale 'L' holding class indices)")
    if mode not in ("P", "L", "I", "I;16", "I;16B", "I;16L"):
        raise DatasetError(f"annotation {path} has unsupported image mode {mode!r}; expected 'P' or 'L'")
    if arr.ndim != 2:
        raise DatasetError(f"annotation {path} has shape {arr.shape}; expected (H, W)")
    if palette is not None and pal is not None:
        pal = np.asarray(pal, np.uint8).reshape(-1, 3)
        used = np.unique(arr)
        have = np.zeros((len(used), 3), np.int32) - 1
        inside = used < len(pal)
        have[inside] = pal[used[inside]]
        want = palette[np.minimum(used, len(palette) - 1)].astype(np.int32)
        wrong = np.any(have != want, axis=1)
        if wrong.any():
            i = int(used[wrong][0])
            got, exp = (tuple(int(v) for v in a[wrong][0]) for a in (have, want))
            raise DatasetError(f"annotation {path} has a palette that differs from the expected one: index {i} is "
                               f"{got}, expected {exp}")
    if arr.dtype != np.uint8:
        if arr.size and (arr.min() < 0 or arr.max() > 255):
            raise DatasetError(f"annotation {path} holds values outside 0..255")
        arr = arr.astype(np.uint8)
    return arr


def _dir(path: pathlib.Path, what: str) -> pathlib.Path:
    if not path.is_dir():
        raise DatasetError(f"{what} not found: expected the directory {path}")
    return path


def _file(path: pathlib.Path, what: str) -> pathlib.Path:
    if not path.is_file():
        raise DatasetError(f"{what} not found: expected the file {path}")
    return path


def _read_ids(path: pathlib.Path) -> list[str]:
    try:
        ids = [line.strip() for line in path.read_text("utf-8").splitlines()]
    except (OSError, UnicodeDecodeError) as e:
        raise DatasetError(f"cannot read the split file {path}: {e}") from None
    ids = [i for i in ids if i]
    if not ids:
        raise DatasetError(f"the split file {path} lists no images")
    return ids


def _check_exist(samples: Sequence[Sample], what: str) -> None:
    missing = [p for s in samples for p in (s.image, s.label) if p is not None and not p.is_file()]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise DatasetError(f"{what}: missing file {missing[0]}{more}")


def _root(root) -> pathlib.Path:
    root = pathlib.Path(root).expanduser()
    if not root.is_dir():
        raise DatasetError(f"dataset root not found: {root}")
    return root


# ----------------------------------------------------------------------------- readers


def voc_like(name, root, split, image_dir, label_dir, split_dir, classes, prompts, background, *,
             reduce_zero_label, palette=None, what) -> Dataset:
    """A dataset in PASCAL VOC's layout under ``root``: ``image_dir/<id>.jpg`` and
    ``label_dir/<id>.png`` for the ids listed in ``split_dir/<split>.txt``; ``classes`` and
    their ``prompts``, the ``background`` class name (or ``None``), whether label 0 is dropped
    (``reduce_zero_label``), the label ``palette`` of colour PNGs, and ``what`` the files are
    called in error messages."""
    root = _root(root)
    images = _dir(root / image_dir, f"{what} images")
    labels = _dir(root / label_dir, f"{what} annotations")
    ids = _read_ids(_file(root / split_dir / f"{split}.txt", f"{what} split file"))
    samples = tuple(Sample(i, images / f"{i}.jpg", labels / f"{i}.png") for i in ids)
    _check_exist(samples, f"{what} {split}")
    return Dataset(name, root, split, tuple(classes), prompts, background, "semantic", samples,
                   reduce_zero_label=reduce_zero_label, palette=palette)


def voc(root, split: str = "val") -> Dataset:
    """PASCAL VOC 2012 with background: 21 classes (0 is background), 255 (object borders) ignored.

    Layout (``root`` is ``VOCdevkit/VOC2012``): ``JPEGImages/<id>.jpg``,
    ``SegmentationClass/<id>.png`` (palette PNGs, checked against the VOC colour map),
    ``ImageSets/Segmentation/<split>.txt``.
    """
    return voc_like("voc", root, split, "JPEGImages", "SegmentationClass", "ImageSets/Segmentation",
                     VOC_CLASSES, _prompts(VOC_CLASSES, _VOC_PROMPTS), 0, reduce_zero_label=False,
                     palette=voc_palette(), what="PASCAL VOC")


def voc20(root, split: str = "val") -> Dataset:
    """PASCAL VOC 2012 without background: the 20 object classes; background pixels are
    ignored (mmseg's ``reduce_zero_label``). Same layout as :func:`voc`."""
    classes = VOC_CLASSES[1:]
    return voc_like("voc20", root, split, "JPEGImages", "SegmentationClass", "ImageSets/Segmentation",
                     classes, _prompts(classes, _VOC_PROMPTS), None, reduce_zero_label=True,
                     palette=voc_palette(), what="PASCAL VOC")


def context59(root, split: str = "val") -> Dataset:
    """PASCAL Context, 59 classes, in mmseg's layout (``root`` is ``VOCdevkit/VOC2010``):
    ``JPEGImages/<id>.jpg``, ``SegmentationClassContext/<id>.png``,
    ``ImageSets/SegmentationContext/<split>.txt``.

    mmseg's converter writes raw values 0..59, where 0 is everything outside the 59
    classes ("background"). The 59-class benchmark uses ``reduce_zero_label``: raw 0
    becomes 255 (ignored) and raw k becomes class k - 1; raw 255 stays ignored.
    """
    return voc_like("context", root, split, "JPEGImages", "SegmentationClassContext",
                     "ImageSets/SegmentationContext", CONTEXT59_CLASSES,
                     _prompts(CONTEXT59_CLASSES, _CONTEXT_PROMPTS), None, reduce_zero_label=True,
                     what="PASCAL Context")


def context60(root, split: str = "val") -> Dataset:
    """PASCAL Context with background, 60 classes: raw values are used as they are
    (0 is background, 1..59 the classes of :func:`context59`, 255 ignored). Same layout."""
    classes = ("background",) + CONTEXT59_CLASSES
    return voc_like("context60", root, split, "JPEGImages", "SegmentationClassContext",
                     "ImageSets/SegmentationContext", classes, _prompts(classes, _CONTEXT_PROMPTS), 0,
                     reduce_zero_label=False, what="PASCAL Context")


def _paired(root: pathlib.Path, image_dir: pathlib.Path, label_dir: pathlib.Path, image_glob: str,
            label_of: Callable[[pathlib.Path], pathlib.Path], id_of: Callable[[pathlib.Path], str], what: str,
            hint: str = "") -> tuple[Sample, ...]:
    images = sorted(image_dir.glob(image_glob))
    if not images:
        raise DatasetError(f"{what}: no images match {image_dir / image_glob}")
    samples = tuple(Sample(id_of(p), p, label_of(p)) for p in images)
    missing = [s.label for s in samples if not s.label.is_file()]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise DatasetError(f"{what}: missing annotation {missing[0]}{more}{hint}")
    return samples


def ade20k(root, split: str = "val") -> Dataset:
    """ADE20K (SceneParsing, 150 classes). ``root`` is ``ADEChallengeData2016`` or its parent:
    ``images/validation/*.jpg``, ``annotations/validation/*.png``. Raw 0 ("other") is
    ignored and raw k is class k - 1 (``reduce_zero_label``)."""
    root = _root(root)
    if (root / "ADEChallengeData2016").is_dir():
        root = root / "ADEChallengeData2016"
    sub = {"val": "validation", "validation": "validation", "train": "training", "training": "training"}
    if split not in sub:
        raise DatasetError(f"ADE20K split must be one of {sorted(sub)}, got {split!r}")
    images = _dir(root / "images" / sub[split], "ADE20K images")
    labels = _dir(root / "annotations" / sub[split], "ADE20K annotations")
    samples = _paired(root, images, labels, "*.jpg", lambda p: labels / f"{p.stem}.png", lambda p: p.stem,
                      "ADE20K")
    return Dataset("ade20k", root, split, ADE20K_CLASSES, _prompts(ADE20K_CLASSES, _ADE_PROMPTS), None,
                   "semantic", samples, reduce_zero_label=True)


def _coco_dirs(root, split):
    root = _root(root)
    sub = {"val": "val2017", "val2017": "val2017", "train": "train2017", "train2017": "train2017"}
    if split not in sub:
        raise DatasetError(f"COCO split must be one of {sorted(sub)}, got {split!r}")
    images = _dir(root / "images" / sub[split], "COCO images")
    labels = _dir(root / "annotations" / sub[split], "COCO annotations")
    return root, images, labels


def coco_stuff(root, split: str = "val") -> Dataset:
    """COCO-Stuff 164k, 171 classes, in mmseg's layout: ``images/val2017/<id>.jpg`` and
    ``annotations/val2017/<id>_labelTrainIds.png`` (written by mmseg's
    ``tools/dataset_converters/coco_stuff164k.py``: values 0..170, 255 ignored)."""
    root, images, labels = _coco_dirs(root, split)
    samples = _paired(root, images, labels, "*.jpg", lambda p: labels / f"{p.stem}_labelTrainIds.png",
                      lambda p: p.stem, "COCO-Stuff",
                      "; convert the stuffthingmaps with mmseg's tools/dataset_converters/coco_stuff164k.py")
    return Dataset("coco_stuff", root, split, COCO_STUFF_CLASSES, _prompts(COCO_STUFF_CLASSES, _COCO_PROMPTS),
                   None, "semantic", samples)


def coco_object(root, split: str = "val") -> Dataset:
    """COCO-Object: background plus the 80 COCO things (81 classes), in the layout of the
    GroupViT/TCL converter used by mmseg-based papers: ``images/val2017/<id>.jpg`` and
    ``annotations/val2017/<id>_instanceTrainIds.png`` (0 background, 1..80 things, 255
    ignored)."""
    root, images, labels = _coco_dirs(root, split)
    samples = _paired(root, images, labels, "*.jpg", lambda p: labels / f"{p.stem}_instanceTrainIds.png",
                      lambda p: p.stem, "COCO-Object",
                      "; write *_instanceTrainIds.png with GroupViT's convert_dataset/convert_coco_object.py")
    return Dataset("coco_object", root, split, COCO_OBJECT_CLASSES,
                   _prompts(COCO_OBJECT_CLASSES, _COCO_PROMPTS), 0, "semantic", samples)


def cityscapes(root, split: str = "val") -> Dataset:
    """Cityscapes, 19 classes: ``leftImg8bit/<split>/<city>/<stem>_leftImg8bit.png`` and
    ``gtFine/<split>/<city>/<stem>_gtFine_labelTrainIds.png`` (values 0..18, 255 ignored).
    Sample ids are ``<city>/<stem>``."""
    root = _root(root)
    images = _dir(root / "leftImg8bit" / split, "Cityscapes images")
    labels = _dir(root / "gtFine" / split, "Cityscapes annotations")
    suffix = "_leftImg8bit.png"

    def stem(p):
        return p.name[:-len(suffix)]

    samples = _paired(root, images, labels, f"*/*{suffix}",
                      lambda p: labels / p.parent.name / f"{stem(p)}_gtFine_labelTrainIds.png",
                      lambda p: f"{p.parent.name}/{stem(p)}", "Cityscapes",
                      "; create the *_labelTrainIds.png files with cityscapesscripts' createTrainIdLabelImgs")
    return Dataset("cityscapes", root, split, CITYSCAPES_CLASSES, _prompts(CITYSCAPES_CLASSES, {}), None,
                   "semantic", samples)


#: Columns of OpenImages V7's ``oidv7-<split>-annotations-point-labels.csv``.
OPENIMAGES_POINT_COLUMNS = ("ImageId", "X", "Y", "Label", "EstimatedYesNo", "Source", "YesVotes", "NoVotes",
                            "UnsureVotes", "TextLabel")
_REQUIRED_POINT_COLUMNS = ("ImageId", "X", "Y", "Label", "EstimatedYesNo")


def _class_descriptions(path: pathlib.Path) -> dict[str, str]:
    names = {}
    try:
        with path.open(newline="", encoding="utf-8") as f:
            for n, row in enumerate(csv.reader(f), 1):
                if not row:
                    continue
                if n == 1 and row[:2] == ["LabelName", "DisplayName"]:
                    continue
                if len(row) < 2 or not row[0].strip():
                    raise DatasetError(f"{path}, line {n}: expected LabelName,DisplayName, got {row!r}")
                names[row[0].strip()] = row[1].strip()
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise DatasetError(f"cannot read {path}: {e}") from None
    return names


def openimages(root, split: str = "val") -> Dataset:
    """OpenImages V7 point labels for p-mIoU.

    ``root`` holds ``oidv7-<split>-annotations-point-labels.csv`` (columns
    :data:`OPENIMAGES_POINT_COLUMNS`; X and Y relative to the image size), the class
    descriptions ``oidv7-class-descriptions.csv`` (``LabelName,DisplayName``) and the images
    ``validation/<ImageId>.jpg`` (``test/`` for the test split). "yes" points are positive,
    "no" points negative, "unsure" points are dropped. The classes are the labels that
    have points, sorted by label id; prompts are their display names.
    """
    root = _root(root)
    folder = {"val": "validation", "validation": "validation", "test": "test"}
    if split not in folder:
        raise DatasetError(f"OpenImages split must be one of {sorted(folder)}, got {split!r}")
    short = "val" if folder[split] == "validation" else "test"
    points_csv = _file(root / f"oidv7-{short}-annotations-point-labels.csv", "OpenImages V7 point labels")
    names = _class_descriptions(_file(root / "oidv7-class-descriptions.csv", "OpenImages class descriptions"))
    image_dir = _dir(root / folder[split], "OpenImages images")

    rows: dict[str, list[tuple[str, float, float, bool]]] = {}
    try:
        with points_csv.open(newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            header = reader.fieldnames or []
            missing = [c for c in _REQUIRED_POINT_COLUMNS if c not in header]
            if missing:
                raise DatasetError(f"{points_csv}: missing columns {missing}; expected the header "
                                   f"{','.join(OPENIMAGES_POINT_COLUMNS)}")
            for n, row in enumerate(reader, 2):
                answer = (row["EstimatedYesNo"] or "").strip().lower()
                if answer not in ("yes", "no", "unsure"):
                    raise DatasetError(f"{points_csv}, line {n}: EstimatedYesNo must be yes, no or unsure, got "
                                       f"{row['EstimatedYesNo']!r}")
                try:
                    x, y = float(row["X"]), float(row["Y"])
                except (TypeError, ValueError):
                    raise DatasetError(f"{points_csv}, line {n}: X and Y must be numbers, got "
                                       f"{row['X']!r}, {row['Y']!r}") from None
                if not (0.0 <= x <= 1.0 and 0.0 <= y <= 1.0):
                    raise DatasetError(f"{points_csv}, line {n}: X and Y must be in [0, 1], got {x}, {y}")
                image_id, label = (row["ImageId"] or "").strip(), (row["Label"] or "").strip()
                if not image_id or not label:
                    raise DatasetError(f"{points_csv}, line {n}: empty ImageId or Label")
                if answer != "unsure":
                    rows.setdefault(image_id, []).append((label, x, y, answer == "yes"))
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise DatasetError(f"cannot read {points_csv}: {e}") from None
    if not rows:
        raise DatasetError(f"{points_csv} has no yes/no point labels")
    labels = sorted({r[0] for pts in rows.values() for r in pts})
    unknown = [lab for lab in labels if lab not in names]
    if unknown:
        raise DatasetError(f"labels {unknown[:5]} of {points_csv.name} have no display name in "
                           "oidv7-class-descriptions.csv")
    index = {lab: i for i, lab in enumerate(labels)}
    samples = []
    for image_id in sorted(rows):
        pts = rows[image_id]
        points = Points(np.array([index[p[0]] for p in pts], np.int32), np.array([p[1] for p in pts], np.float32),
                        np.array([p[2] for p in pts], np.float32), np.array([p[3] for p in pts], bool))
        samples.append(Sample(image_id, image_dir / f"{image_id}.jpg", None, points))
    _check_exist(samples, f"OpenImages {split}")
    classes = tuple(labels)
    return Dataset("openimages", root, split, classes, tuple((names[lab],) for lab in labels), None, "points",
                   tuple(samples))


def toy(root, split: str = "val") -> Dataset:
    """gem-jax's synthetic toy scenes in VOC's layout (:func:`gem_jax.toy.dataset.write` writes
    them): 35 classes, the 5 backgrounds and the 30 object phrases, each prompted by its name;
    every pixel has a class (no background class)."""
    from gem_jax.toy.scenes import class_names

    names = class_names()
    return voc_like("toy", root, split, "JPEGImages", "SegmentationClass", "ImageSets/Segmentation", names,
                    tuple((n,) for n in names), None, reduce_zero_label=False, palette=voc_palette(),
                    what="toy scenes")


#: Dataset readers by name.
READERS: dict[str, Callable[..., Dataset]] = {
    "voc": voc,
    "voc20": voc20,
    "context": context59,
    "context60": context60,
    "ade20k": ade20k,
    "coco_stuff": coco_stuff,
    "coco_object": coco_object,
    "cityscapes": cityscapes,
    "openimages": openimages,
    "toy": toy,
}


def open_dataset(name: str, root, split: str = "val") -> Dataset:
    """Reads the dataset ``name`` (a key of :data:`READERS`) from ``root``.

    Raises :class:`DatasetError` naming the expected path when the layout is not there.
    """
    if name not in READERS:
        raise DatasetError(f"unknown dataset {name!r}; choose one of {', '.join(READERS)}")
    return READERS[name](root, split)
