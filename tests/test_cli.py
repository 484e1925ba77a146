"""The ``gem-jax`` command run as a user would: a subprocess, files on disk, exit codes.

Where a case is about what the command decides rather than about the process (start-up,
signals, the hub's offline switch, which ``huggingface_hub`` reads at import), it runs the
same command line through ``gem_jax.cli.main`` in this process (:func:`run_here`), with the
environment and working folder the subprocess would have: the same code path, without a
new interpreter and JAX start-up per case."""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image
from tiny import TINY, save_tiny


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    model = root / "tiny-model"
    save_tiny(model, seed=3)
    e = dict(os.environ, GEM_JAX_WEIGHTS=str(root / "weights"), GEM_JAX_COMPILE_CACHE=str(root / "xla"),
             HF_HUB_OFFLINE="1", JAX_PLATFORMS="cpu")
    return {"root": root, "model": str(model), "env": e}


def run(env, *args, cwd=None):
    proc = subprocess.run([sys.executable, "-m", "gem_jax.cli", *map(str, args)], env=env["env"],
                          cwd=cwd or env["root"], capture_output=True, text=True, timeout=600)
    return proc.returncode, proc.stdout, proc.stderr


def run_here(env, *args, cwd=None):
    """:func:`run` in this process: ``(exit status, stdout, stderr)``."""
    import contextlib
    import io

    from gem_jax import cli

    out, err = io.StringIO(), io.StringIO()
    keys = ("GEM_JAX_WEIGHTS", "GEM_JAX_COMPILE_CACHE")
    saved = {k: os.environ.get(k) for k in keys}
    here = os.getcwd()
    try:
        os.environ.update({k: env["env"][k] for k in keys})
        os.chdir(cwd or env["root"])
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                code = cli.main([str(a) for a in args])
            except SystemExit as e:  # argparse's usage errors
                code = e.code
    finally:
        os.chdir(here)
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    return code, out.getvalue(), err.getvalue()


def write_image(path, h=40, w=56, seed=0):
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)).save(path)
    return path


def files(d):
    """The files a user sees in ``d`` (gem-jax's hidden record of what it wrote left out)."""
    return sorted(p.name for p in pathlib.Path(d).rglob("*") if p.is_file() and not p.name.startswith(".")) \
        if pathlib.Path(d).exists() else []


def test_segment_writes_overlays_grid_labels_and_logits_equal_to_api(env, tmp_path):
    img = write_image(tmp_path / "photo one.png")
    out = tmp_path / "out"
    code, _, err = run(env, "segment", img, "-p", "cat", "-p", "a boxer", "--classes", "cat", "dog",
                       "--model", env["model"], "--gem-layers", "2", "--size", "32x48", "--out", out,
                       "--save-logits", tmp_path / "l.npz")
    assert code == 0, err
    assert files(out) == ["photo_one__gem__a_boxer.png", "photo_one__gem__cat.png", "photo_one__gem__grid.png",
                          "photo_one__gem__labels.png"]
    assert Image.open(out / "photo_one__gem__cat.png").size == (56, 40)  # overlays at the image's own size
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
    assert set(names) == {"im0__gem__cat.png", "im1__gem__cat.png", "example__gem__cat.png", "im0__gem__grid.png",
                          "im1__gem__grid.png", "example__gem__grid.png"}
    assert "3/3" in err  # the progress bar, on stderr


@pytest.mark.parametrize("case", ["missing", "truncated", "empty_dir", "empty_prompt", "unknown_model",
                                  "offline", "no_prompt", "bad_size"])
def test_bad_input_exit_codes_and_no_output(env, tmp_path, case):
    img = write_image(tmp_path / "ok.png")
    args = ["segment", img, "-p", "cat", "--model", env["model"], "--gem-layers", "1"]
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
        args, expect_code, expect_msg = ["segment", img, "--model", env["model"], "--gem-layers", "1"], 2, "prompt"
    elif case == "bad_size":
        args += ["--size", "big"]
        expect_code, expect_msg = 2, "--size"
    out = tmp_path / "out"
    # the hub's offline switch is read when huggingface_hub is imported: that case runs as its own process
    code, stdout, err = (run if case == "offline" else run_here)(env, *args, "--out", out)
    assert code == expect_code, err
    assert expect_msg in err
    # one message (after the progress line of the model load); the offline one also spells out the download
    lines = [line for line in err.strip().splitlines() if not line.startswith("segment: loading model")]
    assert "Traceback" not in err and len(lines) <= (4 if case == "offline" else 2), err
    assert files(out) == []


def test_existing_output_is_not_overwritten_without_force(env, tmp_path):
    img = write_image(tmp_path / "a.png")
    out = tmp_path / "out"
    out.mkdir()
    (out / "a__gem__cat.png").write_bytes(b"keep me")  # the user's file, where segment would write
    base = ["segment", img, "-p", "cat", "-p", "dog", "--model", env["model"], "--gem-layers", "1", "--size",
            "32", "--out", out]
    for force in ([], ["--force"]):  # never replaced: gem-jax did not write it
        code, _, err = run_here(env, *base, *force)
        assert code == 1 and "was not written by gem-jax" in err and "--force" not in err, err
        assert files(out) == ["a__gem__cat.png"] and (out / "a__gem__cat.png").read_bytes() == b"keep me"
    (out / "a__gem__cat.png").unlink()
    assert run_here(env, *base)[0] == 0
    code, _, err = run_here(env, *base)  # its own files: replaced only with --force
    assert code == 1 and "exists" in err and "--force" in err, err
    code, _, err = run_here(env, *base, "--force")
    assert code == 0, err
    # a second method writes beside the first instead of in its way
    code, _, err = run_here(env, "segment", img, "-p", "cat", "--model", env["model"], "--method", "clearclip", "--size", "32",
                       "--out", out)
    assert code == 0, err
    assert {"a__gem__cat.png", "a__clearclip__cat.png"} <= set(files(out))


def test_models_and_convert(env, tmp_path):
    code, stdout, err = run(env, "models")
    assert code == 0, err
    assert "ViT-B/16:openai" in stdout and "hub repository" in stdout
    target = tmp_path / "copy"
    assert run(env, "convert", env["model"], "--out", target)[0] == 0
    code, _, err = run(env, "convert", env["model"], "--out", target)
    assert code == 1 and "--force" in err


def test_convert_registry_hub_id_is_the_registry_entry(env, tmp_path, monkeypatch, capsys):
    """The README's example: the hub id of ViT-B/16:openai is that model, same folder, same message."""
    monkeypatch.setenv("GEM_JAX_WEIGHTS", str(tmp_path / "weights"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    errs = []
    for source in ("openai/clip-vit-base-patch16", "ViT-B/16:openai"):
        code, err = in_process(["convert", source], capsys)
        assert code == 1, err
        errs.append(err)
    assert errs[0] == errs[1] and str(tmp_path / "weights" / "ViT-B-16.openai") in errs[0]
    assert "ViT-B/16:openai" in errs[0] and "open_clip_config.json" not in errs[0] and "Traceback" not in errs[0]
    code, err = in_process(["convert", env["model"]], capsys)  # not a registry model: --out is needed
    assert code == 2 and "--out" in err
    code, err = in_process(["convert", env["model"], "--out", tmp_path / "x", "--seed", "3"], capsys)
    assert code == 2 and "--random" in err and not (tmp_path / "x").exists()


def test_no_command_is_usage_error(env):
    code, _, err = run(env)
    assert code == 2 and "segment" in err


def test_models_shows_activation_and_the_local_state(env, tmp_path):
    weights = pathlib.Path(env["env"]["GEM_JAX_WEIGHTS"])
    (weights / "ViT-B-32.openai").mkdir(parents=True, exist_ok=True)
    (weights / "ViT-B-32.openai" / "ViT-B-32.pt").write_bytes(b"as downloaded")
    code, stdout, err = run(env, "models")
    assert code == 0, err
    rows = {r[0]: r for r in map(str.split, stdout.splitlines()) if r and ":" in r[0]}
    assert rows["ViT-B/32:openai"][2] == "quick_gelu" and rows["ViT-B/32:openai"][-2:] == ["original", "files"]
    assert rows["ViT-B/16:laion2b_s34b_b88k"][2] == "gelu" and rows["ViT-B/16:laion2b_s34b_b88k"][-1] == "-"


def in_process(args, capsys):
    from gem_jax import cli

    code = cli.main([str(a) for a in args])
    return code, capsys.readouterr().err


def test_segment_one_tower_pass_serves_prompts_and_classes(env, tmp_path, monkeypatch, capsys):
    from gem_jax import pipeline

    calls = []
    original = pipeline.GEM.heatmaps

    def counting(self, images, prompts, **kw):
        calls.append(list(prompts))
        return original(self, images, prompts, **kw)

    monkeypatch.setattr(pipeline.GEM, "heatmaps", counting)
    monkeypatch.setattr(pipeline.GEM, "segment", lambda *a, **k: pytest.fail("a second pass through the tower"))
    img = write_image(tmp_path / "a.png")
    code, err = in_process(["segment", img, "-p", "cat", "-p", "sofa", "--classes", "sofa", "plant",
                            "--model", env["model"], "--gem-layers", "1", "--size", "32", "--out", tmp_path / "o",
                            "--no-compile-cache"], capsys)
    assert code == 0, err
    assert calls == [["cat", "sofa", "plant"]]  # one pass, each text once
    assert files(tmp_path / "o") == ["a__gem__cat.png", "a__gem__grid.png", "a__gem__labels.png", "a__gem__sofa.png"]
    # feedback on stderr: the load, the compilation and the time taken
    assert "loading model" in err and "compiling for 32x32" in err and " s" in err.splitlines()[-1]


def test_segment_says_when_a_prompt_is_an_image_file(env, tmp_path, capsys):
    img = write_image(tmp_path / "photo.jpg")
    code, err = in_process(["segment", "-p", "cat", img, "--model", env["model"]], capsys)
    assert code == 2 and "no images given" in err and "is a file" in err and str(img) in err
    assert "Traceback" not in err


def test_segment_on_error_skip_goes_on_and_lists_the_skipped(env, tmp_path, capsys):
    good = [write_image(tmp_path / f"ok{i}.png", seed=i) for i in range(2)]
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"not a png at all")
    base = ["segment", good[0], bad, good[1], "-p", "cat", "--model", env["model"], "--gem-layers", "1",
            "--size", "32", "--no-compile-cache"]
    code, err = in_process([*base, "--out", tmp_path / "fail"], capsys)
    assert code == 1 and "broken.png" in err and "--on-error skip" in err
    assert files(tmp_path / "fail") == []
    code, err = in_process([*base, "--out", tmp_path / "skip", "--on-error", "skip"], capsys)
    assert code == 3, err  # done, with inputs skipped: the same status in every command
    assert files(tmp_path / "skip") == ["ok0__gem__cat.png", "ok0__gem__grid.png", "ok1__gem__cat.png",
                                        "ok1__gem__grid.png"]
    assert "wrote 4 file(s)" in err
    tail = err[err.index("skipped 1 unreadable image"):]
    assert str(bad) in tail


def test_convert_random_then_segment_labels_the_pictures(env, tmp_path, monkeypatch, capsys):
    from gem_jax import visualize
    from gem_jax.config import ARCHITECTURES

    monkeypatch.setitem(ARCHITECTURES, "Tiny-8", TINY)
    code, err = in_process(["convert", "--random", "Tiny-8", "--out", tmp_path / "rnd", "--seed", "4"], capsys)
    assert code == 0 and "RANDOM" in err, err
    titles = []
    for name in ("heatmap_grid", "label_figure"):
        real = getattr(visualize, name)

        def spy(*a, _real=real, **k):
            fig = _real(*a, **k)
            titles.append(fig._suptitle.get_text() if fig._suptitle else None)
            return fig

        monkeypatch.setattr(visualize, name, spy)
    code, err = in_process(["segment", write_image(tmp_path / "a.png"), "-p", "cat", "--classes", "cat", "dog",
                            "--model", tmp_path / "rnd", "--gem-layers", "1", "--size", "32",
                            "--out", tmp_path / "o", "--no-compile-cache"], capsys)
    assert code == 0, err
    assert len(titles) == 2 and all(t and "RANDOM weights" in t for t in titles)


def test_segment_streams_decoding_a_bounded_number_of_images_ahead(env, tmp_path, monkeypatch, capsys):
    from gem_jax import pipeline, preprocess
    from gem_jax.cli import segment as segment_cmd

    n = 12
    paths = [write_image(tmp_path / f"im{i:02d}.png", seed=i) for i in range(n)]
    decoded, at_call = [], []
    load_image, heatmaps = preprocess.load_image, pipeline.GEM.heatmaps

    def counting_load(src):
        if not isinstance(src, np.ndarray):  # a file or a PIL image: a decode (not GEM's own array check)
            decoded.append(src)
        return load_image(src)

    def counting_heatmaps(self, images, prompts, **kw):
        at_call.append(len(decoded))
        return heatmaps(self, images, prompts, **kw)

    monkeypatch.setattr(preprocess, "load_image", counting_load)
    monkeypatch.setattr(pipeline.GEM, "heatmaps", counting_heatmaps)
    code, err = in_process(["segment", *paths, "-p", "cat", "--model", env["model"], "--gem-layers", "1",
                            "--size", "32", "--out", tmp_path / "o", "--no-compile-cache"], capsys)
    assert code == 0, err
    assert len(decoded) == n and len(at_call) == n  # each image decoded once, one model call each
    assert 1 <= at_call[0] < n  # the first result did not wait for every image to be decoded
    # at most the loader's prefetch ahead of the model at any time: memory does not grow with n
    assert all(count <= k + 1 + segment_cmd.SEGMENT_PREFETCH for k, count in enumerate(at_call)), at_call
    assert len(files(tmp_path / "o")) == 2 * n


def test_segment_stops_or_skips_on_a_bad_image_found_while_streaming(env, tmp_path, capsys):
    good = [write_image(tmp_path / f"ok{i}.png", seed=i) for i in range(2)]
    data = write_image(tmp_path / "whole.jpg", 64, 64).read_bytes()
    cut = tmp_path / "cut.jpg"  # a valid header: only decoding finds the damage (a PNG's is found up front)
    cut.write_bytes(data[: len(data) // 2])
    (tmp_path / "whole.jpg").unlink()
    base = ["segment", good[0], cut, good[1], "-p", "cat", "--model", env["model"], "--gem-layers", "1",
            "--size", "32", "--no-compile-cache"]
    code, err = in_process([*base, "--out", tmp_path / "fail", "--save-logits", tmp_path / "fail.npz"], capsys)
    assert code == 1 and f"cannot decode image {cut}: " in err and "--on-error skip" in err, err
    assert "Traceback" not in err and not (tmp_path / "fail.npz").exists()
    assert not [p for p in tmp_path.iterdir() if ".gemjax-" in p.name]  # no temporary logits left
    code, err = in_process([*base, "--out", tmp_path / "skip", "--on-error", "skip",
                            "--save-logits", tmp_path / "skip.npz"], capsys)
    assert code == 3, err
    assert files(tmp_path / "skip") == ["ok0__gem__cat.png", "ok0__gem__grid.png", "ok1__gem__cat.png",
                                        "ok1__gem__grid.png"]
    assert str(cut) in err[err.index("skipped 1 unreadable image"):]
    assert list(np.load(tmp_path / "skip.npz")["images"]) == [str(good[0]), str(good[1])]


@pytest.mark.parametrize("sizes", ["mixed", "same"])
def test_segment_save_logits_written_incrementally_equals_the_in_memory_file(env, tmp_path, capsys, sizes):
    import gem_jax

    shapes = [(40, 56), (64, 32), (40, 40)] if sizes == "mixed" else [(40, 56), (40, 56), (40, 56)]
    paths = [write_image(tmp_path / f"im{i}.png", h, w, seed=i) for i, (h, w) in enumerate(shapes)]
    prompts = ["cat", "a boxer"]
    target = tmp_path / "sub" / "l.npz"
    code, err = in_process(["segment", *paths, "-p", *prompts, "--model", env["model"], "--gem-layers", "1",
                            "--short-side", "32", "--out", tmp_path / "o", "--save-logits", target,
                            "--no-compile-cache"], capsys)
    assert code == 0, err
    # the documented schema, written in memory with np.savez from the API's results
    gem = gem_jax.GEM(gem_jax.load(env["model"]), layers=1, short_side=32)
    outs = [gem.heatmaps(str(p), prompts) for p in paths]
    arrays = {"prompts": np.array(prompts), "images": np.array([str(p) for p in paths]),
              "sizes": np.array([o.sizes[0] for o in outs], dtype=np.int32),
              "description": np.array(json.dumps(gem.describe()))}
    if sizes == "same":
        arrays["logits"] = np.stack([o.logits[0] for o in outs])
        arrays["heatmaps"] = np.stack([o.heatmaps[0] for o in outs])
    else:
        for i, o in enumerate(outs):
            arrays[f"logits_{i}"], arrays[f"heatmaps_{i}"] = o.logits[0], o.heatmaps[0]
    expected = tmp_path / "expected.npz"
    np.savez(expected, **arrays)
    got, want = np.load(target), np.load(expected)
    assert got.files == want.files
    assert ("logits" in got.files) == (sizes == "same")
    for key in want.files:
        assert got[key].dtype == want[key].dtype and got[key].shape == want[key].shape, key
        if got[key].dtype.kind in "US":
            assert (got[key] == want[key]).all(), key
        else:
            np.testing.assert_allclose(got[key], want[key], atol=1e-5, err_msg=key)
    # no temporaries left; beside the file, gem-jax's record that it wrote it
    assert sorted(p.name for p in target.parent.iterdir()) == [".gem-jax-files.jsonl", "l.npz"]
