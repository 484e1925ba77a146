"""Overlays, grids, label maps and atomic PNG writing against hand-built cases."""

from __future__ import annotations

import os
import subprocess
import sys

import matplotlib
import numpy as np
import pytest
from matplotlib.figure import Figure
from PIL import Image

from gem_jax import visualize as vis

JET = matplotlib.colormaps["jet"]


def jet(value):
    """matplotlib's own uint8 RGB of jet at ``value``."""
    return np.array(JET(value, bytes=True)[:3], dtype=np.uint8)


def photo(h=12, w=16, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def image_axes(fig):
    """The figure's panels, without a colour bar axis."""
    return [ax for ax in fig.axes if ax.get_label() != "<colorbar>"]


def legend_names(fig):
    assert len(fig.legends) == 1
    return [t.get_text() for t in fig.legends[0].get_texts()]


# ----------------------------------------------------------------------------- colorize / overlay


def test_colorize_jet_ends_equal_matplotlib():
    heat = np.array([[0.0, 1.0], [1.0, 0.0]])
    out = vis.colorize(heat, "jet")
    assert out.dtype == np.uint8 and out.shape == (2, 2, 3)
    np.testing.assert_array_equal(out[0, 0], jet(0.0))
    np.testing.assert_array_equal(out[0, 1], jet(1.0))
    np.testing.assert_array_equal(out[1, 0], jet(1.0))
    assert not np.array_equal(jet(0.0), jet(1.0))


def test_colorize_clips_and_zeroes_nan():
    out = vis.colorize(np.array([[-3.0, 7.0, np.nan, 0.5]]), "viridis")
    ref = matplotlib.colormaps["viridis"]
    np.testing.assert_array_equal(out[0, 0], ref(0.0, bytes=True)[:3])
    np.testing.assert_array_equal(out[0, 1], ref(1.0, bytes=True)[:3])
    np.testing.assert_array_equal(out[0, 2], ref(0.0, bytes=True)[:3])
    np.testing.assert_array_equal(out[0, 3], ref(0.5, bytes=True)[:3])


def test_overlay_alpha_zero_is_the_image_and_one_the_colours():
    image = photo()
    heat = np.random.default_rng(1).random((12, 16))
    np.testing.assert_array_equal(vis.overlay(image, heat, alpha=0.0), image)
    np.testing.assert_array_equal(vis.overlay(image, heat, alpha=1.0), vis.colorize(heat, "jet"))


def test_overlay_binary_heatmap_gives_colormap_end_colours_at_the_right_pixels():
    image = photo(6, 8)
    heat = np.zeros((6, 8))
    heat[2:4, 5:7] = 1.0
    hot = heat == 1.0
    full = vis.overlay(image, heat, alpha=1.0)
    assert (full[hot] == jet(1.0)).all() and (full[~hot] == jet(0.0)).all()

    alpha = 0.25
    blended = vis.overlay(image, heat, alpha=alpha)
    expected = np.where(hot[..., None], jet(1.0), jet(0.0)).astype(float)
    expected = np.rint((1 - alpha) * image + alpha * expected).astype(np.uint8)
    np.testing.assert_array_equal(blended, expected)


def test_overlay_resizes_the_image_to_the_heatmap():
    image = photo(30, 45)
    out = vis.overlay(image, np.zeros((10, 20)), alpha=0.0)
    assert out.shape == (10, 20, 3)
    np.testing.assert_array_equal(out, np.asarray(Image.fromarray(image).resize((20, 10), Image.BICUBIC)))


@pytest.mark.parametrize("alpha", [-0.1, 1.5, float("nan"), "0.5", None])
def test_overlay_rejects_bad_alpha(alpha):
    with pytest.raises(ValueError, match="alpha"):
        vis.overlay(photo(), np.zeros((12, 16)), alpha=alpha)


def test_unknown_cmap_is_named():
    with pytest.raises(ValueError, match="no_such_map"):
        vis.overlay(photo(), np.zeros((12, 16)), cmap="no_such_map")
    with pytest.raises(ValueError, match="'Jet'.*'jet'"):
        vis.colorize(np.zeros((2, 2)), "Jet")


@pytest.mark.parametrize("image", [
    np.zeros((12, 16), np.uint8),
    np.zeros((12, 16, 4), np.uint8),
    np.zeros((12, 16, 3), np.float32),
])
def test_overlay_rejects_bad_images(image):
    with pytest.raises(ValueError, match=r"image must be a uint8 array of shape \(H, W, 3\)"):
        vis.overlay(image, np.zeros((12, 16)))


def test_heatmap_must_be_2d():
    with pytest.raises(ValueError, match=r"heatmap must have shape \(H, W\)"):
        vis.overlay(photo(), np.zeros((1, 12, 16)))


# ----------------------------------------------------------------------------- heatmap grid


def test_heatmap_grid_has_the_image_and_one_titled_panel_per_prompt():
    heatmaps = np.random.default_rng(0).random((3, 8, 8))
    titles = ["cat", "cat's ear", "sofa"]
    fig = vis.heatmap_grid(photo(12, 16), heatmaps, titles)
    assert isinstance(fig, Figure)
    panels = image_axes(fig)
    assert len(panels) == 1 + 3
    assert [ax.get_title() for ax in panels] == ["image", *titles]
    assert all(not ax.axison for ax in panels)
    # the overlays drawn are the overlay() of each heatmap
    np.testing.assert_array_equal(panels[2].images[0].get_array(), vis.overlay(photo(12, 16), heatmaps[1]))
    fig.canvas.draw()  # lays out and renders without error


def test_heatmap_grid_columns():
    fig = vis.heatmap_grid(photo(), np.zeros((5, 4, 4)), list("abcde"), columns=2)
    panels = image_axes(fig)
    assert len(panels) == 6
    shape = panels[0].get_subplotspec().get_gridspec().get_geometry()
    assert shape == (3, 2)


def test_heatmap_grid_rejects_mismatches():
    with pytest.raises(ValueError, match="3 heatmap.*2 title"):
        vis.heatmap_grid(photo(), np.zeros((3, 4, 4)), ["a", "b"])
    with pytest.raises(ValueError, match=r"heatmaps\[0\]"):
        vis.heatmap_grid(photo(), np.zeros((1, 2, 4, 4)), ["a", "b"])
    with pytest.raises(ValueError, match="single string"):
        vis.heatmap_grid(photo(), np.zeros((2, 4, 4)), "ab")
    with pytest.raises(ValueError, match="columns"):
        vis.heatmap_grid(photo(), np.zeros((2, 4, 4)), ["a", "b"], columns=0)


# ----------------------------------------------------------------------------- labels


def test_label_palette_background_black_rows_distinct_and_stable():
    palette = vis.label_palette(40)
    assert palette.shape == (41, 3) and palette.dtype == np.uint8
    np.testing.assert_array_equal(palette[0], [0, 0, 0])
    assert len({tuple(row) for row in palette}) == 41
    np.testing.assert_array_equal(vis.label_palette(5), palette[:6])
    # the PASCAL VOC colours
    np.testing.assert_array_equal(palette[1:4], [[128, 0, 0], [0, 128, 0], [128, 128, 0]])
    np.testing.assert_array_equal(palette[15], [192, 128, 128])  # VOC 'person'
    assert vis.label_palette(0).shape == (1, 3)


def test_colorize_labels_maps_label_k_to_palette_row_k():
    labels = np.array([[0, 1, 2], [3, 3, 0]], dtype=np.int32)
    out = vis.colorize_labels(labels, 3)
    palette = vis.label_palette(3)
    assert out.shape == (2, 3, 3) and out.dtype == np.uint8
    for k in range(4):
        assert (out[labels == k] == palette[k]).all()


def test_colorize_labels_rejects_bad_input():
    with pytest.raises(ValueError, match="2-D"):
        vis.colorize_labels(np.zeros((1, 2, 2), int), 2)
    with pytest.raises(ValueError, match=r"\[0, 2\]"):
        vis.colorize_labels(np.array([[0, 3]]), 2)
    with pytest.raises(ValueError, match="integers"):
        vis.colorize_labels(np.zeros((2, 2)), 2)


def test_label_figure_legend_lists_every_class_and_marks_the_absent_ones():
    labels = np.zeros((10, 14), dtype=np.int32)
    labels[2:5, 2:5] = 1
    labels[6:9, 8:12] = 3
    names = ["cat", "sofa", "floor", "plant"]
    fig = vis.label_figure(photo(20, 28), labels, names)
    assert legend_names(fig) == ["background", "cat", "sofa (not found)", "floor", "plant (not found)"]
    handles = fig.legends[0].legend_handles
    palette = vis.label_palette(4)
    found = [handles[i] for i in (0, 1, 3)]
    np.testing.assert_allclose([h.get_facecolor()[:3] for h in found], palette[[0, 1, 3]] / 255)
    for h, k in ((handles[2], 2), (handles[4], 4)):  # absent: an empty swatch outlined in the class colour
        assert h.get_facecolor()[3] == 0
        np.testing.assert_allclose(h.get_edgecolor()[:3], palette[k] / 255)
    panels = image_axes(fig)
    assert len(panels) == 2
    shown = panels[1].images[0].get_array()
    assert shown.shape == (10, 14, 3)  # the label map's size, the image resized to it
    fig.canvas.draw()

    labels[labels == 0] = 2
    everything = ["cat", "sofa", "floor", "plant (not found)"]
    assert legend_names(vis.label_figure(photo(10, 14), labels, names)) == everything
    labels[0, 0] = 0
    assert legend_names(vis.label_figure(photo(10, 14), labels, names, background=None)) == everything
    assert legend_names(vis.label_figure(photo(10, 14), labels, names, background="other")) == ["other", *everything]
    titled = vis.label_figure(photo(10, 14), labels, names, title="RANDOM weights")
    assert titled._suptitle.get_text() == "RANDOM weights"


def test_label_figure_rejects_bad_input():
    with pytest.raises(ValueError, match="2-D"):
        vis.label_figure(photo(), np.zeros((12,), int), ["cat"])
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        vis.label_figure(photo(), np.full((12, 16), 2), ["cat"])
    with pytest.raises(ValueError, match="uint8"):
        vis.label_figure(photo().astype(float), np.zeros((12, 16), int), ["cat"])


# ----------------------------------------------------------------------------- save_png


def test_save_png_array_round_trips(tmp_path):
    image = photo(9, 13)
    path = vis.save_png(image, tmp_path / "a.png")
    assert path == tmp_path / "a.png"
    with Image.open(path) as im:
        assert im.format == "PNG" and im.size == (13, 9)
        np.testing.assert_array_equal(np.asarray(im), image)
    assert sorted(os.listdir(tmp_path)) == ["a.png"]


def test_save_png_figure(tmp_path):
    fig = vis.heatmap_grid(photo(), np.zeros((2, 4, 4)), ["a", "b"])
    path = vis.save_png(fig, str(tmp_path / "grid.png"))
    with Image.open(path) as im:
        im.load()
        assert im.format == "PNG" and im.width > im.height > 50
    assert sorted(os.listdir(tmp_path)) == ["grid.png"]


def test_save_png_refuses_to_overwrite(tmp_path):
    path = tmp_path / "a.png"
    path.write_bytes(b"keep me")
    with pytest.raises(FileExistsError, match="overwrite=True"):
        vis.save_png(photo(), path)
    assert path.read_bytes() == b"keep me"
    assert sorted(os.listdir(tmp_path)) == ["a.png"]

    vis.save_png(photo(), path, overwrite=True)
    with Image.open(path) as im:
        assert im.size == (16, 12)
    assert sorted(os.listdir(tmp_path)) == ["a.png"]


def test_save_png_refuses_a_file_that_appears_while_writing(tmp_path, monkeypatch):
    path = tmp_path / "a.png"
    real_save = Image.Image.save

    def racing_save(self, fp, *args, **kwargs):
        path.write_bytes(b"theirs")
        return real_save(self, fp, *args, **kwargs)

    monkeypatch.setattr(Image.Image, "save", racing_save)
    with pytest.raises(FileExistsError):
        vis.save_png(photo(), path)
    assert path.read_bytes() == b"theirs"
    assert sorted(os.listdir(tmp_path)) == ["a.png"]


def test_save_png_leaves_nothing_behind_when_writing_fails(tmp_path, monkeypatch):
    def broken_save(self, fp, *args, **kwargs):
        fp.write(b"\x89PNG partial")
        raise OSError("disk full")

    monkeypatch.setattr(Image.Image, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        vis.save_png(photo(), tmp_path / "a.png")
    assert os.listdir(tmp_path) == []

    # an existing file is kept intact when replacing it fails
    (tmp_path / "b.png").write_bytes(b"old")
    with pytest.raises(OSError, match="disk full"):
        vis.save_png(photo(), tmp_path / "b.png", overwrite=True)
    assert (tmp_path / "b.png").read_bytes() == b"old"
    assert os.listdir(tmp_path) == ["b.png"]


def test_save_png_figure_failure_leaves_nothing_behind(tmp_path, monkeypatch):
    fig = vis.label_figure(photo(), np.zeros((12, 16), int), ["cat"])

    def broken(*args, **kwargs):
        raise RuntimeError("render failed")

    monkeypatch.setattr(fig, "savefig", broken)
    with pytest.raises(RuntimeError, match="render failed"):
        vis.save_png(fig, tmp_path / "fig.png")
    assert os.listdir(tmp_path) == []


def test_save_png_rejects_non_images(tmp_path):
    with pytest.raises(ValueError, match="uint8"):
        vis.save_png(np.zeros((4, 4, 3)), tmp_path / "a.png")
    with pytest.raises(TypeError):
        vis.save_png("not an image", tmp_path / "a.png")
    assert os.listdir(tmp_path) == []


def test_import_does_not_pull_in_jax_or_pyplot():
    code = ("import sys, gem_jax.visualize; "
            "print('jax' in sys.modules, 'matplotlib.pyplot' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "False"]
