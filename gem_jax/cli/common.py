"""What every ``gem-jax`` command shares: exit codes and errors, the model and method flags,
loading the model, the compilation cache, and the checks made before the model loads."""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import sys

from gem_jax import checkpoints, checks, files
from gem_jax.cli import argtypes
from gem_jax.config import CLIPConfig, architecture
from gem_jax.engine import cost
from gem_jax.engine.methods import OptionError, get_method, method_names
from gem_jax.loading import with_model_defaults
from gem_jax.text import resolve_templates

EXIT_OK, EXIT_RUNTIME, EXIT_USAGE = 0, 1, 2
#: The exit status of a run that finished but skipped or failed some inputs (the same for
#: every command: segment, batch, eval).
EXIT_PARTIAL = 3
#: The options a method may have, as the command line names them.
METHOD_FLAGS = {"layers": "--gem-layers", "iterations": "--iterations", "temperature": "--temperature",
                "projections": "--projections", "normalize": "--no-norm", "residual": "--residual/--no-residual",
                "mlp": "--mlp/--no-mlp", "sigma": "--sigma"}


class UsageError(Exception):
    """A bad argument value: exit status 2."""


class RuntimeFailure(Exception):
    """A well-formed command that could not be carried out: exit status 1."""


class Parser(argparse.ArgumentParser):
    """argparse with one-line usage errors (the full usage stays behind --help)."""

    def error(self, message):
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def add_common_flags(p) -> None:
    """``--debug`` and ``--quiet``, accepted after every command."""
    # SUPPRESS keeps the top-level value when absent.
    p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show full tracebacks")
    p.add_argument("--quiet", "-q", action="store_true", default=argparse.SUPPRESS,
                   help="no progress or status lines (errors and notes still show)")


def add_method_flags(p, default: str | None = "gem") -> None:
    """``--method`` and the method options, for every command that chooses a method. Every
    option defaults to "not given" (the method's own value); one the method does not have
    is refused before the model loads."""
    names = ", ".join(method_names())
    p.add_argument("--method", default=None, metavar="NAME",
                   help=f"{names} (and methods registered by plug-ins); what each changes is in the README's "
                        "methods table " + (f"(default {default}, or the model's recommendation)" if default
                                            else "(default: the protocol's method)"))
    g = p.add_argument_group("method options (each method has some; the others are refused)")
    g.add_argument("--gem-layers", type=argtypes.positive_int, default=None, metavar="N",
                   help="gem, clipsurgery: last blocks with the method's path (default 6)")
    g.add_argument("--iterations", type=argtypes.nonneg_int, default=None, help="gem: self-self iterations (1)")
    g.add_argument("--temperature", type=argtypes.positive_float, default=None,
                   help="gem: the paper's tau (default adaptive)")
    g.add_argument("--projections", type=argtypes.projections, default=None,
                   help="gem: self-self projections to ensemble, letters of qkv (default qkv; Table 1)")
    g.add_argument("--no-norm", dest="normalize", action="store_false", default=None,
                   help="gem: without L2 normalisation and adaptive temperature (Table 1's first row)")
    g.add_argument("--sigma", type=argtypes.positive_float, default=None,
                   help="naclip: width of the Gaussian neighbourhood, in patches (default 5)")
    g.add_argument("--residual", action=argparse.BooleanOptionalAction, default=None,
                   help="one-block methods: keep the residual in the modified block (default: the method's own)")
    g.add_argument("--mlp", action=argparse.BooleanOptionalAction, default=None,
                   help="gem and one-block methods: run the block's MLP on the path (default: the method's own)")
    g.add_argument("--feature-surgery", action="store_true",
                   help="CLIP Surgery's feature surgery in place of the raw cosines (any method; off)")


def add_model_flags(p, *, sizing: bool = True, method_default: str | None = "gem") -> None:
    """The model, method, sizing, dtype, memory and cache flags of the commands that run a model."""
    p.add_argument("--model", default=None, help="registry name, hub id, local directory or file "
                                                 f"(default {checkpoints.DEFAULT_MODEL}; `gem-jax models` lists them)")
    add_method_flags(p, method_default)
    p.add_argument("--template", default=None,
                   help="prompt template with {} ('imagenet' for the 80-template ensemble, 'imagenet85' for those "
                        "and 5 scene templates; default 'a photo of a {}.' or the model's recommendation)")
    if sizing:
        size = p.add_mutually_exclusive_group()
        size.add_argument("--size", type=argtypes.size, default=None,
                          help="model input size: N or HxW (default 448, or the model's recommendation)")
        size.add_argument("--short-side", type=argtypes.positive_int, default=None,
                          help="resize the shorter side to this, keeping the aspect")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32", help="compute dtype")
    p.add_argument("--memory-limit", type=argtypes.memory_limit, default="auto", metavar="auto|none|SIZE",
                   help="refuse work whose memory estimate exceeds this (auto: 90%% of the free memory; none: no "
                        "check; or a size such as 8G)")
    add_cache_flags(p)


def add_cache_flags(p) -> None:
    p.add_argument("--compile-cache", default=None, metavar="DIR",
                   help="persistent JAX compilation cache (default: $GEM_JAX_COMPILE_CACHE or "
                        "~/.cache/gem_jax/xla)")
    p.add_argument("--no-compile-cache", action="store_true", help="do not use the persistent compilation cache")
    p.add_argument("--no-text-cache", action="store_true",
                   help="do not keep prompt embeddings on disk ($GEM_JAX_CACHE/text) between runs")


def method_options(args) -> dict:
    """The method options the flags give (``None``: not given)."""
    projections = getattr(args, "projections", None)
    return dict(layers=getattr(args, "gem_layers", None), iterations=getattr(args, "iterations", None),
                temperature=getattr(args, "temperature", None),
                projections=tuple(projections) if projections else None,
                normalize=getattr(args, "normalize", None), sigma=getattr(args, "sigma", None),
                residual=getattr(args, "residual", None), mlp=getattr(args, "mlp", None))


def _flag_words(message: str) -> str:
    """An option error in the words of the command line (``--gem-layers`` for ``layers``)."""
    out = message
    for name, flag in METHOD_FLAGS.items():
        out = out.replace(f"option {name}", f"option {flag}").replace(f"{name} must", f"{flag} must")
    head, sep, tail = out.partition("(its options are ")
    if sep:
        listed, close, rest = tail.partition(")")
        listed = ", ".join(METHOD_FLAGS.get(o.strip(), o.strip()) for o in listed.split(","))
        out = head + sep + listed + close + rest
    return out


def peek_model(name: str | None) -> tuple[int | None, dict]:
    """(vision blocks, recommended GEM settings) of a model, when known without loading it
    (registry names, native directories); (None, {}) otherwise."""
    try:
        path = pathlib.Path(name).expanduser() if name else None
        if name and not path.exists():
            path = checkpoints.packaged_dir(name) or path
        if path is not None and path.is_dir() and (path / "config.json").is_file():
            doc = json.loads((path / "config.json").read_text(encoding="utf-8"))
            defaults = doc.get("defaults") if isinstance(doc.get("defaults"), dict) else {}
            return CLIPConfig.from_dict(doc["clip"]).vision.layers, defaults
        entry = checkpoints.get_entry(name or checkpoints.DEFAULT_MODEL)
        return architecture(entry.architecture).vision.layers, {}
    except Exception:  # anything else is checked once the model is loaded
        return None, {}


def check_method(args):
    """The :class:`~gem_jax.Method` the flags describe, checked before the model loads: an
    unknown method, an option the method does not have, a bad value, or more layers than
    the model's vision blocks is a :class:`UsageError`."""
    depth, defaults = peek_model(getattr(args, "model", None))
    settings = with_model_defaults(dict(method_options(args), method=args.method, size=getattr(args, "size", None),
                                        short_side=getattr(args, "short_side", None),
                                        template=getattr(args, "template", None)), defaults)
    name = settings.pop("method") or "gem"
    for key in ("size", "short_side", "template"):
        settings.pop(key)
    try:
        method = get_method(name, **settings)
    except OptionError as e:
        raise UsageError(_flag_words(str(e))) from None
    except ValueError as e:
        raise UsageError(str(e)) from None
    if depth is not None and method.blocks > depth:
        raise UsageError(f"--gem-layers {method.blocks} exceeds the model's {depth} vision blocks")
    if getattr(args, "template", None) is not None:
        try:
            resolve_templates(args.template)
        except ValueError as e:
            raise UsageError(f"--template: {e}") from None
    return method


def gem_from_flags(model, args, **overrides):
    """``GEM(model, ...)`` from the flags of :func:`add_model_flags` (``overrides`` win);
    options that do not fit the model are a usage error."""
    from gem_jax.pipeline import GEM

    kwargs = dict(method_options(args), method=args.method, feature_surgery=getattr(args, "feature_surgery", False),
                  template=getattr(args, "template", None), size=getattr(args, "size", None),
                  short_side=getattr(args, "short_side", None), dtype=getattr(args, "dtype", "float32"),
                  memory_limit=getattr(args, "memory_limit", "auto"),
                  text_cache=not getattr(args, "no_text_cache", False))
    kwargs.update(overrides)
    try:
        return GEM(model, **kwargs)
    except OptionError as e:
        raise UsageError(_flag_words(str(e))) from None
    except ValueError as e:
        raise UsageError(_flag_words(str(e)).replace("layers=", "--gem-layers ")) from None


def load_model(name, progress=None):
    """The model ``name`` (default :data:`~gem_jax.checkpoints.DEFAULT_MODEL`), saying so on
    ``progress``; an unknown name is a :class:`UsageError`, a model that cannot be loaded a
    :class:`RuntimeFailure`. A model with random weights is noted."""
    import time

    from gem_jax import loading

    shown = name or checkpoints.DEFAULT_MODEL
    if progress is not None:
        progress.say(f"loading model {shown} ...")
    start = time.perf_counter()
    try:
        model = loading.open_model(name)
    except checkpoints.UnknownModelError as e:
        raise UsageError(str(e)) from None
    except loading.ModelLoadError as e:
        raise RuntimeFailure(str(e)) from None
    if progress is not None:
        progress.say(f"loaded in {time.perf_counter() - start:.1f} s")
        if model.random_weights:
            progress.note(f"{model.name} has RANDOM weights (gem-jax convert --random): results show the "
                          "mechanics, not real localisation; pictures and result files say so")
    return model


def prompts_and_classes(prompts, classes, nothing: str) -> tuple[list[str], list[str] | None]:
    """The prompts and class names of the flags, checked before the model loads (empty ones,
    ones the tokenizer's cleaning makes equal); ``nothing`` is the message when there are none."""
    try:
        prompts = checks.clean_prompts(prompts)
        classes = checks.clean_prompts(classes, "class name") if classes else None
        checks.same_after_cleaning(prompts)  # the full check needs the model's tokenizer: after it loads
        checks.same_after_cleaning(classes or [], "class name")
    except checks.PromptError as e:
        raise UsageError(str(e)) from None
    if not prompts and not classes:
        raise UsageError(f"nothing to localise: {nothing}")
    return prompts, classes


def memory_refusal(e: cost.MemoryLimitError, *, size: str | None = "--size or --short-side",
                   batch: str | None = None) -> RuntimeFailure:
    """A memory refusal in the words of the command: the flags it has for a smaller input
    (``size``) and a smaller batch (``batch``), and ``--memory-limit``."""
    return RuntimeFailure(e.message({"size": size and f"a smaller {size}", "batch": batch and f"a smaller {batch}",
                                     "limit": "--memory-limit none to try anyway"}))


def output_dir(path, flag: str = "--out") -> pathlib.Path:
    """:func:`gem_jax.checks.output_directory` as a usage error."""
    try:
        return checks.output_directory(path, flag)
    except checks.OutputPathError as e:
        raise UsageError(str(e)) from None


def output_file(path, flag: str, *, suffix: str | None = None, force: bool = False) -> pathlib.Path:
    """An output file checked before any slow work: its path (:func:`gem_jax.checks.output_file`)
    and, when it exists, whether gem-jax may replace it (:func:`gem_jax.files.check_writable`)."""
    try:
        path = checks.output_file(path, flag, suffix=suffix)
    except checks.OutputPathError as e:
        raise UsageError(str(e)) from None
    try:
        files.check_writable(path, force=force)
    except files.OutputError as e:
        raise RuntimeFailure(str(e)) from None
    return path


def enable_compile_cache(directory: str | None) -> pathlib.Path:
    """Turns on JAX's persistent compilation cache, so a second run of a shape does not compile."""
    import jax

    path = pathlib.Path(directory or os.environ.get("GEM_JAX_COMPILE_CACHE")
                        or pathlib.Path.home() / ".cache" / "gem_jax" / "xla").expanduser()
    if path.exists() and not path.is_dir():
        raise UsageError(f"the compilation cache must be a directory, {path} is a file "
                         "(pass --compile-cache DIR or --no-compile-cache)")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise RuntimeFailure(f"cannot create the compilation cache {path} ({e.strerror or e}); "
                             "pass --compile-cache DIR or --no-compile-cache") from None
    jax.config.update("jax_compilation_cache_dir", str(path))
    # The defaults skip programs compiled in under a second; ours are all worth keeping.
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    return path


def compile_cache_from_flags(args) -> None:
    if not getattr(args, "no_compile_cache", True):
        enable_compile_cache(getattr(args, "compile_cache", None))


def progress_of(args, name: str, **kw):
    """The command's :class:`~gem_jax.progress.Progress` (quiet with ``--quiet``)."""
    from gem_jax.progress import Progress

    return Progress(name, quiet=getattr(args, "quiet", False), stream=sys.stderr, **kw)
