"""The ``gem-jax`` command run as a user would: a subprocess, files on disk, exit codes."""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from gem_jax.checkpoints import save_native
from gem_jax.config import CLIPConfig, TextConfig, VisionConfig
from gem_jax.models import init_params

TINY = CLIPConfig(
    vision=VisionConfig(image_size=32, patch_size=8, width=64, layers=3, heads=2),
    text=TextConfig(width=32, layers=1, heads=2),
    embed_dim=32,
)


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    model = root / "tiny-model"
    save_native(model, TINY, init_params(TINY, seed=3))
    e = dict(os.environ, GEM_JAX_WEIGHTS=str(root / "weights"), GEM_JAX_COMPILE_CACHE=str(root / "xla"),
             HF_HUB_OFFLINE="1", JAX_PLATFORMS="cpu")
    return {"root": root, "model": str(model), "env": e}


def run(env, *args, cwd=None):
    proc = subprocess.run([sys.executable, "-m", "gem_jax.cli", *map(str, args)], env=env["env"],
                          cwd=cwd or env["root"], capture_output=True, text=True, timeout=600)
    return proc.returncode, proc.stdout, proc.stderr


def write_image(path, h=40, w=56, seed=0):
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)).save(path)
    return path


def files(d):
    return sorted(p.name for p in pathlib.Path(d).rglob("*") if p.is_file()) if pathlib.Path(d).exists() else []


def test_segment_writes_overlays_grid_labels_and_logits_equal_to_api(env, tmp_path):
    img = write_image(tmp_path / "photo one.png")
    out = tmp_path / "out"
    code, _, err = run(env, "segment", img, "-p", "cat", "-p", "a boxer", "--classes", "cat", "dog",
                       "--model", env["model"], "--gem-layers", "2", "--size", "32x48", "--out", out,
                       "--save-logits", tmp_path / "l.npz")
    assert code == 0, err
    assert files(out) == ["photo_one__a_boxer.png", "photo_one__cat.png", "photo_one__grid.png",
                          "photo_one__labels.png"]
    assert Image.open(out / "photo_one__cat.png").size == (56, 40)  # overlays at the image's own size
    saved = np.load(tmp_path / "l.npz")
    assert saved["logits"].shape == saved["heatmaps"].shape == (1, 2, 32, 48)
    assert list(saved["prompts"]) == ["cat", "a boxer"]

    import gem_jax

    api = gem_jax.GEM(gem_jax.load(env["model"]), layers=2, size=(32, 48)).heatmaps(str(img), ["cat", "a boxer"])
    np.testing.assert_allclose(saved["logits"], api.logits, atol=1e-5)
    np.testing.assert_allclose(saved["heatmaps"], api.heatmaps, atol=1e-5)


def test_segment_directory_glob_and_example_with_progress(env, tmp_path):
    d = tmp_path / "imgs"
    d.mkdir()
    for i in range(2):
        write_image(d / f"im{i}.jpg", seed=i)
    (d / "notes.txt").write_text("not an image")
    out = tmp_path / "out"
    code, _, err = run(env, "segment", d, str(tmp_path / "imgs" / "im0.*"), "--example", "-p", "cat",
                       "--model", env["model"], "--gem-layers", "1", "--size", "32", "--out", out)
    assert code == 0, err
    names = files(out)
    # im0.jpg, named twice (by the directory and the glob), is processed once
    assert set(names) == {"im0__cat.png", "im1__cat.png", "example__cat.png", "im0__grid.png", "im1__grid.png",
                          "example__grid.png"}
    assert "3/3" in err  # the progress bar, on stderr


@pytest.mark.parametrize("case", ["missing", "truncated", "empty_dir", "empty_prompt", "unknown_model",
                                  "offline", "no_prompt", "bad_size"])
def test_bad_input_exit_codes_and_no_output(env, tmp_path, case):
    img = write_image(tmp_path / "ok.png")
    args = ["segment", img, "-p", "cat", "--model", env["model"]]
    expect_code, expect_msg = 1, None
    if case == "missing":
        args[1], expect_msg = tmp_path / "nope.jpg", "nope.jpg"
    elif case == "truncated":
        data = (tmp_path / "ok.png").read_bytes()
        (tmp_path / "cut.png").write_bytes(data[: len(data) // 2])
        args[1], expect_msg = tmp_path / "cut.png", "cut.png"
    elif case == "empty_dir":
        (tmp_path / "empty").mkdir()
        args[1], expect_msg = tmp_path / "empty", "empty"
    elif case == "empty_prompt":
        args[3], expect_code, expect_msg = "  ", 2, "prompt"
    elif case == "unknown_model":
        args[5], expect_code, expect_msg = "ViT-B/16:opnai", 2, "ViT-B/16:openai"
    elif case == "offline":
        args[5], expect_msg = "ViT-B/32:openai", "download"
    elif case == "no_prompt":
        args, expect_code, expect_msg = ["segment", img, "--model", env["model"]], 2, "prompt"
    elif case == "bad_size":
        args += ["--size", "big"]
        expect_code, expect_msg = 2, "--size"
    out = tmp_path / "out"
    code, stdout, err = run(env, *args, "--out", out)
    assert code == expect_code, err
    assert expect_msg in err
    # one message; the offline one also spells out the download command
    assert "Traceback" not in err and len(err.strip().splitlines()) <= (4 if case == "offline" else 2), err
    assert files(out) == []


def test_existing_output_is_not_overwritten_without_force(env, tmp_path):
    img = write_image(tmp_path / "a.png")
    out = tmp_path / "out"
    out.mkdir()
    (out / "a__cat.png").write_bytes(b"keep me")
    base = ["segment", img, "-p", "cat", "-p", "dog", "--model", env["model"], "--gem-layers", "1", "--size",
            "32", "--out", out]
    code, _, err = run(env, *base)
    assert code == 1 and "exists" in err and "--force" in err
    assert files(out) == ["a__cat.png"] and (out / "a__cat.png").read_bytes() == b"keep me"
    code, _, err = run(env, *base, "--force")
    assert code == 0, err
    assert (out / "a__cat.png").read_bytes() != b"keep me"


def test_models_and_convert(env, tmp_path):
    code, stdout, err = run(env, "models")
    assert code == 0, err
    assert "ViT-B/16:openai" in stdout and "hub repository" in stdout
    target = tmp_path / "copy"
    assert run(env, "convert", env["model"], "--out", target)[0] == 0
    code, _, err = run(env, "convert", env["model"], "--out", target)
    assert code == 1 and "--force" in err


def test_no_command_is_usage_error(env):
    code, _, err = run(env)
    assert code == 2 and "segment" in err
