"""Pictures of GEM's outputs: heatmap overlays, prompt grids, colour label maps, and safe PNG writing."""

from __future__ import annotations

import difflib
import math
import numbers
import pathlib
import textwrap
from typing import Sequence

import matplotlib
import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.cm import ScalarMappable
from matplotlib.colors import Colormap, Normalize
from matplotlib.figure import Figure
from matplotlib.patches import Patch
from PIL import Image

from gem_jax import files

__all__ = [
    "colorize",
    "overlay",
    "heatmap_grid",
    "colorbar_figure",
    "label_palette",
    "colorize_labels",
    "label_figure",
    "png_writer",
    "save_png",
]

#: Longest side in inches of one panel of the figures (3.2 wide for a landscape image).
PANEL_INCHES = 3.2
#: Resolution of figures written by :func:`save_png`.
FIGURE_DPI = 100


# ----------------------------------------------------------------------------- validation


def _as_image(image, name: str = "image") -> np.ndarray:
    """An (H, W, 3) uint8 array from an array or a PIL image; ValueError otherwise."""
    if isinstance(image, Image.Image):
        image = image.convert("RGB")
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[-1] != 3 or image.dtype != np.uint8:
        raise ValueError(f"{name} must be a uint8 array of shape (H, W, 3), got {image.dtype} {image.shape}")
    if image.shape[0] == 0 or image.shape[1] == 0:
        raise ValueError(f"{name} must not be empty, got shape {image.shape}")
    return image


def _as_maps(maps, ndim: int, name: str, layout: str) -> np.ndarray:
    """A float64 array of ``ndim`` dimensions (``layout`` names them for the error)."""
    maps = np.asarray(maps)
    if maps.dtype.kind in "cSUMm":
        raise ValueError(f"{name} must be real numbers, got dtype {maps.dtype}")
    try:
        maps = maps.astype(np.float64)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be real numbers, got dtype {maps.dtype}") from None
    if maps.ndim != ndim:
        hint = ""
        if ndim == 3 and maps.ndim == 4 and maps.shape[0] == 1:
            hint = "; for a batch of one image pass heatmaps[0]"
        raise ValueError(f"{name} must have shape {layout}, got shape {maps.shape}{hint}")
    if maps.shape[-1] == 0 or maps.shape[-2] == 0:
        raise ValueError(f"{name} must not be empty, got shape {maps.shape}")
    return maps


def _as_labels(labels, n_classes: int) -> np.ndarray:
    """A 2-D int64 label map with values in [0, n_classes]."""
    labels = np.asarray(labels)
    if labels.ndim != 2:
        raise ValueError(f"labels must be a 2-D (H, W) array, got shape {labels.shape}")
    if labels.dtype.kind not in "iub":
        raise ValueError(f"labels must be integers (0 = background, k + 1 = class k), got dtype {labels.dtype}")
    if labels.size == 0:
        raise ValueError(f"labels must not be empty, got shape {labels.shape}")
    labels = labels.astype(np.int64)
    low, high = int(labels.min()), int(labels.max())
    if low < 0 or high > n_classes:
        raise ValueError(f"labels must lie in [0, {n_classes}] for {n_classes} class(es), got values in [{low}, {high}]")
    return labels


def _as_count(n, name: str) -> int:
    if isinstance(n, bool) or not isinstance(n, numbers.Integral):
        raise ValueError(f"{name} must be an int, got {n!r}")
    return int(n)


def _check_alpha(alpha) -> float:
    if isinstance(alpha, bool) or not isinstance(alpha, numbers.Real) or not 0.0 <= float(alpha) <= 1.0:
        raise ValueError(f"alpha must be a number in [0, 1], got {alpha!r}")
    return float(alpha)


def _get_cmap(cmap) -> Colormap:
    """A matplotlib colour map from a name or a Colormap; ValueError naming an unknown one."""
    if isinstance(cmap, Colormap):
        return cmap
    if not isinstance(cmap, str):
        raise ValueError(f"cmap must be a colour map name or a matplotlib Colormap, got {cmap!r}")
    try:
        return matplotlib.colormaps[cmap]
    except KeyError:
        close = difflib.get_close_matches(cmap, list(matplotlib.colormaps), n=3)
        if not close:
            close = difflib.get_close_matches(cmap.lower(), list(matplotlib.colormaps), n=3)
        hint = f"; did you mean {', '.join(map(repr, close))}?" if close else "; e.g. 'jet', 'viridis', 'inferno', 'turbo'"
        raise ValueError(f"unknown colour map {cmap!r} (see matplotlib.colormaps){hint}") from None


def _resize_image(image: np.ndarray, hw: tuple[int, int]) -> np.ndarray:
    """The image at (H, W), resampled bicubically with PIL when it is not that size already."""
    if image.shape[:2] == tuple(hw):
        return image
    return np.asarray(Image.fromarray(image).resize((hw[1], hw[0]), Image.Resampling.BICUBIC))


def _titles(titles, count: int) -> list[str]:
    if isinstance(titles, (str, bytes)):
        raise ValueError(f"titles must be a sequence of {count} strings, got a single string {titles!r}")
    titles = list(titles)
    if len(titles) != count:
        raise ValueError(f"got {count} heatmap(s) but {len(titles)} title(s); pass one title per heatmap")
    return [str(t) for t in titles]


def _wrap(title: str, width_inches: float) -> str:
    """A title broken into at most three lines that fit a panel ``width_inches`` wide (at 11 pt)."""
    chars = max(8, int(10.5 * width_inches))
    if len(title) <= chars:
        return title
    return "\n".join(textwrap.wrap(title, chars, max_lines=3, placeholder=" ..."))


def _new_figure(width: float, height: float) -> Figure:
    """A figure on its own Agg canvas: no pyplot state, works headless and displays in notebooks."""
    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _show(ax, array: np.ndarray, shape_hw: tuple[int, int], title: str | None) -> None:
    """Draw ``array`` so that it appears with the proportions of an image of ``shape_hw``.

    Heatmaps are often computed at another aspect than the photo (e.g. 448 x 448); drawing
    them with the photo's proportions keeps every panel of a figure geometrically aligned.
    """
    h, w = array.shape[:2]
    aspect = (shape_hw[0] / shape_hw[1]) * (w / h)
    ax.imshow(array, aspect=aspect, interpolation="antialiased")
    ax.set_axis_off()
    if title is not None:
        ax.set_title(title, fontsize=11)


def _panel_size(shape_hw: tuple[int, int]) -> tuple[float, float]:
    """(width, height) in inches of one panel showing an image of ``shape_hw``.

    Landscape panels are :data:`PANEL_INCHES` wide, portrait ones that tall (but at least
    1.6 wide, so titles fit); extreme aspects are clamped.
    """
    aspect = shape_hw[0] / shape_hw[1]
    width = float(np.clip(PANEL_INCHES / aspect, 1.6, PANEL_INCHES))
    return width, float(np.clip(width * aspect, 0.8, 2 * PANEL_INCHES))


# ----------------------------------------------------------------------------- heatmaps


def colorize(heatmap, cmap="jet") -> np.ndarray:
    """Colour a heatmap through a matplotlib colour map.

    Args:
      heatmap: (H, W) values in [0, 1]; values outside are clipped, NaN counts as 0.
      cmap: a colour map name (``matplotlib.colormaps``) or a ``Colormap``.

    Returns:
      uint8 (H, W, 3) RGB.

    Raises:
      ValueError: ``heatmap`` is not 2-D real numbers, or ``cmap`` is unknown.
    """
    colour_map = _get_cmap(cmap)
    heatmap = _as_maps(heatmap, 2, "heatmap", "(H, W)")
    values = np.clip(np.nan_to_num(heatmap, nan=0.0, posinf=1.0, neginf=0.0), 0.0, 1.0)
    return np.ascontiguousarray(colour_map(values, bytes=True)[..., :3])


def overlay(image, heatmap, *, cmap="jet", alpha=0.5) -> np.ndarray:
    """Blend a coloured heatmap over an image: ``(1 - alpha) * image + alpha * colorize(heatmap)``.

    Args:
      image: uint8 (H', W', 3) RGB (or a PIL image); resized bicubically to the heatmap's
        (H, W) when the sizes differ.
      heatmap: (H, W) values in [0, 1].
      cmap: colour map name or ``Colormap``.
      alpha: opacity of the heatmap in [0, 1]; 0 gives the image, 1 the colour map colours.

    Returns:
      uint8 (H, W, 3).

    Raises:
      ValueError: bad shapes or dtypes, ``alpha`` outside [0, 1], or an unknown ``cmap``.
    """
    alpha = _check_alpha(alpha)
    image = _as_image(image)
    colours = colorize(heatmap, cmap).astype(np.float64)
    base = _resize_image(image, colours.shape[:2]).astype(np.float64)
    blended = (1.0 - alpha) * base + alpha * colours
    return np.clip(np.rint(blended), 0, 255).astype(np.uint8)


def heatmap_grid(image, heatmaps, titles, *, cmap="jet", alpha=0.5, columns=None, title=None) -> Figure:
    """A figure of the image followed by one titled heatmap overlay per prompt.

    Every panel is drawn with the image's proportions (heatmaps of another aspect are
    stretched back), axes are hidden, and a colour bar for the heatmap scale is shared.

    Args:
      image: uint8 (H, W, 3) RGB (or a PIL image).
      heatmaps: (P, h, w) values in [0, 1], e.g. ``out.heatmaps[0]``.
      titles: P titles, usually the prompts.
      cmap, alpha: as for :func:`overlay`.
      columns: panels per row; by default at most five, rows balanced.
      title: a title over the whole figure (e.g. saying the model's weights are random).

    Returns:
      A ``matplotlib.figure.Figure`` (Agg canvas); save it with :func:`save_png`.
    """
    colour_map = _get_cmap(cmap)
    alpha = _check_alpha(alpha)
    image = _as_image(image)
    heatmaps = _as_maps(heatmaps, 3, "heatmaps", "(P, H, W)")
    titles = _titles(titles, len(heatmaps))

    n_panels = 1 + len(heatmaps)
    if columns is None:
        rows = math.ceil(n_panels / 5)
        columns = math.ceil(n_panels / rows)
    else:
        columns = _as_count(columns, "columns")
        if columns < 1:
            raise ValueError(f"columns must be at least 1, got {columns}")
        columns = min(columns, n_panels)
        rows = math.ceil(n_panels / columns)

    shape_hw = image.shape[:2]
    panel_w, panel_h = _panel_size(shape_hw)
    titles = [_wrap(t, panel_w) for t in titles]
    lines = [t.count("\n") + 1 for t in ["image", *titles]]
    row_lines = [max(lines[r * columns:(r + 1) * columns]) for r in range(rows)]
    fig = _new_figure(panel_w * columns + 0.9, sum(panel_h + 0.22 * n + 0.15 for n in row_lines) + 0.1
                      + (0.35 if title else 0.0))
    if title:
        fig.suptitle(title, fontsize=11)
    grid = fig.add_gridspec(rows, columns)

    axes = []
    for i in range(n_panels):
        ax = fig.add_subplot(grid[i // columns, i % columns])
        if i == 0:
            _show(ax, image, shape_hw, "image")
        else:
            _show(ax, overlay(image, heatmaps[i - 1], cmap=colour_map, alpha=alpha), shape_hw, titles[i - 1])
        axes.append(ax)

    scale = ScalarMappable(norm=Normalize(0.0, 1.0), cmap=colour_map)
    fig.colorbar(scale, ax=axes, shrink=0.85 if rows == 1 else 0.6, aspect=20 * rows, label="heatmap", pad=0.02)
    return fig


def colorbar_figure(cmap="jet", *, label="heatmap", width=PANEL_INCHES * 2, height=0.75) -> Figure:
    """A horizontal colour bar from 0 to 1 on its own, as the one :func:`heatmap_grid` shares.

    For pages that show overlays one by one (e.g. in a gallery) and need one scale for all.

    Args:
      cmap: colour map name or ``Colormap``, as for :func:`overlay`.
      label: the bar's caption.
      width, height: figure size in inches.

    Returns:
      A ``matplotlib.figure.Figure`` (Agg canvas); save it with :func:`save_png`.
    """
    colour_map = _get_cmap(cmap)
    fig = _new_figure(float(width), float(height))
    ax = fig.add_subplot(1, 1, 1)
    fig.colorbar(ScalarMappable(norm=Normalize(0.0, 1.0), cmap=colour_map), cax=ax, orientation="horizontal",
                 label=label)
    return fig


# ----------------------------------------------------------------------------- label maps


def label_palette(n) -> np.ndarray:
    """Colours for a label map of ``n`` classes, by the PASCAL VOC colour map algorithm.

    Row 0 is the background (black); row k (1..n) spreads the bits of k over the high bits
    of R, G and B, so the colours are distinct (for n < 2**24) and the same for every n.

    Returns:
      uint8 (n + 1, 3).
    """
    n = _as_count(n, "n")
    if not 0 <= n < 2**24:
        raise ValueError(f"n must be in [0, {2**24 - 1}], got {n}")
    index = np.arange(n + 1, dtype=np.int64)
    palette = np.zeros((n + 1, 3), dtype=np.int64)
    code = index.copy()
    for bit in range(8):
        for channel in range(3):
            palette[:, channel] |= ((code >> channel) & 1) << (7 - bit)
        code >>= 3
    return palette.astype(np.uint8)


def colorize_labels(labels, n_classes) -> np.ndarray:
    """Colour a label map (0 = background, k + 1 = class k) with :func:`label_palette`.

    Args:
      labels: (H, W) integers in [0, n_classes].
      n_classes: the number of classes (background excluded).

    Returns:
      uint8 (H, W, 3); label k gets ``label_palette(n_classes)[k]``.
    """
    n_classes = _as_count(n_classes, "n_classes")
    if n_classes < 0:
        raise ValueError(f"n_classes must be non-negative, got {n_classes}")
    labels = _as_labels(labels, n_classes)
    return label_palette(n_classes)[labels]


def label_figure(image, labels, class_names: Sequence[str], *, alpha=0.6, background="background",
                 title=None) -> Figure:
    """The image beside its colour label map (blended over it), with a legend of every class:
    those absent from the map are listed as "(not found)" with an empty swatch.

    Args:
      image: uint8 (H', W', 3) RGB (or a PIL image); resized to the label map when sizes differ.
      labels: (H, W) integers, 0 = background and k + 1 = ``class_names[k]``.
      class_names: the names of the classes.
      alpha: opacity of the label colours in [0, 1].
      background: the legend's name for label 0 (listed when present), or None to leave it out.
      title: a title over the whole figure (e.g. saying the model's weights are random).

    Returns:
      A ``matplotlib.figure.Figure`` (Agg canvas); the legend is ``fig.legends[0]``.
    """
    alpha = _check_alpha(alpha)
    image = _as_image(image)
    if isinstance(class_names, (str, bytes)):
        raise ValueError(f"class_names must be a sequence of names, got a single string {class_names!r}")
    class_names = [str(c) for c in class_names]
    labels = _as_labels(labels, len(class_names))

    palette = label_palette(len(class_names))
    colours = palette[labels].astype(np.float64)
    base = _resize_image(image, labels.shape).astype(np.float64)
    blended = np.clip(np.rint((1.0 - alpha) * base + alpha * colours), 0, 255).astype(np.uint8)

    present = set(np.unique(labels).tolist())
    entries = []
    if 0 in present and background is not None:
        entries.append(Patch(facecolor=palette[0] / 255.0, edgecolor="0.25", linewidth=0.8, label=str(background)))
    for k, name in enumerate(class_names, start=1):
        if k in present:
            entries.append(Patch(facecolor=palette[k] / 255.0, edgecolor="0.25", linewidth=0.8, label=name))
        else:
            entries.append(Patch(facecolor="none", edgecolor=palette[k] / 255.0, linewidth=1.2,
                                 label=f"{name} (not found)"))

    shape_hw = image.shape[:2]
    legend_inches = 0.4 + 0.085 * max([8] + [len(e.get_label()) for e in entries]) if entries else 0.0
    panel_w, panel_h = _panel_size(shape_hw)
    fig = _new_figure(2 * panel_w + legend_inches + 0.3, panel_h + 0.55 + (0.35 if title else 0.0))
    if title:
        fig.suptitle(title, fontsize=11)
    _show(fig.add_subplot(1, 2, 1), image, shape_hw, "image")
    _show(fig.add_subplot(1, 2, 2), blended, shape_hw, "labels")
    if entries:
        fig.legend(handles=entries, loc="outside right upper", frameon=False, fontsize=10,
                   handlelength=1.4, handleheight=1.1, title="classes", alignment="left")
    return fig


# ----------------------------------------------------------------------------- writing


def png_writer(array_or_figure):
    """A function writing ``array_or_figure`` (a uint8 (H, W), (H, W, 3) or (H, W, 4) array, or a
    matplotlib ``Figure`` at 100 dpi with a tight bounding box) as a PNG to a binary file;
    for :func:`gem_jax.files.atomic_write`. Checks the array first (ValueError, TypeError)."""
    if isinstance(array_or_figure, Figure):
        figure = array_or_figure

        def write(f):
            figure.savefig(f, format="png", dpi=FIGURE_DPI, bbox_inches="tight")
        return write
    if not isinstance(array_or_figure, (np.ndarray, list, tuple)) and not hasattr(array_or_figure, "__array__"):
        raise TypeError(f"save_png takes a uint8 array or a matplotlib Figure, got {type(array_or_figure).__name__}")
    array = np.asarray(array_or_figure)
    if array.dtype != np.uint8 or not (array.ndim == 2 or (array.ndim == 3 and array.shape[-1] in (3, 4))):
        raise ValueError(f"save_png needs a uint8 array of shape (H, W), (H, W, 3) or (H, W, 4), "
                         f"got {array.dtype} {array.shape}")
    if array.shape[0] == 0 or array.shape[1] == 0:
        raise ValueError(f"cannot save an empty image of shape {array.shape}")
    picture = Image.fromarray(np.ascontiguousarray(array))

    def write(f):
        picture.save(f, format="PNG")
    return write


def save_png(array_or_figure, path, *, overwrite=False) -> pathlib.Path:
    """Write a uint8 image array or a matplotlib Figure to ``path`` as a PNG, atomically
    (:func:`gem_jax.files.atomic_write`: a temporary file renamed into place, never seen
    half-written, nothing left behind on failure). Figures are saved at 100 dpi with a
    tight bounding box.

    Args:
      array_or_figure: uint8 (H, W), (H, W, 3) or (H, W, 4) array, or a ``Figure``.
      path: where to write; its directory must exist.
      overwrite: replace an existing file; without it an existing ``path`` is an error.

    Returns:
      ``path`` as a ``pathlib.Path``.

    Raises:
      FileExistsError: ``path`` exists and ``overwrite`` is false.
      ValueError: the array is not a uint8 image.
      TypeError: neither an array nor a Figure was given.
    """
    try:
        return files.atomic_write(path, png_writer(array_or_figure), overwrite=overwrite)
    except FileExistsError:
        raise FileExistsError(f"{path} already exists; refusing to overwrite it (pass overwrite=True to replace "
                              "it)") from None
