"""``gem-jax segment``: heatmap overlays, prompt grids and label maps for images and prompts."""

from __future__ import annotations

import os
import pathlib
import time

import numpy as np

from gem_jax import checks, files, outputs, postprocess, preprocess, visualize
from gem_jax.cli import argtypes
from gem_jax.cli.common import (EXIT_OK, EXIT_PARTIAL, RuntimeFailure, UsageError, add_model_flags, check_method,
                                compile_cache_from_flags, gem_from_flags, load_model, memory_refusal, output_dir,
                                output_file, progress_of, prompts_and_classes)
from gem_jax.engine.cost import MemoryLimitError

#: Images decoded ahead of the model by segment's loader threads: what bounds its memory.
SEGMENT_PREFETCH = 4


def add_parser(sub, parents) -> None:
    seg = sub.add_parser("segment", parents=parents, help="heatmaps and label maps for images and prompts",
                         description="Writes, per image, an overlay PNG per prompt, a grid of all prompts, and "
                                     "with --classes a colour label map with a legend. File names carry the "
                                     "method, so several methods can share one --out.")
    seg.add_argument("images", nargs="*", metavar="IMAGE", help="image files, directories or glob patterns")
    seg.add_argument("--example", action="store_true", help="use the bundled example image (a cat; with --model toy, a toy scene)")
    seg.add_argument("-p", "--prompt", dest="prompts", action="extend", nargs="+", default=[], metavar="PROMPT",
                     help="text to localise; repeat or list several")
    seg.add_argument("--classes", nargs="+", metavar="CLASS", help="class names for a label map")
    seg.add_argument("--background-threshold", type=argtypes.probability, default=0.85,
                     help="with --classes: pixels whose top class probability is below this are background "
                          "(default 0.85)")
    seg.add_argument("--logit-scale", type=argtypes.positive_float, default=100.0,
                     help="with --classes: softmax of this times the cosine (default 100, CLIP's)")
    seg.add_argument("--area-threshold", type=argtypes.probability, default=None,
                     help="with --classes: drop classes on at most this fraction of the image (SCLIP's; off)")
    seg.add_argument("--pamr", type=argtypes.nonneg_int, default=0, metavar="N",
                     help="with --classes: PAMR iterations on the logits, dilations 8 and 16 (NACLIP: 10; off)")
    add_model_flags(seg)
    seg.add_argument("--out", default="gem_out", help="output directory (default ./gem_out)")
    seg.add_argument("--save-logits", metavar="FILE.npz", default=None,
                     help="also save raw cosine logits, heatmaps and prompts")
    seg.add_argument("--cmap", default="jet", help="matplotlib colour map of the overlays (jet)")
    seg.add_argument("--alpha", type=argtypes.probability, default=0.5, help="overlay opacity in [0, 1] (0.5)")
    seg.add_argument("--force", action="store_true", help="overwrite output files an earlier run wrote")
    seg.add_argument("--on-error", choices=("fail", "skip"), default="fail",
                     help="an unreadable image stops the run (fail) or is skipped and listed at the end (skip; "
                          "the exit status is then 3)")
    seg.set_defaults(run=run)


def _check_outputs(args, plans, out_dir: pathlib.Path) -> None:
    """Every output checked before the model loads: refused when it exists and gem-jax did
    not write it, or without --force."""
    output_dir(out_dir)
    targets = [p for overlays, grid, labels in plans for p in (*overlays, grid, labels) if p is not None]
    problems = []
    for t in targets:
        try:
            files.check_writable(t, force=args.force)
        except files.OutputError as e:
            problems.append(str(e))
    if problems:
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise RuntimeFailure(problems[0] + more)


def run(args) -> int:
    prompts, classes = prompts_and_classes(args.prompts, args.classes,
                                           "give prompts with -p PROMPT (or class names with --classes)")
    progress = progress_of(args, "segment")
    if args.save_logits and not prompts:
        raise UsageError("--save-logits needs prompts (-p)")
    in_prompts = [p for p in prompts if os.path.isfile(p)]
    if not args.images and not args.example:
        if in_prompts:
            raise UsageError(f"no images given: the prompt {in_prompts[0]!r} is a file; -p takes every word after "
                             f"it, so put the images first (gem-jax segment {in_prompts[0]} -p PROMPT) or end the "
                             "prompts with --")
        raise UsageError("no images given (pass IMAGE paths, a directory, a glob, or --example)")
    if in_prompts:
        progress.note(f"the prompt {in_prompts[0]!r} is also a file name; images go before -p or after --")
    method = check_method(args)
    try:
        preprocess.target_size(224, 224, size=args.size, short_side=args.short_side)
        visualize.colorize(np.zeros((1, 1)), args.cmap)
    except ValueError as e:
        raise UsageError(str(e)) from None
    try:
        paths = preprocess.expand_image_paths(args.images) if args.images else []
    except preprocess.ImageError as e:
        raise RuntimeFailure(str(e)) from None
    if args.example:
        from gem_jax.loading import example_image_path

        paths = checks.unique_real_paths([*paths, example_image_path(args.model)])
    out_dir = pathlib.Path(args.out)
    plans = outputs.plan_outputs(paths, prompts, classes, out_dir, method.name)
    _check_outputs(args, plans, out_dir)
    if args.save_logits:
        output_file(args.save_logits, "--save-logits", suffix=".npz", force=args.force)

    # A cheap check before the (slow) model load: every file is opened and its header read
    # (format and size, no pixels), so a missing, unreadable or non-image file fails fast;
    # the pixels are decoded later, while the model runs.
    dims, kept, skipped = [], [], []
    for path, plan in zip(paths, plans):
        try:
            dims.append(preprocess.probe_image(path))
            kept.append((path, plan))
        except preprocess.ImageError as e:
            if args.on_error == "fail":
                raise RuntimeFailure(f"{e} (--on-error skip goes on without it)") from None
            skipped.append(f"{path}: {e}")
    if not kept:
        raise RuntimeFailure(f"none of the {len(paths)} image(s) could be read: {skipped[0]}")
    paths, plans = [p for p, _ in kept], [plan for _, plan in kept]

    compile_cache_from_flags(args)
    start = time.perf_counter()
    model = load_model(args.model, progress)
    gem = gem_from_flags(model, args)
    wanted = prompts + [c for c in dict.fromkeys(classes or []) if c not in prompts]
    try:
        checks.vet(model.tokenizer, prompts, classes, gem.templates, progress.note)
    except checks.PromptError as e:
        raise UsageError(str(e)) from None
    try:  # every image's memory need (from its header's size), before anything is computed
        for hw in dict.fromkeys(dims):
            gem.check_memory(gem.input_size(hw), 1, len(wanted), display=outputs.display_size(hw),
                             display_prompts=len(prompts))
    except MemoryLimitError as e:
        raise memory_refusal(e) from None

    made = files.make_dirs(out_dir)
    files.remove_stale(out_dir)  # leftovers of a killed run
    try:
        written, failed = _segment_images(args, gem, paths, plans, prompts, classes, progress)
    except BaseException:
        files.remove_empty(made)  # leave no empty output directory behind
        raise
    skipped += failed
    progress.say(f"wrote {written} file(s) to {out_dir}" + (f" and {args.save_logits}" if args.save_logits else "")
                 + f" in {time.perf_counter() - start:.1f} s")
    if skipped:
        progress.note(f"skipped {len(skipped)} unreadable image(s) (exit status 3):\n  " + "\n  ".join(skipped))
        return EXIT_PARTIAL
    return EXIT_OK


def _segment_images(args, gem, paths, plans, prompts, classes, progress) -> tuple[int, list[str]]:
    """Decodes the images on loader threads, a few ahead of the model, and writes each one's
    pictures (and its logits) as soon as it is done; returns (files written, skipped images)."""
    from gem_jax.batch import inputs as inputs_lib
    from gem_jax.batch import loader

    # one tower pass per image serves both: the label map comes from the classes' logits
    wanted = prompts + [c for c in dict.fromkeys(classes or []) if c not in prompts]
    column = {p: i for i, p in enumerate(wanted)}
    title = _title(gem)
    # The loader hands over the decoded image; GEM.heatmaps resizes it itself (with its cap on
    # the long side), so the loader's own model-input pixels are asked at the smallest size, one
    # patch. No pixel limit of our own: Pillow's, as in GEM.heatmaps, refuses decompression bombs.
    patch = gem.model.config.vision.patch_size
    sizing = loader.Sizing(patch, None, patch, max_pixels=1 << 62, keep_image=True)
    workers = max(1, min(SEGMENT_PREFETCH, os.cpu_count() or 1))
    stream = loader.stream(((i, inputs_lib.Item(str(p), str(p))) for i, p in enumerate(paths)), sizing,
                           workers=workers, prefetch=SEGMENT_PREFETCH)
    logits_file = outputs.LogitsWriter(pathlib.Path(args.save_logits), prompts, args.force, gem.describe()) \
        if args.save_logits else None
    compiled, written, skipped, done = set(), 0, [], 0
    try:
        with progress.bar(len(paths)) as bar:
            for path, (overlays, grid, labels_path) in zip(paths, plans):
                d = next(stream)
                if d.error is not None:
                    message = preprocess.decode_error_message(path, d.error)
                    if args.on_error == "fail":
                        raise RuntimeFailure(f"{message} (--on-error skip goes on without it)")
                    skipped.append(f"{path}: {message}")
                    bar.update(1)
                    continue
                image, d.pixels, d.image = d.image, None, None  # segment resizes itself (as GEM.heatmaps does)
                hw = gem.input_size(image)
                tick = time.perf_counter()
                if hw not in compiled:
                    cached = "" if args.no_compile_cache else "; later runs read the compile cache"
                    progress.say(f"compiling for {hw[0]}x{hw[1]} (first image of this size{cached}) ...")
                try:
                    out = gem.heatmaps(image, wanted)
                except MemoryLimitError as e:
                    raise memory_refusal(e) from None
                logits, heat = np.asarray(out.logits[0]), np.asarray(out.heatmaps[0])
                if hw not in compiled:
                    compiled.add(hw)
                    progress.say(f"first {hw[0]}x{hw[1]} image took {time.perf_counter() - tick:.1f} s")
                done += 1
                shown_hw = outputs.display_size(image.shape[:2])
                picture = outputs.resize_image(image, shown_hw)
                if prompts:
                    logits_p, heat_p = logits[:len(prompts)], heat[:len(prompts)]
                    if logits_file is not None:
                        logits_file.add(logits_p, heat_p, path, out.sizes[0])
                    for p_idx, target in enumerate(overlays):
                        shown = outputs.to_display(heat_p[p_idx], shown_hw)
                        overlay = visualize.overlay(picture, shown, cmap=args.cmap, alpha=args.alpha)
                        files.write_owned(target, visualize.png_writer(overlay), force=args.force)
                        written += 1
                    shown = outputs.to_display(heat_p, shown_hw)
                    fig = visualize.heatmap_grid(picture, shown, prompts, cmap=args.cmap, alpha=args.alpha,
                                                 title=title)
                    files.write_owned(grid, visualize.png_writer(fig), force=args.force)
                    written += 1
                if classes:
                    class_logits = logits[[column[c] for c in classes]]
                    labels = postprocess.label_map(image, class_logits, args.background_threshold,
                                                   logit_scale=args.logit_scale, area_threshold=args.area_threshold,
                                                   pamr_iterations=args.pamr)
                    labels = outputs.to_display(labels, shown_hw, nearest=True)
                    fig = visualize.label_figure(picture, labels, classes, title=title)
                    files.write_owned(labels_path, visualize.png_writer(fig), force=args.force)
                    written += 1
                bar.update(1)  # this image's pictures are written
        if not done:
            raise RuntimeFailure(f"none of the {len(paths)} image(s) could be read: {skipped[0]}")
        if logits_file is not None:
            try:
                logits_file.commit()
            except files.OutputError as e:
                raise RuntimeFailure(str(e)) from None
    finally:
        if logits_file is not None:
            logits_file.abort()
        stream.close()
    return written, skipped


def _title(gem) -> str:
    """What every picture's title says: the method and the model, and RANDOM weights."""
    from gem_jax.loading import RANDOM_WEIGHTS_NOTE

    name = pathlib.Path(gem.model.name).name if os.sep in gem.model.name else gem.model.name
    title = f"{gem.method.name} on {name}"
    return f"{title}\n{RANDOM_WEIGHTS_NOTE}" if gem.model.random_weights else title
