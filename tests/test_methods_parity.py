"""Parity of every sibling method with a PyTorch port of its official code.

The ports below follow, line for line in torch, the official repositories' last-block
code and positional-embedding resampling (MaskCLIP ``mmseg/models/backbones/vit.py``
and ``decode_heads/maskclip_head.py``; CLIP Surgery ``clip/clip_surgery_model.py``
and ``clip/clip.py``; SCLIP ``clip/model.py``; ClearCLIP ``open_clip/transformer.py``;
NACLIP ``clip/model.py``), applied to the modules of an open_clip model with perturbed
random weights, float32. Where an official code cannot run a case (CLIP Surgery
resamples square grids only) the port generalises it the obvious way, said at the spot.
Towers are the real ViT-B/16 and ViT-B/32 widths with fewer blocks: every method
changes only the last ones.
"""

from __future__ import annotations

import math

import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("open_clip")

import open_clip  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from gem_jax.engine import tower as methods_lib  # noqa: E402
from gem_jax import preprocess  # noqa: E402
from gem_jax.pipeline import GEM  # noqa: E402
from reference_models import openclip_model, twin  # noqa: E402

LOGIT_TOL = 1e-5
PROMPTS = ["cat", "a boxer", "vehicle registration plate"]


# ---- positional embeddings, as each official code resamples them ----------------------

def pos_scale_factor(pe, h, w):
    """SCLIP / ClearCLIP / NACLIP ``interpolate_pos_encoding`` (NACLIP's explicit arguments;
    SCLIP and ClearCLIP leave ``recompute_scale_factor`` at its default, which is the same)."""
    n = pe.shape[0] - 1
    if h * w == n and h == w:
        return pe
    g = int(math.sqrt(n))
    h0, w0 = h + 0.1, w + 0.1
    grid = F.interpolate(pe[1:].reshape(1, g, g, -1).permute(0, 3, 1, 2), mode="bicubic",
                         scale_factor=(h0 / g, w0 / g), align_corners=False, recompute_scale_factor=False)
    assert grid.shape[-2:] == (h, w)
    return torch.cat([pe[:1], grid.permute(0, 2, 3, 1).reshape(h * w, -1)])


def pos_maskclip(pe, h, w):
    """mmseg's ``resize_pos_embed``: bicubic to the size, align_corners=False."""
    if h * w + 1 == pe.shape[0]:
        return pe
    g = int(math.sqrt(pe.shape[0] - 1))
    grid = F.interpolate(pe[1:].reshape(1, g, g, -1).permute(0, 3, 1, 2), size=(h, w), mode="bicubic",
                         align_corners=False)
    return torch.cat([pe[:1], grid.flatten(2).transpose(1, 2)[0]])


def pos_clipsurgery(pe, h, w):
    """CLIP Surgery's bilinear resampling to the new side. The official code assumes a
    square grid (``new_side = sqrt(N)``) and writes the result back into the parameter;
    here the same resampling goes to (h, w), from the checkpoint's grid every call."""
    g = int(math.sqrt(pe.shape[0] - 1))
    if (h, w) == (g, g):
        return pe
    grid = F.interpolate(pe[1:].reshape(1, g, g, -1).permute(0, 3, 1, 2), (h, w), mode="bilinear")
    return torch.cat([pe[:1], grid.reshape(-1, pe.shape[1], h * w).transpose(1, 2)[0]])


def embed(visual, x, resample):
    """Patch embedding, class token, resampled positions, ``ln_pre``; LND as the official code."""
    b, _, hh, ww = x.shape
    p = visual.conv1.kernel_size[0]
    t = visual.conv1(x).reshape(b, visual.conv1.out_channels, -1).permute(0, 2, 1)
    cls = visual.class_embedding.to(t.dtype) + torch.zeros(b, 1, t.shape[-1], dtype=t.dtype)
    t = torch.cat([cls, t], dim=1)
    t = t + resample(visual.positional_embedding, hh // p, ww // p)
    return visual.ln_pre(t).permute(1, 0, 2)


def split_heads(attn_layer, x):
    """The official ``custom_attn`` head split of (L, B, C) tokens: (B*heads, L, d) each."""
    num_heads = attn_layer.num_heads
    _, bsz, embed_dim = x.size()
    head_dim = embed_dim // num_heads
    q, k, v = F.linear(x, attn_layer.in_proj_weight, attn_layer.in_proj_bias).chunk(3, dim=-1)
    return [t.contiguous().view(-1, bsz * num_heads, head_dim).transpose(0, 1) for t in (q, k, v)], head_dim ** -0.5


def merge_out(attn_layer, weights, v, bsz, embed_dim):
    out = torch.bmm(weights, v).transpose(0, 1).contiguous().view(-1, bsz, embed_dim)
    return attn_layer.out_proj(out)


# ---- the official last blocks ---------------------------------------------------------

def sclip_tokens(visual, x):
    """SCLIP ``VisionTransformer.forward(csa=True)`` with ``return_all``."""
    x = embed(visual, x, pos_scale_factor)
    for blk in visual.transformer.resblocks[:-1]:
        x = blk(x)
    blk = visual.transformer.resblocks[-1]
    y = blk.ln_1(x)
    (q, k, v), scale = split_heads(blk.attn, y)
    weights = F.softmax(torch.bmm(q, q.transpose(1, 2)) * scale, dim=-1) + \
        F.softmax(torch.bmm(k, k.transpose(1, 2)) * scale, dim=-1)
    x = x + merge_out(blk.attn, weights, v, y.shape[1], y.shape[2])
    x = x + blk.mlp(blk.ln_2(x))
    return visual.ln_post(x.permute(1, 0, 2)) @ visual.proj


def clearclip_tokens(visual, x, ignore_residual=True):
    """ClearCLIP ``VisionTransformer.forward(model_type='ClearCLIP', last_n_layers=1)``."""
    x = embed(visual, x, pos_scale_factor)
    for blk in visual.transformer.resblocks[:-1]:
        x = blk(x)
    blk = visual.transformer.resblocks[-1]
    y = blk.ln_1(x)
    (q, k, v), scale = split_heads(blk.attn, y)
    attn = merge_out(blk.attn, F.softmax(torch.bmm(q, q.transpose(1, 2)) * scale, dim=-1), v, y.shape[1], y.shape[2])
    if ignore_residual:
        out = attn
    else:
        out = x + attn
        out = out + blk.mlp(blk.ln_2(out))
    return visual.ln_post(out.permute(1, 0, 2)) @ visual.proj


def gaussian_window(dim1, dim2, std):
    constant = 1 / (std * math.sqrt(2))
    ks = []
    for dim in (dim1, dim2):
        start = -(dim - 1) / 2.0
        ks.append(torch.linspace(start * constant, (start + (dim - 1)) * constant, steps=dim, dtype=torch.float))
    return torch.exp(-(torch.stack(torch.meshgrid(*ks, indexing="ij")) ** 2).sum(0))


def attention_addition(dim1, dim2, window):
    """NACLIP's Ω: each patch's one-hot map convolved with the window, class row and column zero."""
    m = torch.einsum("ij,kl->ijkl", torch.eye(dim1), torch.eye(dim2)).permute((0, 3, 1, 2)).contiguous()
    out = F.conv2d(m.view(-1, dim1, dim2).unsqueeze(1), window.unsqueeze(0).unsqueeze(1), padding="same").squeeze(1)
    out = out.view(dim1 * dim2, dim1 * dim2)
    out = torch.vstack([torch.zeros((1, dim1 * dim2)), out])
    return torch.hstack([torch.zeros((dim1 * dim2 + 1, 1)), out])


def naclip_tokens(visual, x, sigma=5.0, arch="reduced"):
    """NACLIP ``VisionTransformer.forward(return_all=True)``, ``attn_strategy='naclip'``."""
    p = visual.conv1.kernel_size[0]
    n_patches = (x.shape[2] // p, x.shape[3] // p)
    x = embed(visual, x, pos_scale_factor)
    for blk in visual.transformer.resblocks[:-1]:
        x = blk(x)
    blk = visual.transformer.resblocks[-1]
    y = blk.ln_1(x)
    (q, k, v), scale = split_heads(blk.attn, y)
    window = gaussian_window(*[side * 2 - 1 for side in n_patches], std=sigma)
    omega = attention_addition(*n_patches, window).unsqueeze(0).to(x.dtype)
    weights = torch.bmm(k, k.transpose(1, 2)) * scale
    weights += omega
    attn = merge_out(blk.attn, F.softmax(weights, dim=-1), v, y.shape[1], y.shape[2])
    if arch == "vanilla":
        x = x + attn
        x = x + blk.mlp(blk.ln_2(x))
    else:
        x = attn
    return visual.ln_post(x.permute(1, 0, 2)) @ visual.proj


def maskclip_tokens(visual, x):
    """MaskCLIP's ViT (``return_qkv`` on the last layer, ``final_norm``) and ``MaskClipHead``:
    q, k, v each through ``out_proj``; ``v += x``; ``v = ffn(norm2(v), identity=v)``;
    the final norm, then the visual projection (a 1x1 conv without bias)."""
    x = embed(visual, x, pos_maskclip).permute(1, 0, 2)  # mmseg is batch-first
    for blk in visual.transformer.resblocks[:-1]:
        x = blk(x.permute(1, 0, 2)).permute(1, 0, 2)
    blk = visual.transformer.resblocks[-1]
    y = blk.ln_1(x)
    y = F.linear(y, blk.attn.in_proj_weight, blk.attn.in_proj_bias)
    n, length, c = y.shape
    y = y.view(n, length, 3, c // 3).permute(2, 0, 1, 3).reshape(3 * n, length, c // 3)
    y = F.linear(y, blk.attn.out_proj.weight, blk.attn.out_proj.bias)
    q, k, v = y.tensor_split(3, dim=0)
    v += x
    v = v + blk.mlp(blk.ln_2(v))
    v = visual.ln_post(v)
    return v @ visual.proj


def clipsurgery_tokens(visual, x, depth=6):
    """CLIP Surgery's ``VisionTransformer.forward``: its ``Attention`` in the last ``depth``
    blocks (dual paths, v-v attention on the new one, no MLP there), then the original
    path's class token on the new path."""
    x = embed(visual, x, pos_clipsurgery)
    blocks = visual.transformer.resblocks

    def attention(blk, t):  # Attention.forward on (L, B, C) via batch-first
        t = t.transpose(0, 1)
        b, n, c = t.shape
        heads = blk.attn.num_heads
        scale = (c // heads) ** -0.5
        qkv = F.linear(t, blk.attn.in_proj_weight, blk.attn.in_proj_bias)
        qkv = qkv.reshape(b, n, 3, heads, c // heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        attn_ori = ((q @ k.transpose(-2, -1)) * scale).softmax(dim=-1)
        k = v
        q = k
        attn = ((q @ k.transpose(-2, -1)) * scale).softmax(dim=-1)
        x_ori = (attn_ori @ v).transpose(1, 2).reshape(b, n, c)
        xs = (attn @ v).transpose(1, 2).reshape(b, n, c)
        return blk.attn.out_proj(xs).transpose(0, 1), blk.attn.out_proj(x_ori).transpose(0, 1)

    for blk in blocks[:-depth]:
        x = blk(x)
    x_ori = None
    for blk in blocks[-depth:]:
        if x_ori is None:
            x_res, x_ori_res = attention(blk, blk.ln_1(x))
            x_ori = x + x_ori_res
            x_ori = x_ori + blk.mlp(blk.ln_2(x_ori))
            x = x + x_res
        else:
            x_res, x_ori_res = attention(blk, blk.ln_1(x_ori))
            x_ori = x_ori + x_ori_res
            x_ori = x_ori + blk.mlp(blk.ln_2(x_ori))
            x = x + x_res
    x[0, :, :] = x_ori[0, :, :]
    return visual.ln_post(x.permute(1, 0, 2)) @ visual.proj


def clip_feature_surgery(image_features, text_features, redundant_feats=None):
    """CLIP Surgery's ``clip.clip_feature_surgery`` (t=2); one image (its weights reshape
    to batch 1)."""
    if redundant_feats is not None:
        return image_features @ (text_features - redundant_feats).t()
    prob = image_features[:, :1, :] @ text_features.t()
    prob = (prob * 2).softmax(-1)
    w = prob / prob.mean(-1, keepdim=True)
    b, n_t, n_i, c = image_features.shape[0], text_features.shape[0], image_features.shape[1], image_features.shape[2]
    feats = image_features.reshape(b, n_i, 1, c) * text_features.reshape(1, 1, n_t, c)
    feats *= w.reshape(1, 1, n_t, 1)
    feats = feats - feats.mean(2, keepdim=True)
    return feats.sum(-1)


PORTS = {
    "sclip": sclip_tokens,
    "clearclip": clearclip_tokens,
    "naclip": naclip_tokens,
    "maskclip": maskclip_tokens,
    "clipsurgery": clipsurgery_tokens,
}


# ---- harness --------------------------------------------------------------------------

def official_logits(model, tokens_fn, pixels, prompts, patch):
    """Raw cosine logits (B, P, H, W) from the port's tokens, bilinear to the input size."""
    x = torch.from_numpy(np.ascontiguousarray(pixels.transpose(0, 3, 1, 2)))
    with torch.no_grad():
        tok = tokens_fn(model.visual, x)
        text = model.encode_text(open_clip.get_tokenizer("ViT-B-16")(prompts))
        feats = F.normalize(tok[:, 1:], dim=-1)
        text = F.normalize(text, dim=-1)
        h, w = x.shape[2] // patch, x.shape[3] // patch
        sims = (feats @ text.t()).permute(0, 2, 1).reshape(x.shape[0], len(prompts), h, w)
        return F.interpolate(sims, size=x.shape[2:], mode="bilinear", align_corners=False).numpy()


def random_image(h, w, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


_MODELS: dict = {}


def tower(arch: str, layers: int):
    """A perturbed open_clip CLIP of the real ``arch`` widths with ``layers`` vision blocks, and its twin."""
    key = (arch, layers)
    if key not in _MODELS:
        patch = {"B16": 16, "B32": 32}[arch]
        # text heads of width 64 too, so the twin infers the head count of both towers
        model = openclip_model(dict(layers=layers, width=768, patch_size=patch, image_size=224, head_width=64),
                               text=dict(width=128, heads=2, layers=2),
                               seed=layers + patch, quick_gelu=True)
        # The perturbation makes q and k so large that the last block's attention is
        # nearly one-hot, where NACLIP's neighbourhood term (at most 1) would vanish
        # below the tolerance; smaller q and k there keep every term of every method
        # visible in the logits.
        with torch.no_grad():
            attn = model.visual.transformer.resblocks[-1].attn
            attn.in_proj_weight[:2 * attn.embed_dim] *= 0.1
            attn.in_proj_bias[:2 * attn.embed_dim] *= 0.1
        _MODELS[key] = (model, twin(model, quick_gelu=True, head_width=64))
    return _MODELS[key]


CASES = [("B16", (224, 224)), ("B16", (448, 448)), ("B32", (320, 480))]


@pytest.fixture(scope="module", autouse=True)
def _free_models():
    yield
    _MODELS.clear()


def check(parity, name, arch, hw, tower_layers=2, port_kwargs=None, **gem_kwargs):
    """The max abs difference of ``GEM(method=name, **gem_kwargs)`` logits from the port's."""
    model, jm = tower(arch, tower_layers)
    image = random_image(*hw, seed=hw[0] + tower_layers)
    pixels = preprocess.normalize(preprocess.resize(image, hw))[None]
    patch = jm.config.vision.patch_size
    ref = official_logits(model, lambda v, x: PORTS[name](v, x, **(port_kwargs or {})), pixels, PROMPTS, patch)
    with jax.default_matmul_precision("highest"):
        out = GEM(jm, method=name, size=hw, template="{}", **gem_kwargs).heatmaps(image, PROMPTS)
    assert out.logits.shape == ref.shape == (1, len(PROMPTS), *hw)
    # the maps vary: a near-constant map would pass any tolerance
    assert np.ptp(ref) > 0.05
    return parity(f"{name} {arch} {hw[0]}x{hw[1]} logits", out.logits, ref)


@pytest.mark.parametrize("arch,hw", CASES, ids=lambda c: c if isinstance(c, str) else f"{c[0]}x{c[1]}")
@pytest.mark.parametrize("name", ["maskclip", "sclip", "clearclip", "naclip"])
def test_one_block_methods_match_official_code(parity, name, arch, hw):
    assert check(parity, name, arch, hw) <= LOGIT_TOL


@pytest.mark.parametrize("arch,hw", CASES, ids=lambda c: c if isinstance(c, str) else f"{c[0]}x{c[1]}")
def test_clipsurgery_matches_official_code(parity, arch, hw):
    assert check(parity, "clipsurgery", arch, hw, tower_layers=3, port_kwargs=dict(depth=2), layers=2) <= LOGIT_TOL


def test_clipsurgery_default_six_blocks(parity):
    assert check(parity, "clipsurgery", "B16", (224, 224), tower_layers=7) <= LOGIT_TOL


@pytest.mark.parametrize("name,port_kwargs,kwargs", [
    ("naclip", dict(sigma=2.0), dict(sigma=2.0)),
    ("naclip", dict(arch="vanilla"), dict(residual=True, mlp=True)),
    ("clearclip", dict(ignore_residual=False), dict(residual=True, mlp=True)),
])
def test_official_switches(parity, name, port_kwargs, kwargs):
    assert check(parity, name, "B32", (320, 480), port_kwargs=port_kwargs, **kwargs) <= LOGIT_TOL
    # the switch changes the result, so the check above could tell the settings apart
    model, jm = tower("B32", 2)
    image = random_image(320, 480, seed=322)
    with jax.default_matmul_precision("highest"):
        switched = GEM(jm, method=name, size=(320, 480), template="{}", **kwargs).heatmaps(image, PROMPTS).logits
        default = GEM(jm, method=name, size=(320, 480), template="{}").heatmaps(image, PROMPTS).logits
    assert np.abs(switched - default).max() > 100 * LOGIT_TOL


def test_feature_surgery_matches_official_function(parity):
    rng = np.random.default_rng(0)
    image = rng.standard_normal((2, 50, 64)).astype(np.float32)
    image /= np.linalg.norm(image, axis=-1, keepdims=True)
    text = rng.standard_normal((5, 64)).astype(np.float32)
    text /= np.linalg.norm(text, axis=-1, keepdims=True)
    # a class-token direction close to one prompt, so the weights are far from uniform
    image[:, 0] = text[1] + 0.2 * image[:, 0]
    with torch.no_grad():  # the official function takes one image at a time
        ref = np.concatenate([clip_feature_surgery(torch.from_numpy(im[None]), torch.from_numpy(text)).numpy()
                              for im in image])
        red = clip_feature_surgery(torch.from_numpy(image), torch.from_numpy(text[:1]),
                                   torch.from_numpy(text[4:5])).numpy()
    ours = methods_lib.feature_surgery(image, text)
    assert np.ptp(ref) > 0.1
    assert parity("feature surgery", ours, ref) <= 1e-5
    assert parity("feature surgery, redundant", methods_lib.feature_surgery(image, text[:1], text[4]), red) <= 1e-5


def test_feature_surgery_heatmaps_match_official_pipeline(parity):
    """``GEM(method="clipsurgery", feature_surgery=True)`` on ragged prompt sets = CLIP
    Surgery's demo: its tokens, ``clip_feature_surgery`` (with the empty prompt's
    embedding for a single prompt), patches on the grid, bilinear to the input size."""
    model, jm = tower("B16", 3)
    hw = (224, 224)
    images = [random_image(*hw, seed=s) for s in (5, 6)]
    prompts = [PROMPTS, ["cat"]]
    tok = open_clip.get_tokenizer("ViT-B-16")
    refs = []
    with torch.no_grad():
        empty = F.normalize(model.encode_text(tok([""])), dim=-1)
        for image, ps in zip(images, prompts):
            x = torch.from_numpy(np.ascontiguousarray(preprocess.normalize(preprocess.resize(image, hw))[None]
                                                      .transpose(0, 3, 1, 2)))
            feats = F.normalize(clipsurgery_tokens(model.visual, x, depth=2), dim=-1)
            text = F.normalize(model.encode_text(tok(ps)), dim=-1)
            sim = clip_feature_surgery(feats, text, empty if len(ps) == 1 else None)[:, 1:]
            sim = sim.permute(0, 2, 1).reshape(1, len(ps), 14, 14)
            refs.append(F.interpolate(sim, size=hw, mode="bilinear", align_corners=False)[0].numpy())
    with jax.default_matmul_precision("highest"):
        out = GEM(jm, method="clipsurgery", layers=2, size=hw, template="{}", feature_surgery=True)
        out = out.heatmaps(images, prompts)
    for i, (mine, ref) in enumerate(zip(out.logits, refs)):
        assert np.ptp(ref) > 0.05
        assert parity(f"feature surgery maps, image {i}", mine, ref) <= LOGIT_TOL
