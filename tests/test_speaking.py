"""Every command speaks the same way: status lines never inside a progress bar's line, the
same log-line form off a terminal, --quiet, the method and the model named, --version,
`models` listing every model folder."""

from __future__ import annotations

import os
import pathlib
import pty
import re
import select
import subprocess
import sys
import time

import numpy as np
import pytest
from PIL import Image

from gem_jax import __version__
from tiny import save_tiny


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("speak")
    model = root / "tiny"
    save_tiny(model, seed=3)
    images = root / "imgs"
    images.mkdir()
    for i in range(6):
        Image.fromarray(np.random.default_rng(i).integers(0, 256, (30, 40, 3), dtype=np.uint8)).save(
            images / f"im{i}.png")
    e = dict(os.environ, GEM_JAX_WEIGHTS=str(root / "weights"), HF_HUB_OFFLINE="1", JAX_PLATFORMS="cpu")
    return {"root": root, "model": model, "images": images, "env": e}


def on_a_terminal(args, env, columns):
    """Runs the command with stderr on a pseudo-terminal of ``columns``; returns what it drew."""
    master, slave = pty.openpty()
    import fcntl
    import struct
    import termios

    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, columns, 0, 0))
    proc = subprocess.Popen([sys.executable, "-m", "gem_jax.cli", *map(str, args)], stdin=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL, stderr=slave, env=dict(env, COLUMNS=str(columns)))
    os.close(slave)
    chunks, deadline = [], time.monotonic() + 600
    while time.monotonic() < deadline:
        ready, _, _ = select.select([master], [], [], 1.0)
        if ready:
            try:
                data = os.read(master, 65536)
            except OSError:
                break
            if not data:
                break
            chunks.append(data)
        elif proc.poll() is not None:
            break
    proc.wait(timeout=60)
    os.close(master)
    return proc.returncode, b"".join(chunks).decode("utf-8", "replace")


def screen_lines(raw: str) -> list[str]:
    """What is left on each terminal line after carriage returns redraw it."""
    raw = re.sub(r"\x1b\[[0-9;]*[A-Za-z]", "", raw)  # cursor movements of the bar
    out = []
    for line in raw.replace("\r\n", "\n").split("\n"):
        out.append(line.split("\r")[-1])
    return [line for line in out if line.strip()]


@pytest.mark.parametrize("columns", [100, 160])
@pytest.mark.parametrize("command", ["segment", "batch"])
def test_status_lines_are_never_written_into_the_bar(env, tmp_path, columns, command):
    common = ["--model", env["model"], "--gem-layers", "1", "--size", "32", "--no-compile-cache"]
    if command == "segment":
        args = ["segment", env["images"], "-p", "cat", "--out", tmp_path / "o", *common]
    else:
        args = ["batch", env["images"], "-p", "cat", "--out", tmp_path / "o", "--batch-size", "2", *common]
    code, raw = on_a_terminal(args, env["env"], columns)
    assert code == 0, raw
    lines = screen_lines(raw)
    status = [line for line in lines if line.startswith(f"{command}: ")]
    assert any("loading model" in line for line in status) and any("compiling" in line or "to do" in line
                                                                    for line in status), lines
    for line in lines:  # every line is a status line or a bar, never both run together
        is_bar = "it/s" in line or "image/s" in line or "s/image" in line or "%|" in line
        assert not (is_bar and f"{command}: " in line[1:]), line
        assert line.startswith(f"{command}: ") or is_bar or line.startswith("  "), line


def test_off_a_terminal_progress_is_log_lines_in_one_form(env, tmp_path):
    proc = subprocess.run([sys.executable, "-m", "gem_jax.cli", "batch", env["images"], "-p", "cat", "--out",
                           tmp_path / "o", "--model", env["model"], "--gem-layers", "1", "--size", "32",
                           "--log-every", "2", "--batch-size", "2", "--no-compile-cache"],
                          env=env["env"], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    progress = [line for line in proc.stderr.splitlines() if re.match(r"batch: \d+/6 images, ", line)]
    assert len(progress) >= 2 and progress[-1].startswith("batch: 6/6 images"), proc.stderr
    quiet = subprocess.run([sys.executable, "-m", "gem_jax.cli", "batch", env["images"], "-p", "cat", "--out",
                            tmp_path / "q", "--model", env["model"], "--gem-layers", "1", "--size", "32",
                            "--quiet", "--no-compile-cache"], env=env["env"], capture_output=True, text=True,
                           timeout=600)
    assert quiet.returncode == 0 and quiet.stderr == "", quiet.stderr


def test_version(env):
    proc = subprocess.run([sys.executable, "-m", "gem_jax.cli", "--version"], env=env["env"], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip() == f"gem-jax {__version__}"


def test_models_lists_every_folder_in_weights(env):
    weights = pathlib.Path(env["env"]["GEM_JAX_WEIGHTS"])
    save_tiny(weights / "random-b16", seed=1, random_weights=True)
    save_tiny(weights / "my-finetune", seed=2)
    (weights / "downloads").mkdir(parents=True)
    (weights / "downloads" / "model.safetensors").write_bytes(b"")
    proc = subprocess.run([sys.executable, "-m", "gem_jax.cli", "models"], env=env["env"], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    rows = {pathlib.Path(line.split()[0]).name: line for line in proc.stdout.splitlines()
            if line.startswith(str(weights))}
    assert "random weights" in rows["random-b16"] and "converted" in rows["my-finetune"]
    assert "original files" in rows["downloads"]


def test_titles_name_the_method_and_the_model(env, tmp_path, monkeypatch):
    from gem_jax import visualize
    from gem_jax.cli import main

    titles = []
    for name in ("heatmap_grid", "label_figure"):
        real = getattr(visualize, name)
        monkeypatch.setattr(visualize, name, lambda *a, _real=real, **k: (titles.append(k.get("title")),
                                                                          _real(*a, **k))[1])
    random_model = tmp_path / "rnd"
    save_tiny(random_model, seed=4, random_weights=True)
    out = tmp_path / "o"
    for model in (env["model"], random_model):
        code = main(["segment", str(env["images"] / "im0.png"), "-p", "cat", "--classes", "cat", "dog", "--model",
                     str(model), "--method", "naclip", "--size", "32", "--out", str(out / model.name), "--quiet",
                     "--no-compile-cache"])
        assert code == 0
    assert titles[:2] == ["naclip on tiny"] * 2
    assert all(t.startswith("naclip on rnd") and "RANDOM weights" in t for t in titles[2:]) and len(titles) == 4
    assert sorted(p.name for p in (out / "tiny").iterdir() if not p.name.startswith(".")) == \
        ["im0__naclip__cat.png", "im0__naclip__grid.png", "im0__naclip__labels.png"]
