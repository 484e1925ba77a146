"""``gem-jax batch``: inputs, resumption after SIGKILL, shards, bad images, tar shards, the
manifest check, and ``load_results`` against ``GEM.heatmaps``."""

from __future__ import annotations

import io
import json
import os
import pathlib
import random
import signal
import subprocess
import sys
import tarfile
import time

import jax
import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from gem_jax import batch
from gem_jax.batch import inputs as inputs_lib
from gem_jax.models import init_params
from gem_jax.progress import Progress
from gem_jax.loading import Model
from gem_jax.pipeline import GEM
from gem_jax.postprocess import labels_from_logits
from gem_jax.tokenizer import Tokenizer
from tiny import TINY, save_tiny

PROMPTS = ["cat", "dog", "a red car"]
QUIET = Progress("batch", quiet=True)
N_IMAGES = 14


def write_image(path, h, w, seed, fmt=None):
    """A smooth random picture (upsampled noise), like a photo more than white noise."""
    rng = np.random.default_rng(seed)
    small = Image.fromarray(rng.integers(0, 256, (max(2, h // 8), max(2, w // 8), 3), dtype=np.uint8))
    small.resize((w, h), Image.BILINEAR).save(path, format=fmt)
    return path


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("batch")
    model = root / "tiny-model"
    save_tiny(model, seed=3)
    images = root / "images"
    for i in range(N_IMAGES):
        sub = images / ("b" if i % 3 == 0 else "a") / ("deep" if i % 5 == 0 else "")
        sub.mkdir(parents=True, exist_ok=True)
        h, w = ((30, 60), (40, 41), (45, 30))[i % 3]  # three input sizes under --short-side 24
        write_image(sub / f"img{i:02d}.{'png' if i % 4 == 0 else 'jpg'}", h, w, i)
    e = dict(os.environ, GEM_JAX_WEIGHTS=str(root / "weights"), GEM_JAX_COMPILE_CACHE=str(root / "xla"),
             HF_HUB_OFFLINE="1", JAX_PLATFORMS="cpu")
    return {"root": root, "model": str(model), "images": images, "env": e}


def command(env, out, *extra, inputs=None):
    return [sys.executable, "-m", "gem_jax.cli", "batch", *map(str, inputs or [env["images"]]), "-p", *PROMPTS,
            "--model", env["model"], "--gem-layers", "2", "--short-side", "24", "--out", str(out),
            "--part-size", "3", "--batch-size", "2", "--logits-dtype", "float32", "--labels", *map(str, extra)]


def run(env, out, *extra, inputs=None):
    proc = subprocess.run(command(env, out, *extra, inputs=inputs), env=env["env"], cwd=env["root"],
                          capture_output=True, text=True, timeout=600)
    return proc.returncode, proc.stderr


def table(out):
    """Every record of a job, sorted by input index, as a dict of columns."""
    t = pq.read_table(pathlib.Path(out) / "parts").sort_by("index")
    return t.to_pydict()


@pytest.fixture(scope="module")
def reference(env):
    """One uninterrupted single-process run: the results every other run must equal."""
    out = env["root"] / "reference"
    code, err = run(env, out)
    assert code == 0, err
    return out


# --- inputs -----------------------------------------------------------------------------

def test_inputs_are_expanded_sorted_and_deduplicated(env, tmp_path):
    images = env["images"]
    listing = tmp_path / "list.txt"
    first = sorted(images.rglob("*.jpg"))[0]
    listing.write_text(f"# a comment\n\n{first}\n{images / 'a'}\n")
    items = batch.expand_inputs([f"@{listing}", str(images / "b" / "*.png"), str(first)])
    paths = [it.path for it in items]
    assert paths == sorted(paths) and len(set(paths)) == len(paths)
    expected = {str(first)} | {str(p) for p in (images / "a").rglob("*") if p.is_file()} \
        | {str(p) for p in (images / "b").glob("*.png")}
    assert set(paths) == expected
    everything = batch.expand_inputs([str(images)])
    assert len(everything) == N_IMAGES  # recursive


def test_bad_input_arguments_raise(env, tmp_path):
    with pytest.raises(batch.InputError, match="not found"):
        batch.expand_inputs([str(tmp_path / "missing.jpg")])
    (tmp_path / "empty").mkdir()
    with pytest.raises(batch.InputError, match="no images"):
        batch.expand_inputs([str(tmp_path / "empty")])
    (tmp_path / "broken.tar").write_bytes(b"\x00not a tar" * 100)
    with pytest.raises(batch.InputError, match="cannot read tar"):
        batch.expand_inputs([str(tmp_path / "broken.tar")])
    for bad in ("1", "2/2", "a/b", "0/0", "-1/3"):
        with pytest.raises(ValueError, match="--shard"):
            batch.parse_shard(bad)
    assert batch.parse_shard("3/4") == (3, 4)


@pytest.mark.parametrize("n_parts,count", [(1, 1), (7, 2), (7, 3), (2, 5)])
def test_shards_partition_the_parts(n_parts, count):
    owned = [inputs_lib.shard_parts(n_parts, i, count) for i in range(count)]
    flat = sorted(j for o in owned for j in o)
    assert flat == list(range(n_parts))
    ranges = inputs_lib.part_ranges(10, 3)
    assert [list(r) for r in ranges] == [[0, 1, 2], [3, 4, 5], [6, 7, 8], [9]]


# --- the job, in process -----------------------------------------------------------------

@pytest.fixture(scope="module")
def model():
    return Model(TINY, init_params(TINY, seed=1), Tokenizer.default(), "tiny")


def test_load_results_equal_gem_heatmaps(model, env, tmp_path):
    """float32 logits, mixed input sizes (--short-side): upsampled records equal GEM.heatmaps."""
    gem = GEM(model, layers=2, short_side=24)
    items = batch.expand_inputs([str(env["images"])])
    opts = batch.BatchOptions(PROMPTS, part_size=5, batch_size=2, logits_dtype="float32", labels=True,
                              heatmaps=True, background_threshold=0.4, shard=(0, 1))
    summary = batch.run(gem, items, tmp_path / "out", opts, progress=QUIET)
    assert (summary.images, summary.processed, summary.errors, summary.job_complete) == (N_IMAGES,) * 2 + (0, True)
    records = list(batch.load_results(tmp_path / "out"))
    assert sorted(r.path for r in records) == [it.path for it in items]
    sizes = set()
    for rec in records:
        with jax.default_matmul_precision("highest"):
            ref = gem.heatmaps(rec.path, PROMPTS)
        sizes.add(rec.input_size)
        assert rec.input_size == ref.sizes[0] and rec.prompts == PROMPTS
        assert rec.grid_logits.shape == (3, rec.input_size[0] // 8, rec.input_size[1] // 8)
        assert rec.original_size == Image.open(rec.path).size[::-1]
        np.testing.assert_allclose(rec.logits(), ref.logits[0], atol=1e-5)
        np.testing.assert_allclose(rec.heatmaps(), ref.heatmaps[0], atol=1e-5)
        np.testing.assert_allclose(rec.stored_heatmaps(), ref.heatmaps[0], atol=1e-5)
        # label maps at the image's own size, from the same logits as GEM.segment
        labels = labels_from_logits(np.asarray(ref.logits[0]), 0.4)
        own = np.asarray(Image.fromarray(labels.astype(np.uint8)).resize(rec.original_size[::-1], Image.NEAREST))
        assert (rec.labels() == own).all()  # the one label rule, on the device and on the host
        assert rec.logits("original").shape == (3, *rec.original_size)
    assert len(sizes) > 1  # several batch shapes were exercised


def test_float16_logits_are_rounded_float32(model, env, tmp_path):
    gem = GEM(model, layers=2, size=32)
    items = batch.expand_inputs([str(env["images"] / "a")])
    run32 = batch.run(gem, items, tmp_path / "f32", batch.BatchOptions(PROMPTS, logits_dtype="float32",
                                                                       shard=(0, 1)), progress=QUIET)
    run16 = batch.run(gem, items, tmp_path / "f16", batch.BatchOptions(PROMPTS, shard=(0, 1)), progress=QUIET)
    assert run32.errors == run16.errors == 0
    a, b = table(tmp_path / "f32"), table(tmp_path / "f16")
    assert a["path"] == b["path"]
    for x, y in zip(a["logits"], b["logits"]):
        np.testing.assert_array_equal(np.asarray(x, np.float32).astype(np.float16), np.asarray(y, np.float16))


def test_bad_images_are_recorded_and_skipped(model, env, tmp_path):
    d = tmp_path / "mixed"
    d.mkdir()
    write_image(d / "good1.jpg", 40, 50, 1)
    write_image(d / "good2.png", 33, 45, 2)
    data = (d / "good1.jpg").read_bytes()
    (d / "truncated.jpg").write_bytes(data[: len(data) // 2])
    (d / "empty.png").write_bytes(b"")
    (d / "text.jpg").write_text("not an image")
    write_image(d / "huge.png", 200, 200, 3)  # over the --max-pixels limit below: a "bomb"
    gem = GEM(model, layers=2, size=32)
    opts = batch.BatchOptions(PROMPTS, part_size=4, batch_size=2, shard=(0, 1), max_pixels=20_000)
    summary = batch.run(gem, batch.expand_inputs([str(d)]), tmp_path / "out", opts, progress=QUIET)
    assert summary.errors == 4 and summary.images == 6
    errors = [json.loads(line) for line in (tmp_path / "out" / "errors.jsonl").read_text().splitlines()]
    reasons = {pathlib.Path(e["path"]).name: e["error"] for e in errors}
    assert set(reasons) == {"truncated.jpg", "empty.png", "text.jpg", "huge.png"}
    assert "empty" in reasons["empty.png"] and "40,000 pixels" in reasons["huge.png"]
    assert "not an image" in reasons["text.jpg"]
    good = sorted(pathlib.Path(r.path).name for r in batch.load_results(tmp_path / "out"))
    assert good == ["good1.jpg", "good2.png"]
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["counts"] == {"images": 6, "parts": 2, "records": 2, "errors": 4, "complete": True}
    assert [p["rows"] for p in manifest["complete_parts"].values()] == [4, 2]


# --- the command, in subprocesses -------------------------------------------------------

def test_reference_run_writes_manifest_and_parts(env, reference):
    manifest = json.loads((reference / "manifest.json").read_text())
    spec = manifest["spec"]
    assert spec["prompts"] == PROMPTS and spec["gem"]["method"]["name"] == "gem"
    assert spec["gem"]["method"]["layers"] == 2 and spec["gem"]["model"]["random_weights"] is False
    assert spec["gem"]["templates"] == ["a photo of a {}."] and spec["gem"]["short_side"] == 24
    assert manifest["counts"]["images"] == N_IMAGES and manifest["counts"]["complete"]
    assert sorted(p.name for p in (reference / "parts").iterdir() if not p.name.startswith(".")) == \
        [f"part-{j:05d}.parquet" for j in range(5)]
    t = table(reference)
    assert t["index"] == list(range(N_IMAGES)) and not any(t["error"])
    assert (reference / "errors.jsonl").read_text() == ""


def test_finished_job_is_not_redone(env, reference):
    before = {p.name: p.stat().st_mtime_ns for p in (reference / "parts").iterdir()}
    code, err = run(env, reference)
    assert code == 0, err
    assert "nothing to do" in err
    assert {p.name: p.stat().st_mtime_ns for p in (reference / "parts").iterdir()} == before


def test_different_options_are_refused_then_forced(env, reference, tmp_path):
    import shutil

    out = tmp_path / "copy"
    shutil.copytree(reference, out)
    cmd = command(env, out)
    cmd[cmd.index("--gem-layers") + 1] = "1"
    proc = subprocess.run(cmd, env=env["env"], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 1
    assert "different job" in proc.stderr and "gem.method.layers was 2, now 1" in proc.stderr
    assert "Traceback" not in proc.stderr
    proc = subprocess.run(cmd + ["--force"], env=env["env"], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    assert json.loads((out / "manifest.json").read_text())["spec"]["gem"]["method"]["layers"] == 1


def test_resume_after_sigkill_equals_uninterrupted_run(env, reference, tmp_path):
    """Kills at random moments (a seeded draw, printed on failure), then a final rerun."""
    out = tmp_path / "killed"
    seed = random.randrange(10 ** 6)
    rng = random.Random(seed)
    kills = 0
    for _ in range(3):
        target = rng.randrange(0, 5)  # parts to wait for before the kill
        proc = subprocess.Popen(command(env, out), env=env["env"], cwd=env["root"], stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 300
        while proc.poll() is None and time.monotonic() < deadline:
            if len(list((out / "parts").glob("part-*.parquet"))) >= target:
                time.sleep(rng.uniform(0.0, 0.3))
                break
            time.sleep(0.01)
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            kills += 1
        proc.wait()
    code, err = run(env, out)
    assert code == 0, f"seed {seed}: {err}"
    leftovers = [p.name for p in (out / "parts").iterdir() if not p.name.startswith("part-")]
    assert leftovers == [".gem-jax-files.jsonl"], f"seed {seed}: {leftovers}"
    assert table(out) == table(reference), f"seed {seed}, {kills} kill(s)"


def test_two_shards_in_parallel_equal_one_process(env, reference, tmp_path):
    out = tmp_path / "sharded"
    procs = [subprocess.Popen(command(env, out, "--shard", f"{i}/2"), env=env["env"], cwd=env["root"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)]
    for p in procs:
        _, err = p.communicate(timeout=600)
        assert p.returncode == 0, err
    assert sorted(p.name for p in (out / "parts").iterdir()) == sorted(p.name for p in (reference / "parts").iterdir())
    assert not (out / "parts" / "_pending").exists()
    assert table(out) == table(reference)
    assert json.loads((out / "manifest.json").read_text())["counts"]["complete"]


def test_tar_shards_equal_the_directory(env, reference, tmp_path):
    files = sorted(p for p in env["images"].rglob("*") if p.is_file())
    shards = []
    for s in range(2):
        path = tmp_path / f"shard-{s}.tar"
        with tarfile.open(path, "w") as tar:
            for f in files[s::2]:
                key = str(f.relative_to(env["images"]))
                tar.add(f, arcname=key)
                meta = json.dumps({"source": key}).encode()
                info = tarfile.TarInfo(key.rsplit(".", 1)[0] + ".json")
                info.size = len(meta)
                tar.addfile(info, io.BytesIO(meta))
        shards.append(path)
    out = tmp_path / "from-tar"
    code, err = run(env, out, inputs=[tmp_path / "shard-*.tar"])
    assert code == 0, err
    by_member = {p.split("::", 1)[1]: i for i, p in enumerate(table(out)["path"])}
    assert len(by_member) == N_IMAGES
    ref, got = table(reference), table(out)
    for i, path in enumerate(ref["path"]):
        j = by_member[str(pathlib.Path(path).relative_to(env["images"]))]
        assert got["logits"][j] == ref["logits"][i] and got["labels_png"][j] == ref["labels_png"][i]
        assert (got["height"][j], got["width"][j]) == (ref["height"][i], ref["width"][i])


def test_segment_and_batch_share_the_model_flags():
    from gem_jax.cli import build_parser

    flags = ["--model", "m", "--method", "clip", "--gem-layers", "3", "--iterations", "2", "--temperature", "0.5",
             "--template", "a {}", "--short-side", "224", "--dtype", "bfloat16"]
    parser = build_parser()
    seg = parser.parse_args(["segment", "x.jpg", "-p", "cat", *flags])
    bat = parser.parse_args(["batch", "x.jpg", "-p", "cat", "--out", "o", *flags])
    names = ("model", "method", "gem_layers", "iterations", "temperature", "template", "size", "short_side", "dtype")
    assert [getattr(seg, n) for n in names] == [getattr(bat, n) for n in names]
    assert bat.short_side == 224 and bat.temperature == 0.5 and bat.dtype == "bfloat16"


@pytest.mark.parametrize("args,code,message", [
    (["x.jpg", "--out", "o"], 2, "nothing to localise"),
    (["x.jpg", "-p", "cat", "-p", "cat", "--out", "o"], 2, "given twice"),
    (["x.jpg", "--classes", "Cat", "cat", "--out", "o"], 2, "the same to the model"),
    (["x.jpg", "-p", "cat", "--shard", "2/2", "--out", "o"], 2, "--shard"),
    (["missing.jpg", "-p", "cat", "--out", "o"], 1, "input not found: missing.jpg"),
])
def test_batch_usage_errors(env, tmp_path, args, code, message):
    proc = subprocess.run([sys.executable, "-m", "gem_jax.cli", "batch", *args], env=env["env"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == code and message in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
    assert not (tmp_path / "o").exists()
