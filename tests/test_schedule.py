"""Schedules (chunking over images and heads) and data-parallel sharding never change results."""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gem_jax.engine import attention, methods, tower
from gem_jax.config import CLIPConfig, TextConfig, VisionConfig
from gem_jax.models import VisionTransformer, init_params
from gem_jax.loading import Model
from gem_jax.pipeline import GEM
from gem_jax.tokenizer import Tokenizer

# Three heads, so chunks of 2 or 4 (image, head) pairs do not line up with images.
SMALL = CLIPConfig(
    vision=VisionConfig(image_size=32, patch_size=8, width=96, layers=4, heads=3),
    text=TextConfig(width=32, layers=1, heads=2),
    embed_dim=32,
)


def sharpened(params):
    """Scales the attention input projections up so attention maps are far from uniform."""
    def f(path, x):
        names = [getattr(k, "key", "") for k in path]
        return x * 3.0 if "in_proj" in names and names[-1] == "kernel" else x
    return jax.tree_util.tree_map_with_path(f, params)


@pytest.fixture(scope="module")
def setup():
    params = sharpened(init_params(SMALL, seed=3))
    vit = VisionTransformer(SMALL.vision, SMALL.embed_dim)
    pixels = jnp.asarray(np.random.default_rng(0).standard_normal((4, 40, 48, 3)), jnp.float32)
    return vit, params, pixels


SCHEDULES = [
    tower.Schedule(head_chunk=1),
    tower.Schedule(head_chunk=2),
    tower.Schedule(head_chunk=4),  # 12 pairs: chunks of 4 span images
    tower.Schedule(image_chunk=1),
    tower.Schedule(image_chunk=3),  # largest divisor of 4 below 3: chunks of 2
    tower.Schedule(head_chunk=4, image_chunk=1),
]
OPTIONS = [
    methods.GEMOptions(layers=2),
    methods.GEMOptions(layers=3, iterations=2, projections=("k", "v")),
    methods.GEMOptions(layers=2, temperature=0.2, mlp=True),
    methods.GEMOptions(layers=2, normalize=False),
    methods.GEMOptions(layers=2, iterations=6),  # the fori_loop branch
    None,  # plain CLIP
]


#: (schedule, options) pairs: every schedule with two or three option sets and every option
#: set with two or three schedules (the iterated path with head chunks, image chunks and both),
#: not the whole product, whose other cases add compile time and no new code path.
PAIRS = [(0, 0), (0, 4), (1, 1), (1, 3), (2, 2), (2, 4), (3, 0), (3, 5), (4, 1), (4, 2), (5, 3), (5, 4), (5, 5)]


def _pair_id(i: int, j: int) -> str:
    s, o = SCHEDULES[i], OPTIONS[j]
    return f"h{s.head_chunk}-i{s.image_chunk}-" + ("clip" if o is None else f"L{o.layers}-K{o.iterations}-{j}")


@pytest.mark.parametrize("schedule,opts", [(SCHEDULES[i], OPTIONS[j]) for i, j in PAIRS],
                         ids=[_pair_id(i, j) for i, j in PAIRS])
def test_chunked_equals_plain(setup, opts, schedule):
    vit, params, pixels = setup
    # The plain model on the same image groups the schedule steps through: XLA's CPU
    # kernels round differently by batch size (tokens ~8e-5 apart, max 3.9, at batch 1
    # against batch 4 here), which is not what this test is about.
    c = pixels.shape[0] if schedule.image_chunk is None else attention.largest_divisor(4, schedule.image_chunk)
    with jax.default_matmul_precision("highest"):
        plain_fn = jax.jit(lambda p, x: tower.vision_tokens(vit, p, x, opts))
        parts = [plain_fn(params["visual"], pixels[i:i + c]) for i in range(0, pixels.shape[0], c)]
        plain = {k: None if parts[0][k] is None else np.concatenate([np.asarray(q[k]) for q in parts])
                 for k in parts[0]}
        chunked = jax.jit(lambda p, x: tower.vision_tokens(vit, p, x, opts, schedule=schedule))(
            params["visual"], pixels)
    for key in ("gem", "clip"):
        if plain[key] is None:
            assert chunked[key] is None
            continue
        a, b = np.asarray(plain[key]), np.asarray(chunked[key])
        assert a.shape == b.shape == (4, 1 + 5 * 6, SMALL.embed_dim)
        assert np.abs(a - b).max() <= 1e-5 * np.abs(a).max()
        assert np.ptp(a[:, 1:], axis=1).min() > 1e-3  # tokens differ across the grid


def largest_intermediate(jaxpr) -> int:
    """Elements of the largest array any equation makes, sub-computations (scan
    bodies, pjit) included: what a backend without fused attention must hold."""
    best = 0
    for eqn in jaxpr.eqns:
        for v in eqn.outvars:
            best = max(best, int(np.prod(getattr(v.aval, "shape", ()))))
        for param in eqn.params.values():
            for sub in param if isinstance(param, (list, tuple)) else [param]:
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns"):
                    best = max(best, largest_intermediate(inner))
    return best


@pytest.mark.parametrize("chunk", [1, 2])
def test_head_chunks_bound_the_attention_maps(chunk):
    """At 512 x 512 (4097 tokens) the plain path makes all 2 x 3 (image, head) N x N
    maps at once; chunked, no array is larger than ``chunk`` of them."""
    cfg = CLIPConfig(vision=VisionConfig(image_size=32, patch_size=8, width=96, layers=2, heads=3),
                     text=TextConfig(width=32, layers=1, heads=2), embed_dim=32)
    vit = VisionTransformer(cfg.vision, cfg.embed_dim)
    params = jax.eval_shape(lambda: init_params(cfg))["visual"]
    pixels = jax.ShapeDtypeStruct((2, 512, 512, 3), jnp.float32)
    n_n = 4097 ** 2

    def biggest(schedule):
        def f(p, x):
            return tower.vision_tokens(vit, p, x, methods.GEMOptions(layers=1), True, schedule)
        return largest_intermediate(jax.make_jaxpr(f)(params, pixels).jaxpr)

    assert biggest(tower.Schedule()) == 2 * 3 * n_n
    assert biggest(tower.Schedule(head_chunk=chunk)) == chunk * n_n


@pytest.mark.parametrize("bad", [0, -1, 1.5, True, "4"])
def test_schedule_rejects_bad_chunks(bad):
    with pytest.raises(ValueError, match="head_chunk"):
        tower.Schedule(head_chunk=bad)
    with pytest.raises(ValueError, match="image_chunk"):
        tower.Schedule(image_chunk=bad)


def test_auto_schedule_per_backend_and_size():
    large, small = tower.CPU_CHUNK_TOKENS, tower.CPU_CHUNK_TOKENS - 1
    assert tower.Schedule.auto("cpu") == tower.Schedule(head_chunk=4, image_chunk=1)
    assert tower.Schedule.auto("cpu", tokens=large) == tower.Schedule(head_chunk=4, image_chunk=1)
    assert tower.Schedule.auto("cpu", tokens=small) == tower.Schedule()
    for backend in ("gpu", "tpu"):
        assert tower.Schedule.auto(backend) == tower.Schedule() == tower.Schedule.auto(backend, tokens=large)
    assert tower.Schedule.resolve(tower.Schedule(head_chunk=2)) == tower.Schedule(head_chunk=2)


def test_auto_schedule_follows_the_input_size():
    """``schedule="auto"`` is settled at trace time from the input's token count: a
    small input runs whole, a large one in head chunks (on CPU, where the tests run)."""
    assert jax.default_backend() == "cpu"
    cfg = CLIPConfig(vision=VisionConfig(image_size=32, patch_size=8, width=96, layers=2, heads=3),
                     text=TextConfig(width=32, layers=1, heads=2), embed_dim=32)
    vit = VisionTransformer(cfg.vision, cfg.embed_dim)
    params = jax.eval_shape(lambda: init_params(cfg))["visual"]

    def jaxpr(side):
        def f(p, x):
            return tower.vision_tokens(vit, p, x, methods.GEMOptions(layers=1), True, "auto")
        return jax.make_jaxpr(f)(params, jax.ShapeDtypeStruct((2, side, side, 3), jnp.float32)).jaxpr

    def loops(jaxpr) -> int:
        return sum(e.primitive.name == "scan" for e in jaxpr.eqns)  # lax.map is a scan

    n_small, n_large = (64 // 8) ** 2 + 1, (256 // 8) ** 2 + 1
    assert n_small < tower.CPU_CHUNK_TOKENS <= n_large
    assert loops(jaxpr(64)) == 0  # whole batch, all heads at once
    assert loops(jaxpr(256)) == 1  # a map over the images (the head maps nest inside it)
    assert largest_intermediate(jaxpr(256)) == 3 * n_large ** 2  # one image's three heads


def test_gem_rejects_a_bad_schedule_and_no_devices():
    model = Model(SMALL, init_params(SMALL), Tokenizer.default(), "small")
    with pytest.raises(ValueError, match="schedule"):
        GEM(model, layers=2, schedule="fast")
    with pytest.raises(ValueError, match="devices"):
        GEM(model, layers=2, devices=[])


SHARDED_RUN = textwrap.dedent("""
    import json, sys
    import jax, numpy as np
    from gem_jax.config import CLIPConfig
    from gem_jax.models import init_params
    from gem_jax.loading import Model
    from gem_jax.pipeline import GEM
    from gem_jax.tokenizer import Tokenizer
    from test_schedule import SMALL, sharpened, images, PROMPTS, PER_IMAGE

    assert jax.device_count() == 4, jax.devices()
    model = Model(SMALL, sharpened(init_params(SMALL, seed=3)), Tokenizer.default(), "small")
    out = {}
    for name, devices in (("four", jax.devices()), ("one", jax.devices()[:1])):
        for schedule in ("per_image", "auto"):
            with jax.default_matmul_precision("highest"):
                g = GEM(model, layers=2, size=(32, 40), batch_size=8, devices=devices,
                        schedule=PER_IMAGE if schedule == "per_image" else "auto")
                res = g.heatmaps(images(), PROMPTS)
            out[name + "_" + schedule] = [np.asarray(x).tolist() for x in res.logits]
        out[name + "_sharding"] = str(g.visual_params["conv1"]["kernel"].sharding)
    json.dump(out, sys.stdout)
""")
PROMPTS = [["cat", "dog"], ["car"], ["tree", "sky", "road"], ["cat"], ["dog", "car"]]
# One image per step: each image's program is then the same whatever the batch
# per device, so sharded and single-device results agree to the last bit or two.
# Whole-batch steps block the matmuls by batch size, which moves float32 rounding.
PER_IMAGE = tower.Schedule(head_chunk=4, image_chunk=1)


def images():
    return [np.random.default_rng(s).integers(0, 256, (30 + 3 * s, 44, 3), dtype=np.uint8) for s in range(5)]


@pytest.mark.slow
def test_four_devices_equal_one():
    """Five images over a 4-device data mesh (padded to 8, two per device) give the
    single-device results; the subprocess has 4 host CPU devices from XLA_FLAGS."""
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4", JAX_PLATFORMS="cpu",
               PYTHONPATH=os.pathsep.join([str(pathlib.Path(__file__).parent), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, "-c", SHARDED_RUN], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout)
    assert "4" in out["four_sharding"] or "replicated" in out["four_sharding"].lower()
    with jax.default_matmul_precision("highest"):
        here = GEM(Model(SMALL, sharpened(init_params(SMALL, seed=3)), Tokenizer.default(), "small"), layers=2,
                   size=(32, 40), batch_size=8, schedule=PER_IMAGE).heatmaps(images(), PROMPTS).logits
    assert len(out["four_per_image"]) == len(out["one_per_image"]) == len(out["four_auto"]) == len(here) == 5
    for i, prompts in enumerate(PROMPTS):
        four, one, local = np.asarray(out["four_per_image"][i]), np.asarray(out["one_per_image"][i]), here[i]
        assert four.shape == one.shape == local.shape == (len(prompts), 32, 40)
        np.testing.assert_allclose(four, one, atol=1e-6)
        np.testing.assert_allclose(four, local, atol=1e-6)
        assert np.ptp(four) > 1e-3
        # The automatic (whole-batch) schedule: equal up to float32 rounding.
        np.testing.assert_allclose(np.asarray(out["four_auto"][i]), np.asarray(out["one_auto"][i]), atol=1e-5)
        np.testing.assert_allclose(np.asarray(out["four_auto"][i]), four, atol=1e-5)


MULTI_HOST_WORKER = textwrap.dedent("""
    import json, sys
    import jax
    process_id, processes, port = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
    jax.distributed.initialize(coordinator_address=f"localhost:{port}", num_processes=processes,
                               process_id=process_id)
    import numpy as np
    from gem_jax.models import init_params
    from gem_jax.loading import Model
    from gem_jax.pipeline import GEM
    from gem_jax.tokenizer import Tokenizer
    from test_schedule import SMALL, sharpened, images, PROMPTS, PER_IMAGE

    model = Model(SMALL, sharpened(init_params(SMALL, seed=3)), Tokenizer.default(), "small")
    # The README's recipe: this process's devices, this process's share of the images.
    mine = list(range(jax.process_index(), len(PROMPTS), jax.process_count()))
    with jax.default_matmul_precision("highest"):
        g = GEM(model, layers=2, size=(32, 40), batch_size=8, devices=jax.local_devices(), schedule=PER_IMAGE)
        res = g.heatmaps([images()[i] for i in mine], [PROMPTS[i] for i in mine])
    json.dump({"process": jax.process_index(), "processes": jax.process_count(), "indices": mine,
               "logits": [np.asarray(x).tolist() for x in res.logits]}, sys.stdout)
""")


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes_with_jax_distributed():
    """Two local processes joined by ``jax.distributed.initialize``, each on its own
    devices and its share of the images, give the single-process results."""
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="",
               PYTHONPATH=os.pathsep.join([str(pathlib.Path(__file__).parent), os.environ.get("PYTHONPATH", "")]))
    port = str(_free_port())
    procs = [subprocess.Popen([sys.executable, "-c", MULTI_HOST_WORKER, str(i), "2", port], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)]
    try:
        outs = [p.communicate(timeout=600) for p in procs]
    finally:
        for p in procs:
            p.kill()
    for p, (_, err) in zip(procs, outs):
        assert p.returncode == 0, err[-3000:]
    results = [json.loads(out) for out, _ in outs]
    assert sorted(r["process"] for r in results) == [0, 1] and all(r["processes"] == 2 for r in results)
    with jax.default_matmul_precision("highest"):
        here = GEM(Model(SMALL, sharpened(init_params(SMALL, seed=3)), Tokenizer.default(), "small"), layers=2,
                   size=(32, 40), batch_size=8, schedule=PER_IMAGE).heatmaps(images(), PROMPTS).logits
    seen = []
    for r in results:
        for i, logits in zip(r["indices"], r["logits"]):
            seen.append(i)
            assert np.asarray(logits).shape == here[i].shape
            np.testing.assert_allclose(np.asarray(logits), here[i], atol=1e-6)
    assert sorted(seen) == list(range(len(PROMPTS)))
