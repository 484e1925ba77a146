"""The benchmark: its FLOP count, and ``gem-jax bench`` end to end (no timing asserted)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from gem_jax import bench
from gem_jax.engine import methods, tower
from gem_jax.config import architecture


def test_flops_of_vit_b16_at_448_by_hand():
    cfg = architecture("ViT-B-16")
    f = bench.count_flops(cfg, (448, 448), methods.GEMOptions(), prompts=8)
    n, c = 785, 768
    block = 2 * n * c * 3 * c + 4 * n * n * c + 2 * n * c * c + 4 * n * c * 4 * c
    assert f["blocks"] == pytest.approx(6 * block / 1e9)
    # beside GEM: q/k/v of six blocks, the rest of five (the last one's output is unused)
    assert f["gem_blocks_original"] == pytest.approx((6 * 2 * n * c * 3 * c + 5 * (block - 2 * n * c * 3 * c)) / 1e9)
    # three projections x (1 iteration + the assignment) x two N x N products, and out_proj
    assert f["self_self_attention"] == pytest.approx(6 * (3 * 2 * 4 * n * n * c + 2 * n * c * c) / 1e9)
    assert f["patch_embed"] == pytest.approx(2 * 784 * c * 3 * 16 * 16 / 1e9)
    assert f["total"] == pytest.approx(sum(v for k, v in f.items() if k != "total"))
    assert 215 < f["total"] < 225  # the reference's whole last block would add ~10 more


def test_flops_follow_the_options():
    cfg = architecture("ViT-B-16")
    base = bench.count_flops(cfg, (448, 448), methods.GEMOptions(), 1)
    more = bench.count_flops(cfg, (448, 448), methods.GEMOptions(iterations=3, projections=("v",)), 1)
    out = 6 * 2 * 785 * 768 ** 2 / 1e9
    assert (more["self_self_attention"] - out) == pytest.approx((base["self_self_attention"] - out) * 4 / 6)
    wide = bench.count_flops(cfg, (448, 672), methods.GEMOptions(), 64)
    assert wide["similarity"] == pytest.approx(2 * 28 * 42 * 512 * 64 / 1e9)
    assert wide["total"] > 1.5 * base["total"]


def run_cli(*args, timeout=900):
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, "-m", "gem_jax.cli", "bench", *map(str, args)], env=env,
                          capture_output=True, text=True, timeout=timeout)
    return proc.returncode, proc.stdout, proc.stderr


@pytest.mark.slow
def test_bench_with_reference_writes_table_and_json(tmp_path):
    """Tiny inputs of the real ViT-B/32: both implementations run, agree, and are reported."""
    pytest.importorskip("gem.gem_wrapper")
    out = tmp_path / "bench.json"
    code, stdout, err = run_cli("--arch", "ViT-B-32", "--size", "64x96", "--batch", "1", "2", "--prompts", "1", "3",
                                "--rounds", "1", "--reference", "--dtype", "float32", "bfloat16", "--out", out)
    assert code == 0, err[-2000:]
    result = json.loads(out.read_text())
    assert result["arch"] == "ViT-B-32" and result["size"] == [64, 96] and result["matmul_peak_gflops"] > 0
    assert [(c["batch"], c["prompts"]) for c in result["cases"]] == [(1, 1), (1, 3), (2, 1), (2, 3)]
    for case in result["cases"]:
        names = [e["name"] for e in case["results"]]
        assert names == ["gem-jax float32", "gem-jax bfloat16", "reference gem-torch"]
        f32, bf16, ref = case["results"]
        # the same weights, pixels and text: the reference's heatmaps equal gem-jax's
        assert ref["max_abs_diff_vs_first"] < 1e-4
        assert 0 < bf16["max_abs_diff_vs_first"] < 0.5  # bfloat16 changes results a little, and says so
        for e in (f32, bf16):
            assert e["images_per_s"] > 0 and e["compile_s"] > 0 and e["xla_memory_bytes"] > 0
            assert e["ratio_vs_reference"] == pytest.approx(e["images_per_s"] / ref["images_per_s"])
            assert e["gflops"] == pytest.approx(case["gflop_per_image"]["total"] * case["batch"] / e["median_s"])
    assert "| 2 | 3 | reference gem-torch |" in stdout and "matmul peak" in stdout
    # the peak is the best of a timing before the cases and one after each case
    samples = result["matmul_peak_samples_gflops"]
    assert len(samples) == 1 + len(result["cases"]) and result["matmul_peak_gflops"] == max(samples)
    for case in result["cases"]:
        for e in case["results"]:
            assert e["fraction_of_peak"] == pytest.approx(e["gflops"] / result["matmul_peak_gflops"])


def test_bench_usage_errors_are_one_line(tmp_path):
    code, _, err = run_cli("--arch", "ViT-Q-99", timeout=120)
    assert code == 2 and "unknown architecture" in err and "Traceback" not in err
    (tmp_path / "b.json").write_text("{}")
    code, _, err = run_cli("--arch", "ViT-B-32", "--out", tmp_path / "b.json", timeout=120)
    assert code == 1 and "exists" in err and (tmp_path / "b.json").read_text() == "{}"
    code, _, err = run_cli("--no-chunks", "--head-chunk", "2", timeout=120)
    assert code == 2 and "--no-chunks" in err


@pytest.mark.slow
def test_chunk_overrides_replace_the_automatic_schedule(monkeypatch):
    """``--head-chunk``/``--image-chunk`` replace only their field of the schedule chosen
    for the input size (a six-block tiny CLIP at 32 x 48 is 25 tokens: run whole by default)."""
    import dataclasses

    from gem_jax.config import ARCHITECTURES
    from tiny import TINY

    six = TINY.replace(vision=dataclasses.replace(TINY.vision, layers=6))  # GEM's default blocks
    monkeypatch.setitem(ARCHITECTURES, "Tiny-6", six)
    monkeypatch.setattr("gem_jax.bench.model.matmul_peak", lambda *a, **k: 1.0)  # not what is tested here

    def schedule(**kw):
        return bench.run("Tiny-6", (32, 48), batches=(1,), prompts=(1,), rounds=1, progress=False, **kw)["schedule"]

    assert schedule() == {"head_chunk": None, "image_chunk": None}
    assert schedule(head_chunk=2) == {"head_chunk": 2, "image_chunk": None}
    assert schedule(schedule=tower.Schedule(4, 1), image_chunk=2) == {"head_chunk": 4, "image_chunk": 2}



def test_bench_pipeline_reports_every_input_path(tmp_path):
    """A tiny random CLIP: the streaming comparison runs end to end (no timing asserted)."""
    from gem_jax.config import CLIPConfig, TextConfig, VisionConfig

    tiny = CLIPConfig(vision=VisionConfig(image_size=32, patch_size=8, width=64, layers=6, heads=2),
                      text=TextConfig(width=32, layers=1, heads=2), embed_dim=32)
    result = bench.pipeline(tiny, 32, batch=2, images=5, image_hw=(60, 80), prompts=2, rounds=1, progress=False)
    assert result["batch"] == 2 and result["images"] == 5 and result["size"] == [32, 32]
    assert set(result["images_per_s"]) == {"in_memory", "stream_thread", "stream_grain", "batch_job"}
    assert set(result["fraction_of_in_memory"]) == {"stream_thread", "stream_grain", "batch_job"}
    assert set(result["cpu_ms_per_image"]) == set(result["images_per_s"])
    assert all(v > 0 for v in result["images_per_s"].values())
    assert "| stream_thread |" in bench.format_pipeline(result)
    code, _, err = run_cli("--pipeline", "--batch", "2", "4")
    assert code == 2 and "one --batch" in err


def test_vocabulary_bench_reports_prompt_counts_and_the_text_side(monkeypatch, tmp_path):
    """The vocabulary case list on a tiny architecture (no timing asserted): every prompt count,
    the text side first and from the cache, the cache equal to the first run."""
    from gem_jax.config import ARCHITECTURES
    from tiny import TINY

    monkeypatch.setitem(ARCHITECTURES, "Tiny-8", TINY)
    monkeypatch.setenv("GEM_JAX_CACHE", str(tmp_path))
    result = bench.vocabulary("Tiny-8", 32, 2, (8, 40), rounds=1, progress=False, classes=("cat", "dog"))
    assert [c["prompts"] for c in result["image_side"]] == [8, 40]
    assert result["image_side"][0]["vs_first"] == 1.0
    text = result["text_side"]
    assert text["texts"] == 2 * 80 and text["cached_equal"] is True and text["cached_s"] >= 0
    table = bench.format_vocabulary(result)
    assert "| 40 |" in table and "from the cache" in table
