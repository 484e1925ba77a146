"""``gem-jax demo``: a web page (Gradio) to try GEM on one image with many prompts.

Everything the page shows comes from the package itself: :class:`gem_jax.GEM` for the
logits and heatmaps, :func:`gem_jax.pipeline.labels_from_logits` for the label map,
:mod:`gem_jax.visualize` for the overlays, the colour bar and the legend, the CLI's
``--save-logits`` writer for the download, and the registry for the model list and the
offline message. Gradio is an optional dependency: ``pip install "gem-jax[demo]"``.

The page has one API endpoint, ``/segment``::

    from gradio_client import Client, handle_file
    gallery, label_map, npz, timing, status = Client(url).predict(
        handle_file("cat.jpg"), "cat, sofa", "gem", api_name="/segment")
"""

from __future__ import annotations

import argparse
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

#: Options of the page and of ``/segment`` beyond its first three inputs, with their defaults.
DEFAULTS = dict(layers=6, iterations=1, temperature=0.0, size="448", background_threshold=0.85)
#: Largest model input side the page accepts (larger ones take minutes on a CPU).
MAX_SIDE = 2048
#: Runs whose files (overlays, label maps, npz) are kept on disk for the page.
KEEP_RUNS = 16
#: GEM objects (each with its compiled programs) kept for the most recent option sets.
KEEP_OPTION_SETS = 8


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
    from gem_jax import argtypes

    try:
        size = argtypes.size(str(text if text is not None else ""))
    except argparse.ArgumentTypeError as e:
        raise DemoError(f"Size: {e}.") from None
    sides = size if isinstance(size, tuple) else (size, size)
    if min(sides) < 1 or max(sides) > MAX_SIDE:
        raise DemoError(f"Size: each side must be between 1 and {MAX_SIDE} pixels, got {text!r}.")
    return size


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


def read_upload(value) -> tuple[np.ndarray, str]:
    """The uploaded image as uint8 (H, W, 3) and its file name.

    ``value`` is what the page sends (a file dict with ``path`` and ``orig_name``), a path,
    or an array. Unreadable files raise :class:`DemoError` naming the upload, not the
    server's copy.
    """
    from gem_jax import preprocess

    if value is None or (isinstance(value, str) and not value):
        raise DemoError("Upload an image first (or click the example below the button).")
    if isinstance(value, dict):
        path, name = value.get("path"), value.get("orig_name")
        if not path:
            raise DemoError("The upload did not arrive; try again.")
    elif isinstance(value, (str, os.PathLike)):
        path, name = os.fspath(value), None
    else:
        try:
            return preprocess.load_image(value), "image"
        except preprocess.ImageError as e:
            raise DemoError(f"Could not read the image: {e}.") from None
    name = name or pathlib.Path(path).name
    try:
        return preprocess.load_image(path), name
    except preprocess.ImageError as e:
        message = str(e).replace(str(path), repr(name))
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
    note: str | None = None  # the pictures' title (a model with random weights says so)


def _programs(gem) -> int | None:
    """How many programs the GEM object's jitted image function holds (None if JAX does not say)."""
    size = getattr(gem._maps, "_cache_size", None)
    return size() if callable(size) else None


class Demo:
    """The page's state: loaded models, GEM objects per option set, and what has been compiled.

    Args:
      model: registry name, hub id, directory or file of the model to start with
        (default :data:`gem_jax.checkpoints.DEFAULT_MODEL`).

    A model name that is not in the registry raises
    :class:`~gem_jax.checkpoints.UnknownModelError`; a model whose weights are missing
    does not: :attr:`startup_error` keeps the message for the page.
    """

    def __init__(self, model: str | None = None):
        from gem_jax import checkpoints

        self.initial = model or checkpoints.DEFAULT_MODEL
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
        from gem_jax import checkpoints, pipeline

        try:
            return pipeline.load(name)
        except checkpoints.UnknownModelError:
            raise
        except (checkpoints.ModelNotAvailableError, checkpoints.CheckpointError, FileNotFoundError, OSError) as e:
            raise DemoError(str(e)) from None

    def model(self, name: str | None):
        """The loaded model ``name`` (loaded on first use); :class:`DemoError` if it cannot be."""
        from gem_jax import checkpoints

        name = name or self.initial
        if name not in self._models:
            if name != self.initial and name not in self.model_choices():
                raise DemoError(f"Unknown model {name!r}; pick one from the list.")
            try:
                self._models[name] = self._load(name)
            except checkpoints.UnknownModelError as e:
                raise DemoError(str(e)) from None
        return self._models[name]

    def model_choices(self) -> list[str]:
        """The model given at start, then every registry model already converted on this machine."""
        from gem_jax import checkpoints

        names = [self.initial]
        for name in checkpoints.available_models():
            try:
                if name != self.initial and checkpoints.is_converted(name):
                    names.append(name)
            except OSError:
                continue
        return names

    def vision_layers(self, name: str | None = None) -> int | None:
        """Blocks of the image tower of a loaded model (``None`` when it is not loaded)."""
        model = self._models.get(name or self.initial)
        return None if model is None else model.config.vision.layers

    def gem(self, model_name, method, layers, iterations, temperature):
        """The :class:`gem_jax.GEM` for these options, made once and kept (its compiled programs too)."""
        from gem_jax import GEM
        from gem_jax import gem as gem_lib

        if method not in gem_lib.METHODS:
            raise DemoError(f"Unknown method {method!r}; pick one of {', '.join(gem_lib.METHODS)}.")
        layers = _whole(layers, "Layers", 1)
        iterations = _whole(iterations, "Iterations", 0)
        temperature = _number(temperature if temperature not in (None, "") else 0.0, "Temperature", 0.0)
        model = self.model(model_name)
        key = (model_name or self.initial, method, layers, iterations, temperature)
        if key not in self._gems:
            try:
                from gem_jax.methods import ONE_BLOCK

                # the one-block methods change the last block only: the layers slider is not theirs
                self._gems[key] = GEM(model, method=method, layers=None if method in ONE_BLOCK else layers,
                                      iterations=iterations, temperature=temperature or None)
            except ValueError as e:
                raise DemoError(f"{str(e)[:1].upper()}{str(e)[1:]}.") from None
            while len(self._gems) > KEEP_OPTION_SETS:  # drop the least recently used, and its programs
                old, _ = self._gems.popitem(last=False)
                self._compiled = {k for k in self._compiled if k[0] != old}
        self._gems.move_to_end(key)
        return key, self._gems[key]


    def run(self, image, prompts, method="gem", model=None, layers=DEFAULTS["layers"],
            iterations=DEFAULTS["iterations"], temperature=DEFAULTS["temperature"], size=DEFAULTS["size"],
            background_threshold=DEFAULTS["background_threshold"]):
        """The page's main action, as a generator of output tuples
        ``(overlays, label_map, npz, timing, status, result)``.

        Yields a "compiling" notice first when this input size or prompt-count bucket is
        new for these options, then the results; bad input yields one message instead.
        """
        from gem_jax import pipeline, preprocess

        try:
            prompts = parse_prompts(prompts)
            picture, name = read_upload(image)
            size = parse_size(size)
            threshold = _number(background_threshold, "Background threshold", 0.0, 1.0)
            key, gem = self.gem(model, method, layers, iterations, temperature)
        except DemoError as e:
            yield self._failure(str(e))
            return
        hw = preprocess.target_size(*picture.shape[:2], size=size, patch_size=gem.model.config.vision.patch_size)
        shape_key = (key, hw, pipeline._bucket(len(prompts), 8))
        compiling = shape_key not in self._compiled
        if compiling:
            yield self._notice(f"Compiling the model for {hw[0]} x {hw[1]} inputs and up to {shape_key[2]} prompts "
                               "(once per input size and prompt-count bucket; later runs of this shape are fast)...")
        try:
            with self._lock:
                before = _programs(gem)
                start = time.perf_counter()
                out = gem.heatmaps(picture, prompts, size=size)
                seconds = time.perf_counter() - start
                if before is not None:  # what JAX did, rather than what was expected
                    compiling = _programs(gem) > before
            self._compiled.add(shape_key)
            note = pipeline.RANDOM_WEIGHTS_NOTE if gem.model.random_weights else None
            result = Result(picture, np.asarray(out.logits[0]), prompts, self._new_run_dir(), note)
            overlays = self._overlays(picture, np.asarray(out.heatmaps[0]), prompts)
            label_map = self._label_map(result, threshold)
            npz = self._npz(result, np.asarray(out.heatmaps[0]), name, out.sizes[0])
        except DemoError as e:
            yield self._failure(str(e))
            return
        except Exception as e:  # shown in the page as one line, never as a traceback
            yield self._failure(f"{type(e).__name__}: {' '.join(str(e).split())}")
            return
        timing = self._timing(seconds, compiling, hw, result)
        yield overlays, label_map, str(npz), timing, markdown_message(
            f"Done: {len(prompts)} prompt(s) with {method} on {name}."
            + (f" {result.note}." if result.note else ""), "info"), result

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
        from gem_jax import visualize
        from gem_jax.cli import _to_original_size

        shown = _to_original_size(heatmaps, picture.shape[:2])
        return [(visualize.overlay(picture, shown[i]), p) for i, p in enumerate(prompts)]

    @staticmethod
    def _label_map(result: Result, threshold: float) -> str:
        from gem_jax import pipeline, visualize
        from gem_jax.cli import _to_original_size

        labels = pipeline.labels_from_logits(result.logits, threshold)
        labels = _to_original_size(labels, result.image.shape[:2], nearest=True)
        fig = visualize.label_figure(result.image, labels, result.prompts, title=result.note)
        result.directory.mkdir(parents=True, exist_ok=True)  # an old run's files may have been cleared
        path = result.directory / f"labels_{threshold:.2f}.png"
        return str(visualize.save_png(fig, path, overwrite=True))

    @staticmethod
    def _npz(result: Result, heatmaps, name: str, size) -> pathlib.Path:
        from gem_jax.cli import _save_logits, _slug

        path = result.directory / f"{_slug(pathlib.Path(name).stem)}_logits.npz"
        _save_logits(path, [result.logits], [heatmaps], result.prompts, [name], [size], True)
        return path

    @staticmethod
    def _timing(seconds: float, compiling: bool, hw, result: Result) -> str:
        note = " (including compilation for this shape)" if compiling else ""
        rows = ["| prompt | min cosine | max cosine | pixels where it is the top prompt |", "| --- | --- | --- | --- |"]
        from gem_jax import pipeline

        labels = pipeline.labels_from_logits(result.logits, None)
        for i, p in enumerate(result.prompts):
            lg = result.logits[i]
            rows.append(f"| {p} | {lg.min():.4f} | {lg.max():.4f} | {np.mean(labels == i + 1):.1%} |")
        return (f"**Model time:** {seconds:.2f} s{note}, {len(result.prompts)} prompt(s) at {hw[0]} x {hw[1]}.\n\n"
                + "\n".join(rows))

    def close(self) -> None:
        """Removes the files the page wrote."""
        shutil.rmtree(self.workdir, ignore_errors=True)


def _model_label(name: str) -> str:
    """How the model list shows a name: registry names as they are, local paths by their last part."""
    path = pathlib.Path(name).expanduser()
    return f"{path.name} (local)" if path.exists() else name


def build(demo: Demo):
    """The Gradio page (``gradio.Blocks``) around a :class:`Demo`."""
    import gradio as gr

    from gem_jax import gem as gem_lib
    from gem_jax import visualize
    from gem_jax.pipeline import example_image_path

    layers_max = demo.vision_layers() or 24
    colorbar = visualize.save_png(visualize.colorbar_figure(label="heatmap (min-max scaled per prompt)"),
                                  demo.workdir / "colorbar.png", overwrite=True)
    # Gradio's copies of uploads and results: cleared hourly of files older than an hour.
    with gr.Blocks(title="gem-jax demo", analytics_enabled=False, delete_cache=(3600, 3600)) as page:
        gr.Markdown("# gem-jax: GEM heatmaps for many prompts at once\n"
                    "Upload or paste an image, type prompts (one per line or separated by commas) and run. "
                    "The model compiles once per input size and prompt-count bucket (1-8, 9-16, ...).")
        gr.Markdown(markdown_message(demo.startup_error, "model") if demo.startup_error else "", elem_id="banner",
                    visible=demo.startup_error is not None)
        with gr.Row():
            with gr.Column(scale=2):
                image = gr.Image(label="image", type="filepath", image_mode=None, sources=["upload", "clipboard"],
                                 elem_id="image")
                prompts = gr.Textbox(label="prompts", lines=3, placeholder="cat, sofa\nremote control",
                                     elem_id="prompts")
                with gr.Row():
                    method = gr.Dropdown(list(gem_lib.METHODS), value="gem", label="method", elem_id="method")
                    model = gr.Dropdown([(_model_label(n), n) for n in demo.model_choices()], value=demo.initial,
                                        label="model", elem_id="model")
                with gr.Accordion("GEM options", open=False):
                    layers = gr.Slider(1, layers_max, value=min(DEFAULTS["layers"], layers_max), step=1,
                                       label="layers (last blocks with the GEM path)", elem_id="layers")
                    iterations = gr.Slider(0, 10, value=DEFAULTS["iterations"], step=1,
                                           label="self-self attention iterations", elem_id="iterations")
                    temperature = gr.Number(DEFAULTS["temperature"], minimum=0, label="temperature tau (0 = adaptive)",
                                            elem_id="temperature")
                    size = gr.Textbox(DEFAULTS["size"], label="model input size (N or HxW)", elem_id="size")
                threshold = gr.Slider(0, 1, value=DEFAULTS["background_threshold"], step=0.01,
                                      label="background threshold of the label map", elem_id="threshold")
                run = gr.Button("Run", variant="primary", elem_id="run")
                gr.Examples([[str(example_image_path()), "cat, sofa, remote control"]], inputs=[image, prompts],
                            label="example (Chelsea the cat, CC0)")
            with gr.Column(scale=3):
                status = gr.Markdown(label="status", elem_id="status")
                overlays = gr.Gallery(label="heatmap overlays", columns=3, format="png", object_fit="contain",
                                      elem_id="overlays")
                gr.Image(str(colorbar), label="colour scale", show_label=False, interactive=False, height=70,
                         elem_id="colorbar", buttons=[])
                label_map = gr.Image(label="label map (prompts as classes)", type="filepath", format="png",
                                     interactive=False, elem_id="label-map")
                timing = gr.Markdown(label="timing", elem_id="timing")
                npz = gr.File(label="raw logits (.npz, the --save-logits schema)", interactive=False,
                              elem_id="npz")
        result = gr.State(None)

        run.click(demo.run, inputs=[image, prompts, method, model, layers, iterations, temperature, size, threshold],
                  outputs=[overlays, label_map, npz, timing, status, result], api_name="segment",
                  preprocess=False, concurrency_limit=1, concurrency_id="model")
        # Dragging or typing a threshold redraws the label map from the last logits; only the
        # latest value is drawn when several arrive during one drawing.
        threshold.input(demo.relabel, inputs=[result, threshold], outputs=[label_map], api_visibility="private",
                        trigger_mode="always_last", show_progress="hidden")

        def pick_model(name):
            try:
                demo.model(name)
            except DemoError as e:
                return gr.skip(), markdown_message(str(e), "model")
            n = demo.vision_layers(name)
            return gr.update(maximum=n, value=min(DEFAULTS["layers"], n)), markdown_message(f"Model: {name}.", "info")

        model.change(pick_model, inputs=[model], outputs=[layers, status], api_visibility="private",
                     concurrency_limit=1, concurrency_id="model")
    return page


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def serve(args) -> int:
    """``gem-jax demo``: loads the model once, starts the page, prints its URL, serves until Ctrl-C.

    Returns the exit status; raises :class:`StartError`, or
    :class:`~gem_jax.checkpoints.UnknownModelError` for a model name not in the registry.
    """
    from gem_jax import checkpoints
    from gem_jax.cli import enable_compile_cache

    try:
        import gradio  # noqa: F401
    except ImportError:
        raise StartError('the demo needs Gradio: pip install "gem-jax[demo]"') from None
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    if not args.no_compile_cache:
        enable_compile_cache(args.compile_cache)
    print(f"gem-jax demo: loading {args.model or checkpoints.DEFAULT_MODEL} ...", file=sys.stderr, flush=True)
    demo = Demo(args.model)
    if demo.startup_error:
        print(f"gem-jax demo: warning: {demo.startup_error}", file=sys.stderr, flush=True)
    try:
        page = build(demo)
        page.queue(default_concurrency_limit=1)
        try:
            _, local_url, share_url = page.launch(server_name=args.host, server_port=args.port, share=args.share,
                                                  prevent_thread_lock=True, quiet=True, show_error=True,
                                                  ssr_mode=False, inbrowser=False)
        except OSError as e:
            reason = ("the port is in use" if "empty port" in str(e) else " ".join(str(e).split()))
            raise StartError(f"cannot serve on {args.host}:{args.port}: {reason}; pass another --port") from None
        print(f"gem-jax demo: running on {local_url}", flush=True)
        if share_url:
            print(f"gem-jax demo: public link {share_url}", flush=True)
        print("gem-jax demo: press Ctrl-C to stop", file=sys.stderr, flush=True)
        signal.signal(signal.SIGTERM, _interrupt)  # `kill` stops the page as Ctrl-C does, tidily
        page.block_thread()
    finally:
        demo.close()
    return 0
