"""Careless and hostile input: no lost data, no silent wrong results, no runaway runs, early failures."""

from __future__ import annotations

import os
import pathlib
import stat

import numpy as np
import pytest
from PIL import Image

from gem_jax import cli
from gem_jax.checkpoints import save_native
from gem_jax.models import init_params
from tiny import TINY, save_tiny


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    path = tmp_path_factory.mktemp("model") / "tiny"
    save_tiny(path, seed=3)
    return path


@pytest.fixture(autouse=True)
def _offline(monkeypatch, tmp_path_factory):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("GEM_JAX_WEIGHTS", str(tmp_path_factory.getbasetemp() / "weights"))


def gem_jax_cli(capsys, *args):
    """Runs the command in this process: (exit code, stderr)."""
    try:
        code = cli.main([str(a) for a in args] + ["--no-compile-cache"] * (args[0] in ("segment", "eval")))
    except SystemExit as e:  # argparse's own usage errors
        code = e.code
    return code, capsys.readouterr().err


def write_image(path, h=40, w=56, seed=0):
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)).save(path)
    return path


def listing(d):
    """What a user sees in ``d`` (gem-jax's hidden record of the files it wrote left out)."""
    d = pathlib.Path(d)
    return sorted(str(p.relative_to(d)) for p in d.rglob("*") if p.name != ".gem-jax-files.jsonl")


# ----------------------------------------------------------------------------- convert --force


def test_convert_force_never_removes_what_gem_jax_did_not_write(tiny_model, tmp_path, capsys, monkeypatch):
    work = tmp_path / "work"
    (work / "sub").mkdir(parents=True)
    (work / "thesis.tex").write_text("years of work")
    (work / "sub" / "data.csv").write_text("1,2")
    before = listing(work)
    monkeypatch.chdir(work)
    for out in (".", work):  # the working directory itself, and any other directory of the user's
        code, err = gem_jax_cli(capsys, "convert", tiny_model, "--out", out, "--force")
        assert code == 1 and "refusing to replace" in err, err
        assert listing(work) == before and (work / "thesis.tex").read_text() == "years of work"

    # A converted checkpoint with a file of the user's added is refused too.
    ckpt = tmp_path / "ckpt"
    assert gem_jax_cli(capsys, "convert", tiny_model, "--out", ckpt)[0] == 0
    (ckpt / "notes.txt").write_text("mine")
    code, err = gem_jax_cli(capsys, "convert", tiny_model, "--out", ckpt, "--force")
    assert code == 1 and "notes.txt" in err, err
    assert (ckpt / "notes.txt").read_text() == "mine"


def test_convert_force_replaces_its_own_checkpoint_atomically_with_the_umask(tiny_model, tmp_path, capsys):
    ckpt = tmp_path / "ckpt"
    old_mask = os.umask(0o022)
    try:
        assert gem_jax_cli(capsys, "convert", tiny_model, "--out", ckpt)[0] == 0
        first = (ckpt / "config.json").stat().st_ino
        code, err = gem_jax_cli(capsys, "convert", tiny_model, "--out", ckpt, "--force")
    finally:
        os.umask(old_mask)
    assert code == 0, err
    assert (ckpt / "config.json").stat().st_ino != first  # a new copy, renamed into place
    assert stat.S_IMODE(ckpt.stat().st_mode) == 0o755
    assert {stat.S_IMODE(p.stat().st_mode) for p in ckpt.iterdir()} == {0o644}
    assert listing(tmp_path) == ["ckpt", "ckpt/config.json", "ckpt/model.safetensors"]  # no .tmp or .old left


# ----------------------------------------------------------------------------- output names


def test_segment_output_names_are_distinct_and_the_count_is_true(tiny_model, tmp_path, capsys):
    for folder in ("d1", "d2"):
        (tmp_path / folder).mkdir()
        write_image(tmp_path / folder / "a.png")
    write_image(tmp_path / "d2" / "a_1.png", seed=1)
    prompts = ["Cat", "cat!", "cat.", "猫", "собака", "grid", "labels", "a cat"]
    out = tmp_path / "out"
    code, err = gem_jax_cli(capsys, "segment", tmp_path / "d1", tmp_path / "d2", "-p", *prompts, "--classes",
                            "cat", "dog", "--model", tiny_model, "--gem-layers", "1", "--size", "32", "--out", out)
    assert code == 0, err
    names = listing(out)
    assert len(names) == 3 * (len(prompts) + 2)  # per image: an overlay per prompt, the grid, the label map
    assert len({n.lower() for n in names}) == len(names)  # distinct on case-insensitive file systems too
    assert f"wrote {len(names)} file(s)" in err
    assert "a__gem__a_cat.png" in names and "a__gem__grid.png" in names  # plain prompts keep plain names
    # a name depends on its prompt only, not on the others given with it
    code, err = gem_jax_cli(capsys, "segment", tmp_path / "d1" / "a.png", "-p", "猫", "--model", tiny_model,
                            "--gem-layers", "1", "--size", "32", "--out", tmp_path / "solo")
    assert code == 0, err
    assert set(listing(tmp_path / "solo")) - {"a__gem__grid.png"} <= set(names)


# ----------------------------------------------------------------------------- duplicate classes


@pytest.mark.parametrize("classes", [["cat", "dog", "cat"], ["Cat", "dog", "cat "]])
def test_duplicate_classes_are_refused(tiny_model, tmp_path, capsys, classes):
    img = write_image(tmp_path / "a.png")
    out = tmp_path / "out"
    code, err = gem_jax_cli(capsys, "segment", img, "--classes", *classes, "--model", tiny_model, "--gem-layers", "1",
                            "--size", "32", "--out", out)
    assert code == 2 and "give each class name once" in err, err
    assert not out.exists()

    import gem_jax

    gem = gem_jax.GEM(gem_jax.load(str(tiny_model)), layers=1, size=32)
    with pytest.raises(ValueError, match="give each class name once"):
        gem.segment(str(img), classes)


# ----------------------------------------------------------------------------- degenerate numbers


@pytest.mark.parametrize("option", [["--temperature", "1e-30"], ["--temperature", "inf"],
                                    ["--iterations", "1000000000"], ["--size", "0"], ["--size", "32x0"]])
def test_degenerate_numbers_are_refused_with_the_valid_range(tiny_model, tmp_path, capsys, option):
    img = write_image(tmp_path / "a.png")
    out = tmp_path / "out"
    code, err = gem_jax_cli(capsys, "segment", img, "-p", "cat", "--classes", "cat", "dog", "--model", tiny_model,
                            "--gem-layers", "1", "--size", "32", *option, "--out", out)
    assert code == 2, err
    assert option[0] in err or "temperature" in err or "iterations" in err, err
    assert not out.exists()


def test_tiny_temperature_in_the_api_is_refused_not_nan(tiny_model):
    import gem_jax
    from gem_jax.engine.gem import MIN_TEMPERATURE

    model = gem_jax.load(str(tiny_model))
    with pytest.raises(ValueError, match="temperature must be a finite number >= 0.001"):
        gem_jax.GEM(model, layers=1, size=32, temperature=1e-30)
    out = gem_jax.GEM(model, layers=1, size=32, temperature=MIN_TEMPERATURE).heatmaps(
        np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8), ["cat", "dog"])
    assert np.isfinite(out.logits).all()  # the smallest accepted value still computes


def test_nan_weights_are_an_error_at_load(tmp_path):
    import gem_jax
    from gem_jax.checkpoints import CheckpointError

    params = init_params(TINY, seed=3)
    params["visual"]["ln_post"]["scale"] = np.full_like(np.asarray(params["visual"]["ln_post"]["scale"]), np.nan)
    save_native(tmp_path / "bad", TINY, params)
    with pytest.raises(CheckpointError, match=r"NaN or infinite values in 1 tensor\(s\): visual/ln_post/scale"):
        gem_jax.load(str(tmp_path / "bad"))


# ----------------------------------------------------------------------------- eval: results, state, signals


@pytest.fixture
def voc(tmp_path, monkeypatch):
    import dataclasses

    from gem_jax.eval.protocols import GEM_PROTOCOL, PROTOCOLS
    from test_eval_datasets import make_voc

    make_voc(tmp_path / "voc")
    monkeypatch.setitem(PROTOCOLS, "gem", dataclasses.replace(GEM_PROTOCOL, short_side=32))
    return tmp_path / "voc"


def eval_args(voc, tiny_model, *extra):
    return ("eval", "--dataset", "voc", "--root", voc, "--model", tiny_model, "--gem-layers", "1",
            "--no-progress", *extra)


def test_eval_out_is_not_overwritten_without_force(voc, tiny_model, tmp_path, capsys):
    out = tmp_path / "results.json"
    out.write_text("last week's results")  # the user's: never replaced, --force or not
    for force in ([], ["--force"]):
        code, err = gem_jax_cli(capsys, *eval_args(voc, tiny_model, "--out", out, "--limit", "1", *force))
        assert code == 1 and "was not written by gem-jax" in err and "--force" not in err, err
        assert out.read_text() == "last week's results"
    out.unlink()
    code, err = gem_jax_cli(capsys, *eval_args(voc, tiny_model, "--out", out, "--limit", "1"))
    assert code == 0 and '"mIoU"' in out.read_text(), err
    code, err = gem_jax_cli(capsys, *eval_args(voc, tiny_model, "--out", out, "--limit", "1"))
    assert code == 1 and "pass --force" in err, err  # its own results: replaced only when asked
    code, err = gem_jax_cli(capsys, *eval_args(voc, tiny_model, "--out", out, "--limit", "1", "--force"))
    assert code == 0 and '"mIoU"' in out.read_text(), err


def test_eval_saves_its_state_on_sigterm(voc, tiny_model, tmp_path, capsys, monkeypatch):
    import signal

    from gem_jax.eval import runner

    class NotHandled(Exception):
        pass

    def unhandled(signum, frame):  # stands in for the default action (death without a save)
        raise NotHandled()

    real, calls = runner._Run.score_labels, []

    def preempted(self, sample, label, logits, *rest):
        calls.append(sample.id)
        real(self, sample, label, logits, *rest)
        if len(calls) == 2:
            os.kill(os.getpid(), signal.SIGTERM)  # a scheduler pre-empts the job after the second image

    monkeypatch.setattr(runner._Run, "score_labels", preempted)
    previous = signal.signal(signal.SIGTERM, unhandled)
    try:
        code, err = gem_jax_cli(capsys, *eval_args(voc, tiny_model, "--out", tmp_path / "r.json",
                                                    "--batch-size", "1"))
        assert signal.getsignal(signal.SIGTERM) is unhandled  # the command put it back
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert code == 143 and "terminated" in err and "resume" in err, err
    with np.load(tmp_path / "r.json.state.npz") as z:
        assert len(z["done"]) == 2


def test_eval_saves_its_state_by_time_not_image_count(voc, tiny_model, tmp_path, monkeypatch):
    import gem_jax
    from gem_jax.eval import datasets, runner

    clock = [0.0]
    monkeypatch.setattr(runner.time, "monotonic", lambda: clock[0])
    real, seen = runner._Run.score_labels, []
    state = tmp_path / "s.npz"

    def slow(self, sample, label, logits, *rest):
        if state.exists():
            with np.load(state) as z:
                seen.append(len(z["done"]))
        real(self, sample, label, logits, *rest)
        clock[0] += 61.0  # a minute per image

    monkeypatch.setattr(runner._Run, "score_labels", slow)
    gem = gem_jax.GEM(gem_jax.load(str(tiny_model)), layers=1, batch_size=1)
    runner.evaluate(gem, datasets.voc(voc), "gem", state_file=state, batch_size=1, progress=False)
    assert seen == [1, 2]  # saved after every image that took more than the 60 s interval


@pytest.mark.parametrize("content", ["truncated", "foreign"])
def test_eval_damaged_state_file_gets_a_message_naming_it(voc, tiny_model, tmp_path, capsys, content):
    out = tmp_path / "r.json"
    state = tmp_path / "r.json.state.npz"
    assert gem_jax_cli(capsys, *eval_args(voc, tiny_model, "--out", out, "--limit", "1"))[0] == 0
    data = state.read_bytes()
    if content == "truncated":
        state.write_bytes(data[: len(data) // 2])
    else:
        np.savez(state, weights=np.zeros(3))
    out.unlink()
    code, err = gem_jax_cli(capsys, *eval_args(voc, tiny_model, "--out", out))
    assert code == 1, err
    # changed since gem-jax wrote it: named, left alone, and no step offered that would delete it
    assert str(state) in err and "--restart" not in err and "rerun" not in err, err
    assert "BadZipFile" not in err
    assert len(err.strip().splitlines()) == 1
    code, err = gem_jax_cli(capsys, *eval_args(voc, tiny_model, "--out", out, "--restart"))
    assert code == 1 and state.exists(), err
    state.rename(tmp_path / "moved-away.npz")
    code, err = gem_jax_cli(capsys, *eval_args(voc, tiny_model, "--out", out))
    assert code == 0, err


def test_temporaries_of_a_killed_run_are_removed_by_the_next(voc, tiny_model, tmp_path, capsys):
    import subprocess
    import sys

    out_dir = tmp_path / "results"
    out_dir.mkdir()
    (out_dir / ".notes.tmp").write_text("the user's")
    proc = subprocess.run([sys.executable, "-c",
                           "import os, sys; from gem_jax import files as _files\n"
                           "fd, temp = _files.open_temp(sys.argv[1]); os.write(fd, b'half'); os.kill(os.getpid(), 9)",
                           str(out_dir / "r.json")])
    assert proc.returncode == -9
    leftovers = [p.name for p in out_dir.iterdir() if p.name.startswith(".r.json.")]
    assert len(leftovers) == 1
    code, err = gem_jax_cli(capsys, *eval_args(voc, tiny_model, "--out", out_dir / "r.json", "--limit", "1"))
    assert code == 0, err
    assert sorted(p.name for p in out_dir.iterdir()) == [".gem-jax-files.jsonl", ".notes.tmp", "r.json",
                                                         "r.json.state.npz"]


# ----------------------------------------------------------------------------- fail early, in our words


@pytest.mark.parametrize("case", ["logits_dir", "out_file", "cache_file", "size0", "layers", "template",
                                  "temperature"])
def test_segment_refuses_bad_options_before_loading_the_model(tiny_model, tmp_path, capsys, monkeypatch, case):
    def no_load(name):
        raise AssertionError("the model was loaded")

    from gem_jax import loading

    monkeypatch.setattr(loading, "open_model", no_load)
    img = write_image(tmp_path / "a.png")
    out = tmp_path / "out"
    extra = {"logits_dir": ["--save-logits", tmp_path], "out_file": [], "cache_file": [],
             "size0": ["--size", "0"], "layers": ["--gem-layers", "4"], "template": ["--template", "a {} of {}"],
             "temperature": ["--temperature", "1e-9"]}[case]
    if case == "out_file":
        out = tmp_path / "out.txt"
        out.write_text("a file")
    args = ["segment", img, "-p", "cat", "--model", tiny_model, "--gem-layers", "1", "--out", out, *extra]
    if case == "cache_file":
        (tmp_path / "cache").write_text("a file")
        code = cli.main([str(a) for a in args] + ["--compile-cache", str(tmp_path / "cache")])
        err = capsys.readouterr().err
    else:
        code, err = gem_jax_cli(capsys, *args)
    assert code == 2, err
    assert len(err.strip().splitlines()) == 1 and "Error" not in err and "overwrite=True" not in err, err
    assert out.is_file() if case == "out_file" else not out.exists()  # and no empty directory left


def test_eval_refuses_bad_options_before_loading_the_model(voc, tiny_model, tmp_path, capsys, monkeypatch):
    from gem_jax import loading

    monkeypatch.setattr(loading, "open_model", lambda name: pytest.fail("the model was loaded"))
    code, err = gem_jax_cli(capsys, *eval_args(voc, tiny_model, "--temperature", "1e-9"))
    assert code == 2 and "temperature" in err, err
    (tmp_path / "preds").write_text("a file")
    code, err = gem_jax_cli(capsys, *eval_args(voc, tiny_model, "--save-predictions", tmp_path / "preds"))
    assert code == 2 and "--save-predictions" in err, err


def test_api_errors_are_one_sentence_in_our_words(tiny_model):
    import gem_jax

    model = gem_jax.load(str(tiny_model))
    with pytest.raises(ValueError, match="exactly one {}"):
        gem_jax.GEM(model, layers=1, template="a {} of {}")
    gem = gem_jax.GEM(model, layers=1, size=32)
    image = np.zeros((32, 32, 3), np.uint8)
    with pytest.raises(ValueError, match="prompts must be a string, a list of strings"):
        gem.heatmaps(image, None)
    with pytest.raises(ValueError, match="class names must be a list"):
        gem.segment(image, None)


def test_inputs_are_deduplicated_by_real_path(tmp_path):
    from gem_jax import preprocess

    d = tmp_path / "photos"
    d.mkdir()
    write_image(d / "cat.png")
    (d / "loop").symlink_to(d)  # a symlink loop: ** finds cat.png again at every depth
    (tmp_path / "alias.png").symlink_to(d / "cat.png")
    found = preprocess.expand_image_paths([str(d / "**" / "*.png"), str(d / "cat.png"), str(tmp_path / "alias.png"),
                                           str(d)])
    assert found == [d / "cat.png"]


def test_offline_hub_names_fail_fast_without_download_attempts(monkeypatch, tmp_path):
    import huggingface_hub
    from huggingface_hub import constants

    from gem_jax import checkpoints
    from gem_jax.checkpoints.hub import _hub_errors

    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")  # nothing listens there: refused at once
    monkeypatch.chdir(tmp_path)
    attempts = []

    def fake_download(repo, filename, local_files_only=False, **kw):
        attempts.append(local_files_only)
        if local_files_only:
            raise _hub_errors()[1]("not in the cache")
        raise OSError("connection failed after the client's retries")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_download)
    with pytest.raises(checkpoints.ModelNotAvailableError) as e:
        checkpoints.resolve("someorg/some-model")
    assert "no local file or directory someorg/some-model" in str(e.value)
    assert "cannot be reached" in str(e.value)
    assert attempts and not any(a is False for a in attempts)  # only the cache was asked, no network attempt


# ----------------------------------------------------------------------------- memory


def test_long_side_is_capped_in_short_side_mode(tiny_model):
    import gem_jax
    from gem_jax import preprocess

    assert preprocess.target_size(5, 5000, short_side=448, patch_size=16, max_long_side=2048) == (16, 2048)
    assert preprocess.target_size(5000, 5, short_side=448, patch_size=16, max_long_side=2048) == (2048, 16)
    assert preprocess.target_size(375, 500, short_side=448, patch_size=16, max_long_side=2048) == (448, 592)
    gem = gem_jax.GEM(gem_jax.load(str(tiny_model)), layers=1, short_side=448)
    assert max(gem.input_size(np.zeros((5, 5000, 3), np.uint8))) == gem_jax.pipeline.MAX_LONG_SIDE
    free = gem_jax.GEM(gem_jax.load(str(tiny_model)), layers=1, short_side=448, max_long_side=None)
    assert free.input_size(np.zeros((5, 5000, 3), np.uint8)) == (448, 448000)


def test_memory_estimate_refuses_with_the_figure_and_the_way_out(tiny_model, tmp_path, capsys):
    import gem_jax
    from gem_jax.engine.cost import MemoryLimitError, estimate_memory

    model = gem_jax.load(str(tiny_model))
    # the estimate grows with the size and shrinks with the schedule
    small, big = (estimate_memory(TINY, hw, 1, 1) for hw in ((32, 32), (2048, 2048)))
    assert big > 2 ** 34 > small
    one = gem_jax.Schedule(head_chunk=1, image_chunk=1)
    assert estimate_memory(TINY, (512, 512), 4, 1, schedule=one) < estimate_memory(
        TINY, (512, 512), 4, 1, schedule=gem_jax.Schedule())
    gem = gem_jax.GEM(model, layers=1, size=2048, memory_limit=8 * 2 ** 30)
    with pytest.raises(MemoryLimitError, match=r"2048x2048 .* needs about \d+\.\d GiB, more than the 8\.0 GiB .*"
                                               r"head_chunk=1"):
        gem.heatmaps(np.zeros((32, 32, 3), np.uint8), ["cat"])
    img = write_image(tmp_path / "a.png")
    code, err = gem_jax_cli(capsys, "segment", img, "-p", "cat", "--model", tiny_model, "--gem-layers", "1",
                            "--size", "4096", "--out", tmp_path / "out")
    assert code == 1 and "GiB" in err and "a smaller --size or --short-side" in err, err
    assert "Schedule" not in err and "memory_limit" not in err  # the command line's words, not Python's
    assert not (tmp_path / "out").exists()


def test_many_prompts_go_in_chunks_with_the_same_results(tiny_model, monkeypatch):
    import gem_jax
    from gem_jax import pipeline

    model = gem_jax.load(str(tiny_model))
    image = np.random.default_rng(0).integers(0, 256, (32, 48, 3), dtype=np.uint8)
    prompts = [f"thing number {i}" for i in range(21)]
    whole = gem_jax.GEM(model, layers=1, size=32).heatmaps([image, image], [prompts, prompts[:5]])
    monkeypatch.setattr(pipeline, "PROMPT_CHUNK", 8)
    gem = gem_jax.GEM(model, layers=1, size=32)
    widths, towers = [], []
    real, real_tokens = gem.maps, gem.tokens
    gem.maps = lambda tokens, text, mask, stats=None: (widths.append(text.shape[1]), real(tokens, text, mask, stats))[1]
    gem.tokens = lambda pixels: (towers.append(pixels.shape[0]), real_tokens(pixels))[1]
    chunked = gem.heatmaps([image, image], [prompts, prompts[:5]])
    assert set(widths) == {8} and len(widths) == 3  # 21 prompts: three calls of 8, never all at once
    assert towers == [2]  # and the image tower ran once for both images, not once per chunk
    for a, b in zip(chunked.logits, whole.logits):
        assert a.shape == b.shape
        np.testing.assert_allclose(a, b, atol=1e-5)
    for a, b in zip(chunked.heatmaps, whole.heatmaps):
        np.testing.assert_allclose(a, b, atol=1e-5)


def test_bench_out_naming_a_directory_fails_before_the_timing(tmp_path, capsys, monkeypatch):
    from gem_jax import bench

    monkeypatch.setattr(bench, "run", lambda *a, **k: pytest.fail("the benchmark ran"))
    code, err = gem_jax_cli(capsys, "bench", "--out", tmp_path)
    assert code == 2 and "--out" in err, err


def test_non_finite_maps_raise_instead_of_being_returned():
    import jax

    import gem_jax
    from gem_jax.tokenizer import Tokenizer

    params = jax.tree_util.tree_map(np.asarray, init_params(TINY, seed=3))
    params["visual"]["proj"] = np.full_like(params["visual"]["proj"], np.nan)  # a model built by hand, unchecked
    gem = gem_jax.GEM(gem_jax.Model(TINY, params, Tokenizer.default()), layers=1, size=32)
    with pytest.raises(FloatingPointError, match="NaN"):
        gem.heatmaps(np.zeros((32, 32, 3), np.uint8), ["cat"])
