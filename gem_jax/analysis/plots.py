"""Matplotlib figures of the analyses (``matplotlib.figure.Figure`` objects, no pyplot state)."""

from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np
from matplotlib.colors import LogNorm
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from gem_jax.analysis.calibration import CalibrationResult
from gem_jax.analysis.clustering import ClusteringGrid, cluster_labels_np
from gem_jax.analysis.lipschitz import PAPER_LIPSCHITZ, LipschitzReport
from gem_jax.analysis.localization import LocalizationMetrics

__all__ = [
    "attention_figure",
    "calibration_figure",
    "cluster_count_figure",
    "lipschitz_figure",
    "localization_figure",
    "methods_figure",
    "pca_figure",
]

_METRIC_TITLES = {
    "patch_similarity": "patch-patch similarity",
    "object_background": "object-background contrast",
    "text_object_background": "text-object-background contrast",
}


def _finish(fig: Figure, title: str | None) -> Figure:
    if title:
        fig.suptitle(title)
    return fig


def _clusters(n) -> str:
    n = int(n)
    return f"{n} cluster" if n == 1 else f"{n} clusters"


def _select(grid: ClusteringGrid, index: tuple[int, ...], iterations, temperatures):
    """Grid rows and columns to draw, and the grid's arrays at one token set."""
    lead = grid.counts.ndim - 2
    if len(index) != lead:
        raise ValueError(f"the grid has {lead} token-set axes; give index with {lead} entries, got {index!r}")
    ks = range(len(grid.iterations)) if iterations is None else [list(grid.iterations).index(k) for k in iterations]
    ts = range(len(grid.temperatures)) if temperatures is None else \
        [int(np.argmin(np.abs(grid.temperatures - t))) for t in temperatures]
    return list(ks), list(ts)


def cluster_count_figure(grid: ClusteringGrid, title: str | None = None) -> Figure:
    """Number of clusters over the (K, tau) grid: a table-like heatmap and curves over K.

    Counts are averaged over the grid's token sets when it has several.
    """
    counts = grid.counts.reshape(-1, *grid.counts.shape[-2:]).astype(np.float64)
    mean = counts.mean(axis=0)
    n_sets = counts.shape[0]
    fig = Figure(figsize=(11, 4.2), layout="constrained")
    ax_map, ax_lines = fig.subplots(1, 2)
    im = ax_map.imshow(mean, cmap="viridis", aspect="auto", origin="upper")
    ax_map.set_xticks(range(len(grid.temperatures)), [f"{t:g}" for t in grid.temperatures])
    ax_map.set_yticks(range(len(grid.iterations)), [str(k) for k in grid.iterations])
    ax_map.set_xlabel("temperature tau")
    ax_map.set_ylabel("iterations K")
    for (i, j), v in np.ndenumerate(mean):
        ax_map.text(j, i, f"{v:.3g}", ha="center", va="center", fontsize=8,
                    color="white" if v < mean.max() / 2 else "black")
    fig.colorbar(im, ax=ax_map, label="clusters")
    x = np.asarray(grid.iterations)
    for j, t in enumerate(grid.temperatures):
        ax_lines.plot(x, mean[:, j], marker="o", label=f"tau = {t:g}")
    ax_lines.set_xscale("symlog", linthresh=1)
    ax_lines.set_yscale("log")
    ax_lines.set_xlabel("iterations K")
    ax_lines.set_ylabel("clusters")
    ax_lines.legend(fontsize=8)
    sets = f", mean of {n_sets} token sets" if n_sets > 1 else ""
    ax_map.set_title(f"clusters (cosine > {grid.cos_threshold:g}, connected components){sets}", fontsize=9)
    ax_lines.set_title("fewer, larger clusters with more iterations and higher tau", fontsize=9)
    return _finish(fig, title)


def attention_figure(grid: ClusteringGrid, index: tuple[int, ...] = (), iterations: Sequence[int] | None = None,
                     temperatures: Sequence[float] | None = None, title: str | None = None) -> Figure:
    """Self-self attention matrices over the grid for one token set.

    Tokens are reordered by cluster so that clusters show as diagonal blocks; the
    colour scale is logarithmic and shared (a uniform row is 1/N, a one-hot row 1).
    """
    if grid.attention is None:
        raise ValueError("the grid was computed without attention (with_attention=False)")
    ks, ts = _select(grid, index, iterations, temperatures)
    att, labels = grid.attention[index], grid.labels[index]
    norm = LogNorm(vmin=1e-4, vmax=1.0, clip=True)
    fig = Figure(figsize=(2.2 * len(ts) + 0.8, 2.2 * len(ks) + 0.5), layout="constrained")
    axes = np.atleast_2d(fig.subplots(len(ks), len(ts), squeeze=False))
    for r, k in enumerate(ks):
        for c, t in enumerate(ts):
            order = np.argsort(labels[k, t], kind="stable")
            ax = axes[r, c]
            im = ax.imshow(att[k, t][np.ix_(order, order)], cmap="magma", norm=norm)
            ax.set_xticks([])
            ax.set_yticks([])
            ax.set_title(f"K={grid.iterations[k]}, tau={grid.temperatures[t]:g}\n"
                         f"{_clusters(grid.counts[index][k, t])}", fontsize=8)
    fig.colorbar(im, ax=axes, shrink=0.6, label="attention weight")
    return _finish(fig, title)


def _pca_2d(x: np.ndarray) -> np.ndarray:
    x = x - x.mean(axis=0, keepdims=True)
    if not np.any(x):
        return np.zeros((len(x), 2))
    u, s, _ = np.linalg.svd(x, full_matrices=False)
    out = u[:, :2] * s[:2]
    return np.pad(out, ((0, 0), (0, 2 - out.shape[1])))


def pca_figure(grid: ClusteringGrid, index: tuple[int, ...] = (), iterations: Sequence[int] | None = None,
               temperatures: Sequence[float] | None = None, title: str | None = None) -> Figure:
    """The normalised tokens of one token set projected on their first two principal
    components (computed per panel), coloured by cluster."""
    ks, ts = _select(grid, index, iterations, temperatures)
    tokens, labels = grid.tokens[index], grid.labels[index]
    fig = Figure(figsize=(2.4 * len(ts), 2.4 * len(ks) + 0.4), layout="constrained")
    axes = fig.subplots(len(ks), len(ts), squeeze=False)
    for r, k in enumerate(ks):
        for c, t in enumerate(ts):
            x = tokens[k, t]
            x = x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)
            xy = _pca_2d(x.astype(np.float64))
            ax = axes[r, c]
            ax.scatter(xy[:, 0], xy[:, 1], c=labels[k, t] % 20, cmap="tab20", vmin=0, vmax=19, s=12,
                       edgecolors="none")
            ax.set_xticks([])
            ax.set_yticks([])
            ax.set_title(f"K={grid.iterations[k]}, tau={grid.temperatures[t]:g}: "
                         f"{int(grid.counts[index][k, t])}", fontsize=8)
    return _finish(fig, title or "PCA of the normalised tokens, coloured by cluster (title: cluster count)")


def lipschitz_figure(report: LipschitzReport, title: str | None = None, show_paper: bool = True) -> Figure:
    """Spectral norms of W_q, W_k, W_v: per layer (mean +- std over heads) and overall,
    beside the paper's figures (CLIP ViT-B/16, real weights) when ``show_paper``."""
    fig = Figure(figsize=(11, 4), layout="constrained")
    ax_layers, ax_all = fig.subplots(1, 2, width_ratios=[2, 1])
    colours = {"q": "tab:blue", "k": "tab:orange", "v": "tab:green"}
    for p in "qkv":
        m, s = report.per_layer_mean[p], report.per_layer_std[p]
        layers = np.arange(len(m))
        ax_layers.plot(layers, m, marker="o", color=colours[p], label=f"W_{p}")
        ax_layers.fill_between(layers, m - s, m + s, color=colours[p], alpha=0.2)
    ax_layers.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax_layers.set_xlabel("block")
    ax_layers.set_ylabel("spectral norm (mean +- std over heads)")
    ax_layers.legend()
    ax_layers.set_title("per-head Lipschitz constants by block", fontsize=9)
    x = np.arange(3)
    ax_all.errorbar(x - 0.1, [report.mean[p] for p in "qkv"], [report.std[p] for p in "qkv"], fmt="o",
                    capsize=4, label="this model")
    if show_paper:
        ax_all.errorbar(x + 0.1, [PAPER_LIPSCHITZ[p][0] for p in "qkv"], [PAPER_LIPSCHITZ[p][1] for p in "qkv"],
                        fmt="s", mfc="none", capsize=4, color="black", label="paper: ViT-B/16, real weights")
    ax_all.set_xticks(x, ["C_q", "C_k", "C_v"])
    ax_all.set_xlim(-0.6, 2.6)
    ax_all.legend(fontsize=8)
    ax_all.set_title("mean +- std over layers and heads", fontsize=9)
    return _finish(fig, title)


def localization_figure(metrics: LocalizationMetrics, title: str | None = None) -> Figure:
    """The three localisation metrics over layers, one line per path (image means),
    with a dotted line where the parallel paths start."""
    means = metrics.mean()
    names = [m for m in _METRIC_TITLES if not np.all(np.isnan(means[m]))]
    fig = Figure(figsize=(4.2 * len(names), 3.6), layout="constrained")
    axes = fig.subplots(1, len(names), squeeze=False)[0]
    starts = {s for s in metrics.start_layer.values() if s is not None}
    for ax, m in zip(axes, names):
        for i, path in enumerate(metrics.paths):
            ax.plot(metrics.layers, means[m][i], marker="o", label=path)
        for s in starts:
            if s > 0:
                ax.axvline(s - 0.5, color="grey", linestyle=":", linewidth=1)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("block (output)")
        ax.set_title(_METRIC_TITLES[m], fontsize=10)
    axes[0].legend(fontsize=8)
    return _finish(fig, title)


def calibration_figure(result: CalibrationResult, title: str | None = None) -> Figure:
    """The soft-IoU loss during the fit, and held-out mIoU before, after and with defaults."""
    fig = Figure(figsize=(10, 3.6), layout="constrained")
    ax_loss, ax_miou = fig.subplots(1, 2)
    ax_loss.plot(np.arange(len(result.history)), result.history)
    ax_loss.set_xlabel("Adam step")
    ax_loss.set_ylabel("1 - soft mIoU (fitting images)")
    ax_loss.set_title(f"tau {result.initial_temperature:.3g} -> {result.temperature:.3g}, threshold "
                      f"{result.initial_threshold:.2f} -> {result.background_threshold:.2f}", fontsize=9)
    bars = {"adaptive tau,\ninitial threshold": result.miou_default,
            "initial": result.miou_before, "fitted": result.miou_after}
    ax_miou.bar(list(bars), list(bars.values()), color=["grey", "tab:blue", "tab:green"])
    for i, v in enumerate(bars.values()):
        ax_miou.text(i, v, f"{v:.3f}", ha="center", va="bottom", fontsize=8)
    ax_miou.set_ylabel("mIoU (held-out images)")
    return _finish(fig, title)


def _pca_rgb(x: np.ndarray) -> np.ndarray:
    """(h, w, D) tokens -> (h, w, 3) in [0, 1]: the first three principal components of
    the normalised tokens, each min-max scaled."""
    h, w, d = x.shape
    flat = x.reshape(-1, d).astype(np.float64)
    flat = flat / np.maximum(np.linalg.norm(flat, axis=-1, keepdims=True), 1e-12)
    flat = flat - flat.mean(axis=0)
    u, s, _ = np.linalg.svd(flat, full_matrices=False)
    pcs = u[:, :3] * s[:3]
    pcs = np.pad(pcs, ((0, 0), (0, 3 - pcs.shape[1])))
    lo, hi = pcs.min(axis=0), pcs.max(axis=0)
    return ((pcs - lo) / np.where(hi > lo, hi - lo, 1.0)).reshape(h, w, 3)


def methods_figure(tokens: Mapping[str, np.ndarray], image: np.ndarray | None = None, index: int = 0,
                   cos_threshold: float = 0.9, title: str | None = None) -> Figure:
    """How each method's patch tokens cluster on the same image, side by side.

    One column per method (``tokens`` from :func:`gem_jax.analysis.method_tokens`,
    (B, h, w, D) each): top, the first three principal components of the normalised
    tokens as RGB (alike tokens, alike colours); bottom, the clusters at cosine
    ``cos_threshold`` (connected components, as :func:`count_clusters`), titled with
    their count. ``image`` (H, W, 3), if given, is shown first.
    """
    names = list(tokens)
    cols = len(names) + (image is not None)
    fig = Figure(figsize=(2.2 * cols, 4.8), layout="constrained")
    axes = fig.subplots(2, cols, squeeze=False)
    if image is not None:
        axes[0, 0].imshow(image)
        axes[0, 0].set_title("image", fontsize=9)
        axes[1, 0].set_visible(False)
    for c, name in enumerate(names, start=cols - len(names)):
        x = np.asarray(tokens[name][index])
        labels = cluster_labels_np(x.reshape(-1, x.shape[-1]), cos_threshold).reshape(x.shape[:2])
        axes[0, c].imshow(_pca_rgb(x), interpolation="nearest")
        axes[0, c].set_title(name, fontsize=9)
        axes[1, c].imshow(labels % 20, cmap="tab20", vmin=0, vmax=19, interpolation="nearest")
        axes[1, c].set_title(_clusters(labels.max() + 1), fontsize=8)
    for ax in axes.flat:
        ax.set_axis_off()
    return _finish(fig, title or f"Patch tokens of every method: PCA as RGB (top), clusters at cosine "
                                 f"{cos_threshold:g} (bottom)")
