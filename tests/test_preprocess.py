"""Tests for gem_jax.preprocess: decoding, sizing, normalisation and parity with the GEM demo transform."""

import os
import pathlib

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image, ImageFile

from gem_jax import preprocess as P
from gem_jax.preprocess import ImageError

RED, GREEN, BLUE, WHITE = (255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 255)


@pytest.fixture(autouse=True)
def _strict_truncation(monkeypatch):
    # Another test or library may have flipped this global; our truncation tests need the default.
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", False)


def noise(h, w, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def smooth(h, w):
    """A smooth RGB image that survives JPEG with little error."""
    y, x = np.mgrid[0:h, 0:w]
    return np.stack([x * 255 // max(w - 1, 1), y * 255 // max(h - 1, 1), np.full_like(x, 90)], -1).astype(np.uint8)


def assert_image_error(exc_info, *fragments):
    msg = str(exc_info.value)
    assert "\n" not in msg, msg
    for f in fragments:
        assert str(f) in msg, msg


# --------------------------------------------------------------------------- decoding of files


def test_rgb_png_roundtrip_and_path_types(tmp_path):
    arr = noise(17, 23)
    path = tmp_path / "rgb.png"
    Image.fromarray(arr).save(path)
    for src in (path, str(path), Image.open(path), arr):
        out = P.load_image(src)
        assert out.dtype == np.uint8 and out.shape == (17, 23, 3) and out.flags.c_contiguous
        np.testing.assert_array_equal(out, arr)


def test_load_image_returns_a_copy_of_arrays():
    arr = noise(4, 5)
    out = P.load_image(arr)
    out[:] = 0
    assert arr.any()


def test_grayscale_L(tmp_path):
    g = np.arange(256, dtype=np.uint8).reshape(16, 16)
    Image.fromarray(g).save(tmp_path / "g.png")
    out = P.load_image(tmp_path / "g.png")
    assert out.shape == (16, 16, 3)
    for c in range(3):
        np.testing.assert_array_equal(out[..., c], g)


@pytest.mark.parametrize("fmt", ["png", "tiff"])
def test_16bit_grayscale_is_scaled_not_clipped(tmp_path, fmt):
    v = np.array([[0, 257, 1000, 32768], [257 * 100, 65280, 65534, 65535]], np.uint16)
    path = tmp_path / f"g16.{fmt}"
    Image.fromarray(v).save(path)
    assert Image.open(path).mode.startswith("I")
    out = P.load_image(path)
    expected = np.array([[0, 1, 4, 128], [100, 254, 255, 255]], np.uint8)
    np.testing.assert_array_equal(out[..., 0], expected)
    np.testing.assert_array_equal(out[..., 2], expected)


def test_16bit_pgm_mode_I(tmp_path):
    path = tmp_path / "g.pgm"
    path.write_bytes(b"P5 3 1 65535\n" + np.array([0, 32768, 65535], ">u2").tobytes())
    assert Image.open(path).mode == "I"
    np.testing.assert_array_equal(P.load_image(path)[0, :, 1], [0, 128, 255])


def test_mode_I_outside_16bit_raises(tmp_path):
    path = tmp_path / "i32.tiff"
    Image.fromarray(np.array([[0, 70000]], np.int32)).save(path)
    with pytest.raises(ImageError) as e:
        P.load_image(path)
    assert_image_error(e, path, "16-bit")


def test_rgba_composited_over_white(tmp_path):
    rgba = np.zeros((2, 2, 4), np.uint8)
    rgba[0, 0] = (255, 0, 0, 255)  # opaque red
    rgba[0, 1] = (255, 0, 0, 0)  # fully transparent -> white
    rgba[1, 0] = (0, 0, 0, 128)  # half black -> mid grey
    rgba[1, 1] = (0, 0, 255, 51)  # 20% blue
    path = tmp_path / "rgba.png"
    Image.fromarray(rgba).save(path)
    expected = np.array([[RED, WHITE], [(127, 127, 127), (204, 204, 255)]], np.uint8)
    np.testing.assert_array_equal(P.load_image(path), expected)
    np.testing.assert_array_equal(P.load_image(rgba), expected)  # same rule for arrays
    np.testing.assert_array_equal(P.load_image(rgba.astype(np.float32) / 255), expected)


def test_la_composited_over_white(tmp_path):
    la = np.array([[[0, 255], [0, 0]], [[0, 128], [200, 255]]], np.uint8)
    path = tmp_path / "la.png"
    Image.frombytes("LA", (2, 2), la.tobytes()).save(path)
    assert Image.open(path).mode == "LA"
    out = P.load_image(path)
    np.testing.assert_array_equal(out[..., 0], [[0, 255], [127, 200]])


def test_palette_with_transparency(tmp_path):
    im = Image.new("P", (4, 2), 0)
    im.putpalette([*RED, *GREEN, *BLUE] + [0] * (256 - 3) * 3)
    im.putpixel((1, 0), 1)
    im.putpixel((2, 1), 2)
    path = tmp_path / "p.png"
    im.save(path, transparency=1)
    reread = Image.open(path)
    assert reread.mode == "P" and "transparency" in reread.info
    out = P.load_image(path)
    assert tuple(out[0, 0]) == RED
    assert tuple(out[0, 1]) == WHITE  # the transparent index
    assert tuple(out[1, 2]) == BLUE


def test_palette_without_transparency(tmp_path):
    im = Image.new("P", (3, 1), 0)
    im.putpalette([*RED, *GREEN, *BLUE] + [0] * (256 - 3) * 3)
    im.putpixel((2, 0), 2)
    im.save(tmp_path / "p.bmp")
    np.testing.assert_array_equal(P.load_image(tmp_path / "p.bmp")[0], [RED, RED, BLUE])


def test_rgb_png_with_colour_key_transparency(tmp_path):
    arr = np.array([[RED, GREEN]], np.uint8)
    Image.fromarray(arr).save(tmp_path / "key.png", transparency=GREEN)
    np.testing.assert_array_equal(P.load_image(tmp_path / "key.png")[0], [RED, WHITE])


def test_cmyk_jpeg(tmp_path):
    path = tmp_path / "cmyk.jpg"
    im = Image.new("CMYK", (16, 16), (255, 0, 0, 0))  # pure cyan
    im.paste((0, 0, 0, 0), (0, 8, 16, 16))  # bottom half white
    im.save(path, quality=95)
    assert Image.open(path).mode == "CMYK"
    out = P.load_image(path).astype(int)
    assert out.shape == (16, 16, 3)
    assert np.abs(out[2, 2] - (0, 255, 255)).max() <= 6
    assert np.abs(out[13, 13] - WHITE).max() <= 6


def test_one_bit(tmp_path):
    im = Image.new("1", (5, 3), 0)
    im.putpixel((4, 2), 1)
    im.save(tmp_path / "b.png")
    out = P.load_image(tmp_path / "b.png")
    assert out.shape == (3, 5, 3)
    assert out.sum() == 3 * 255 and tuple(out[2, 4]) == WHITE


def test_exif_orientation_applied(tmp_path):
    arr = np.zeros((20, 40, 3), np.uint8)
    arr[:] = BLUE
    arr[:8, :8] = RED  # stored top-left corner
    exif = Image.Exif()
    exif[274] = 6  # "rotate 90 clockwise to display"
    path = tmp_path / "rot.jpg"
    Image.fromarray(arr).save(path, exif=exif, quality=95)
    assert Image.open(path).getexif().get(274) == 6
    out = P.load_image(path).astype(int)
    assert out.shape == (40, 20, 3)  # portrait after rotation
    assert np.abs(out[2, -3] - RED).max() < 40  # stored top-left -> displayed top-right
    assert np.abs(out[2, 2] - BLUE).max() < 40
    assert np.abs(out[-3, -3] - BLUE).max() < 40
    # a PIL image opened by the user gets the same treatment
    np.testing.assert_array_equal(P.load_image(Image.open(path)), out)


@pytest.mark.parametrize("fmt", ["gif", "tiff"])
def test_multiframe_first_frame(tmp_path, fmt):
    frames = [Image.new("RGB", (6, 4), c) for c in (RED, GREEN, BLUE)]
    path = tmp_path / f"anim.{fmt}"
    frames[0].save(path, save_all=True, append_images=frames[1:])
    assert getattr(Image.open(path), "n_frames", 1) == 3
    out = P.load_image(path)
    assert out.shape == (4, 6, 3)
    assert np.all(out == np.array(RED, np.uint8))


def test_webp_and_bmp(tmp_path):
    arr = noise(9, 7)
    Image.fromarray(arr).save(tmp_path / "a.bmp")
    np.testing.assert_array_equal(P.load_image(tmp_path / "a.bmp"), arr)
    try:
        Image.fromarray(arr).save(tmp_path / "a.webp", lossless=True)
    except (OSError, KeyError):
        pytest.skip("Pillow built without WebP")
    np.testing.assert_array_equal(P.load_image(tmp_path / "a.webp"), arr)


# --------------------------------------------------------------------------- file errors


def test_missing_file(tmp_path):
    with pytest.raises(ImageError) as e:
        P.load_image(tmp_path / "missing.png")
    assert_image_error(e, "missing.png", "not found")


def test_directory_as_image(tmp_path):
    with pytest.raises(ImageError) as e:
        P.load_image(tmp_path)
    assert_image_error(e, tmp_path, "directory")


def test_text_file_named_png(tmp_path):
    path = tmp_path / "notes.png"
    path.write_text("this is not an image\nat all\n")
    with pytest.raises(ImageError) as e:
        P.load_image(path)
    assert_image_error(e, path)


def test_empty_file(tmp_path):
    path = tmp_path / "empty.jpg"
    path.write_bytes(b"")
    with pytest.raises(ImageError) as e:
        P.load_image(path)
    assert_image_error(e, path)


@pytest.mark.parametrize("fmt,keep", [("jpeg", 0.5), ("png", 0.5), ("png", 0.02), ("jpeg", 0.01)])
def test_truncated_files(tmp_path, fmt, keep):
    full = tmp_path / f"full.{fmt}"
    Image.fromarray(noise(64, 64)).save(full, format=fmt)
    data = full.read_bytes()
    cut = tmp_path / f"cut.{fmt}"
    cut.write_bytes(data[: max(8, int(len(data) * keep))])
    with pytest.raises(ImageError) as e:
        P.load_image(cut)
    assert_image_error(e, cut)
    with pytest.raises(ImageError):
        P.prepare(cut, size=32)


def test_truncated_pil_image_object(tmp_path):
    full = tmp_path / "full.png"
    Image.fromarray(noise(64, 64)).save(full)
    cut = tmp_path / "cut.png"
    cut.write_bytes(full.read_bytes()[:3000])
    im = Image.open(cut)  # opening succeeds; decoding must fail cleanly
    with pytest.raises(ImageError) as e:
        P.load_image(im)
    assert_image_error(e, "PIL image")


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root ignores file permissions")
def test_unreadable_file(tmp_path):
    path = tmp_path / "locked.png"
    Image.fromarray(noise(4, 4)).save(path)
    path.chmod(0)
    with pytest.raises(ImageError) as e:
        P.load_image(path)
    assert_image_error(e, path)


def test_empty_pil_image():
    with pytest.raises(ImageError) as e:
        P.load_image(Image.new("RGB", (0, 5)))
    assert_image_error(e, "empty")


# --------------------------------------------------------------------------- arrays


def test_array_gray_and_single_channel():
    g = np.array([[0, 10], [200, 255]], np.uint8)
    for arr in (g, g[..., None]):
        out = P.load_image(arr)
        assert out.shape == (2, 2, 3)
        np.testing.assert_array_equal(out[..., 1], g)


def test_float_array_in_unit_range_rounds():
    arr = np.array([[[0.0, 0.5, 1.0]]], np.float64)
    np.testing.assert_array_equal(P.load_image(arr), [[[0, 128, 255]]])
    np.testing.assert_array_equal(P.load_image(arr.astype(np.float16)), [[[0, 128, 255]]])
    u8 = noise(5, 6)
    np.testing.assert_array_equal(P.load_image(u8 / 255.0), u8)
    np.testing.assert_array_equal(P.load_image(u8.astype(np.float32) / 255), u8)


def test_integer_arrays_in_byte_range_accepted():
    arr = noise(3, 3).astype(np.int64)
    np.testing.assert_array_equal(P.load_image(arr), arr)
    with pytest.raises(ImageError, match=r"\[0, 255\]"):
        P.load_image(np.full((3, 3), 1000, np.uint16))


@pytest.mark.parametrize(
    "arr,fragment",
    [
        (np.full((8, 8, 3), 7.5, np.float32), "scale it to [0, 1] or pass uint8"),
        (np.full((8, 8, 3), -0.1, np.float32), "[0, 1]"),
        (np.full((4, 4), np.inf), "[0, 1]"),
        (np.full((4, 4, 3), np.nan, np.float32), "NaN"),
        (np.zeros((8, 8, 5), np.uint8), "channels"),
        (np.zeros((8, 8, 2), np.uint8), "channels"),
        (np.zeros((3, 16, 16), np.uint8), "channels-first"),
        (np.zeros((8,), np.uint8), "shape"),
        (np.zeros((2, 2, 2, 2, 3), np.uint8), "shape"),
        (np.zeros((4, 4, 3), bool), "boolean"),
        (np.zeros((4, 4, 3), np.complex64), "dtype"),
        (np.empty((4, 4, 3), object), "dtype"),
        (np.zeros((0, 4, 3), np.uint8), "empty"),
        (np.zeros((4, 0), np.float32), "empty"),
    ],
)
def test_bad_arrays(arr, fragment):
    with pytest.raises(ImageError) as e:
        P.load_image(arr)
    assert_image_error(e, fragment)


@pytest.mark.parametrize("src", [None, 3, 2.5, b"/tmp/x.png", [[0, 1], [2, 3]], {"a": 1}])
def test_unsupported_types(src):
    with pytest.raises(ImageError) as e:
        P.load_image(src)
    assert_image_error(e, "unsupported image type")


def test_image_error_is_value_error():
    assert issubclass(ImageError, ValueError)


# --------------------------------------------------------------------------- as_image_list


def test_as_image_list_forms(tmp_path):
    a, b = noise(4, 5, 1), noise(6, 3, 2)
    path = tmp_path / "b.png"
    Image.fromarray(b).save(path)
    assert [x.shape for x in P.as_image_list(a)] == [(4, 5, 3)]
    assert [x.shape for x in P.as_image_list(path)] == [(6, 3, 3)]
    assert [x.shape for x in P.as_image_list(str(path))] == [(6, 3, 3)]
    assert [x.shape for x in P.as_image_list(Image.fromarray(a))] == [(4, 5, 3)]
    got = P.as_image_list([a, path, Image.fromarray(a)])
    np.testing.assert_array_equal(got[0], a)
    np.testing.assert_array_equal(got[1], b)
    np.testing.assert_array_equal(got[2], a)
    assert len(P.as_image_list((a, a))) == 2
    batch = np.stack([a, a[::-1]])
    got = P.as_image_list(batch)
    assert len(got) == 2
    np.testing.assert_array_equal(got[1], a[::-1])
    got = P.as_image_list(batch.astype(np.float32) / 255)
    np.testing.assert_array_equal(got[0], a)


def test_as_image_list_errors_name_the_index(tmp_path):
    good = noise(4, 4)
    with pytest.raises(ImageError) as e:
        P.as_image_list([good, good, tmp_path / "nope.jpg"])
    assert_image_error(e, "image 2", "nope.jpg")
    with pytest.raises(ImageError) as e:
        P.as_image_list([good, np.full((4, 4, 3), 3.0)])
    assert_image_error(e, "image 1", "[0, 1]")
    batch = np.zeros((3, 4, 4, 3), np.float32)
    batch[2, 0, 0, 0] = np.nan
    with pytest.raises(ImageError) as e:
        P.as_image_list(batch)
    assert_image_error(e, "image 2", "NaN")
    with pytest.raises(ImageError) as e:
        P.as_image_list([good, np.stack([good, good])])
    assert_image_error(e, "image 1", "batch")
    with pytest.raises(ImageError, match="empty"):
        P.as_image_list([])
    with pytest.raises(ImageError, match="empty"):
        P.as_image_list(np.zeros((0, 4, 4, 3), np.uint8))
    with pytest.raises(ImageError) as e:
        P.as_image_list([good, 7])
    assert_image_error(e, "image 1", "int")


# --------------------------------------------------------------------------- target_size


@pytest.mark.parametrize(
    "hw,kwargs,expected",
    [
        ((100, 200), {}, (448, 448)),
        ((100, 200), {"size": 224}, (224, 224)),
        ((100, 200), {"size": 230}, (224, 224)),
        ((100, 200), {"size": 232}, (240, 240)),  # halves round up
        ((100, 200), {"size": (320, 480)}, (320, 480)),
        ((100, 200), {"size": [100, 5]}, (96, 16)),
        ((100, 200), {"size": np.int64(64)}, (64, 64)),
        ((300, 450), {"short_side": 448}, (448, 672)),
        ((450, 300), {"short_side": 448}, (672, 448)),
        ((500, 500), {"short_side": 224}, (224, 224)),
        ((480, 640), {"short_side": 224, "patch_size": 14}, (224, 294)),  # 298.67 -> 299 -> 294
        ((3, 4), {"short_side": 2, "patch_size": 1}, (2, 3)),  # 2.67 rounds to 3, not truncated to 2
        ((10, 25), {"short_side": 1, "patch_size": 1}, (1, 3)),  # 2.5 rounds up
        ((10, 10000), {"short_side": 1}, (16, 1008)),
        ((100, 200), {"size": 3}, (16, 16)),  # at least one patch
        ((100, 200), {"size": 448, "patch_size": 14}, (448, 448)),
    ],
)
def test_target_size_examples(hw, kwargs, expected):
    assert P.target_size(*hw, **kwargs) == expected


@pytest.mark.parametrize(
    "args,kwargs",
    [
        ((100, 100), {"size": 0}),
        ((100, 100), {"size": -4}),
        ((100, 100), {"size": 224.0}),
        ((100, 100), {"size": True}),
        ((100, 100), {"size": "224"}),
        ((100, 100), {"size": (224,)}),
        ((100, 100), {"size": (224, 224, 3)}),
        ((100, 100), {"size": (224, 0)}),
        ((100, 100), {"size": (224.5, 224)}),
        ((100, 100), {"size": 224, "short_side": 224}),
        ((100, 100), {"short_side": 0}),
        ((100, 100), {"short_side": 3.5}),
        ((100, 100), {"size": 224, "patch_size": 0}),
        ((0, 100), {}),
        ((100, -1), {}),
        ((100.0, 100), {}),
    ],
)
def test_target_size_rejects_bad_values(args, kwargs):
    with pytest.raises(ValueError) as e:
        P.target_size(*args, **kwargs)
    assert "\n" not in str(e.value) and str(e.value)


sides = st.integers(1, 5000)
patches = st.sampled_from([1, 7, 8, 14, 16, 32])


@settings(max_examples=300, deadline=None)
@given(h=sides, w=sides, s=st.integers(1, 2000), patch=patches)
def test_target_size_short_side_properties(h, w, s, patch):
    H, W = P.target_size(h, w, short_side=s, patch_size=patch)
    assert H % patch == 0 and W % patch == 0
    assert H >= patch and W >= patch
    assert (H <= W) if h <= w else (H >= W)  # orientation kept
    short, long_ = (H, W) if h <= w else (W, H)
    ideal_long = s * max(h, w) / min(h, w)
    # each side is within half a patch (+ the 0.5 of integer rounding) of its ideal, unless clamped to one patch
    assert abs(short - max(patch, s)) <= patch / 2
    assert abs(long_ - max(patch, ideal_long)) <= patch / 2 + 0.5
    if patch == 1:  # no snapping: the long side is the ideal rounded to the nearest int
        assert abs(long_ - ideal_long) <= 0.5
    # aspect approximately kept: exact when nothing needed snapping
    if s % patch == 0 and (s * max(h, w)) % (min(h, w) * patch) == 0:
        assert long_ * min(h, w) == s * max(h, w)


@settings(max_examples=300, deadline=None)
@given(h=sides, w=sides, size=st.one_of(st.integers(1, 3000), st.tuples(sides, sides)), patch=patches)
def test_target_size_size_properties(h, w, size, patch):
    H, W = P.target_size(h, w, size=size, patch_size=patch)
    want = (size, size) if isinstance(size, int) else size
    for got, ideal in zip((H, W), want):
        assert got % patch == 0 and got >= patch
        assert abs(got - max(patch, ideal)) <= patch / 2
        if ideal % patch == 0:
            assert got == ideal


# --------------------------------------------------------------------------- resize / normalize / prepare


def test_resize_matches_pil_bicubic():
    arr = noise(30, 50)
    out = P.resize(arr, (48, 64))
    assert out.dtype == np.uint8 and out.shape == (48, 64, 3)
    np.testing.assert_array_equal(out, np.asarray(Image.fromarray(arr).resize((64, 48), Image.BICUBIC)))
    np.testing.assert_array_equal(P.resize(arr, (30, 50)), arr)
    with pytest.raises(ValueError):
        P.resize(arr.astype(np.float32), (10, 10))
    with pytest.raises(ValueError):
        P.resize(arr, (10, 0))
    with pytest.raises(ValueError):
        P.resize(arr, 10)


def test_normalize_values_and_inverse():
    arr = np.arange(256, dtype=np.uint8).repeat(3).reshape(16, 16, 3)
    x = P.normalize(arr)
    assert x.dtype == np.float32 and x.shape == arr.shape
    want = (arr / 255.0 - np.array(P.OPENAI_MEAN)) / np.array(P.OPENAI_STD)
    np.testing.assert_allclose(x, want, atol=1e-6)
    np.testing.assert_array_equal(P.denormalize(x), arr)
    np.testing.assert_array_equal(P.denormalize(x.astype(np.float64)[None]), arr[None])  # batches too
    assert P.denormalize(np.full((1, 1, 3), 100.0))[0, 0].tolist() == [255, 255, 255]  # clipped
    assert P.denormalize(np.full((1, 1, 3), -100.0))[0, 0].tolist() == [0, 0, 0]
    with pytest.raises(ValueError):
        P.normalize(arr.astype(np.float32))
    with pytest.raises(ValueError):
        P.denormalize(np.zeros((4, 4, 2)))


def test_prepare_shapes_and_sources_agree(tmp_path):
    arr = noise(30, 45)
    path = tmp_path / "x.png"
    Image.fromarray(arr).save(path)
    a = P.prepare(path, size=64)
    assert a.dtype == np.float32 and a.shape == (64, 64, 3)
    np.testing.assert_array_equal(a, P.prepare(arr, size=64))
    np.testing.assert_array_equal(a, P.prepare(Image.open(path), size=64))
    assert P.prepare(arr, short_side=32).shape == (32, 48, 3)
    assert P.prepare(arr, size=(40, 70), patch_size=8).shape == (40, 72, 3)
    assert P.prepare(arr).shape == (448, 448, 3)
    with pytest.raises(ValueError):
        P.prepare(path, size=32, short_side=32)
    with pytest.raises(ImageError, match="gone.png"):
        P.prepare(tmp_path / "gone.png")


# --------------------------------------------------------------------------- parity with the reference transform


@pytest.fixture(scope="module")
def tv():
    return pytest.importorskip("torchvision.transforms")


def _reference_gem_transform(size):
    pytest.importorskip("torchvision")
    gem = pytest.importorskip("gem")
    return gem.get_gem_img_transform(img_size=size)


@pytest.mark.filterwarnings("ignore::FutureWarning")
@pytest.mark.parametrize("hw,fmt", [((300, 450), "png"), ((517, 389), "jpg"), ((448, 448), "png"), ((97, 61), "png")])
def test_parity_with_gem_demo_transform(tmp_path, hw, fmt):
    transform = _reference_gem_transform((448, 448))
    path = tmp_path / f"img.{fmt}"
    Image.fromarray(noise(*hw, seed=hw[0])).save(path)
    ref = transform(Image.open(path).convert("RGB")).numpy().transpose(1, 2, 0)
    ours = P.prepare(path, size=448)
    assert ours.shape == ref.shape == (448, 448, 3)
    assert np.abs(ours - ref).max() <= 1e-6


@pytest.mark.parametrize("hw", [(300, 450), (450, 300), (224, 336)])
def test_parity_short_side_with_torchvision_resize(tmp_path, tv, hw):
    transform = tv.Compose([
        tv.Resize(448, interpolation=tv.InterpolationMode.BICUBIC),
        tv.ToTensor(),
        tv.Normalize(P.OPENAI_MEAN, P.OPENAI_STD),
    ])
    path = tmp_path / "img.png"
    Image.fromarray(smooth(*hw)).save(path)
    ref = transform(Image.open(path).convert("RGB")).numpy().transpose(1, 2, 0)
    ours = P.prepare(path, short_side=448)
    expected_hw = (448, 672) if hw[0] < hw[1] else (672, 448)
    assert ours.shape[:2] == ref.shape[:2] == expected_hw
    assert np.abs(ours - ref).max() <= 1e-6


# --------------------------------------------------------------------------- expand_image_paths


def _touch_images(folder: pathlib.Path, names):
    folder.mkdir(parents=True, exist_ok=True)
    for n in names:
        (folder / n).write_bytes(b"x")


def test_expand_directory_sorted_non_recursive(tmp_path):
    d = tmp_path / "imgs"
    _touch_images(d, ["b.png", "a.JPG", "c.webp", "notes.txt", "z.tiff"])
    _touch_images(d / "sub", ["deep.png"])
    (d / "dir.png").mkdir()
    assert P.expand_image_paths([str(d)]) == [d / "a.JPG", d / "b.png", d / "c.webp", d / "z.tiff"]


def test_expand_files_globs_and_order(tmp_path):
    d = tmp_path / "imgs"
    _touch_images(d, ["b.png", "a.png", "c.jpg", "readme.txt"])
    odd = tmp_path / "photo.raw"
    odd.write_bytes(b"x")
    got = P.expand_image_paths([str(odd), str(d / "*.png"), str(d / "*")])
    assert got == [odd, d / "a.png", d / "b.png", d / "c.jpg"]  # a file matched twice is kept once, first place
    assert P.expand_image_paths([]) == []
    assert P.expand_image_paths(d / "c.jpg") == [d / "c.jpg"]  # a single path is not split into characters
    _touch_images(d / "sub", ["deep.png"])
    assert d / "sub" / "deep.png" in P.expand_image_paths([str(d / "**" / "*.png")])


@pytest.mark.parametrize("kind", ["missing", "empty_dir", "no_match", "only_text"])
def test_expand_errors(tmp_path, kind):
    d = tmp_path / "d"
    d.mkdir()
    item = {
        "missing": str(tmp_path / "missing.png"),
        "empty_dir": str(d),
        "no_match": str(tmp_path / "*.png"),
        "only_text": str(d),
    }[kind]
    if kind == "only_text":
        (d / "a.txt").write_text("x")
    with pytest.raises(ImageError) as e:
        P.expand_image_paths([item])
    assert_image_error(e, item)


def test_module_is_numpy_only():
    src = pathlib.Path(P.__file__).read_text()
    assert "import jax" not in src and "import torch" not in src
