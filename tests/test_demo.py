"""``gem-jax demo``: the page in a real headless Chromium, the ``/segment`` API, the messages.

The server runs as a user starts it (a subprocess on a free port) on a small random-weight
model. The browser is Debian's ``chromium`` driven by Playwright's Python API through
``executable_path`` (``.ci/run`` installs it); outside CI a missing browser skips the
browser tests, in CI (``CI=true``) it fails them.

Set ``GEM_JAX_DEMO_SCREENSHOT=docs/demo.png`` to also write the page's screenshot there
(the README's picture).
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import os
import pathlib
import queue
import shutil
import socket
import subprocess
import sys
import threading

import numpy as np
import pytest
from PIL import Image

IN_CI = os.environ.get("CI", "").strip().lower() in ("1", "true", "yes")
try:
    import gradio  # noqa: F401
    import gradio_client  # noqa: F401
except ImportError:
    if IN_CI:  # the test extra has them: never skip the demo's tests silently in CI
        raise
    pytest.skip("the demo extra is not installed (pip install -e '.[demo]')", allow_module_level=True)

from gem_jax import loading, pipeline, postprocess, visualize  # noqa: E402
from gem_jax.checkpoints import save_native  # noqa: E402
from gem_jax.outputs import to_display  # noqa: E402
from gem_jax.config import CLIPConfig, TextConfig, VisionConfig  # noqa: E402
from gem_jax.models import init_params  # noqa: E402

#: A small random CLIP; 32-pixel patches keep the default 448 input at 14 x 14 tokens.
TINY = CLIPConfig(
    vision=VisionConfig(image_size=64, patch_size=32, width=64, layers=3, heads=2),
    text=TextConfig(width=32, layers=1, heads=2),
    embed_dim=32,
)
START_TIMEOUT = 240  # seconds for the server to print its URL (imports, model load)
RUN_TIMEOUT = 120_000  # milliseconds for a run in the page (the first one compiles)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """``gem-jax demo`` in a subprocess; ``url`` once it has printed it."""

    def __init__(self, args, env):
        self.port = _free_port()
        self.proc = subprocess.Popen([sys.executable, "-m", "gem_jax.cli", "demo", *map(str, args),
                                      "--port", str(self.port)], env=env, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True)
        self.lines: queue.Queue = queue.Queue()
        self.err: list[str] = []
        threading.Thread(target=self._pump, args=(self.proc.stdout, self.lines.put), daemon=True).start()
        threading.Thread(target=self._pump, args=(self.proc.stderr, self.err.append), daemon=True).start()
        self.url = self._wait_for_url()

    @staticmethod
    def _pump(stream, sink):
        for line in stream:
            sink(line)
        sink(None)

    def _wait_for_url(self) -> str:
        while True:
            try:
                line = self.lines.get(timeout=START_TIMEOUT)
            except queue.Empty:
                self.stop()
                pytest.fail(f"the demo printed no URL in {START_TIMEOUT} s; stderr:\n{''.join(filter(None, self.err))}")
            if line is None:
                self.proc.wait(timeout=30)
                pytest.fail(f"the demo exited ({self.proc.returncode}); stderr:\n{''.join(filter(None, self.err))}")
            if "running on " in line:
                url = line.split("running on ", 1)[1].strip()
                assert url == f"http://127.0.0.1:{self.port}/", url
                return url

    def stop(self):
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=30)


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo")
    model = root / "tiny-model"
    # random weights, marked as such (as `gem-jax convert --random` writes them): the page says so
    save_native(model, TINY, init_params(TINY, seed=5), metadata={"random_weights": True})
    e = dict(os.environ, GEM_JAX_WEIGHTS=str(root / "weights"), GEM_JAX_COMPILE_CACHE=str(root / "xla"),
             HF_HUB_OFFLINE="1", JAX_PLATFORMS="cpu", GRADIO_ANALYTICS_ENABLED="False",
             PYTHONUNBUFFERED="1")
    return {"root": root, "model": model, "env": e}


@pytest.fixture(scope="module")
def server(env):
    s = Server(["--model", env["model"]], env["env"])
    yield s
    s.stop()


def write_image(path, h=60, w=88, seed=0):
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)).save(path)
    return pathlib.Path(path)


def test_segment_api_logits_match_gem_heatmaps(server, env, tmp_path):
    from gradio_client import Client, handle_file

    img = write_image(tmp_path / "photo.png")
    client = Client(server.url, verbose=False)
    gallery, label_map, npz, timing, status = client.predict(handle_file(str(img)), "cat, sofa", "gem",
                                                             api_name="/segment")
    assert status.startswith("Done"), status
    assert "compilation" in timing  # the first run of this shape compiles

    # The page's defaults: 448 input, adaptive temperature, all of the tiny model's 3 blocks.
    api = pipeline.GEM(loading.load(str(env["model"])), layers=3).heatmaps(str(img), ["cat", "sofa"])
    saved = np.load(npz)
    assert sorted(saved.files) == ["description", "heatmaps", "images", "logits", "prompts", "sizes"]
    assert json.loads(str(saved["description"]))["method"]["name"] == "gem"
    assert list(saved["prompts"]) == ["cat", "sofa"] and list(saved["images"]) == ["photo.png"]
    assert saved["logits"].shape == (1, 2, 448, 448) and saved["sizes"].tolist() == [[448, 448]]
    np.testing.assert_allclose(saved["logits"], api.logits, rtol=0, atol=1e-5)
    np.testing.assert_allclose(saved["heatmaps"], api.heatmaps, rtol=0, atol=1e-5)

    # Each overlay is the package's overlay of that prompt's heatmap, at the image's own size.
    picture = np.asarray(Image.open(img).convert("RGB"))
    shown = to_display(saved["heatmaps"][0], picture.shape[:2])
    assert [item["caption"] for item in gallery] == ["cat", "sofa"]
    for i, item in enumerate(gallery):
        got = np.asarray(Image.open(item["image"]).convert("RGB"))
        np.testing.assert_array_equal(got, visualize.overlay(picture, shown[i]))
    assert Image.open(label_map).size[0] > picture.shape[1]  # image, labels and legend side by side

    # Same size and prompt-count bucket: no compilation; nine prompts: a new bucket compiles.
    again = client.predict(handle_file(str(img)), "dog\nsofa\ncat", "gem", api_name="/segment")
    assert again[4].startswith("Done") and "compilation" not in again[3], again[3]
    many = client.predict(handle_file(str(img)), ", ".join(f"thing {i}" for i in range(9)), "gem",
                          api_name="/segment")
    assert many[4].startswith("Done") and "compilation" in many[3], many[3]
    assert len(many[0]) == 9


@pytest.mark.parametrize("case", ["empty_prompts", "bad_upload", "truncated", "bad_size", "too_many_layers"])
def test_segment_api_messages(server, tmp_path, case):
    from gradio_client import Client, handle_file

    img = write_image(tmp_path / "ok.png")
    args, kwargs, expect = [img, "cat", "gem"], {}, None
    if case == "empty_prompts":
        args[1], expect = " ,\n , ", "Type at least one prompt"
    elif case == "bad_upload":
        (tmp_path / "notes.png").write_text("these are notes, not a picture")
        args[0], expect = tmp_path / "notes.png", "Could not read the uploaded file 'notes.png'"
    elif case == "truncated":
        data = img.read_bytes()
        (tmp_path / "cut.png").write_bytes(data[: len(data) // 2])
        args[0], expect = tmp_path / "cut.png", "Could not read the uploaded file 'cut.png'"
    elif case == "bad_size":
        kwargs, expect = {"size": "big"}, "Size: expected N or HxW"
    elif case == "too_many_layers":
        kwargs, expect = {"layers": 5}, "exceeds the model's 3 vision blocks"
    gallery, label_map, npz, timing, status = Client(server.url, verbose=False).predict(
        handle_file(str(args[0])), *args[1:], api_name="/segment", **kwargs)
    assert expect in status, status
    assert "Traceback" not in status and str(tmp_path) not in status
    assert gallery == [] and label_map is None and npz is None


@pytest.mark.parametrize("case", ["unknown_model", "port_taken"])
def test_start_errors_exit_codes(env, case):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        model, port = str(env["model"]), busy.getsockname()[1]
        if case == "unknown_model":
            model, expect_code, expect_msg = "ViT-B/16:opnai", 2, "did you mean 'ViT-B/16:openai'"
        else:
            expect_code, expect_msg = 1, f"cannot serve on 127.0.0.1:{port}: the port is in use"
        proc = subprocess.run([sys.executable, "-m", "gem_jax.cli", "demo", "--model", model, "--port", str(port)],
                              env=env["env"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == expect_code, proc.stderr
    assert expect_msg in proc.stderr and "Traceback" not in proc.stderr
    assert "running on" not in proc.stdout


def test_demo_object_compiles_once_per_shape_and_relabels_without_the_model(env, monkeypatch):
    from gem_jax.demo import Demo, DemoError

    weights = pathlib.Path(env["root"] / "weights-one-converted")
    monkeypatch.setenv("GEM_JAX_WEIGHTS", str(weights))
    demo = Demo(str(env["model"]))
    try:
        # the models that ship inside gem-jax are always listed
        assert demo.startup_error is None and demo.model_choices() == [str(env["model"]), "toy"]
        # A registry model converted on this machine joins the list; a broken one says why.
        save_native(weights / "ViT-B-32.openai", TINY, init_params(TINY, seed=1))
        assert demo.model_choices() == [str(env["model"]), "ViT-B/32:openai", "toy"]
        with pytest.raises(DemoError, match="ViT-B"):
            demo.model("ViT-B/32:openai")  # the tiny model is not a ViT-B/32
        with pytest.raises(DemoError, match="pick one from the list"):
            demo.model(str(env["root"]))  # only listed models load: no arbitrary server paths
        picture = np.random.default_rng(1).integers(0, 256, (40, 50, 3), dtype=np.uint8)
        first = list(demo.run(picture, "cat\ndog", "gem", layers=2, size="64x96"))
        assert len(first) == 2 and "Compiling the model for 64 x 96 inputs" in first[0][4]
        overlays, label_map, npz, timing, status, result = first[1]
        assert status.startswith("Done") and [c for _, c in overlays] == ["cat", "dog"]
        assert result.logits.shape == (2, 64, 96)
        # Another image of the same input size and bucket: results only, no notice, and
        # JAX compiled nothing new.
        (gem,) = demo._gems.values()  # one option set so far
        programs = gem.compiled_programs()
        second = list(demo.run(picture[::-1], "sofa, cat, dog", "gem", layers=2, size="64x96"))
        assert len(second) == 1 and second[0][4].startswith("Done") and "compilation" not in second[0][3]
        assert gem.compiled_programs() == programs
        third = list(demo.run(picture, "cat", "gem", layers=2, size="96"))
        assert len(third) == 2 and "compilation" in third[1][3] and gem.compiled_programs() > programs
        # A model with random weights says so in the page and in the pictures' titles, which
        # also name the method and the model.
        assert loading.RANDOM_WEIGHTS_NOTE in status and loading.RANDOM_WEIGHTS_NOTE in result.note
        assert result.note.startswith("gem on tiny-model (local)")
        gem.model = dataclasses.replace(gem.model, random_weights=False)
        ((*_, plain_status, plain),) = demo.run(picture, "cat", "gem", layers=2, size="96")
        assert "RANDOM" not in plain_status and "RANDOM" not in plain.note

        expect = postprocess.labels_from_logits(result.logits, 1.0)
        assert (expect == 0).all()  # at threshold 1 every pixel is background...
        everything, nothing = demo.relabel(result, 0.0), demo.relabel(result, 1.0)
        assert pathlib.Path(everything).read_bytes() != pathlib.Path(nothing).read_bytes()
        assert demo.relabel(None, 0.5) is None
    finally:
        demo.close()
    assert not demo.workdir.exists()


def _chromium() -> str:
    """Debian's chromium, or a skip (a failure in CI)."""
    path = next(filter(None, map(shutil.which, ("chromium", "chromium-browser"))), None)
    problem = None
    if path is None:
        problem = "no chromium on PATH (apt-get install chromium; .ci/run does it)"
    else:
        try:
            import playwright.sync_api  # noqa: F401
        except ImportError:
            problem = "playwright is not installed (it is in the test extra)"
    if problem:
        if IN_CI:
            pytest.fail(f"browser test cannot run in CI: {problem}")
        pytest.skip(problem)
    return path


@pytest.fixture(scope="module")
def browser():
    executable = _chromium()
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=executable, headless=True, args=["--no-sandbox"])
        yield b
        b.close()


@contextlib.contextmanager
def page_of(browser, url):
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    try:
        page.goto(url)
        page.wait_for_selector("#run", timeout=60_000)
        yield page
    finally:
        page.close()


def _fetch_image(page, src) -> Image.Image:
    response = page.request.get(src)
    assert response.ok, (src, response.status)
    return Image.open(io.BytesIO(response.body())).convert("RGB")


def _status(page, text):
    page.wait_for_function("t => document.querySelector('#status').innerText.includes(t)", arg=text,
                           timeout=RUN_TIMEOUT)
    return page.inner_text("#status")


def test_page_in_chromium(browser, server, tmp_path):
    from gem_jax.loading import example_image_path

    photo = tmp_path / "chelsea.jpg"
    shutil.copyfile(example_image_path(), photo)
    original = np.asarray(Image.open(photo).convert("RGB"))
    with page_of(browser, server.url) as page:
        page.set_input_files("#image input[type=file]", str(photo))
        page.wait_for_selector("#image img", timeout=30_000)  # the upload's preview

        page.click("#run")  # no prompts yet
        assert "Type at least one prompt" in _status(page, "Type at least one prompt")

        page.fill("#prompts textarea", "cat\nsofa\nremote control")
        page.get_by_text("method options").click()
        page.fill("#size textarea", "224")
        page.click("#run")
        _status(page, "Done")
        page.wait_for_function("document.querySelectorAll('#overlays .thumbnail-item img').length === 3 && "
                               "[...document.querySelectorAll('#overlays .thumbnail-item img')]"
                               ".every(i => i.complete && i.naturalWidth > 0)", timeout=RUN_TIMEOUT)
        page.wait_for_function("(() => { const i = document.querySelector('#label-map img'); "
                               "return i && i.complete && i.naturalWidth > 0; })()", timeout=RUN_TIMEOUT)

        thumbs = page.locator("#overlays .thumbnail-item")
        assert [thumbs.nth(i).locator(".caption-label").inner_text() for i in range(3)] == \
            ["cat", "sofa", "remote control"]
        for i in range(3):
            overlay = np.asarray(_fetch_image(page, thumbs.nth(i).locator("img").get_attribute("src")))
            assert overlay.shape == original.shape  # at the image's own size
            assert np.mean(np.abs(overlay.astype(int) - original)) > 5  # the heatmap is blended in
        labels = _fetch_image(page, page.locator("#label-map img").get_attribute("src"))
        assert labels.width > original.shape[1] and labels.height > 100
        assert "Model time" in page.inner_text("#timing")
        assert page.locator("#npz a[download], #npz a.download-link").count() >= 1
        page.screenshot(path=str(tmp_path / "demo.png"), full_page=True)

        # The threshold slider redraws the label map from the last logits.
        before = page.locator("#label-map img").get_attribute("src")
        page.fill("#threshold input[type=number]", "0.3")
        page.press("#threshold input[type=number]", "Enter")
        page.wait_for_function("s => { const i = document.querySelector('#label-map img'); "
                               "return i && i.src !== s && i.complete && i.naturalWidth > 0; }", arg=before,
                               timeout=RUN_TIMEOUT)
        assert "labels_0.30.png" in page.locator("#label-map img").get_attribute("src")
        target = os.environ.get("GEM_JAX_DEMO_SCREENSHOT")
        if target:
            shutil.copyfile(tmp_path / "demo.png", target)

        # An unreadable upload: a message in the page, no traceback.
        broken = tmp_path / "broken.jpg"
        broken.write_bytes(b"not a JPEG at all" * 10)
        page.locator("#image button[aria-label='Remove Image']").click()
        page.wait_for_selector("#image img", state="detached", timeout=30_000)
        page.set_input_files("#image input[type=file]", str(broken))
        page.wait_for_selector("#image img", timeout=30_000)  # the (broken) preview of the new upload
        page.click("#run")
        message = _status(page, "Could not read the uploaded file")
        assert "broken.jpg" in message and "Traceback" not in page.content()


def test_page_opens_offline_and_says_what_to_download(env, browser, tmp_path):
    """No --model and no converted default: the page opens with the CLI's download message."""
    s = Server([], env["env"])
    try:
        with page_of(browser, s.url) as page:
            banner = page.inner_text("#banner")
            # the page names the model but no server path; the terminal has the download command
            assert "ViT-B/16:openai" in banner and "not available on this server" in banner
            assert env["env"]["GEM_JAX_WEIGHTS"] not in page.content()
            page.fill("#prompts textarea", "cat")
            page.click("#run")
            assert "Upload an image first" in _status(page, "Upload an image")
            page.get_by_text("cat, sofa, remote control").click()  # the bundled example fills both inputs
            page.wait_for_function("document.querySelector('#prompts textarea').value === 'cat, sofa, remote control'",
                                   timeout=30_000)
            page.wait_for_selector("#image img", timeout=30_000)
            page.locator("#image button[aria-label='Remove Image']").click()
            page.wait_for_selector("#image img", state="detached", timeout=30_000)
            page.set_input_files("#image input[type=file]", str(write_image(tmp_path / "a.png")))
            page.wait_for_selector("#image img", timeout=30_000)
            page.click("#run")
            assert "terminal" in _status(page, "is not available")  # the same message on running
        assert any("hf download openai/clip-vit-base-patch16" in line for line in s.err if line)  # the terminal's
    finally:
        s.stop()


def _call_raw(url, data):
    """POSTs a raw payload to ``/segment`` as any HTTP client can, bypassing gradio_client's
    file handling; returns the final event's text."""
    import httpx

    r = httpx.post(f"{url}gradio_api/call/segment", json={"data": data}, timeout=60)
    if r.status_code != 200:
        return f"HTTP {r.status_code}: {r.text}"
    event_id = r.json()["event_id"]
    with httpx.stream("GET", f"{url}gradio_api/call/segment/{event_id}", timeout=300) as stream:
        return "".join(stream.iter_text())


def test_server_paths_are_never_read(server, env, tmp_path):
    """Payloads naming files on the server, in every shape: refused with the same answer
    whether the file exists or not, and no answer names it."""
    real = write_image(tmp_path / "secret.png")  # a readable image on the server
    missing = tmp_path / "missing.png"
    shapes = [
        lambda p: {"path": str(p)},
        lambda p: {"path": str(p), "orig_name": "x.png"},
        lambda p: {"path": str(p), "meta": {"_type": "gradio.FileData"}},
        lambda p: str(p),
        lambda p: {"path": f"{tmp_path}/../{tmp_path.name}/{p.name}"},
    ]
    for shape in shapes:
        answers = []
        for target in (real, missing):
            text = _call_raw(server.url, [shape(target), "cat", "gem"])
            assert "Done" not in text and str(tmp_path) not in text and "secret" not in text, text
            answers.append(text.replace(target.name, "NAME"))
        assert answers[0] == answers[1], answers
    # the schema names no server path (the model is listed by its label)
    import httpx

    info = httpx.get(f"{server.url}gradio_api/info", timeout=60).text
    assert str(env["model"]) not in info and str(env["root"]) not in info


def test_a_huge_upload_is_answered_and_the_server_lives(server, tmp_path):
    from gradio_client import Client, handle_file

    big = tmp_path / "big.jpg"
    Image.fromarray(np.full((8000, 8000, 3), 120, np.uint8)).save(big, quality=50)
    client = Client(server.url, verbose=False)
    gallery, label_map, npz, timing, status = client.predict(handle_file(str(big)), "cat, sofa", "gem",
                                                             api_name="/segment")
    assert status.startswith("Done") or "GiB" in status, status
    if gallery:  # processed: the pictures are drawn at most 2048 pixels on a side
        assert max(Image.open(gallery[0]["image"]).size) <= 2048
    again = client.predict(handle_file(str(write_image(tmp_path / "small.png"))), "cat", "gem", api_name="/segment")
    assert again[4].startswith("Done"), again[4]


def test_page_says_random_weights_before_run_and_shows_the_whole_label_map_title(browser, server, tmp_path):
    with page_of(browser, server.url) as page:
        assert "RANDOM weights" in page.inner_text("#banner")  # before anything is run
        page.set_input_files("#image input[type=file]", str(write_image(tmp_path / "a.png")))
        page.wait_for_selector("#image img", timeout=30_000)
        page.fill("#prompts textarea", "cat, sofa")
        page.click("#run")
        _status(page, "Done")
        page.wait_for_function("(() => { const i = document.querySelector('#label-map img'); "
                               "return i && i.complete && i.naturalWidth > 0; })()", timeout=RUN_TIMEOUT)
        # nothing of Gradio's is drawn over the picture (its label badge would cover the title)
        overlapping = page.evaluate("""() => {
            const img = document.querySelector('#label-map img').getBoundingClientRect();
            return [...document.querySelectorAll('#label-map *')].filter(e => {
                if (e.tagName === 'IMG' || e.contains(document.querySelector('#label-map img'))) return false;
                const r = e.getBoundingClientRect(), s = getComputedStyle(e);
                return r.width > 0 && r.height > 0 && s.visibility !== 'hidden' && s.display !== 'none' &&
                       r.bottom > img.top && r.top < img.top + 40 && r.right > img.left && r.left < img.right &&
                       e.innerText && e.innerText.trim().length > 0;
            }).map(e => e.innerText);
        }""")
        assert overlapping == [], overlapping
        assert "background threshold" in page.inner_text("#timing")
