"""The toy scenes, the toy vocabulary, the shipped toy model and the training command."""

from __future__ import annotations

import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from gem_jax.toy import scenes, vocab

# ----------------------------------------------------------------------------- scenes


def test_scene_is_a_function_of_its_seed():
    a, b, c = scenes.scene(7), scenes.scene(7), scenes.scene(8)
    assert np.array_equal(a.image, b.image) and a.caption == b.caption and a.background == b.background
    assert [p for p, _ in a.objects] == [p for p, _ in b.objects]
    assert all(np.array_equal(m, n) for (_, m), (_, n) in zip(a.objects, b.objects))
    assert not np.array_equal(a.image, c.image)


@pytest.mark.parametrize("seed", range(0, 400, 7))
def test_scene_fields_and_exact_masks(seed):
    sc = scenes.scene(seed)
    assert sc.image.dtype == np.uint8 and sc.image.shape == (64, 64, 3)
    assert sc.background in scenes.BACKGROUNDS
    assert 1 <= len(sc.objects) <= 3
    phrases = [p for p, _ in sc.objects]
    assert len(set(phrases)) == len(phrases) and all(p in scenes.PHRASES for p in phrases)
    assert sc.caption == scenes.caption(phrases, sc.background)
    assert all(f"a {p}" in sc.caption for p in phrases) and sc.caption.endswith(f" on {sc.background}")
    masks = np.stack([m for _, m in sc.objects])
    assert masks.dtype == bool and masks.shape[1:] == (64, 64)
    assert masks.sum(axis=0).max() <= 1, "visible masks overlap"
    assert (masks.sum(axis=(1, 2)) >= 4).all()
    # The objects' colours are painted on exactly the masks' pixels: the same scene laid out
    # but not painted differs from the scene nowhere else, and everywhere on the masks.
    bare = scenes._make(seed, 64, paint=False).image
    changed = (sc.image != bare).any(axis=-1)
    union = masks.any(axis=0)
    assert not (changed & ~union).any()
    assert changed[union].mean() > 0.97
    # and each mask is one flat colour (fill + small noise), so no background pixel is in it
    for (phrase, m) in sc.objects:
        pix = sc.image[m].astype(int)
        assert np.abs(pix - np.median(pix, axis=0)).max() <= 40, phrase
    labels = sc.label_map()
    names = scenes.class_names()
    assert names[labels[~union][0]] == sc.background if (~union).any() else True
    for phrase, m in sc.objects:
        assert (labels[m] == names.index(phrase)).all()


def test_scenes_cover_the_vocabulary():
    found = [scenes.scene(s) for s in range(300)]
    assert {s.background for s in found} == set(scenes.BACKGROUNDS)
    assert {p for s in found for p in s.phrases} == set(scenes.PHRASES)
    assert {len(s.objects) for s in found} == {1, 2, 3}


def test_scene_rejects_bad_arguments():
    with pytest.raises(ValueError):
        scenes.scene(-1)
    with pytest.raises(ValueError):
        scenes.scene(1, size=8)


# ----------------------------------------------------------------------------- vocabulary


def _decode(tok, ids):
    from tokenizers import pre_tokenizers

    symbols = sorted(pre_tokenizers.ByteLevel.alphabet())
    # byte-level BPE maps byte b to a printable symbol; invert that map
    byte_of = {}
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    codes = printable[:]
    n = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            codes.append(256 + n)
            n += 1
    byte_of = {chr(c): b for b, c in zip(printable, codes)}
    assert set(byte_of) == set(symbols)
    inverse = {i: t for t, i in tok.vocab.items()}
    text = "".join(inverse[i] for i in ids if i not in (tok.sot_token_id, tok.eot_token_id) and i)
    words = text.replace("</w>", " ")
    return bytes(byte_of[ch] if ch != " " else 32 for ch in words).decode("utf-8").strip()


def test_toy_vocabulary_round_trip(tmp_path):
    from gem_jax.tokenizer import Tokenizer

    vocab.write_tokenizer(tmp_path)
    tok = Tokenizer.from_dir(tmp_path, context_length=vocab.CONTEXT_LENGTH)
    assert tok.eot_token_id == max(tok.vocab.values()), "the text tower pools at the largest id"
    assert tok.vocab_size < 700
    for word in vocab.WORDS:
        assert len(tok.encode(word)) == 1, word
    longest = "a red circle, a blue square and a green triangle on grass"
    ids = tok(longest)[0]
    assert ids[0] == tok.sot_token_id and list(ids).index(tok.eot_token_id) == len(tok.encode(longest)) + 1
    assert _decode(tok, ids) == "a red circle , a blue square and a green triangle on grass"
    # unknown words fall back to bytes, and still decode
    odd = "zebra größe"
    assert len(tok.encode("zebra")) > 1
    assert _decode(tok, tok(odd)[0]) == odd
    # the same ids as the in-memory tokenizer
    assert np.array_equal(tok([longest, odd]), vocab.tokenizer()([longest, odd]))


# ----------------------------------------------------------------------------- training

_TINY_RECIPE = {"image_size": 32, "patch_size": 8, "vision_width": 32, "vision_layers": 1, "vision_heads": 2,
                "text_width": 32, "text_layers": 1, "text_heads": 2, "embed_dim": 16, "batch_size": 8,
                "steps": 60, "warmup_steps": 10}


def _train_cmd(out, recipe_file, *extra):
    return [sys.executable, "-m", "gem_jax.cli", "train-toy", "--out", str(out), "--recipe", str(recipe_file),
            *extra]


def _env():
    env = dict(os.environ)
    root = str(pathlib.Path(__file__).resolve().parents[1])
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    env.setdefault("JAX_PLATFORMS", "cpu")
    return env


def _weights(d):
    from safetensors.numpy import load_file

    return load_file(str(pathlib.Path(d) / "model.safetensors"))


def test_train_command_resumes_after_kill_9_to_the_uninterrupted_result(tmp_path):
    recipe = tmp_path / "recipe.json"
    recipe.write_text(json.dumps(_TINY_RECIPE))
    env = _env()
    # uninterrupted
    whole = tmp_path / "whole"
    done = subprocess.run(_train_cmd(whole, recipe, "--save-every", "1000"), env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    # killed with SIGKILL as soon as a state has been saved, then resumed
    cut = tmp_path / "cut"
    state = cut.with_name("cut.state.npz")
    proc = subprocess.Popen(_train_cmd(cut, recipe, "--save-every", "3"), env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 240
        while not state.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    assert state.exists() and not (cut / "model.safetensors").exists()
    with np.load(state) as z:
        killed_at = int(z["step"])
    assert 0 < killed_at < _TINY_RECIPE["steps"]
    again = subprocess.run(_train_cmd(cut, recipe, "--save-every", "3"), env=env, capture_output=True, text=True,
                           timeout=300)
    assert again.returncode == 0, again.stderr
    assert "resuming from step" in again.stderr and "resumed from step" in again.stderr
    assert not state.exists(), "the state file outlived the finished run"
    a, b = _weights(whole), _weights(cut)
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)
    # the model is gem-jax's native format, with its recipe and recommended settings
    cfg = json.loads((cut / "config.json").read_text())
    assert cfg["format"] == "gem-jax" and cfg["toy"]["steps"] == _TINY_RECIPE["steps"]
    assert cfg["defaults"]["method"] == "gem" and cfg["defaults"]["size"] == 32
    # a finished run says so and does nothing
    third = subprocess.run(_train_cmd(cut, recipe), env=env, capture_output=True, text=True, timeout=120)
    assert third.returncode == 0 and "already trained" in third.stderr
    assert np.array_equal(_weights(cut)["visual/proj"], b["visual/proj"])


def test_train_command_refuses_a_foreign_directory_a_foreign_state_and_bad_recipes(tmp_path, capsys):
    from gem_jax import cli

    def run(*args):
        code = cli.main(["train-toy", *map(str, args)])
        return code, capsys.readouterr().err

    foreign = tmp_path / "photos"
    foreign.mkdir()
    (foreign / "cat.jpg").write_bytes(b"x")
    for force in ((), ("--force",)):
        code, err = run("--out", foreign, *force)
        assert code == 2 and "refusing to replace" in err and "Traceback" not in err
    assert (foreign / "cat.jpg").read_bytes() == b"x"
    bad = tmp_path / "bad.json"
    bad.write_text('{"widthh": 3}')
    code, err = run("--out", tmp_path / "m", "--recipe", bad)
    assert code == 2 and "unknown recipe fields" in err and "Traceback" not in err
    assert not (tmp_path / "m").exists()
    # a file named like the run's state that gem-jax did not write is neither read as a state
    # nor deleted by --force
    recipe = tmp_path / "recipe.json"
    recipe.write_text(json.dumps(_TINY_RECIPE))
    theirs = tmp_path / "m.state.npz"
    theirs.write_bytes(b"someone else's file")
    for force in ((), ("--force",)):
        code, err = run("--out", tmp_path / "m", "--recipe", recipe, *force)
        assert code == 2 and "not written by gem-jax" in err, err
    assert theirs.read_bytes() == b"someone else's file" and not (tmp_path / "m").exists()
