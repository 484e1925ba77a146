"""The official protocols pixel for pixel: ``evaluate`` against a PyTorch port of each official segmentor.

Each port below follows its repository's order of operations from the file on disk to the
label map, with every pixel step as the official code does it:

- mmcv ``LoadImageFromFile`` (``imfrombytes``, flag ``'color'``, backend cv2):
  ``cv2.imdecode(bytes, IMREAD_COLOR)``, BGR;
- mmseg ``Resize(scale, keep_ratio=True)``: mmcv ``imrescale``, i.e. ``rescale_size``
  (``min(long / max(h, w), short / min(h, w))``, sides ``int(w * scale + 0.5)``) and
  ``cv2.resize(img, (w, h), interpolation=INTER_LINEAR)`` on the uint8 BGR image;
- SCLIP, NACLIP, ClearCLIP: ``PackSegInputs`` and ``SegDataPreProcessor`` (channels flipped,
  ``(x.float() - mean) / std`` with mean (122.771, 116.746, 104.094), std (68.501, 66.632,
  70.323)); the segmentor's ``predict``, ``forward_slide`` / ``forward_feature`` and
  ``postprocess_result`` (SCLIP ``clip_segmentor.py``, NACLIP ``naclip.py``, ClearCLIP
  ``clearclip_segmentor.py``), NACLIP's PAMR guided by the normalised input interpolated to
  the original size;
- MaskCLIP (mmseg 0.x): ``Normalize`` (mmcv ``imnormalize``: ``cvtColor`` BGR to RGB,
  ``cv2.subtract`` the ImageNet mean, ``cv2.multiply`` by 1 / std), the ViT's corner padding
  (``F.pad`` with zeros), ``MaskClipHead.cls_seg``, ``EncoderDecoder.encode_decode`` and
  ``whole_inference`` (the head's grid to the input size, then to the original size), softmax
  and argmax;
- the last blocks are the ports of ``test_methods_parity.py``; PAMR the port of
  ``test_postprocess.py``.

The images are synthetic JPEGs of odd sizes in the VOC layout; the model is a random
perturbed open_clip ViT with 16-pixel patches.

The rule for float rounding (it differs between libraries and between CPUs): a pixel is a
near tie when a change of the cosine logits by less than ``EPS`` could flip the port's
decision there, i.e. when its two largest class probabilities (after the max over synonyms
and the area threshold) have ``log p1 - log p2 < logit_scale * EPS`` (for a softmax that is
the scaled logit gap), or its largest probability is within ``2 * logit_scale * EPS`` of the
background threshold in log. Near ties may differ; every other pixel must be equal, and
near ties must stay rare. The logits of the two sides differ by about 1e-6 here.
"""

from __future__ import annotations

import dataclasses
import importlib.resources
import os
import pathlib

import numpy as np
import pytest
from PIL import Image

torch = pytest.importorskip("torch")
pytest.importorskip("open_clip")
cv2 = pytest.importorskip("cv2")

import open_clip  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from gem_jax.eval import datasets as D  # noqa: E402
from gem_jax.eval import images, runner  # noqa: E402
from gem_jax.eval.protocols import PROTOCOLS  # noqa: E402
from gem_jax.pipeline import GEM  # noqa: E402
from gem_jax.text import template_set  # noqa: E402
from gem_jax.eval.sliding import rescaled_size  # noqa: E402
from reference_models import openclip_model, twin  # noqa: E402
from test_eval_datasets import make_voc  # noqa: E402
from test_methods_parity import clearclip_tokens, maskclip_tokens, naclip_tokens, sclip_tokens  # noqa: E402
from test_postprocess import torch_pamr  # noqa: E402

PATCH = 16
#: Near-tie margin in cosine units (see the module docstring).
EPS = 1e-5
#: VOC-like sizes (VOC's are up to 500 on a side), and a strip the long-side cap of 2048
#: shrinks below the crop size, so windows are cut short and not patch multiples.
VOC_LIKE = (("2007_000032", 375, 500), ("2007_000039", 500, 333), ("2007_000063", 353, 481))
#: The same shapes at half the size (the protocols upscale them to their short side).
HALF_VOC = (("2007_000032", 187, 250), ("2007_000039", 250, 167), ("2007_000063", 177, 241))
STRIP = ("2007_000121", 43, 437)
#: The SCLIP test's images; GEM_JAX_FULL_SIZE=1 runs it at VOC's own sizes (slower).
SCLIP_IMAGES = (VOC_LIKE if os.environ.get("GEM_JAX_FULL_SIZE") else HALF_VOC[:2]) + (STRIP,)
CONTEXT = 16  # text context: the longest prompt here is 14 tokens, so nothing is truncated


# ---- the model ------------------------------------------------------------------------

@pytest.fixture(scope="module")
def models():
    """A perturbed random open_clip ViT (16-pixel patches, 4 x 4 checkpoint grid), its twin,
    and a cache of GEMs by method (their text embeddings and compilations are reused)."""
    model = openclip_model(dict(layers=2, width=64, patch_size=PATCH, image_size=64, head_width=32),
                           text=dict(context_length=CONTEXT, width=32, heads=1, layers=1), embed_dim=32, seed=3)
    with torch.no_grad():  # the last block's q and k smaller: attention far from one-hot (NACLIP's term shows)
        attn = model.visual.transformer.resblocks[-1].attn
        attn.in_proj_weight[:2 * attn.embed_dim] *= 0.3
        attn.in_proj_bias[:2 * attn.embed_dim] *= 0.3
    return model, twin(model, quick_gelu=True, head_width=32), {}


# ---- the official pipelines, ported -----------------------------------------------------

def load_image_from_file(path):
    """mmcv ``LoadImageFromFile``: ``imfrombytes(fileio.get(path), flag='color', backend='cv2')``."""
    return cv2.imdecode(np.frombuffer(pathlib.Path(path).read_bytes(), np.uint8), cv2.IMREAD_COLOR)


def imrescale(img, scale):
    """mmcv ``imrescale(img, scale)`` with the defaults (``'bilinear'``, backend cv2)."""
    h, w = img.shape[:2]
    max_long_edge, max_short_edge = max(scale), min(scale)
    scale_factor = min(max_long_edge / max(h, w), max_short_edge / min(h, w))
    new_size = int(w * float(scale_factor) + 0.5), int(h * float(scale_factor) + 0.5)
    return cv2.resize(img, new_size, interpolation=cv2.INTER_LINEAR)


def seg_data_preprocessor(img):
    """``PackSegInputs`` then ``SegDataPreProcessor(mean=[122.771, 116.746, 104.094],
    std=[68.501, 66.632, 70.323], rgb_to_bgr=True)`` (``bgr_to_rgb`` in ClearCLIP: the same flip)."""
    x = torch.from_numpy(np.ascontiguousarray(img.transpose(2, 0, 1)))
    x = x[[2, 1, 0], ...].float()
    mean = torch.tensor([122.771, 116.746, 104.094]).view(-1, 1, 1)
    std = torch.tensor([68.501, 66.632, 70.323]).view(-1, 1, 1)
    return ((x - mean) / std)[None]


def get_cls_idx(name_set, dataset, sep):
    """The official ``get_cls_idx`` on the class-name file (SCLIP, NACLIP split on ', ',
    ClearCLIP on ',')."""
    text = (importlib.resources.files("gem_jax") / "data" / "class_names" / name_set / f"{dataset}.txt").read_text()
    name_sets = text.splitlines(keepends=True)
    class_names, class_indices = [], []
    for idx, line in enumerate(name_sets):
        names_i = line.split(sep)
        class_names += names_i
        class_indices += [idx] * len(names_i)
    return [n.replace("\n", "") for n in class_names], class_indices


_QUERIES: dict = {}


def query_features(model, words, templates):
    """Each query word under every template: features normalised, averaged, normalised (cached)."""
    key = (id(model), tuple(words), tuple(templates))
    if key not in _QUERIES:
        _QUERIES[key] = _query_features(model, words, templates)
    return _QUERIES[key]


def _query_features(model, words, templates):
    out = []
    with torch.no_grad():
        # All texts in one call (the official code calls encode_text per word: the same rows).
        texts = open_clip.tokenize([t.format(qw) for qw in words for t in templates], CONTEXT)
        features = model.encode_text(texts).reshape(len(words), len(templates), -1)
        for feature in features:
            feature /= feature.norm(dim=-1, keepdim=True)
            feature = feature.mean(dim=0)
            feature /= feature.norm()
            out.append(feature.unsqueeze(0))
    return torch.cat(out, dim=0)


def forward_feature(model, tokens_fn, query, img, logit_size=None):
    """``forward_feature`` of SCLIP / NACLIP / ClearCLIP."""
    image_features = tokens_fn(model.visual, img)
    image_features = image_features[:, 1:]
    image_features = image_features / image_features.norm(dim=-1, keepdim=True)
    logits = image_features @ query.T
    w, h = img[0].shape[-2] // PATCH, img[0].shape[-1] // PATCH
    out_dim = logits.shape[-1]
    logits = logits.permute(0, 2, 1).reshape(-1, out_dim, w, h)
    return F.interpolate(logits, size=img.shape[-2:] if logit_size is None else logit_size, mode="bilinear",
                         align_corners=False)


def compute_padsize(H, W, patch_size):
    """ClearCLIP ``compute_padsize``."""
    l, r, t, b = 0, 0, 0, 0
    if W % patch_size:
        lr = patch_size - (W % patch_size)
        l = lr // 2
        r = lr - l
    if H % patch_size:
        tb = patch_size - (H % patch_size)
        t = tb // 2
        b = tb - t
    return l, r, t, b


def forward_slide(model, tokens_fn, query, img, stride, crop_size, clearclip_pad=False):
    """``forward_slide`` up to ``preds / count_mat`` (ClearCLIP's: the crops padded)."""
    h_stride, w_stride = stride, stride
    h_crop, w_crop = crop_size, crop_size
    batch_size, _, h_img, w_img = img.shape
    h_grids = max(h_img - h_crop + h_stride - 1, 0) // h_stride + 1
    w_grids = max(w_img - w_crop + w_stride - 1, 0) // w_stride + 1
    preds = img.new_zeros((batch_size, query.shape[0], h_img, w_img))
    count_mat = img.new_zeros((batch_size, 1, h_img, w_img))
    for h_idx in range(h_grids):
        for w_idx in range(w_grids):
            y1 = h_idx * h_stride
            x1 = w_idx * w_stride
            y2 = min(y1 + h_crop, h_img)
            x2 = min(x1 + w_crop, w_img)
            y1 = max(y2 - h_crop, 0)
            x1 = max(x2 - w_crop, 0)
            crop_img = img[:, :, y1:y2, x1:x2]
            pad = (0, 0, 0, 0)
            if clearclip_pad:
                H, W = crop_img.shape[2:]
                pad = compute_padsize(H, W, PATCH)
                if any(pad):
                    crop_img = F.pad(crop_img, pad)
            crop_seg_logit = forward_feature(model, tokens_fn, query, crop_img)
            if any(pad):
                l, t = pad[0], pad[2]
                crop_seg_logit = crop_seg_logit[:, :, t:t + H, l:l + W]
            # preds += F.pad(crop_seg_logit, (x1, W - x2, y1, H - y2)): the same sums without the zeros
            preds[:, :, y1:y2, x1:x2] += crop_seg_logit
            count_mat[:, :, y1:y2, x1:x2] += 1
    assert (count_mat == 0).sum() == 0
    return preds / count_mat


def postprocess_result(seg_logits, query_idx, logit_scale, prob_thd, area_thd=None):
    """``postprocess_result`` (SCLIP's, with its area threshold; NACLIP's and ClearCLIP's are
    the same without it). Returns the label map and the class probabilities it came from."""
    seg_logits = seg_logits[0] * logit_scale
    seg_logits = seg_logits.softmax(0)
    query_idx = torch.tensor(query_idx, dtype=torch.int64)
    num_cls, num_queries = int(max(query_idx)) + 1, len(query_idx)
    if num_cls != num_queries:
        # (seg_logits * one_hot(query_idx).T.view(num_cls, num_queries, 1, 1)).max(1)[0]: each class's
        # largest probability (the other queries count as 0, below any probability), without the
        # (num_cls, num_queries, H, W) product.
        seg_logits = torch.stack([seg_logits[query_idx == c].max(0)[0] for c in range(num_cls)])
    if area_thd is not None:
        predictions = F.one_hot(seg_logits.argmax(0), num_cls).to(seg_logits.dtype)
        area_pred = predictions[:, :, 1:].sum((0, 1), keepdim=True)
        area_pred = (area_pred > area_thd * area_pred.sum()).to(seg_logits.dtype)
        seg_logits[1:] *= area_pred.transpose(0, -1)
    seg_pred = seg_logits.argmax(0, keepdim=True)
    seg_pred[seg_logits.max(0, keepdim=True)[0] < prob_thd] = 0
    return seg_pred[0].numpy(), seg_logits.numpy()


@dataclasses.dataclass
class Official:
    """A port of one repository's test: its segmentor's settings from ``configs/cfg_voc*.py``."""

    repo: str
    scale: tuple[int, int]          # Resize(scale=...)
    logit_scale: float
    slide_crop: int                  # 0: whole image
    slide_stride: int
    names: tuple[str, str, str]      # (class-name set, dataset, separator of get_cls_idx)
    pamr_steps: int = 0

    def logits(self, model, path):
        """``predict`` up to the logits at the original size (after PAMR), and the query classes."""
        tokens = {"sclip": sclip_tokens, "naclip": naclip_tokens, "clearclip": clearclip_tokens}[self.repo]
        words, query_idx = get_cls_idx(*self.names)
        query = query_features(model, words, template_set("imagenet"))
        bgr = load_image_from_file(path)
        ori_shape = bgr.shape[:2]
        inputs = seg_data_preprocessor(imrescale(bgr, self.scale))
        with torch.no_grad():
            if self.slide_crop > 0:
                seg_logits = forward_slide(model, tokens, query, inputs, self.slide_stride, self.slide_crop,
                                           clearclip_pad=self.repo == "clearclip")
            else:  # NACLIP predict: forward_feature(inputs), at the input size
                seg_logits = forward_feature(model, tokens, query, inputs)
            seg_logits = F.interpolate(seg_logits, size=ori_shape, mode="bilinear", align_corners=False)
            if self.pamr_steps:
                img = F.interpolate(inputs, size=ori_shape, mode="bilinear", align_corners=False)
                seg_logits = torch_pamr(img, seg_logits.to(img.dtype), self.pamr_steps, [8, 16])
        return seg_logits, query_idx

    def labels(self, logits_and_classes, prob_thd, area_thd=None):
        """``postprocess_result`` on the output of :meth:`logits`."""
        seg_logits, query_idx = logits_and_classes
        with torch.no_grad():
            return postprocess_result(seg_logits.clone(), query_idx, self.logit_scale, prob_thd, area_thd)


def maskclip_predict(model, path, scale=(2048, 512)):
    """MaskCLIP's test: mmseg 0.x pipeline, ``EncoderDecoder`` in whole mode with ``MaskClipHead``."""
    words = (importlib.resources.files("gem_jax") / "data" / "class_names" / "maskclip" / "voc20.txt").read_text()
    words = words.splitlines()
    query = query_features(model, words, template_set("imagenet85"))  # prompt_engineering.py
    img = load_image_from_file(path)
    ori_shape = img.shape[:2]
    img = imrescale(img, scale)
    # Normalize(mean=[123.675, 116.28, 103.53], std=[58.395, 57.12, 57.375], to_rgb=True): mmcv imnormalize.
    img = img.copy().astype(np.float32)
    mean = np.float64(np.array([123.675, 116.28, 103.53]).reshape(1, -1))
    stdinv = 1 / np.float64(np.array([58.395, 57.12, 57.375]).reshape(1, -1))
    cv2.cvtColor(img, cv2.COLOR_BGR2RGB, img)
    cv2.subtract(img, mean, img)
    cv2.multiply(img, stdinv, img)
    x = torch.from_numpy(np.ascontiguousarray(img.transpose(2, 0, 1)))[None]  # ImageToTensor
    with torch.no_grad():
        h, w = x.shape[2:]
        pad_h, pad_w = -h % PATCH, -w % PATCH  # AdaptivePadding(padding='corner')
        padded = F.pad(x, [0, pad_w, 0, pad_h])
        feat = maskclip_tokens(model.visual, padded)[:, 1:]
        feat = feat.permute(0, 2, 1).reshape(1, -1, padded.shape[2] // PATCH, padded.shape[3] // PATCH)
        feat = feat / feat.norm(dim=1, keepdim=True)  # MaskClipHead.cls_seg
        out = F.conv2d(feat, query[:, :, None, None])
        out = F.interpolate(out, size=x.shape[2:], mode="bilinear", align_corners=False)  # encode_decode
        out = F.interpolate(out, size=ori_shape, mode="bilinear", align_corners=False)  # whole_inference
        output = F.softmax(out, dim=1)
        return output.argmax(dim=1)[0].numpy(), output[0].numpy()


# ---- the comparison -------------------------------------------------------------------

def near_ties(cls, logit_scale, prob_thd):
    with np.errstate(divide="ignore"):
        top = np.log(np.sort(cls, axis=0)[-2:].astype(np.float64))
    tie = top[1] - top[0] < logit_scale * EPS
    if prob_thd:
        tie |= np.abs(top[1] - np.log(prob_thd)) < 2 * logit_scale * EPS
    return tie


def run_gem_jax(models, tmp_path, protocol, dataset, method, tag, **changes):
    _, jm, gems = models
    protocol = dataclasses.replace(PROTOCOLS[protocol].for_dataset(dataset.name), **changes)
    if (method, protocol.template) not in gems:
        gems[method, protocol.template] = GEM(jm, method=method, template=protocol.template, batch_size=4)
    gem = gems[method, protocol.template]
    out = tmp_path / f"pred_{tag}"
    result = runner.evaluate(gem, dataset, protocol, save_predictions=out, progress=False)
    assert result["complete"] and result["evaluated"] == len(dataset.samples)
    return {s.id: np.asarray(Image.open(runner.prediction_path(out, s.id))) for s in dataset.samples}


def compare(name, got, official, logit_scale, prob_thd=0.0, min_agreement=None):
    """Equal on every pixel but near ties; returns the agreement over all pixels."""
    equal = total = ties = 0
    for sid, (want, cls) in official.items():
        tie = near_ties(cls, logit_scale, prob_thd)
        mine = got[sid]
        assert mine.shape == want.shape, sid
        bad = (mine != want) & ~tie
        assert not bad.any(), f"{name} {sid}: {bad.sum()} pixels differ away from ties, e.g. at {np.argwhere(bad)[:5]}"
        equal += (mine == want).sum()
        ties += tie.sum()
        total += want.size
    agreement = equal / total
    print(f"{name}: {agreement:.6%} of {total} pixels equal ({ties} near ties)")
    assert ties / total < 0.01
    if min_agreement is not None:
        assert agreement >= min_agreement
    return agreement


def varied(labels, background=None):
    """The label maps are not degenerate: several classes, and both background and classes."""
    values = np.concatenate([x.ravel() for x in labels])
    assert len(np.unique(values)) >= 4
    if background is not None:
        assert 0.02 < (values == background).mean() < 0.9


# ---- one test per protocol -------------------------------------------------------------

def test_sclip_protocol_equals_official_pipeline(models, tmp_path):
    """SCLIP on VOC21 (cfg_voc21.py: Resize (2048, 336), 224 / 112 windows, logit scale 65,
    prob_thd 0.1, area_thd 0.1, cls_voc21.txt): >= 99.99% of pixels equal."""
    make_voc(tmp_path / "voc", specs=SCLIP_IMAGES)
    ds = D.voc(tmp_path / "voc")
    official = Official("sclip", (2048, 336), 65.0, 224, 112, ("sclip", "voc", ", "))
    logits = {s.id: official.logits(models[0], s.image) for s in ds.samples}
    for tag, thd, area in (("off", 0.0, None), ("on", 0.1, 0.1)):
        want = {sid: official.labels(x, thd, area) for sid, x in logits.items()}
        got = run_gem_jax(models, tmp_path, "sclip", ds, "sclip", tag, background_threshold=thd, area_threshold=area)
        compare(f"sclip voc thresholds {tag}", got, want, 65.0, thd, min_agreement=0.9999)
        varied([w for w, _ in want.values()], background=0 if tag == "on" else None)


def test_naclip_protocol_equals_official_pipeline(models, tmp_path):
    """NACLIP on VOC21 with PAMR (cfg_voc21.py: Resize (2048, 336), the whole image, prob_thd
    0.1; naclip.py: logit scale 40, PAMR 10 steps at dilations 8 and 16)."""
    make_voc(tmp_path / "voc", specs=(("2007_000032", 125, 167), ("2007_000039", 111, 166)))
    ds = D.voc(tmp_path / "voc")
    official = Official("naclip", (2048, 336), 40.0, 0, 112, ("sclip", "voc", ", "), pamr_steps=10)
    model = models[0]
    logits = {s.id: official.logits(model, s.image) for s in ds.samples}
    for tag, thd in (("off", 0.0), ("on", 0.1)):
        want = {sid: official.labels(x, thd) for sid, x in logits.items()}
        got = run_gem_jax(models, tmp_path, "naclip", ds, "naclip", tag, background_threshold=thd)
        compare(f"naclip voc thresholds {tag}", got, want, 40.0, thd)
        varied([w for w, _ in want.values()], background=0 if tag == "on" else None)
    # PAMR changes the official labels here, so the comparison above saw it.
    no_pamr = dataclasses.replace(official, pamr_steps=0)
    assert any((no_pamr.labels(no_pamr.logits(model, s.image), 0.1)[0] != want[s.id][0]).any() for s in ds.samples)


def test_clearclip_protocol_equals_official_pipeline(models, tmp_path):
    """ClearCLIP on VOC21 (cfg_voc21.py: Resize (2048, 448), prob_thd 0.5; clearclip_segmentor.py:
    448 / 224 windows zero-padded to the patch multiple, logit scale 50), with a strip whose
    windows are 202 high (padded to 208)."""
    make_voc(tmp_path / "voc", specs=(HALF_VOC[0], STRIP))
    ds = D.voc(tmp_path / "voc")
    official = Official("clearclip", (2048, 448), 50.0, 448, 224, ("clearclip", "voc", ","))
    assert rescaled_size(*STRIP[1:], 448, 2048)[0] % PATCH  # the padding is exercised
    logits = {s.id: official.logits(models[0], s.image) for s in ds.samples}
    for tag, thd in (("off", 0.0), ("on", 0.5)):
        want = {sid: official.labels(x, thd) for sid, x in logits.items()}
        got = run_gem_jax(models, tmp_path, "clearclip", ds, "clearclip", tag, background_threshold=thd)
        compare(f"clearclip voc thresholds {tag}", got, want, 50.0, thd)
        varied([w for w, _ in want.values()], background=0 if tag == "on" else None)


def test_maskclip_protocol_equals_official_pipeline(models, tmp_path):
    """MaskCLIP on VOC20 (pascal_voc12_aug_20.py: Resize (2048, 512), ImageNet Normalize;
    maskclip_vit16.py: whole image, corner padding): argmax, no thresholds in MaskCLIP."""
    make_voc(tmp_path / "voc", specs=(HALF_VOC[0], STRIP))
    ds = D.voc20(tmp_path / "voc")
    # 512 x 684 padded at the right to 688; 202 x 2048 padded at the bottom to 208.
    assert rescaled_size(*HALF_VOC[0][1:], 512, 2048) == (512, 684)
    assert rescaled_size(*STRIP[1:], 512, 2048) == (202, 2048)
    model = models[0]
    want = {s.id: maskclip_predict(model, s.image) for s in ds.samples}
    got = run_gem_jax(models, tmp_path, "maskclip", ds, "maskclip", "off")
    compare("maskclip voc20", got, want, 1.0)  # softmax of the raw cosines
    varied([w for w, _ in want.values()])


# ---- the image steps on their own --------------------------------------------------------

def test_image_steps_equal_mmcv(tmp_path):
    """Decoding, keep-ratio sizes and normalisation of the image steps equal the ports above
    over many sizes and scales; the gem steps stay Pillow's."""
    rng = np.random.default_rng(0)
    mmseg, maskclip = images.IMAGE_STEPS["mmseg"], images.IMAGE_STEPS["mmseg_imagenet"]
    for k in range(40):
        h, w = (int(v) for v in rng.integers(8, 700, 2))
        short, long = int(rng.integers(16, 900)), int(rng.choice([2048, 1024, 520, 333]))
        img = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        want = imrescale(img, (long, short))
        hw = rescaled_size(h, w, short, long)
        assert hw == want.shape[:2], (h, w, short, long)
        np.testing.assert_array_equal(mmseg.resize_to(img[..., ::-1], hw), want[..., ::-1])
    img = rng.integers(0, 256, (37, 53, 3), dtype=np.uint8)
    np.testing.assert_array_equal(mmseg.normalize(img[..., ::-1])[None].transpose(0, 3, 1, 2),
                                  seg_data_preprocessor(img).numpy())
    x = img.astype(np.float32)
    cv2.cvtColor(x, cv2.COLOR_BGR2RGB, x)
    cv2.subtract(x, np.float64(np.array(images.IMAGENET_MEAN).reshape(1, -1)), x)
    cv2.multiply(x, 1 / np.float64(np.array(images.IMAGENET_STD).reshape(1, -1)), x)
    np.testing.assert_array_equal(maskclip.normalize(img[..., ::-1]), x)
    # Decoding: OpenCV's, with the EXIF orientation applied (a rotated JPEG comes out upright).
    path = tmp_path / "rotated.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    Image.fromarray(rng.integers(0, 256, (30, 50, 3), dtype=np.uint8)).save(path, quality=95, exif=exif.tobytes())
    np.testing.assert_array_equal(mmseg.read(path), load_image_from_file(path)[..., ::-1])
    assert mmseg.read(path).shape == (50, 30, 3)
    gem = images.IMAGE_STEPS["gem"]
    assert gem.read(path).shape == (50, 30, 3)
    # Unreadable files are ImageErrors (the runner skips or names them).
    (tmp_path / "broken.jpg").write_bytes(b"not an image")
    for bad, match in ((tmp_path / "broken.jpg", "cannot decode"), (tmp_path / "missing.jpg", "not found"),
                       (tmp_path, "directory")):
        with pytest.raises(images.ImageError, match=match):
            mmseg.read(bad)
    small = rng.integers(0, 256, (9, 13, 3), dtype=np.uint8)
    np.testing.assert_array_equal(gem.resize_to(small, (20, 30)),
                                  np.asarray(Image.fromarray(small).resize((30, 20), Image.Resampling.BICUBIC)))
    assert (gem.resize_to(small, (20, 30)) != mmseg.resize_to(small, (20, 30))).any()


def test_logit_resizes_equal_torch():
    """The bilinear resizes of logits (window to image, image to annotation) are torch's,
    float32 coordinates included: at the official sizes float64 coordinates would be off
    by more than the model's own rounding."""
    from gem_jax.models.layers import resize_matrix
    from gem_jax.eval.sliding import bilinear_matrix

    rng = np.random.default_rng(1)
    for hi, wi, ho, wo in ((202, 2048, 43, 437), (336, 449, 187, 250), (12, 14, 202, 224), (21, 28, 336, 449),
                           (503, 336, 250, 167), (684, 512, 167, 125)):
        x = rng.standard_normal((2, hi, wi)).astype(np.float32)
        want = F.interpolate(torch.from_numpy(x)[None], size=(ho, wo), mode="bilinear", align_corners=False)[0]
        mine = bilinear_matrix(hi, ho) @ x @ bilinear_matrix(wi, wo).T
        assert np.abs(mine - want.numpy()).max() < 2e-6, (hi, wi, ho, wo)
    x = rng.standard_normal((2, 202, 2048)).astype(np.float32)
    want = F.interpolate(torch.from_numpy(x)[None], size=(43, 437), mode="bilinear", align_corners=False)[0].numpy()
    coarse = resize_matrix(202, 43, "bilinear") @ x @ resize_matrix(2048, 437, "bilinear").T
    assert np.abs(coarse - want).max() > 1e-5
