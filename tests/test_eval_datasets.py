"""Dataset readers on synthetic copies of each benchmark's exact on-disk layout, and their errors."""

from __future__ import annotations

import csv
import pathlib

import numpy as np
import pytest
from PIL import Image

from gem_jax.eval import datasets as D
from gem_jax.eval.datasets import DatasetError

# ---- layout builders (also used by test_eval_runner.py) ---------------------------


def write_jpeg(path, h, w, seed=0):
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    # Smooth colour blobs rather than noise, so JPEG keeps them roughly.
    small = rng.integers(0, 256, (max(h // 8, 1), max(w // 8, 1), 3), dtype=np.uint8)
    Image.fromarray(small).resize((w, h), Image.Resampling.BILINEAR).save(path, quality=90)


def write_png(path, h, w, seed=0):
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)).save(path)


def write_label(path, raw, palette=None):
    """An index PNG: palette mode 'P' with ``palette`` (N, 3), else greyscale 'L'."""
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    im = Image.fromarray(np.asarray(raw, np.uint8), mode="P" if palette is not None else "L")
    if palette is not None:
        im.putpalette(np.asarray(palette, np.uint8).reshape(-1).tolist())
    im.save(path)


def random_label(h, w, values, seed, ignore=255, ignore_frac=0.1):
    """Blocky random labels from ``values``, with some ``ignore`` pixels (None: none)."""
    rng = np.random.default_rng(seed)
    blocks = rng.choice(values, size=(-(-h // 8), -(-w // 8)))
    raw = np.kron(blocks, np.ones((8, 8), int))[:h, :w].astype(np.uint8)
    if ignore is not None:
        raw[rng.random((h, w)) < ignore_frac] = ignore
    return raw


VOC_SPECS = (("2007_000032", 40, 56), ("2007_000039", 33, 47), ("2007_000063", 40, 56))


def make_voc(root, specs=VOC_SPECS, seed=0):
    """VOCdevkit/VOC2012: JPEGImages, SegmentationClass (VOC palette PNGs), ImageSets/Segmentation/val.txt.
    Returns {id: raw label}."""
    root = pathlib.Path(root)
    raws = {}
    for k, (i, h, w) in enumerate(specs):
        write_jpeg(root / "JPEGImages" / f"{i}.jpg", h, w, seed + k)
        raws[i] = random_label(h, w, np.arange(21), seed + k)
        write_label(root / "SegmentationClass" / f"{i}.png", raws[i], D.voc_palette())
    split = root / "ImageSets" / "Segmentation" / "val.txt"
    split.parent.mkdir(parents=True, exist_ok=True)
    split.write_text("\n".join(i for i, _, _ in specs) + "\n")
    return raws


def make_context(root, specs=(("2008_000002", 40, 56), ("2008_000003", 33, 47)), seed=0):
    """VOC2010 in mmseg's PASCAL Context layout (greyscale PNGs with raw values 0..59)."""
    root = pathlib.Path(root)
    raws = {}
    for k, (i, h, w) in enumerate(specs):
        write_jpeg(root / "JPEGImages" / f"{i}.jpg", h, w, seed + k)
        raws[i] = random_label(h, w, np.arange(60), seed + k, ignore=None)
        write_label(root / "SegmentationClassContext" / f"{i}.png", raws[i])
    split = root / "ImageSets" / "SegmentationContext" / "val.txt"
    split.parent.mkdir(parents=True, exist_ok=True)
    split.write_text("\n".join(i for i, _, _ in specs) + "\n")
    return raws


def make_ade(root, stems=("ADE_val_00000002", "ADE_val_00000001"), seed=0):
    """ADEChallengeData2016/images/validation/*.jpg and annotations/validation/*.png (raw 0..150)."""
    base = pathlib.Path(root) / "ADEChallengeData2016"
    raws = {}
    for k, s in enumerate(stems):
        write_jpeg(base / "images" / "validation" / f"{s}.jpg", 40, 56, seed + k)
        raws[s] = random_label(40, 56, np.arange(151), seed + k, ignore=None)
        write_label(base / "annotations" / "validation" / f"{s}.png", raws[s])
    return raws


def make_coco(root, kind="stuff", stems=("000000000139", "000000000285"), seed=0):
    """mmseg's COCO layout: images/val2017/*.jpg and annotations/val2017/*_labelTrainIds.png
    (stuff, 0..170) or *_instanceTrainIds.png (object, 0..80)."""
    root = pathlib.Path(root)
    suffix, n = ("_labelTrainIds", 171) if kind == "stuff" else ("_instanceTrainIds", 81)
    raws = {}
    for k, s in enumerate(stems):
        write_jpeg(root / "images" / "val2017" / f"{s}.jpg", 40, 56, seed + k)
        raws[s] = random_label(40, 56, np.arange(n), seed + k)
        write_label(root / "annotations" / "val2017" / f"{s}{suffix}.png", raws[s])
    return raws


def make_cityscapes(root, names=(("frankfurt", "frankfurt_000000_000294"), ("lindau", "lindau_000000_000019")),
                    seed=0):
    """leftImg8bit/val/<city>/<stem>_leftImg8bit.png and gtFine/val/<city>/<stem>_gtFine_labelTrainIds.png."""
    root = pathlib.Path(root)
    raws = {}
    for k, (city, stem) in enumerate(names):
        write_png(root / "leftImg8bit" / "val" / city / f"{stem}_leftImg8bit.png", 32, 64, seed + k)
        raws[f"{city}/{stem}"] = random_label(32, 64, np.arange(19), seed + k)
        write_label(root / "gtFine" / "val" / city / f"{stem}_gtFine_labelTrainIds.png", raws[f"{city}/{stem}"])
        # The raw download's other files sit beside it.
        write_label(root / "gtFine" / "val" / city / f"{stem}_gtFine_labelIds.png", np.zeros((32, 64)))
    return raws


OI_CLASSES = {"/m/01g317": "Person", "/m/0bt9lr": "Dog", "/m/01yrx": "Cat", "/m/0k4j": "Car"}
OI_HEADER = ["ImageId", "X", "Y", "Label", "EstimatedYesNo", "Source", "YesVotes", "NoVotes", "UnsureVotes",
             "TextLabel"]


def make_openimages(root, image_ids=("0a1b2c3d4e5f6071", "00ff00ff00ff00ff"), seed=0, points_per_image=14):
    """OpenImages V7: the validation point-label CSV with its real header, the class
    descriptions CSV and validation/<ImageId>.jpg. Returns the rows written."""
    root = pathlib.Path(root)
    rng = np.random.default_rng(seed)
    rows = []
    labels = list(OI_CLASSES)
    for k, image_id in enumerate(image_ids):
        write_jpeg(root / "validation" / f"{image_id}.jpg", 40, 56, seed + k)
        chosen = labels[k % 2: k % 2 + 3]
        for j in range(points_per_image):
            answer = ["yes", "no", "yes", "unsure"][j % 4]
            rows.append([image_id, f"{rng.random():.6f}", f"{rng.random():.6f}", chosen[j % len(chosen)], answer,
                         "ih", "2" if answer == "yes" else "0", "1", "0", ""])
    with (root / "oidv7-val-annotations-point-labels.csv").open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(OI_HEADER)
        w.writerows(rows)
    with (root / "oidv7-class-descriptions.csv").open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["LabelName", "DisplayName"])
        w.writerows([[k, v] for k, v in OI_CLASSES.items()] + [["/m/0unused", "Unused"]])
    return rows


# ---- class names -------------------------------------------------------------------


def test_class_lists_are_the_benchmarks():
    assert len(D.VOC_CLASSES) == 21 and D.VOC_CLASSES[0] == "background" and D.VOC_CLASSES[15] == "person"
    assert len(D.CONTEXT59_CLASSES) == 59 and D.CONTEXT59_CLASSES[-1] == "wood"
    assert len(D.ADE20K_CLASSES) == 150 and D.ADE20K_CLASSES[:3] == ("wall", "building", "sky")
    assert D.ADE20K_CLASSES[-1] == "flag"
    assert len(D.COCO_STUFF_CLASSES) == 171 and D.COCO_STUFF_CLASSES[80] == "banner"
    assert D.COCO_STUFF_CLASSES[-1] == "wood" and len(D.COCO_OBJECT_CLASSES) == 81
    assert len(D.CITYSCAPES_CLASSES) == 19 and D.CITYSCAPES_CLASSES[-1] == "bicycle"
    for names in (D.VOC_CLASSES, D.CONTEXT59_CLASSES, D.ADE20K_CLASSES, D.COCO_STUFF_CLASSES, D.CITYSCAPES_CLASSES):
        assert len(set(names)) == len(names)


def test_voc_palette():
    pal = D.voc_palette()
    assert pal.shape == (256, 3)
    assert tuple(pal[0]) == (0, 0, 0) and tuple(pal[1]) == (128, 0, 0) and tuple(pal[15]) == (192, 128, 128)
    assert tuple(pal[255]) == (224, 224, 192)


# ---- readers -----------------------------------------------------------------------


def test_voc_reads_split_and_palette_labels(tmp_path):
    raws = make_voc(tmp_path)
    ds = D.open_dataset("voc", tmp_path)
    assert [s.id for s in ds] == [i for i, _, _ in VOC_SPECS] and len(ds) == 3
    assert ds.num_classes == 21 and ds.background == 0 and ds.kind == "semantic"
    s = ds.samples[1]
    assert s.image == tmp_path / "JPEGImages" / "2007_000039.jpg"
    assert s.label == tmp_path / "SegmentationClass" / "2007_000039.png"
    label = ds.load_label(s, (33, 47))
    np.testing.assert_array_equal(label, raws[s.id])  # raw values are the classes; 255 stays
    assert label.dtype == np.int32 and (label == 255).any()
    assert ds.prompts[20][0] == "tv monitor" and "person in shirt" in ds.prompts[15]


def test_voc20_drops_background(tmp_path):
    raws = make_voc(tmp_path)
    ds = D.open_dataset("voc20", tmp_path)
    assert ds.num_classes == 20 and ds.background is None
    raw = raws[ds.samples[0].id]
    label = ds.load_label(ds.samples[0])
    np.testing.assert_array_equal(label, np.where((raw == 0) | (raw == 255), 255, raw.astype(int) - 1))


def test_context_59_reduces_zero_label_and_60_keeps_it(tmp_path):
    raws = make_context(tmp_path)
    c59 = D.open_dataset("context", tmp_path)
    c60 = D.open_dataset("context60", tmp_path)
    assert c59.num_classes == 59 and c60.num_classes == 60 and c60.background == 0 and c59.background is None
    assert c59.classes == c60.classes[1:]
    s = c59.samples[0]
    raw = raws[s.id]
    assert (raw == 0).any()
    np.testing.assert_array_equal(c59.load_label(s), np.where(raw == 0, 255, raw.astype(int) - 1))
    np.testing.assert_array_equal(c60.load_label(c60.samples[0]), raw)
    assert s.label == tmp_path / "SegmentationClassContext" / f"{s.id}.png"


def test_ade20k_from_parent_or_itself(tmp_path):
    raws = make_ade(tmp_path)
    for root in (tmp_path, tmp_path / "ADEChallengeData2016"):
        ds = D.open_dataset("ade20k", root)
        assert [s.id for s in ds] == ["ADE_val_00000001", "ADE_val_00000002"]  # sorted
        assert ds.num_classes == 150
        raw = raws[ds.samples[0].id]
        np.testing.assert_array_equal(ds.load_label(ds.samples[0]), np.where(raw == 0, 255, raw.astype(int) - 1))


@pytest.mark.parametrize("kind", ["stuff", "object"])
def test_coco(tmp_path, kind):
    raws = make_coco(tmp_path, kind)
    ds = D.open_dataset("coco_" + kind, tmp_path)
    assert ds.num_classes == (171 if kind == "stuff" else 81)
    assert ds.background == (None if kind == "stuff" else 0)
    s = ds.samples[0]
    assert s.id == "000000000139" and s.image == tmp_path / "images" / "val2017" / "000000000139.jpg"
    np.testing.assert_array_equal(ds.load_label(s), raws[s.id])
    assert ds.prompts[ds.classes.index("tv")][0] == "tv"
    if kind == "stuff":
        assert ds.prompts[ds.classes.index("wall-brick")] == ("brick wall",)


def test_cityscapes_ids_are_city_and_stem(tmp_path):
    raws = make_cityscapes(tmp_path)
    ds = D.open_dataset("cityscapes", tmp_path)
    assert [s.id for s in ds] == ["frankfurt/frankfurt_000000_000294", "lindau/lindau_000000_000019"]
    s = ds.samples[0]
    assert s.label.name == "frankfurt_000000_000294_gtFine_labelTrainIds.png"
    np.testing.assert_array_equal(ds.load_label(s, (32, 64)), raws[s.id])


def test_openimages_points(tmp_path):
    rows = make_openimages(tmp_path)
    ds = D.open_dataset("openimages", tmp_path)
    assert ds.kind == "points" and [s.id for s in ds] == sorted({r[0] for r in rows})
    used = sorted({r[3] for r in rows if r[4] != "unsure"})
    assert ds.classes == tuple(used)
    assert [p[0] for p in ds.prompts] == [OI_CLASSES[c] for c in used]
    for s in ds:
        mine = [r for r in rows if r[0] == s.id and r[4] != "unsure"]  # unsure points dropped
        assert len(s.points.classes) == len(mine)
        np.testing.assert_allclose(s.points.x, [float(r[1]) for r in mine], atol=1e-6)
        np.testing.assert_allclose(s.points.y, [float(r[2]) for r in mine], atol=1e-6)
        np.testing.assert_array_equal(s.points.positive, [r[4] == "yes" for r in mine])
        assert [ds.classes[c] for c in s.points.classes] == [r[3] for r in mine]
        assert s.image == tmp_path / "validation" / f"{s.id}.jpg"


# ---- bad input ---------------------------------------------------------------------


@pytest.mark.parametrize("name", list(D.READERS))
def test_missing_root_names_the_path(tmp_path, name):
    with pytest.raises(DatasetError, match="not found") as e:
        D.open_dataset(name, tmp_path / "nowhere")
    assert str(tmp_path / "nowhere") in str(e.value)


@pytest.mark.parametrize("name", list(D.READERS))
def test_empty_root_names_the_expected_path(tmp_path, name):
    with pytest.raises(DatasetError) as e:
        D.open_dataset(name, tmp_path)
    assert str(tmp_path) in str(e.value) and "expected" in str(e.value)


def test_missing_split_file_and_listed_image(tmp_path):
    make_voc(tmp_path)
    split = tmp_path / "ImageSets" / "Segmentation" / "val.txt"
    split.unlink()
    with pytest.raises(DatasetError, match=r"ImageSets/Segmentation/val\.txt"):
        D.voc(tmp_path)
    split.write_text("2007_000032\n2009_999999\n")
    with pytest.raises(DatasetError, match="2009_999999.jpg"):
        D.voc(tmp_path)
    split.write_text("\n\n")
    with pytest.raises(DatasetError, match="no images"):
        D.voc(tmp_path)
    with pytest.raises(DatasetError, match="unknown dataset"):
        D.open_dataset("pascal", tmp_path)


def test_annotation_of_wrong_size_palette_or_values(tmp_path):
    make_voc(tmp_path)
    ds = D.voc(tmp_path)
    s = ds.samples[0]
    with pytest.raises(DatasetError, match="56x40 .* image is 57x40"):
        ds.load_label(s, (40, 57))
    # A colour-coded RGB annotation.
    Image.fromarray(np.zeros((40, 56, 3), np.uint8)).save(s.label)
    with pytest.raises(DatasetError, match="RGB colour image"):
        ds.load_label(s)
    # A palette PNG whose palette is not VOC's.
    raw = random_label(40, 56, np.arange(21), 0)
    write_label(s.label, raw, np.random.default_rng(0).integers(0, 256, (256, 3)))
    with pytest.raises(DatasetError, match="palette"):
        ds.load_label(s)
    # Values outside the classes.
    raw[0, 0] = 37
    write_label(s.label, raw, D.voc_palette())
    with pytest.raises(DatasetError, match=r"values \[37\]"):
        ds.load_label(s)
    # Not an image at all.
    s.label.write_bytes(b"not a png")
    with pytest.raises(DatasetError, match="cannot read annotation"):
        ds.load_label(s)


def test_missing_annotations_hint_at_the_converter(tmp_path):
    make_cityscapes(tmp_path)
    next((tmp_path / "gtFine").rglob("*_labelTrainIds.png")).unlink()
    with pytest.raises(DatasetError, match="createTrainIdLabelImgs"):
        D.cityscapes(tmp_path)
    make_coco(tmp_path / "coco")
    next((tmp_path / "coco").rglob("*_labelTrainIds.png")).unlink()
    with pytest.raises(DatasetError, match="coco_stuff164k.py"):
        D.coco_stuff(tmp_path / "coco")


def test_malformed_openimages_csv(tmp_path):
    make_openimages(tmp_path)
    path = tmp_path / "oidv7-val-annotations-point-labels.csv"
    good = path.read_text()
    path.write_text(good.replace("EstimatedYesNo", "Answer", 1))
    with pytest.raises(DatasetError, match=r"missing columns \['EstimatedYesNo'\]"):
        D.openimages(tmp_path)
    lines = good.splitlines()
    path.write_text("\n".join(lines[:3] + [lines[3].replace(lines[3].split(",")[1], "1.7", 1)] + lines[4:]))
    with pytest.raises(DatasetError, match="line 4: X and Y must be in"):
        D.openimages(tmp_path)
    path.write_text(good.replace("/m/0k4j", "/m/0nope"))
    with pytest.raises(DatasetError, match="no display name"):
        D.openimages(tmp_path)
    path.write_text(good)
    next((tmp_path / "validation").glob("*.jpg")).unlink()
    with pytest.raises(DatasetError, match="missing file"):
        D.openimages(tmp_path)
