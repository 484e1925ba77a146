"""The official pipelines' options: template sets, class-name files, protocol settings as read
from each repository's configs, window borders, and `gem-jax eval --protocol ...` end to end."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
from PIL import Image

from gem_jax.eval import class_names as C
from gem_jax import preprocess
from gem_jax.eval import sliding
from gem_jax.cli import eval as command
from gem_jax.eval import protocols
from gem_jax.eval import datasets as D
from gem_jax.eval.protocols import PROTOCOLS, get_protocol
from gem_jax.pipeline import GEM
from gem_jax.text import TEMPLATE_SETS, imagenet_templates, template_set
from gem_jax.eval.images import MMSEG_STEPS, read_opencv, resize_opencv_linear
from gem_jax.eval.sliding import rescaled_size, sliding_logits
from gem_jax.cli import main as cli_main
from test_eval_datasets import make_voc
from test_eval_runner import gem, model, np_bilinear, parse  # noqa: F401  (gem, model: fixtures)

# ---------------------------------------------------------------------------- templates

SCENE = ("there is a {} in the scene.", "there is the {} in the scene.", "this is a {} in the scene.",
         "this is the {} in the scene.", "this is one {} in the scene.")


def test_template_sets():
    assert TEMPLATE_SETS == ("imagenet", "imagenet85")
    eighty = template_set("imagenet")
    assert len(eighty) == 80 == len(set(eighty)) and eighty == imagenet_templates()
    assert "a photo of a {}." in eighty and "itap of my {}." in eighty
    full = template_set("imagenet85")
    assert len(full) == 85 == len(set(full))
    assert full[:80] == eighty and full[80:] == SCENE  # MaskCLIP prompt_engineering.py, CLIP Surgery clip.py
    with pytest.raises(ValueError, match="template set"):
        template_set("imagenet81")


def test_gem_accepts_the_85_templates(model):
    assert len(GEM(model, layers=2, template="imagenet85").templates) == 85
    assert GEM(model, layers=2, template="imagenet").templates == template_set("imagenet")


# ---------------------------------------------------------------------------- class-name files

DATASET_CLASSES = {
    "voc": D.VOC_CLASSES, "voc20": D.VOC_CLASSES[1:], "context": D.CONTEXT59_CLASSES,
    "context60": ("background",) + D.CONTEXT59_CLASSES, "ade20k": D.ADE20K_CLASSES,
    "coco_stuff": D.COCO_STUFF_CLASSES, "coco_object": D.COCO_OBJECT_CLASSES, "cityscapes": D.CITYSCAPES_CLASSES,
}
# The 26 stuff words of SCLIP's and NACLIP's VOC / COCO-Object background line.
STUFF = ("sky, wall, tree, wood, grass, road, sea, river, mountain, sands, desk, bed, building, cloud, lamp, door, "
         "window, wardrobe, ceiling, shelf, curtain, stair, floor, hill, rail, fence").split(", ")


def test_parse_class_names():
    with pytest.raises(ValueError, match="line 3"):  # a blank line between classes
        C.parse_class_names("sky, wall\nperson\n\ntv monitor, screen\n", "x")
    names = C.parse_class_names("sky, wall\nperson\ntv monitor, screen\n\n")
    assert names.names == (("sky", "wall"), ("person",), ("tv monitor", "screen"))
    q, cls = names.queries()
    assert q == ("sky", "wall", "person", "tv monitor", "screen") and cls.tolist() == [0, 0, 1, 2, 2]
    with pytest.raises(ValueError, match="empty class name"):
        C.parse_class_names("a, , b\n")
    with pytest.raises(ValueError, match="no class names"):
        C.parse_class_names("\n\n")


def _norm(s):
    return re.sub(r"[^a-z]", "", s.lower())


@pytest.mark.parametrize("name_set", C.NAME_SETS)
def test_bundled_class_names_fit_the_datasets(name_set):
    for ds in C.available(name_set):
        names = C.class_names(name_set, ds)
        classes = DATASET_CLASSES[ds]
        assert names.num_classes == len(classes), (name_set, ds)
        # In the dataset's class order: nearly every line names its class (a few are
        # renamed, e.g. "ship" for boat, "sky, wall, ..." for background).
        agree = sum(any(_norm(n) in _norm(c) or _norm(c) in _norm(n) for n in line)
                    for line, c in zip(names.names, classes))
        assert agree >= 0.9 * len(classes), (name_set, ds, agree)


def test_background_and_synonym_lines():
    for ds in ("voc", "coco_object"):
        assert list(C.class_names("sclip", ds).names[0]) == STUFF and len(STUFF) == 26
        assert C.class_names("clearclip", ds).names[0] == ("background",)
    voc = C.class_names("sclip", "voc").names
    assert voc[15][:2] == ("person", "person in shirt") and len(voc[15]) == 7
    assert voc[20] == ("television monitor", "tv monitor", "monitor", "television", "screen")
    assert C.class_names("clearclip", "voc").names[15] == ("person",)
    assert C.class_names("clearclip", "voc").names[20] == ("tvmonitor",)
    # ClearCLIP repeats SCLIP's lists for the other datasets.
    assert C.class_names("clearclip", "ade20k").names == C.class_names("sclip", "ade20k").names
    assert C.class_names("maskclip", "voc20").names[0] == ("airplane",)
    with pytest.raises(ValueError, match="no list for 'voc'"):
        C.class_names("maskclip", "voc")
    with pytest.raises(ValueError, match="unknown class-name set"):
        C.class_names("mine", "voc")


# ---------------------------------------------------------------------------- protocol settings

def effective(protocol_name, dataset):
    p = get_protocol(protocol_name).for_dataset(dataset)
    return {
        "resize": (p.max_long_side, p.short_side),
        "slide": (p.crop, p.stride) if p.crop is not None else None,
        "logit_scale": p.logit_scale,
        "prob_thd": p.background_threshold,
        "area_thd": p.area_threshold,
        "pamr": (p.pamr_iterations, p.pamr_dilations) if p.pamr_iterations else None,
        "template": p.template, "names": p.class_names, "border": p.border, "method": p.method,
    }


# What each official repository's code and per-dataset configs set (read from the files cited).
SCLIP = {  # wangf3014/SCLIP
    # clip_segmentor.py: logit_scale=40, prob_thd=0.0, slide_stride=112, slide_crop=224, pamr_steps=0,
    # area_thd=None; prompts/imagenet_template.py (80); the crop's patch conv drops the remainder.
    "_": dict(slide=(224, 112), logit_scale=40.0, area_thd=None, pamr=None, template="imagenet", names="sclip",
              border="truncate", method="sclip"),
    "voc": dict(resize=(2048, 336), logit_scale=65.0, prob_thd=0.1, area_thd=0.1),  # configs/cfg_voc21.py
    "context60": dict(resize=(2048, 336), logit_scale=50.0, prob_thd=0.1),  # configs/cfg_context60.py
    "coco_object": dict(resize=(2048, 336), logit_scale=50.0, prob_thd=0.1),  # configs/cfg_coco_object.py
    "voc20": dict(resize=(2048, 336)),  # configs/cfg_voc20.py
    "cityscapes": dict(resize=(2048, 560)),  # configs/cfg_city_scapes.py
    "context": dict(resize=(2048, 336)),  # configs/cfg_context59.py
    "ade20k": dict(resize=(2048, 336)),  # configs/cfg_ade20k.py
    "coco_stuff": dict(resize=(2048, 448)),  # configs/cfg_coco_stuff164k.py
}
NACLIP = {  # sinahmr/NACLIP
    # naclip.py: prob_thd=0.0, logit_scale=40, slide_stride=112, slide_crop=224, pamr_stride=(8, 16);
    # eval.py --pamr on (README, test_all.sh): pamr_steps=10.
    "_": dict(slide=(224, 112), logit_scale=40.0, area_thd=None, pamr=(10, (8, 16)), template="imagenet",
              names="sclip", border="truncate", method="naclip"),
    "voc": dict(resize=(2048, 336), prob_thd=0.1, slide=None),  # configs/cfg_voc21.py (slide_crop=0)
    "context60": dict(resize=(2048, 336), prob_thd=0.1),  # configs/cfg_context60.py
    "coco_object": dict(resize=(2048, 336), prob_thd=0.1),  # configs/cfg_coco_object.py
    "voc20": dict(resize=(2048, 336), slide=None),  # configs/cfg_voc20.py (slide_crop=0)
    "cityscapes": dict(resize=(2048, 560)),  # configs/cfg_city_scapes.py
    "context": dict(resize=(2048, 336)),  # configs/cfg_context59.py
    "ade20k": dict(resize=(2048, 336)),  # configs/cfg_ade20k.py
    "coco_stuff": dict(resize=(2048, 336)),  # configs/cfg_coco_stuff164k.py
}
CLEARCLIP = {  # mc-lan/ClearCLIP
    # clearclip_segmentor.py: prob_thd=0.0, logit_scale=50, slide_stride=224, slide_crop=448,
    # compute_padsize (zero padding split between both sides); openai_imagenet_template.
    "_": dict(slide=(448, 224), logit_scale=50.0, area_thd=None, pamr=None, template="imagenet",
              names="clearclip", border="pad_center", method="clearclip"),
    "voc": dict(resize=(2048, 448), prob_thd=0.5),  # configs/cfg_voc21.py
    "context60": dict(resize=(2048, 448), prob_thd=0.15),  # configs/cfg_context60.py
    "coco_object": dict(resize=(2048, 448), prob_thd=0.4),  # configs/cfg_coco_object.py
    "voc20": dict(resize=(2048, 448)),  # configs/cfg_voc20.py
    "cityscapes": dict(resize=(2048, 448), slide=(224, 224)),  # configs/cfg_city_scapes.py (slide_crop=224)
    "context": dict(resize=(2048, 448)),  # configs/cfg_context59.py
    "ade20k": dict(resize=(2048, 448)),  # configs/cfg_ade20k.py
    "coco_stuff": dict(resize=(2048, 448)),  # configs/cfg_coco_stuff164k.py
}
MASKCLIP = {  # chongzhou96/MaskCLIP
    # configs/_base_/models/maskclip_vit16.py: test_cfg mode='whole'; mmseg/models/backbones/vit.py:
    # PatchEmbed padding='corner'; tools/maskclip_utils/prompt_engineering.py: 85 templates.
    "_": dict(slide=None, area_thd=None, pamr=None, template="imagenet85", names="maskclip", border="pad_corner",
              method="maskclip"),
    "voc20": dict(resize=(2048, 512)),  # configs/_base_/datasets/pascal_voc12_aug_20.py img_scale
    "context": dict(resize=(520, 520)),  # configs/_base_/datasets/pascal_context_59.py img_scale
    "coco_stuff": dict(resize=(2048, 512)),  # configs/_base_/datasets/coco-stuff164k.py img_scale
    "cityscapes": dict(resize=(1024, 512)),  # configs/maskclip/maskclip_vit16_1024x512_cityscapes.py img_scale
    "ade20k": dict(resize=(2048, 512)),  # configs/_base_/datasets/ade20k.py img_scale
}
BACKGROUND = {"voc", "context60", "coco_object"}


@pytest.mark.parametrize("name,table", [("sclip", SCLIP), ("naclip", NACLIP), ("clearclip", CLEARCLIP),
                                        ("maskclip", MASKCLIP)])
def test_protocol_settings_equal_the_official_configs(name, table):
    datasets = [d for d in table if d != "_"]
    assert set(PROTOCOLS[name].datasets) == set(datasets)
    for ds in datasets:
        want = {**table["_"], **table[ds]}
        got = effective(name, ds)
        if ds not in BACKGROUND:  # the probability threshold acts on the background class only
            want.pop("prob_thd", None)
            got.pop("prob_thd")
        if name == "maskclip":  # argmax without a background class: the scale changes nothing
            got.pop("logit_scale")
        assert got == want, (name, ds)
    with pytest.raises(ValueError, match="settings for"):
        PROTOCOLS["maskclip"].for_dataset("voc")


def test_rescaled_sizes_of_the_mmseg_resize():
    # mmseg keep-ratio Resize(scale=(long, short)): one factor, min(long / max side, short / min side).
    assert rescaled_size(375, 500, 336, 2048) == (336, 448)
    assert rescaled_size(1024, 2048, 560, 2048) == (560, 1120)
    assert rescaled_size(1024, 2048, 512, 1024) == (512, 1024)     # MaskCLIP Cityscapes
    assert rescaled_size(375, 500, 520, 520) == (390, 520)         # MaskCLIP Context-59: longer side 520


# ---------------------------------------------------------------------------- window borders

def patch_grid(logits, patch=8):
    """The patch-grid logits whose bilinear upsampling the model returned, by least squares
    (checked: upsampling them again gives the model's logits back)."""
    def up(n):  # (n * patch, n): column i is unit vector i upsampled
        return np_bilinear(np.eye(n)[:, None, :], (1, n * patch))[:, 0, :].T

    gh, gw = logits.shape[-2] // patch, logits.shape[-1] // patch
    rows, cols = up(gh), up(gw)  # (h, gh), (w, gw)
    grid = np.einsum("gh,phw,kw->pgk", np.linalg.lstsq(rows, np.eye(len(rows)), rcond=None)[0], logits,
                     np.linalg.lstsq(cols, np.eye(len(cols)), rcond=None)[0])
    np.testing.assert_allclose(np_bilinear(grid, logits.shape[-2:]), logits, atol=1e-5)
    return grid


def test_window_borders(gem):
    img = np.random.default_rng(3).integers(0, 256, (40, 45, 3), dtype=np.uint8)
    prompts = ["cat", "dog"]
    heat = lambda x, size: np.asarray(gem.heatmaps(x, prompts, size=size).logits[0], np.float64)
    grid = lambda pixels: np.asarray(gem.pixel_logits(pixels, prompts)[0], np.float64)
    pixels = preprocess.normalize(img)
    # One window over the whole image (crop=None), sides 40 x 45 with 8-pixel patches.
    whole = lambda border: sliding_logits(gem, img, prompts, crop=None, stride=None, short_side=40,
                                          border=border)
    # SCLIP / NACLIP: the patch conv sees 40 x 40 (a 5 x 5 grid), whose logits are stretched
    # over 40 x 45 in one bilinear step.
    seen = grid(pixels[:, :40])
    assert seen.shape == (2, 5, 5)
    np.testing.assert_allclose(whole("truncate"), np_bilinear(seen, (40, 45)), atol=1e-5)
    np.testing.assert_allclose(patch_grid(heat(img[:, :40], (40, 40))), seen, atol=1e-5)
    assert np.abs(whole("truncate") - np_bilinear(np_bilinear(seen, (40, 40)), (40, 45))).max() > 1e-4
    # ClearCLIP: the normalised crop padded with zeros to 40 x 48, 1 column left and 2 right,
    # logits at the padded size cut back.
    padded = np.zeros((40, 48, 3), np.float32)
    padded[:, 1:46] = pixels
    np.testing.assert_allclose(whole("pad_center"), np_bilinear(grid(padded), (40, 48))[:, :, 1:46], atol=1e-5)
    # MaskCLIP: padded with zeros at the right, the 5 x 6 grid's logits stretched over 40 x 45.
    padded[:] = 0
    padded[:, :45] = pixels
    np.testing.assert_allclose(whole("pad_corner"), np_bilinear(grid(padded), (40, 45)), atol=1e-5)
    # Zero after normalisation is not CLIP's mean colour in uint8 (123, 117, 104), which is
    # 0.003 .. 0.007 off: the padding is the official code's exact zero.
    mean_colour = np.empty((40, 48, 3), np.uint8)
    mean_colour[:] = (123, 117, 104)
    mean_colour[:, :45] = img
    assert np.abs(preprocess.normalize(mean_colour)[:, 45:]).min() > 1e-3
    assert np.abs(whole("pad_corner") - np_bilinear(grid(preprocess.normalize(mean_colour)), (40, 45))).max() > 0
    assert sliding.BORDERS == protocols.BORDERS
    # The borders differ from one another and from gem-jax's resize.
    outs = [whole(b) for b in ("resize", "truncate", "pad_center", "pad_corner")]
    assert all(np.abs(a - b).max() > 1e-4 for i, a in enumerate(outs) for b in outs[i + 1:])
    # Sliding windows with a border: 24-pixel crops, stride 16, over 40 x 45: the last column
    # of windows ends at the border (x 21..45), every window a patch multiple but the image not.
    got = sliding_logits(gem, img, prompts, crop=24, stride=16, short_side=40, border="pad_center")
    total, count = np.zeros((2, 40, 45)), np.zeros((40, 45))
    for y1, y2, x1, x2 in [(y, y + 24, x, x + 24) for y in (0, 16) for x in (0, 16, 21)]:
        total[:, y1:y2, x1:x2] += heat(img[y1:y2, x1:x2], (24, 24))
        count[y1:y2, x1:x2] += 1
    np.testing.assert_allclose(got, total / count, atol=1e-5)
    with pytest.raises(ValueError, match="border"):
        sliding_logits(gem, img, prompts, border="mirror")
    with pytest.raises(ValueError, match="no whole"):
        sliding_logits(gem, img[:5], prompts, crop=None, stride=None, short_side=5, border="truncate")
    with pytest.raises(ValueError, match="multiples of the patch size"):
        gem.pixel_logits(np.zeros((1, 30, 32, 3), np.float32), prompts)


# ---------------------------------------------------------------------------- end to end

def _softmax(x, axis=0):
    e = np.exp(x - x.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


@pytest.fixture
def cli_env(tmp_path, model, monkeypatch):
    from gem_jax import loading

    monkeypatch.setattr(loading, "load", lambda name=None, **kw: model)
    make_voc(tmp_path / "voc", specs=(("2007_000032", 30, 38),))
    return tmp_path


@pytest.mark.parametrize("protocol,dataset", [("sclip", "voc"), ("clearclip", "voc"), ("maskclip", "voc20")])
def test_eval_command_runs_each_protocol(cli_env, protocol, dataset, capsys):
    out = cli_env / f"{protocol}.json"
    argv = ["eval", "--dataset", dataset, "--root", str(cli_env / "voc"), "--protocol", protocol,
            "--method", "gem", "--gem-layers", "2", "--no-progress", "--out", str(out)]
    assert cli_main(argv) == 0, capsys.readouterr().err
    result = json.loads(out.read_text())
    assert result["protocol"] == protocol and result["evaluated"] == 1 and result["num_templates"] == (
        85 if protocol == "maskclip" else 80)
    settings = result["protocol_settings"]
    assert settings["class_names"] == protocol and settings["method"] == protocol
    names = C.class_names(protocol, dataset).names
    assert result["prompts"] == {D.open_dataset(dataset, cli_env / "voc").classes[c]: list(n)
                                 for c, n in enumerate(names)}
    assert 0.0 <= result["mIoU"] <= 100.0


def test_eval_command_naclip_equals_the_official_steps(cli_env, gem, model, capsys):
    """`gem-jax eval --protocol naclip` on VOC: the whole image at short side 336 (whole
    patches), logits bilinearly to the annotation size, PAMR (the official code's port),
    softmax of 40 * cosine, max over synonyms, background below 0.1."""
    from test_postprocess import torch_pamr
    import torch

    pred_dir = cli_env / "pred"
    argv = ["eval", "--dataset", "voc", "--root", str(cli_env / "voc"), "--protocol", "naclip", "--method", "gem",
            "--gem-layers", "2", "--no-progress", "--out", str(cli_env / "n.json"), "--save-predictions",
            str(pred_dir)]
    assert cli_main(argv) == 0, capsys.readouterr().err
    result = json.loads((cli_env / "n.json").read_text())
    assert result["protocol_settings"]["pamr_iterations"] == 10

    ds = D.voc(cli_env / "voc")
    sample = ds.samples[0]
    image = read_opencv(sample.image)  # 30 x 38, decoded as mmcv's LoadImageFromFile
    names, classes = C.class_names("sclip", "voc").queries()
    ref = GEM(model, layers=2, template="imagenet")
    hw = rescaled_size(30, 38, 336, 2048)  # (336, 426): 42 x 53 patches seen, stretched over it
    pixels = MMSEG_STEPS.normalize(resize_opencv_linear(image, hw))  # mmcv imrescale, SegDataPreProcessor
    logits = np_bilinear(ref.pixel_logits(pixels[:336, :424], list(names))[0], hw)
    logits = np_bilinear(logits, (30, 38))
    guide = np_bilinear(pixels.transpose(2, 0, 1), (30, 38))  # the normalised input, as NACLIP
    refined = torch_pamr(torch.from_numpy(guide[None]).float(), torch.from_numpy(logits[None]).float(), 10,
                         [8, 16])[0].numpy()
    probs = _softmax(40.0 * refined.astype(np.float64))
    cls = np.stack([probs[classes == c].max(axis=0) for c in range(21)])
    want = np.where(cls.max(axis=0) < 0.1, 0, cls.argmax(axis=0))
    got = np.asarray(Image.open(pred_dir / f"{sample.id}.png"))
    # Ties aside (none expected with random weights), every pixel agrees.
    top2 = np.sort(cls, axis=0)[-2:]
    sure = (top2[1] - top2[0] > 1e-4) & (np.abs(cls.max(axis=0) - 0.1) > 1e-4)
    assert sure.mean() > 0.9
    np.testing.assert_array_equal(got[sure], want[sure])
    # PAMR changed the prediction somewhere (else this test would not see it).
    plain = _softmax(40.0 * logits)
    plain_cls = np.stack([plain[classes == c].max(axis=0) for c in range(21)])
    assert (np.where(plain_cls.max(axis=0) < 0.1, 0, plain_cls.argmax(axis=0)) != want).any()


def test_eval_command_needs_opencv_for_the_official_protocols(cli_env, capsys, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "cv2", None)  # as if OpenCV were not installed
    base = ["eval", "--dataset", "voc", "--root", str(cli_env / "voc"), "--no-progress"]
    assert cli_main(base + ["--protocol", "sclip"]) == 1
    err = capsys.readouterr().err.strip()
    assert "pip install 'gem-jax[eval]'" in err and "\n" not in err
    # GEM's protocol reads with Pillow, and so does any protocol told to.
    out = cli_env / "g.json"
    assert cli_main(base + ["--protocol", "sclip", "--image-steps", "gem", "--method", "gem",
                                     "--gem-layers", "2", "--template", "a photo of a {}.", "--out", str(out)]) == 0
    assert json.loads(out.read_text())["protocol_settings"]["image_steps"] == "gem"


def test_eval_command_refuses_a_dataset_without_settings(cli_env, capsys):
    argv = ["eval", "--dataset", "voc", "--root", str(cli_env / "voc"), "--protocol", "maskclip", "--no-progress"]
    assert cli_main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "maskclip protocol has settings for" in err and "\n" not in err


def test_eval_command_overrides_the_protocol(cli_env, capsys):
    out = cli_env / "o.json"
    argv = ["eval", "--dataset", "voc", "--root", str(cli_env / "voc"), "--protocol", "sclip", "--method", "gem",
            "--gem-layers", "2", "--no-progress", "--out", str(out), "--template", "a photo of a {}.",
            "--class-names", "dataset", "--logit-scale", "12.5", "--area-threshold", "none", "--pamr", "2",
            "--pamr-dilations", "1,3", "--border", "pad_corner", "--background-threshold", "0.3"]
    assert cli_main(argv) == 0, capsys.readouterr().err
    result = json.loads(out.read_text())
    s = result["protocol_settings"]
    assert (s["template"], s["class_names"], s["logit_scale"], s["area_threshold"], s["pamr_iterations"],
            s["pamr_dilations"], s["border"], s["background_threshold"]) == (
        "a photo of a {}.", None, 12.5, None, 2, [1, 3], "pad_corner", 0.3)
    assert result["num_templates"] == 1 and s["crop"] == 224  # the rest is SCLIP's
    assert result["prompts"]["person"][:2] == ["person", "person in shirt"]  # the dataset's own names
    base = ["eval", "--dataset", "voc", "--root", str(cli_env / "voc"), "--no-progress"]
    assert cli_main(base + ["--class-names", "mine"]) == 2
    assert "unknown class-name set" in capsys.readouterr().err
    for bad in (["--pamr-dilations", "0"], ["--area-threshold", "1.5"], ["--border", "mirror"], ["--pamr", "-1"]):
        with pytest.raises(SystemExit) as e:
            parse(base + bad)
        assert e.value.code == 2


def test_segment_options(gem):
    from gem_jax import pipeline, postprocess
    from test_postprocess import torch_pamr
    import torch

    # The logit scale decides the background threshold: cosines .05 / .04 give p = .73 at
    # scale 100 but .52 at 10.
    x = np.zeros((2, 1, 1), np.float32)
    x[:, 0, 0] = [0.05, 0.04]
    assert postprocess.labels_from_logits(x, 0.6).tolist() == [[1]]
    assert postprocess.labels_from_logits(x, 0.6, logit_scale=10.0).tolist() == [[0]]
    # The area threshold: class 2 wins 1 of 5 pixels (20%), dropped at 0.25, kept at 0.15.
    x = np.zeros((2, 1, 5), np.float32)
    x[0, 0, :4] = 0.1
    x[1, 0, 4] = 0.1
    assert postprocess.labels_from_logits(x, None, area_threshold=0.25).tolist() == [[1, 1, 1, 1, 1]]
    assert postprocess.labels_from_logits(x, None, area_threshold=0.15).tolist() == [[1, 1, 1, 1, 2]]
    # PAMR in segment: the official code's steps on the logits, guided by the model's input.
    img = np.random.default_rng(5).integers(0, 256, (30, 41, 3), dtype=np.uint8)
    classes = ["cat", "dog", "tree"]
    out = gem.heatmaps(img, classes, size=(32, 40))
    guide = preprocess.normalize(preprocess.resize(img, (32, 40))).transpose(2, 0, 1)
    refined = torch_pamr(torch.from_numpy(guide[None]), torch.from_numpy(np.asarray(out.logits)), 10,
                         [8, 16])[0].numpy()
    want = postprocess.labels_from_logits(refined, None)
    got = gem.segment(img, classes, None, size=(32, 40), pamr_iterations=10)
    probs = _softmax(100.0 * refined.astype(np.float64))
    top2 = np.sort(probs, axis=0)[-2:]
    sure = top2[1] - top2[0] > 1e-4
    assert sure.mean() > 0.9
    np.testing.assert_array_equal(got[sure], want[sure])
    assert (gem.segment(img, classes, None, size=(32, 40)) != got).any()  # PAMR changed something


def test_segment_with_synonyms(gem):
    from gem_jax import pipeline, postprocess

    # Hand case: prompts 0 and 1 are synonyms of class 1, prompt 2 is class 2.
    x = np.zeros((3, 1, 2), np.float32)
    x[:, 0, 0] = [0.04, 0.04, 0.045]  # p = (.27, .27, .45): class 1 by max .27 < .45 -> class 2
    x[:, 0, 1] = [0.05, 0.0, 0.04]   # p = (.53, .04, .43): class 1
    got = postprocess.labels_from_logits(x, None, query_class=np.array([0, 0, 1]))
    assert got.tolist() == [[2, 1]]
    # The softmax runs over every prompt, before the max: not the same as summing synonyms.
    p = _softmax(100.0 * x[:, 0, 0].astype(np.float64))
    assert p[:2].sum() > p[2] > p[:2].max()
    img = np.random.default_rng(6).integers(0, 256, (32, 40, 3), dtype=np.uint8)
    logits = np.asarray(gem.heatmaps(img, ["cat", "kitty", "dog"], size=(32, 40)).logits[0])
    want = postprocess.labels_from_logits(logits, 0.5, query_class=np.array([0, 0, 1]))
    got = gem.segment(img, [["cat", "kitty"], "dog"], 0.5, size=(32, 40))
    np.testing.assert_array_equal(got, want)
    assert set(np.unique(got)) <= {0, 1, 2}
    with pytest.raises(ValueError, match="at least one name"):
        gem.segment(img, [[], "dog"])
