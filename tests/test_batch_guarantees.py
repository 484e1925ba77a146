"""What a batch job guarantees, whatever is in its way: it deletes or replaces only what it
wrote, one run per shard at a time, resumption by content (weights, checksums), finished
images kept on Ctrl-C, every input name and tar member handled, and large vocabularies
stored as top-k."""

from __future__ import annotations

import io
import json
import os
import pathlib
import shutil
import subprocess
import sys
import tarfile

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

import gem_jax
from gem_jax import batch
from gem_jax.batch import store
from gem_jax.models import init_params
from gem_jax.progress import Progress
from tiny import TINY, save_tiny

PROMPTS = ["cat", "dog", "a red car"]
QUIET = Progress("batch", quiet=True)


def write_image(path, h=36, w=44, seed=0):
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(path)
    return path


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("m") / "tiny"
    save_tiny(d, seed=2)
    return d


@pytest.fixture(scope="module")
def gem(model_dir):
    return gem_jax.GEM(gem_jax.load(str(model_dir)), layers=2, size=32, text_cache=False)


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    d = tmp_path_factory.mktemp("imgs")
    for i in range(10):
        write_image(d / f"im{i:02d}.png", seed=i)
    return d


def opts(**kw):
    return batch.BatchOptions(kw.pop("prompts", PROMPTS), shard=(0, 1), batch_size=2, logits_dtype="float32", **kw)


def run(gem, images, out, **kw):
    return batch.run(gem, batch.expand_inputs([str(images)]), out, opts(**kw), progress=QUIET)


def rows(out):
    return pq.read_table(pathlib.Path(out) / "parts").sort_by("index").to_pydict()


@pytest.fixture(scope="module")
def reference(gem, images, tmp_path_factory):
    out = tmp_path_factory.mktemp("ref") / "job"
    run(gem, images, out, part_size=4)
    return rows(out)


# ----------------------------------------------------------------------------- ownership


def test_force_deletes_only_what_the_job_wrote(gem, images, tmp_path):
    out = tmp_path / "job"
    run(gem, images, out, part_size=4)
    (out / "notes.txt").write_text("mine")
    (out / "parts" / "part-list.txt").write_text("mine too")
    summary = run(gem, images, out, part_size=4, force=True)
    assert summary.processed == 10
    assert (out / "notes.txt").read_text() == "mine" and (out / "parts" / "part-list.txt").read_text() == "mine too"


@pytest.mark.parametrize("name", ["manifest.json", "errors.jsonl", "parts/part-00000.parquet"])
def test_files_the_job_did_not_write_are_refused_with_force_too(gem, images, tmp_path, name):
    donor = tmp_path / "donor"
    run(gem, images, donor, part_size=4)
    out = tmp_path / "job"
    (out / "parts").mkdir(parents=True)
    shutil.copyfile(donor / name, out / name)  # a copy: the same bytes, but not written here by gem-jax
    for force in (False, True):
        with pytest.raises(batch.JobError, match="was not written by a gem-jax batch job") as e:
            run(gem, images, out, part_size=4, force=force)
        assert name.split("/")[-1] in str(e.value) and "--force" not in str(e.value)
    assert (out / name).read_bytes() == (donor / name).read_bytes()


def test_a_second_run_on_the_same_shard_is_refused_and_the_lock_dies_with_its_process(gem, images, tmp_path):
    out = tmp_path / "job"
    out.mkdir()
    lock = store.ShardLock(out, 0, 1)
    lock.acquire()
    try:
        with pytest.raises(batch.JobError, match="another gem-jax batch is running"):
            run(gem, images, out)
    finally:
        lock.release()
    # a process that takes the lock and is killed leaves no lock behind
    code = ("import sys, os, signal; from gem_jax.batch import store; "
            "store.ShardLock(sys.argv[1], 0, 1).acquire(); os.kill(os.getpid(), signal.SIGKILL)")
    assert subprocess.run([sys.executable, "-c", code, str(out)]).returncode == -9
    assert run(gem, images, out).processed == 10


# ----------------------------------------------------------------------------- integrity


@pytest.mark.parametrize("damage", ["swapped", "truncated", "zeroed"])
def test_a_damaged_part_is_redone_and_said_so(gem, images, tmp_path, reference, damage):
    out = tmp_path / "job"
    run(gem, images, out, part_size=4)
    part0, part1 = store.part_path(out, 0), store.part_path(out, 1)
    data = part0.read_bytes()
    if damage == "swapped":
        shutil.copyfile(part1, part0)  # another part's content: 4 rows, the wrong images
    elif damage == "truncated":
        part0.write_bytes(data[: len(data) // 2])
    else:
        part0.write_bytes(b"\0" * len(data))
    notes = []
    progress = Progress("batch", quiet=True)
    progress.note = notes.append
    summary = batch.run(gem, batch.expand_inputs([str(images)]), out, opts(part_size=4), progress=progress)
    assert summary.redone == [0]
    assert any("part 0" in n and "doing it again" in n for n in notes), notes
    assert rows(out) == reference


def test_resume_matches_the_weights_not_how_the_model_was_named(model_dir, images, tmp_path):
    out = tmp_path / "job"
    first = gem_jax.GEM(gem_jax.load(str(model_dir)), layers=2, size=32, text_cache=False)
    run(first, images, out, part_size=4)
    cwd = os.getcwd()
    os.chdir(model_dir.parent)
    try:
        for spelling in (str(model_dir) + "/", "./tiny", os.path.relpath(model_dir)):
            again = gem_jax.GEM(gem_jax.load(spelling), layers=2, size=32, text_cache=False)
            assert run(again, images, out, part_size=4).processed == 0, spelling
    finally:
        os.chdir(cwd)
    other = gem_jax.GEM(gem_jax.Model(TINY, init_params(TINY, seed=9), first.model.tokenizer, str(model_dir)),
                        layers=2, size=32, text_cache=False)
    with pytest.raises(batch.JobError, match="gem.model.fingerprint was"):
        run(other, images, out, part_size=4)


def test_ctrl_c_in_a_default_size_part_keeps_the_finished_images(gem, images, tmp_path, reference, monkeypatch):
    out = tmp_path / "job"
    calls = []
    real = gem.tokens

    def interrupted(pixels):
        calls.append(1)
        if len(calls) == 4:  # three batches of two done, the fourth interrupted
            raise KeyboardInterrupt
        return real(pixels)

    monkeypatch.setattr(gem, "tokens", interrupted)
    with pytest.raises(batch.Interrupted, match=r"kept (\d+) finished image\(s\)") as e:
        run(gem, images, out)  # one part of the default 1024 images
    kept = int(str(e.value).split("kept ")[1].split()[0])
    assert kept >= 4 and f"{10 - kept} remain" in str(e.value)
    monkeypatch.setattr(gem, "tokens", real)
    summary = run(gem, images, out)
    assert summary.kept == kept and summary.processed == 10 - kept
    ref_by_index = reference
    got = rows(out)
    assert got == ref_by_index


# ----------------------------------------------------------------------------- inputs


def test_inputs_are_deduplicated_by_real_path(tmp_path):
    d = tmp_path / "d"
    (d / "x").mkdir(parents=True)
    write_image(d / "a.png")
    write_image(d / "x" / "b.png", seed=1)
    os.symlink(d / "a.png", d / "alias.png")
    os.symlink(d, d / "x" / "loop")  # a directory symlink loop
    items = batch.expand_inputs([str(d), str(d / "x" / "." / "b.png"), f"{d}/**/*.png"])
    assert sorted(pathlib.Path(it.file).resolve().name for it in items) == ["a.png", "b.png"]


def test_a_repeated_tar_member_is_an_error_row_not_a_silent_choice(gem, images, tmp_path):
    tar_path = tmp_path / "shard.tar"
    with tarfile.open(tar_path, "w") as tar:
        for i, name in enumerate(["dup.png", "dup.png", "one.png"]):
            buf = io.BytesIO()
            Image.fromarray(np.full((30, 30, 3), 40 * i, np.uint8)).save(buf, format="PNG")
            info = tarfile.TarInfo(name)
            info.size = len(buf.getvalue())
            tar.addfile(info, io.BytesIO(buf.getvalue()))
    summary = batch.run(gem, batch.expand_inputs([str(tar_path)]), tmp_path / "job", opts(), progress=QUIET)
    assert summary.images == 3 and summary.errors == 2
    errors = [json.loads(x) for x in (tmp_path / "job" / "errors.jsonl").read_text().splitlines()]
    assert [e["path"].split("::")[1] for e in errors] == ["dup.png", "dup.png"]
    assert all("2 members named 'dup.png'" in e["error"] for e in errors)


def test_names_that_are_not_utf8_are_processed(gem, tmp_path):
    d = tmp_path / "d"
    d.mkdir()
    raw = os.path.join(os.fsencode(d), b"caf\xe9.png")
    with open(raw, "wb") as f:
        buf = io.BytesIO()
        Image.fromarray(np.zeros((30, 30, 3), np.uint8)).save(buf, format="PNG")
        f.write(buf.getvalue())
    write_image(d / "plain.png")
    summary = batch.run(gem, batch.expand_inputs([str(d)]), tmp_path / "job", opts(), progress=QUIET)
    assert summary.errors == 0 and summary.images == 2
    results = gem_jax.load_results(tmp_path / "job")
    assert sorted(os.fsencode(r.path) for r in results) == sorted([raw, os.fsencode(d / "plain.png")])
    t = rows(tmp_path / "job")
    assert any("\\xe9" in p for p in t["path"])  # readable in any Parquet reader, the exact bytes beside it


# ----------------------------------------------------------------------------- classes, top-k, reading back


def test_prompts_and_classes_in_one_job(gem, images, tmp_path):
    run(gem, images, tmp_path / "job", prompts=["cat", "a red car"], classes=["dog", "cat"], labels=False)
    results = gem_jax.load_results(tmp_path / "job")
    rec = results[0]
    assert rec.prompts == ["cat", "a red car"] and rec.grid_logits.shape[0] == 2
    labels = rec.labels()
    assert labels.shape == rec.original_size and set(np.unique(labels)) <= {0, 1, 2}
    assert results.manifest["spec"]["classes"] == ["dog", "cat"]


def test_top_k_of_many_prompts_equals_the_top_of_the_full_logits(gem, images, tmp_path):
    prompts = [f"thing {i}" for i in range(1000)]
    small = tmp_path / "few"
    small.mkdir()
    for f in sorted(images.iterdir())[:3]:
        shutil.copyfile(f, small / f.name)
    run(gem, small, tmp_path / "full", prompts=prompts)
    run(gem, small, tmp_path / "top", prompts=prompts, store="topk", top_k=5)
    full, top = gem_jax.load_results(tmp_path / "full"), gem_jax.load_results(tmp_path / "top")
    assert len(full) == len(top) == 3
    for a, b in zip(full, top):
        idx, val = b.topk()
        assert b.grid_logits is None and idx.shape == (*a.grid_size, 5)
        order = np.argsort(-a.grid_logits, axis=0)[:5].transpose(1, 2, 0)
        np.testing.assert_array_equal(idx, order)
        np.testing.assert_allclose(val, np.take_along_axis(a.grid_logits.transpose(1, 2, 0), order, -1), atol=1e-6)


def test_results_are_a_sequence_with_readable_records(gem, images, tmp_path):
    run(gem, images, tmp_path / "job", part_size=4, labels=True)
    results = gem_jax.load_results(tmp_path / "job")
    assert len(results) == 10 and results[3].index == 3 and results[-1].index == 9
    assert [r.index for r in results[2:5]] == [2, 3, 4]
    text = repr(results[0])
    assert len(text) < 200 and "stored: logits, labels" in text and "\\x89PNG" not in text
    assert "10 record(s)" in repr(results) and "gem on" in repr(results)
    table = results.to_pandas()
    assert list(table["index"]) == list(range(10)) and "logits" not in table.columns
    with pytest.raises(IndexError):
        results[10]
