"""``jax.export`` of the image program for platforms that are not here (cuda, tpu), and
``gem-jax export`` served by a process without gem-jax's model code."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest
from tiny import save_tiny


pytest.importorskip("flatbuffers")  # jax.export serialization needs it


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("export")
    model = root / "tiny-model"
    save_tiny(model, seed=3)
    e = dict(os.environ, GEM_JAX_WEIGHTS=str(root / "weights"), HF_HUB_OFFLINE="1", JAX_PLATFORMS="cpu")
    return {"root": root, "model": str(model), "env": e}


# Run in a fresh process: two CPU devices must be set before JAX starts.
SHARDED = textwrap.dedent("""
    import json, sys
    import jax
    jax.config.update("jax_num_cpu_devices", 2)
    import numpy as np
    from jax.sharding import NamedSharding, PartitionSpec as P
    import gem_jax
    from gem_jax import export
    from gem_jax.engine.tower import Schedule

    model = gem_jax.load(sys.argv[1])
    rng = np.random.default_rng(0)
    uint8 = rng.integers(0, 256, (4, 40, 56, 3), dtype=np.uint8)
    report = []
    for method in ("gem", "clip"):
        for dtype in ("float32", "bfloat16"):
            gem = gem_jax.GEM(model, method=method, **({"layers": 2} if method == "gem" else {}), size=32, dtype=dtype, schedule=Schedule(),
                              devices=jax.devices()[:2])
            exp, leaves, hw = export.image_program(gem, batch=4, prompts=3, platforms=("cpu", "cuda", "tpu"))
            back = jax.export.deserialize(exp.serialize())
            entry = {"method": method, "dtype": dtype, "platforms": list(back.platforms),
                     "devices": back.nr_devices, "out": [list(a.shape) for a in back.out_avals]}
            report.append(entry)
            if dtype != "float32":
                continue
            with jax.default_matmul_precision("highest"):
                ref = gem.heatmaps(list(uint8), ["cat", "dog", "car"])
                pixels = np.stack([gem_jax.preprocess.normalize(gem_jax.preprocess.resize(u, hw)) for u in uint8])
                mesh = jax.make_mesh((2,), ("data",))
                rep, data = NamedSharding(mesh, P()), NamedSharding(mesh, P("data"))
                logits, heat = jax.jit(back.call)(jax.device_put(leaves, rep), jax.device_put(pixels, data),
                                                  jax.device_put(gem.embed_text(["cat", "dog", "car"]), rep))
            entry["out_sharding"] = str(logits.sharding.spec)
            entry["logits_diff"] = float(np.abs(np.asarray(logits) - ref.logits).max())
            entry["heatmaps_diff"] = float(np.abs(np.asarray(heat) - ref.heatmaps).max())
    print(json.dumps(report))
""")


def test_export_for_cpu_cuda_tpu_sharded_both_methods_and_dtypes(env):
    proc = subprocess.run([sys.executable, "-c", SHARDED, env["model"]], env=env["env"], capture_output=True,
                          text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert [(r["method"], r["dtype"]) for r in report] == [("gem", "float32"), ("gem", "bfloat16"),
                                                           ("clip", "float32"), ("clip", "bfloat16")]
    for r in report:
        assert r["platforms"] == ["cpu", "cuda", "tpu"] and r["devices"] == 2, r
        assert r["out"] == [[4, 3, 32, 32], [4, 3, 32, 32]], r
        if r["dtype"] == "float32":  # the CPU round trip, sharded over two devices, is GEM.heatmaps
            assert "data" in r["out_sharding"], r
            assert r["logits_diff"] < 1e-5 and r["heatmaps_diff"] < 1e-5, r


SERVE = textwrap.dedent("""
    import json, sys
    import jax, numpy as np
    jax.config.update("jax_default_matmul_precision", "highest")
    path = sys.argv[1]
    exp = jax.export.deserialize(open(path, "rb").read())
    with np.load(path + ".params.npz") as z:
        params = [z[k] for k in z.files]
    text = np.load(path + ".text.npy")
    pixels = np.load(sys.argv[2])
    logits, heatmaps = exp.call(params, pixels, text)
    np.save(sys.argv[3], np.stack([np.asarray(logits), np.asarray(heatmaps)]))
    print(json.dumps({"gem_jax_imported": any(m.startswith("gem_jax") for m in sys.modules)}))
""")


def test_gem_jax_export_is_served_without_gem_jax(env, tmp_path):
    import gem_jax
    from gem_jax import preprocess

    out = tmp_path / "serve" / "gem.jaxexport"
    cmd = [sys.executable, "-m", "gem_jax.cli", "export", "--model", env["model"], "--gem-layers", "2",
           "--size", "32x48", "--batch", "2", "-p", "cat", "a dog", "--platforms", "cpu,cuda,tpu", "--out", str(out)]
    proc = subprocess.run(cmd, env=env["env"], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    meta = json.loads(out.with_name("gem.jaxexport.json").read_text())
    assert meta["platforms"] == ["cpu", "cuda", "tpu"] and meta["inputs"]["pixels"] == [2, 32, 48, 3]
    assert meta["prompts"] == ["cat", "a dog"] and meta["outputs"]["logits"] == [2, 2, 32, 48]
    again = subprocess.run(cmd, env=env["env"], capture_output=True, text=True, timeout=600)
    assert again.returncode == 1 and "exists" in again.stderr and "Traceback" not in again.stderr

    rng = np.random.default_rng(1)
    images = [rng.integers(0, 256, (40, 56, 3), dtype=np.uint8) for _ in range(2)]
    pixels = np.stack([preprocess.normalize(preprocess.resize(im, (32, 48))) for im in images])
    np.save(tmp_path / "pixels.npy", pixels)
    serve = subprocess.run([sys.executable, "-c", SERVE, str(out), str(tmp_path / "pixels.npy"),
                            str(tmp_path / "served.npy")], env=env["env"], capture_output=True, text=True,
                           timeout=600)
    assert serve.returncode == 0, serve.stderr
    assert json.loads(serve.stdout.strip().splitlines()[-1]) == {"gem_jax_imported": False}
    logits, heatmaps = np.load(tmp_path / "served.npy")
    with jax.default_matmul_precision("highest"):
        ref = gem_jax.GEM(gem_jax.load(env["model"]), layers=2, size=(32, 48)).heatmaps(images, ["cat", "a dog"])
    np.testing.assert_allclose(logits, ref.logits, atol=1e-5)
    np.testing.assert_allclose(heatmaps, ref.heatmaps, atol=1e-5)


@pytest.mark.parametrize("args,message", [
    (["--platforms", "cpu,metal"], "--platforms"),
    (["--short-side", "32"], "unrecognized arguments: --short-side"),  # not offered by export --help
    (["--batch", "3", "--devices", "2"], "multiple of --devices"),
    (["--prompts", "3", "-p", "cat"], "1 prompt"),
])
def test_export_usage_errors(env, tmp_path, args, message):
    proc = subprocess.run([sys.executable, "-m", "gem_jax.cli", "export", "--model", env["model"],
                           "--out", str(tmp_path / "x"), *args], env=env["env"], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 2 and message in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
