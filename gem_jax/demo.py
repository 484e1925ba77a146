"""``gem-jax demo``: a web page (Gradio) to try GEM on one image with many prompts.

Everything the page shows comes from the package itself: :class:`gem_jax.GEM` for the
logits and heatmaps, :func:`gem_jax.postprocess.labels_from_logits` for the label map,
:mod:`gem_jax.visualize` for the overlays, the colour bar and the legend,
:mod:`gem_jax.outputs` for the ``--save-logits`` download and the display sizes, and the
registry for the model list. Gradio is an optional dependency: ``pip install "gem-jax[demo]"``.

The page has one API endpoint, ``/segment``::

    from gradio_client import Client, handle_file
    gallery, label_map, npz, timing, status = Client(url).predict(
        handle_file("cat.jpg"), "cat, sofa", "gem", api_name="/segment")

Clients are not trusted: the image must arrive as an upload (Gradio's own file handling,
``handle_file``); a payload naming a file on the server is refused with the same answer
whether that file exists or not, and no message names a server path.
"""

from __future__ import annotations

import collections
import dataclasses
import os
import pathlib
import re
import shutil
import signal
import sys
import tempfile
import threading
import time
from typing import Any

import numpy as np

from gem_jax import checks, checkpoints, outputs, postprocess, preprocess, visualize
from gem_jax.engine.cost import MemoryLimitError
from gem_jax.engine.methods import OptionError, get_method, method_names
from gem_jax.loading import RANDOM_WEIGHTS_NOTE, ModelLoadError, example_image_path, open_model
from gem_jax.pipeline import GEM
from gem_jax.text import bucket

#: Options of the page and of ``/segment`` beyond its first three inputs, with their defaults.
DEFAULTS = dict(layers=6, iterations=1, temperature=0.0, size="448", background_threshold=0.85, sigma=0.0)
#: Largest model input side the page accepts (larger ones take minutes on a CPU).
MAX_SIDE = 2048
#: Runs whose files (overlays, label maps, npz) are kept on disk for the page.
KEEP_RUNS = 16
#: GEM objects (each with its compiled programs) kept for the most recent option sets.
KEEP_OPTION_SETS = 8
#: What the page answers for any upload it cannot take as one, whatever the payload names.
UPLOAD_REFUSED = ("The image did not arrive as an upload. Upload it in the page, or send it with "
                  "gradio_client.handle_file(...).")


class DemoError(Exception):
    """A message for the page: bad input, or a model that cannot be loaded."""


class StartError(RuntimeError):
    """The page cannot be served (no Gradio, port taken): one line for the terminal."""


def parse_prompts(text: str | None) -> list[str]:
    """Prompts from the text box: one per line or separated by commas; blanks are ignored.

    Raises :class:`DemoError` when none is left or one is given twice.
    """
    prompts = [p.strip() for p in re.split(r"[\n,]", text or "")]
    prompts = [p for p in prompts if p]
    if not prompts:
        raise DemoError("Type at least one prompt: one per line or separated by commas (e.g. cat, sofa).")
    seen = set()
    for p in prompts:
        if p in seen:
            raise DemoError(f"The prompt {p!r} is given twice; give each prompt once.")
        seen.add(p)
    return prompts


def parse_size(text) -> int | tuple[int, int]:
    """The size box: ``N`` (square) or ``HxW``; :class:`DemoError` otherwise."""
    try:
        size = preprocess.parse_size(str(text if text is not None else ""))
    except ValueError as e:
        raise DemoError(f"Size: {e}.") from None
    sides = size if isinstance(size, tuple) else (size, size)
    if min(sides) < 1 or max(sides) > MAX_SIDE:
        raise DemoError(f"Size: each side must be between 1 and {MAX_SIDE} pixels, got {text!r}.")
    return size


def parse_auth(text: str) -> list[tuple[str, str]]:
    """``USER:PASSWORD``, or ``@FILE`` with one such pair per line; ValueError otherwise."""
    if text.startswith("@"):
        try:
            lines = pathlib.Path(text[1:]).read_text("utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as e:
            raise ValueError(f"cannot read {text[1:]}: {getattr(e, 'strerror', None) or e}") from None
    else:
        lines = [text]
    pairs = []
    for line in (ln.strip() for ln in lines):
        if not line or line.startswith("#"):
            continue
        user, sep, password = line.partition(":")
        if not sep or not user or not password:
            raise ValueError("expected USER:PASSWORD (both non-empty)")
        pairs.append((user, password))
    if not pairs:
        raise ValueError("no USER:PASSWORD given")
    return pairs


def _whole(value, name: str, low: int) -> int:
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise DemoError(f"{name} must be a whole number, got {value!r}.") from None
    if number != int(number) or number < low:
        raise DemoError(f"{name} must be a whole number >= {low}, got {value!r}.")
    return int(number)


def _number(value, name: str, low: float, high: float | None = None) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise DemoError(f"{name} must be a number, got {value!r}.") from None
    if not (number >= low and (high is None or number <= high)):
        bounds = f"in [{low:g}, {high:g}]" if high is not None else f">= {low:g}"
        raise DemoError(f"{name} must be {bounds}, got {value!r}.")
    return number


def upload_folder() -> pathlib.Path:
    """Where Gradio keeps the files clients upload."""
    from gradio.utils import get_upload_folder

    return pathlib.Path(get_upload_folder())


def read_upload(value, allowed: pathlib.Path | None = None) -> tuple[np.ndarray, str]:
    """The uploaded image as uint8 (H, W, 3) and its file name.

    ``value`` is what a client sends for the image: Gradio's file payload (a dict with
    ``path`` and ``orig_name``) or a path. Only a regular file inside ``allowed`` (Gradio's
    upload folder) is read; anything else gets :data:`UPLOAD_REFUSED`, whether it exists or
    not. Arrays (the Python API) are taken as they are. Messages name the upload, never a
    server path.
    """
    if value is None or (isinstance(value, str) and not value):
        raise DemoError("Upload an image first (or click the example below the button).")
    if isinstance(value, np.ndarray):
        try:
            return preprocess.load_image(value), "image"
        except preprocess.ImageError as e:
            raise DemoError(f"Could not read the image: {e}.") from None
    if isinstance(value, dict):
        path, name = value.get("path"), value.get("orig_name")
    elif isinstance(value, (str, os.PathLike)):
        path, name = os.fspath(value), None
    else:
        raise DemoError(UPLOAD_REFUSED)
    if not isinstance(path, str) or not path:
        raise DemoError(UPLOAD_REFUSED)
    root = os.path.realpath(allowed if allowed is not None else upload_folder())
    real = os.path.realpath(path)
    inside = os.path.commonpath([real, root]) == root if os.path.isabs(real) else False
    if not inside or not os.path.isfile(real):
        raise DemoError(UPLOAD_REFUSED)
    name = pathlib.PurePath(name if isinstance(name, str) and name else real).name or "image"
    try:
        return preprocess.load_image(real), name
    except preprocess.ImageError as e:
        message = str(e)
        for shown in (path, real):  # Pillow quotes the path itself: replace the quoted form first
            message = message.replace(repr(shown), repr(name)).replace(shown, repr(name))
        raise DemoError(f"Could not read the uploaded file {name!r} as an image ({message}). "
                        "Upload a JPEG, PNG, WebP, BMP, GIF or TIFF picture.") from None


def markdown_message(text: str, kind: str = "error") -> str:
    """A message as Markdown, its indented lines (commands) as code blocks; ``kind`` picks the
    lead-in: ``"error"`` (a run failed), ``"model"`` (the model did not load) or ``"info"``."""
    out, code = [], []
    for line in text.splitlines():
        if line.startswith("    "):
            code.append(line[4:])
            continue
        if code:
            out += ["", "```", *code, "```", ""]
            code = []
        out.append(line)
    if code:
        out += ["", "```", *code, "```"]
    prefix = {"error": "**Could not run:** ", "model": "**The model is not loaded:** ", "info": ""}[kind]
    return prefix + "\n".join(out)


@dataclasses.dataclass
class Result:
    """What a run leaves for the threshold slider: the image, its logits and prompts."""

    image: np.ndarray
    logits: np.ndarray  # (P, h, w) at the model input size
    prompts: list[str]
    directory: pathlib.Path
    note: str | None = None  # the pictures' title: the method, the model, and RANDOM weights


def _title(gem) -> str:
    """The title of the pictures: the method and the model (RANDOM weights on a second line)."""
    title = f"{gem.method.name} on {_model_label(gem.model.name)}"
    return f"{title}\n{RANDOM_WEIGHTS_NOTE}" if gem.model.random_weights else title


class Demo:
    """The page's state: loaded models, GEM objects per option set, and what has been compiled.

    Args:
      model: registry name, hub id, directory or file of the model to start with
        (default :data:`gem_jax.checkpoints.DEFAULT_MODEL`).
      memory_limit: bytes a request may use (``"auto"``: 90% of the free memory; ``None``:
        no check); a request above it gets a message.
      text_cache: keep prompt embeddings on disk (:mod:`gem_jax.textcache`).

    A model name that is not in the registry raises
    :class:`~gem_jax.checkpoints.UnknownModelError`; a model whose weights are missing
    does not: :attr:`startup_error` keeps the message for the terminal, and the page says
    the model is not available.
    """

    def __init__(self, model: str | None = None, *, memory_limit="auto", text_cache=False):
        self.initial = model or checkpoints.DEFAULT_MODEL
        self.memory_limit = memory_limit
        self.text_cache = text_cache
        self._models: dict[str, Any] = {}
        self._gems: collections.OrderedDict[tuple, Any] = collections.OrderedDict()
        self._compiled: set[tuple] = set()
        self._lock = threading.Lock()
        self._runs = 0
        self.startup_error: str | None = None
        try:
            self._models[self.initial] = self._load(self.initial)
        except checkpoints.UnknownModelError:
            raise
        except DemoError as e:
            self.startup_error = str(e)
        self.workdir = pathlib.Path(tempfile.mkdtemp(prefix="gem-jax-demo-"))

    @staticmethod
    def _load(name: str):
        try:
            return open_model(name)
        except checkpoints.UnknownModelError:
            raise
        except ModelLoadError as e:
            raise DemoError(str(e)) from None

    def page_message(self, name: str | None = None) -> str:
        """What the page says of a model that did not load (no server paths)."""
        return (f"The model {_model_label(name or self.initial)} is not available on this server; the server's "
                "terminal says what to download and where to put it.")

    def model(self, name: str | None):
        """The loaded model ``name`` (loaded on first use); :class:`DemoError` if it cannot be."""
        name = self._resolve(name)
        if name not in self._models:
            try:
                self._models[name] = self._load(name)
            except checkpoints.UnknownModelError as e:
                raise DemoError(str(e)) from None
            except DemoError as e:
                print(f"gem-jax demo: warning: {e}", file=sys.stderr, flush=True)
                raise DemoError(self.page_message(name)) from None
        return self._models[name]

    def _resolve(self, choice: str | None) -> str:
        """The model a page choice stands for: a listed label or name (never an arbitrary path)."""
        if not choice:
            return self.initial
        for name in self.model_choices():
            if choice in (name, _model_label(name)):
                return name
        raise DemoError(f"Unknown model {choice!r}; pick one from the list.")

    def model_choices(self) -> list[str]:
        """The model given at start, then every registry model already converted on this machine
        and the models that ship with gem-jax."""
        names = [self.initial]
        for name in checkpoints.available_models():
            try:
                if name != self.initial and checkpoints.local_state(name) in ("converted", "packaged"):
                    names.append(name)
            except OSError:
                continue
        return names

    def vision_layers(self, name: str | None = None) -> int | None:
        """Blocks of the image tower of a loaded model (``None`` when it is not loaded)."""
        model = self._models.get(self._resolve(name) if name else self.initial)
        return None if model is None else model.config.vision.layers

    def default_layers(self, name: str | None = None) -> int:
        """The layers slider's start: the model's recommendation, else 6, at most its depth."""
        model = self._models.get(self._resolve(name) if name else self.initial)
        depth = model.config.vision.layers if model is not None else 24
        want = (model.defaults.get("layers") if model is not None else None) or DEFAULTS["layers"]
        return max(1, min(int(want), depth))

    def gem(self, model_name, method, layers, iterations, temperature, sigma=0.0):
        """The :class:`gem_jax.GEM` for these options, made once and kept (its compiled programs too).

        Slider values a method has no option for are left out when they sit at the page's
        defaults, and refused (naming the method's options) when moved."""
        if method not in method_names():
            raise DemoError(f"Unknown method {method!r}; pick one of {', '.join(method_names())}.")
        layers = self.default_layers(model_name) if layers in (None, "") else _whole(layers, "Layers", 1)
        iterations = _whole(iterations, "Iterations", 0)
        temperature = _number(temperature if temperature not in (None, "") else 0.0, "Temperature", 0.0)
        sigma = _number(sigma if sigma not in (None, "") else 0.0, "Sigma", 0.0)
        model = self.model(model_name)
        has = set(get_method(method).options)
        given = {"layers": layers, "iterations": iterations, "temperature": temperature or None,
                 "sigma": sigma or None}
        neutral = {"layers": self.default_layers(model_name), "iterations": DEFAULTS["iterations"],
                   "temperature": None, "sigma": None}
        options = {}
        for name, value in given.items():
            if name in has:
                options[name] = value
            elif value != neutral[name]:
                options[name] = value  # refused below, naming the method's options
        key = (self._resolve(model_name), method, tuple(sorted(options.items())))
        if key not in self._gems:
            try:
                self._gems[key] = GEM(model, method=method, memory_limit=self.memory_limit,
                                      text_cache=self.text_cache, **options)
            except OptionError as e:
                raise DemoError(_sentence(str(e)) + " Put the sliders back to their defaults for this method.") \
                    from None
            except ValueError as e:
                raise DemoError(_sentence(str(e))) from None
            while len(self._gems) > KEEP_OPTION_SETS:  # drop the least recently used, and its programs
                old, _ = self._gems.popitem(last=False)
                self._compiled = {k for k in self._compiled if k[0] != old}
        self._gems.move_to_end(key)
        return key, self._gems[key]

    def run(self, image, prompts, method="gem", model=None, layers=None,
            iterations=DEFAULTS["iterations"], temperature=DEFAULTS["temperature"], size=DEFAULTS["size"],
            background_threshold=DEFAULTS["background_threshold"], sigma=DEFAULTS["sigma"]):
        """The page's main action, as a generator of output tuples
        ``(overlays, label_map, npz, timing, status, result)``. ``layers=None`` is the layers
        slider's start (:meth:`default_layers`).

        Yields a "compiling" notice first when this input size or prompt-count bucket is
        new for these options, then the results; bad input yields one message instead.
        """
        try:
            prompts = parse_prompts(prompts)
            picture, name = read_upload(image)
            size = parse_size(size)
            threshold = _number(background_threshold, "Background threshold", 0.0, 1.0)
            key, gem = self.gem(model, method, layers, iterations, temperature, sigma)
            checks.distinguishable(gem.model.tokenizer, prompts, gem.templates)
            hw = gem.input_size(picture, size=size)
            shown_hw = outputs.display_size(picture.shape[:2])
            gem.check_memory(hw, 1, len(prompts), display=shown_hw, display_prompts=len(prompts))
        except DemoError as e:
            yield self._failure(str(e))
            return
        except checks.PromptError as e:
            yield self._failure(_sentence(str(e)))
            return
        except MemoryLimitError as e:
            yield self._failure(_sentence(e.message("demo")))
            return
        shape_key = (key, hw, bucket(len(prompts), 8))
        compiling = shape_key not in self._compiled
        if compiling:
            yield self._notice(f"Compiling the model for {hw[0]} x {hw[1]} inputs and up to {shape_key[2]} prompts "
                               "(once per input size and prompt-count bucket; later runs of this shape are fast)...")
        try:
            with self._lock:
                before = gem.compiled_programs()
                start = time.perf_counter()
                out = gem.heatmaps(picture, prompts, size=size)
                seconds = time.perf_counter() - start
                if before is not None:  # what JAX did, rather than what was expected
                    compiling = gem.compiled_programs() > before
            self._compiled.add(shape_key)
            shown = outputs.resize_image(picture, shown_hw)
            result = Result(shown, np.asarray(out.logits[0]), prompts, self._new_run_dir(), _title(gem))
            overlays = self._overlays(shown, np.asarray(out.heatmaps[0]), prompts)
            label_map = self._label_map(result, threshold)
            npz = self._npz(result, np.asarray(out.heatmaps[0]), name, out.sizes[0], gem)
        except DemoError as e:
            yield self._failure(str(e))
            return
        except MemoryLimitError as e:
            yield self._failure(_sentence(e.message("demo")))
            return
        except Exception as e:  # shown in the page as one line, never as a traceback
            yield self._failure(f"{type(e).__name__}: {' '.join(str(e).split())}")
            return
        timing = self._timing(seconds, compiling, hw, result, threshold)
        random = f" {RANDOM_WEIGHTS_NOTE}." if gem.model.random_weights else ""
        yield overlays, label_map, str(npz), timing, markdown_message(
            f"Done: {len(prompts)} prompt(s) with {_method_words(gem)} on {name}.{random}", "info"), result

    def relabel(self, result: Result | None, background_threshold):
        """The label map of the last run at a new background threshold (no model call)."""
        if result is None:
            return None
        try:
            threshold = _number(background_threshold, "Background threshold", 0.0, 1.0)
        except DemoError:
            return None
        return self._label_map(result, threshold)

    def _failure(self, message: str):
        return [], None, None, "", markdown_message(message), None

    @staticmethod
    def _notice(message: str):
        import gradio as gr

        return gr.skip(), gr.skip(), gr.skip(), gr.skip(), markdown_message(message, "info"), gr.skip()

    def _new_run_dir(self) -> pathlib.Path:
        self._runs += 1
        old = self.workdir / f"run{self._runs - KEEP_RUNS:05d}"
        shutil.rmtree(old, ignore_errors=True)  # the page already holds its own copies
        directory = self.workdir / f"run{self._runs:05d}"
        directory.mkdir(parents=True)
        return directory

    @staticmethod
    def _overlays(picture, heatmaps, prompts):
        shown = outputs.to_display(heatmaps, picture.shape[:2])
        return [(visualize.overlay(picture, shown[i]), p) for i, p in enumerate(prompts)]

    @staticmethod
    def _label_map(result: Result, threshold: float) -> str:
        labels = postprocess.labels_from_logits(result.logits, threshold)
        labels = outputs.to_display(labels, result.image.shape[:2], nearest=True)
        title = f"{result.note}\nbackground where the top probability < {threshold:.2f}"
        fig = visualize.label_figure(result.image, labels, result.prompts, title=title)
        result.directory.mkdir(parents=True, exist_ok=True)  # an old run's files may have been cleared
        path = result.directory / f"labels_{threshold:.2f}.png"
        return str(visualize.save_png(fig, path, overwrite=True))

    @staticmethod
    def _npz(result: Result, heatmaps, name: str, size, gem) -> pathlib.Path:
        path = result.directory / f"{outputs.slug(pathlib.Path(name).stem) or 'image'}_logits.npz"
        return outputs.save_logits(path, [result.logits], [heatmaps], result.prompts, [name], [size], True,
                                   description=gem.describe())

    @staticmethod
    def _timing(seconds: float, compiling: bool, hw, result: Result, threshold: float) -> str:
        note = " (including compilation for this shape)" if compiling else ""
        rows = ["| prompt | min cosine | max cosine | top prompt on | labelled at this threshold |",
                "| --- | --- | --- | --- | --- |"]
        top = postprocess.labels_from_logits(result.logits, None)
        labelled = postprocess.labels_from_logits(result.logits, threshold)
        for i, p in enumerate(result.prompts):
            lg = result.logits[i]
            rows.append(f"| {p} | {lg.min():.4f} | {lg.max():.4f} | {np.mean(top == i + 1):.1%} "
                        f"| {np.mean(labelled == i + 1):.1%} |")
        return (f"**Model time:** {seconds:.2f} s{note}, {len(result.prompts)} prompt(s) at {hw[0]} x {hw[1]}.\n\n"
                + "\n".join(rows)
                + f"\n\nA pixel is labelled with its top prompt only where that prompt's probability (softmax of "
                  f"100 x cosine over the prompts) reaches the background threshold, {threshold:.2f}; elsewhere it "
                  "is background.")

    def close(self) -> None:
        """Removes the files the page wrote."""
        shutil.rmtree(self.workdir, ignore_errors=True)


def _sentence(text: str) -> str:
    text = text.strip()
    text = text[:1].upper() + text[1:]
    return text if text.endswith((".", "!", "?")) else text + "."


def _method_words(gem) -> str:
    m = gem.method
    if not m.blocks:
        return f"{m.name} (no block changed)"
    return f"{m.name} ({m.blocks} block(s), MLP {'on' if m.mlp else 'off'})"


def _model_label(name: str) -> str:
    """How the page shows a model: registry names as they are, local paths by their last part."""
    if checkpoints.canonical_name(name) is not None:
        return name
    return f"{pathlib.PurePath(name).name or name} (local)"


def build(demo: Demo):
    """The Gradio page (``gradio.Blocks``) around a :class:`Demo`."""
    import gradio as gr

    layers_max = demo.vision_layers() or 24
    colorbar = visualize.save_png(visualize.colorbar_figure(label="heatmap (min-max scaled per prompt)"),
                                  demo.workdir / "colorbar.png", overwrite=True)
    initial = demo._models.get(demo.initial)
    if demo.startup_error:
        banner = markdown_message(demo.page_message(), "model")
    elif initial is not None and initial.random_weights:
        banner = (f"**Note:** the model {_model_label(demo.initial)} has **RANDOM weights**: the maps show the "
                  "mechanics, not real localisation.")
    else:
        banner = ""
    # Gradio's copies of uploads and results: cleared hourly of files older than an hour.
    with gr.Blocks(title="gem-jax demo", analytics_enabled=False, delete_cache=(3600, 3600)) as page:
        gr.Markdown("# gem-jax: GEM heatmaps for many prompts at once\n"
                    "Upload or paste an image, type prompts (one per line or separated by commas) and run. "
                    "The model compiles once per input size and prompt-count bucket (1-8, 9-16, ...).")
        gr.Markdown(banner, elem_id="banner", visible=bool(banner))
        with gr.Row():
            with gr.Column(scale=2):
                image = gr.Image(label="image", type="filepath", image_mode=None, sources=["upload", "clipboard"],
                                 elem_id="image")
                prompts = gr.Textbox(label="prompts", lines=3, placeholder="cat, sofa\nremote control",
                                     elem_id="prompts")
                with gr.Row():
                    method = gr.Dropdown(list(method_names()), value="gem", label="method", elem_id="method")
                    model = gr.Dropdown([_model_label(n) for n in demo.model_choices()],
                                        value=_model_label(demo.initial), label="model", elem_id="model")
                with gr.Accordion("method options", open=False):
                    layers = gr.Slider(1, layers_max, value=demo.default_layers(), step=1,
                                       label="layers (gem, clipsurgery: last blocks with the path)", elem_id="layers")
                    iterations = gr.Slider(0, 10, value=DEFAULTS["iterations"], step=1,
                                           label="self-self attention iterations (gem)", elem_id="iterations")
                    temperature = gr.Number(DEFAULTS["temperature"], minimum=0,
                                            label="temperature tau (gem; 0 = adaptive)", elem_id="temperature")
                    sigma = gr.Number(DEFAULTS["sigma"], minimum=0, label="sigma (naclip; 0 = its own, 5)",
                                      elem_id="sigma")
                    size = gr.Textbox(DEFAULTS["size"], label="model input size (N or HxW)", elem_id="size")
                threshold = gr.Slider(0, 1, value=DEFAULTS["background_threshold"], step=0.01,
                                      label="background threshold of the label map: a pixel whose top prompt's "
                                            "probability is below it is background", elem_id="threshold")
                run = gr.Button("Run", variant="primary", elem_id="run")
                gr.Examples([[str(example_image_path()), "cat, sofa, remote control"]], inputs=[image, prompts],
                            label="example (Chelsea the cat, CC0)")
            with gr.Column(scale=3):
                status = gr.Markdown(label="status", elem_id="status")
                overlays = gr.Gallery(label="heatmap overlays", columns=3, format="png", object_fit="contain",
                                      elem_id="overlays")
                gr.Image(str(colorbar), label="colour scale", show_label=False, interactive=False, height=70,
                         elem_id="colorbar", buttons=[])
                gr.Markdown("**Label map** (the prompts as classes)", elem_id="label-map-heading")
                label_map = gr.Image(label="label map", show_label=False, type="filepath", format="png",
                                     interactive=False, elem_id="label-map")
                timing = gr.Markdown(label="timing", elem_id="timing")
                npz = gr.File(label="raw logits (.npz, the --save-logits schema)", interactive=False,
                              elem_id="npz")
        result = gr.State(None)

        run.click(demo.run, inputs=[image, prompts, method, model, layers, iterations, temperature, size, threshold,
                                    sigma],
                  outputs=[overlays, label_map, npz, timing, status, result], api_name="segment",
                  preprocess=False, concurrency_limit=1, concurrency_id="model")
        # Dragging or typing a threshold redraws the label map from the last logits; only the
        # latest value is drawn when several arrive during one drawing.
        threshold.input(demo.relabel, inputs=[result, threshold], outputs=[label_map], api_visibility="private",
                        trigger_mode="always_last", show_progress="hidden")

        def pick_model(name):
            try:
                loaded = demo.model(name)
            except DemoError as e:
                return gr.skip(), markdown_message(str(e), "model")
            n = demo.vision_layers(name)
            note = " It has RANDOM weights: the maps show the mechanics, not real localisation." \
                if loaded.random_weights else ""
            return (gr.update(maximum=n, value=demo.default_layers(name)),
                    markdown_message(f"Model: {name}.{note}", "info"))

        model.change(pick_model, inputs=[model], outputs=[layers, status], api_visibility="private",
                     concurrency_limit=1, concurrency_id="model")
    return page


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def serve(model: str | None = None, *, host: str = "127.0.0.1", port: int = 7860, share: bool = False,
          auth=None, memory_limit="auto", text_cache: bool = True, quiet: bool = False) -> int:
    """``gem-jax demo``: loads the model once, starts the page, prints its URL (stdout), serves
    until Ctrl-C; status lines on stderr unless ``quiet`` (warnings always).

    Returns the exit status; raises :class:`StartError`, or
    :class:`~gem_jax.checkpoints.UnknownModelError` for a model name not in the registry.
    """
    try:
        import gradio  # noqa: F401
    except ImportError:
        raise StartError('the demo needs Gradio: pip install "gem-jax[demo]"') from None
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    if not quiet:
        print(f"gem-jax demo: loading {model or checkpoints.DEFAULT_MODEL} ...", file=sys.stderr, flush=True)
    demo = Demo(model, memory_limit=memory_limit, text_cache=text_cache)
    if demo.startup_error:
        print(f"gem-jax demo: warning: {demo.startup_error}", file=sys.stderr, flush=True)
    if (host not in ("127.0.0.1", "localhost", "::1") or share) and not auth:
        print("gem-jax demo: warning: the page is reachable from other machines and asks for no password; "
              "give --auth USER:PASSWORD", file=sys.stderr, flush=True)
    try:
        page = build(demo)
        page.queue(default_concurrency_limit=1)
        try:
            _, local_url, share_url = page.launch(server_name=host, server_port=port, share=share, auth=auth,
                                                  prevent_thread_lock=True, quiet=True, show_error=False,
                                                  ssr_mode=False, inbrowser=False)
        except OSError as e:
            reason = ("the port is in use" if "empty port" in str(e) else " ".join(str(e).split()))
            raise StartError(f"cannot serve on {host}:{port}: {reason}; pass another --port") from None
        print(f"gem-jax demo: running on {local_url}", flush=True)
        if share_url:
            print(f"gem-jax demo: public link {share_url}", flush=True)
        if not quiet:
            print("gem-jax demo: press Ctrl-C to stop", file=sys.stderr, flush=True)
        signal.signal(signal.SIGTERM, _interrupt)  # `kill` stops the page as Ctrl-C does, tidily
        page.block_thread()
    finally:
        demo.close()
    return 0
