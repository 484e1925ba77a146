"""Synthetic captioned scenes with exact object masks: the data the toy CLIP is trained and judged on.

A scene is a textured background with one to three flat-coloured objects painted over it
in order (later objects occlude earlier ones), and a caption naming every object and the
background: ``"a red circle and a blue square on grass"``. Every scene is a pure function
of its seed (a NumPy ``Generator``), so the held-out scenes of the model card are named by
their seeds.

Vocabulary (:data:`BACKGROUNDS`, :data:`COLOURS`, :data:`SHAPES`):

- backgrounds, each a procedural texture with its own colour jitter: ``grass`` (green
  with vertical blades), ``sand`` (beige speckle), ``water`` (blue with horizontal waves),
  ``brick`` (red-brown courses with grey mortar), ``wood`` (brown grain);
- colours, flat fills with a little brightness jitter and pixel noise: ``red``, ``green``,
  ``blue``, ``yellow``, ``purple``, ``white``;
- shapes, each turned by a random angle: ``circle``, ``square``, ``triangle``, ``star``,
  ``cross``.

Sizes: at the default 64 x 64, an object's outer radius is 7 to 14 pixels (the scene
size times 0.11 to 0.22), its centre inside the picture by at least its radius less
two pixels. Occlusion: objects are painted in their order; each object's mask is its
*visible* pixels. A layout is kept only if every object keeps at least half of its own
area visible; otherwise the positions are drawn again (the same generator, so still
deterministic). No two objects of a scene share both colour and shape, so every phrase
names one object.

Masks are exact: a pixel belongs to an object when its centre lies inside the shape,
and the object's colour is painted on exactly those pixels (no anti-aliasing).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Sequence

import numpy as np

#: Background names and their base colours (RGB), in label order.
BACKGROUNDS = ("grass", "sand", "water", "brick", "wood")
#: Object colour names and their RGB fills, in label order.
COLOURS = {
    "red": (215, 35, 35),
    "green": (60, 215, 70),
    "blue": (40, 70, 235),
    "yellow": (245, 225, 40),
    "purple": (150, 55, 205),
    "white": (245, 245, 245),
}
#: Shape names, in label order.
SHAPES = ("circle", "square", "triangle", "star", "cross")
#: Every object phrase, colour-major: ``"red circle"``, ``"red square"``, ...
PHRASES = tuple(f"{c} {s}" for c in COLOURS for s in SHAPES)

#: Default scene side in pixels.
SIZE = 64
#: Fewest and most objects in a scene.
MIN_OBJECTS, MAX_OBJECTS = 1, 3
#: Outer radius of an object, as a fraction of the scene side.
RADIUS_RANGE = (0.11, 0.22)
#: Least fraction of an object's own area that must stay visible under the later ones.
MIN_VISIBLE = 0.5


@dataclasses.dataclass(frozen=True, eq=False)
class Scene:
    """One scene.

    Attributes:
      image: (H, W, 3) uint8 RGB.
      objects: ``(phrase, mask)`` pairs in painting order; ``mask`` is the (H, W) bool
        map of the object's visible pixels.
      background: the background's name (one of :data:`BACKGROUNDS`).
      caption: every object and the background, ``"a red circle and a blue square on grass"``.
      seed: the seed it was made from.
    """

    image: np.ndarray
    objects: list[tuple[str, np.ndarray]]
    background: str
    caption: str
    seed: int | None = None

    @property
    def phrases(self) -> list[str]:
        """The object phrases, in painting order."""
        return [p for p, _ in self.objects]

    def label_map(self) -> np.ndarray:
        """(H, W) int32 class indices into :func:`class_names`: the background's index where no
        object is visible, else the visible object's."""
        out = np.full(self.image.shape[:2], BACKGROUNDS.index(self.background), np.int32)
        for phrase, mask in self.objects:
            out[mask] = len(BACKGROUNDS) + PHRASES.index(phrase)
        return out


def class_names() -> tuple[str, ...]:
    """Every name a scene's pixels can carry: the backgrounds, then the object phrases."""
    return BACKGROUNDS + PHRASES


def caption(phrases: Sequence[str], background: str | None) -> str:
    """``"a red circle and a blue square on grass"``; without ``background``, the objects only."""
    parts = [f"a {p}" for p in phrases]
    text = parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]
    if background is not None:
        text += f" on {background}"
    return text


# ----------------------------------------------------------------------------- shapes


def _inside(shape: str, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Whether points (u, v), in units of the outer radius and in the shape's own frame
    (v pointing down), are inside ``shape``."""
    if shape == "circle":
        return u * u + v * v <= 1.0
    if shape == "square":
        s = 0.8  # half side: corners at radius 1.13, area close to the circle's
        return (np.abs(u) <= s) & (np.abs(v) <= s)
    if shape == "triangle":
        # Upright equilateral triangle inscribed in the unit circle, scaled up a little.
        r = 1.1
        y = v / r
        x = u / r
        return (y <= 0.5) & (np.sqrt(3.0) * x - y <= 1.0) & (-np.sqrt(3.0) * x - y <= 1.0)
    if shape == "star":
        # Five points at radius 1 (the first straight up), valleys at radius 0.45 between
        # them, straight edges: inside when the radius is below the edge at that angle.
        a = np.pi / 5
        phi = np.abs(np.mod(np.arctan2(u, -v) + a, 2 * a) - a)  # angle from the nearest point
        dx, dy = 0.45 * np.cos(a) - 1.0, 0.45 * np.sin(a)  # from the point to the valley
        bound = dy / (np.cos(phi) * dy - np.sin(phi) * dx)
        return np.sqrt(u * u + v * v) <= 1.1 * bound
    if shape == "cross":
        arm = 0.36
        return ((np.abs(u) <= arm) & (np.abs(v) <= 0.95)) | ((np.abs(v) <= arm) & (np.abs(u) <= 0.95))
    raise ValueError(f"unknown shape {shape!r}")


# ----------------------------------------------------------------------------- textures


@functools.lru_cache(maxsize=64)
def _upsample_matrix(cells: int, size: int) -> np.ndarray:
    """(size, cells + 1) linear interpolation of cell-corner values onto pixel centres."""
    pos = (np.arange(size) + 0.5) / size * cells
    lo = np.minimum(np.floor(pos).astype(int), cells - 1)
    t = pos - lo
    m = np.zeros((size, cells + 1), np.float32)
    m[np.arange(size), lo] = 1 - t
    m[np.arange(size), lo + 1] = t
    return m


def _smooth_noise(rng: np.random.Generator, size: int, rows: int, cols: int) -> np.ndarray:
    """(size, size) value noise in [-1, 1]: random values on a (rows + 1) x (cols + 1) lattice,
    interpolated linearly."""
    lattice = rng.uniform(-1.0, 1.0, (rows + 1, cols + 1)).astype(np.float32)
    return _upsample_matrix(rows, size) @ lattice @ _upsample_matrix(cols, size).T


def _texture(name: str, rng: np.random.Generator, size: int) -> np.ndarray:
    """(size, size, 3) float32 RGB of the background ``name``, before clipping."""
    y, x = np.mgrid[0:size, 0:size].astype(np.float32)
    scale = size / SIZE  # texture periods are set for 64 pixels
    tint = rng.uniform(0.85, 1.1) * (1.0 + rng.uniform(-0.06, 0.06, 3))
    fine = rng.normal(0.0, 1.0, (size, size)).astype(np.float32)
    if name == "grass":
        base = np.array([70, 140, 50], np.float32)
        blades = _smooth_noise(rng, size, max(2, round(3 * scale)), max(8, round(40 * scale)))
        light = 28 * blades + 10 * fine
        img = base + light[..., None] * np.array([0.8, 1.0, 0.5], np.float32)
    elif name == "sand":
        base = np.array([214, 190, 138], np.float32)
        dunes = _smooth_noise(rng, size, 4, 4)
        light = 12 * dunes + 16 * fine
        img = base + light[..., None]
    elif name == "water":
        base = np.array([45, 100, 170], np.float32)
        period = rng.uniform(5.0, 9.0) * scale
        wobble = rng.uniform(12.0, 24.0) * scale
        phase = rng.uniform(0, 2 * np.pi, 2)
        waves = np.sin(2 * np.pi * (y + 2.0 * scale * np.sin(2 * np.pi * x / wobble + phase[0])) / period + phase[1])
        light = 22 * waves + 5 * fine
        img = base + light[..., None] * np.array([0.6, 0.9, 1.0], np.float32)
    elif name == "brick":
        base = np.array([158, 72, 52], np.float32)
        course = max(3, int(round(rng.uniform(6.0, 9.0) * scale)))
        length = 2 * course + int(rng.integers(0, course))
        oy, ox = rng.integers(0, course), rng.integers(0, length)
        row = (y.astype(int) + oy) // course
        shifted = x.astype(int) + ox + (row % 2) * (length // 2)
        col = shifted // length
        mortar = ((y.astype(int) + oy) % course == 0) | (shifted % length == 0)
        shade = rng.uniform(-18, 18, (row.max() + 1, col.max() + 1)).astype(np.float32)
        img = base + (shade[row, col] + 6 * fine)[..., None]
        img = np.where(mortar[..., None], np.array([185, 180, 170], np.float32) + 6 * fine[..., None], img)
    elif name == "wood":
        base = np.array([140, 92, 50], np.float32)
        angle = rng.uniform(-0.3, 0.3) + (np.pi / 2 if rng.random() < 0.5 else 0.0)
        along = x * np.cos(angle) + y * np.sin(angle)
        warp = 3.0 * _smooth_noise(rng, size, 3, 3)
        period = rng.uniform(4.0, 7.0) * scale
        grain = np.sin(2 * np.pi * along / period + warp + rng.uniform(0, 2 * np.pi))
        light = 20 * grain + 6 * fine
        img = base + light[..., None] * np.array([1.0, 0.8, 0.6], np.float32)
    else:
        raise ValueError(f"unknown background {name!r}")
    return img * tint


# ----------------------------------------------------------------------------- scenes


def _layout(rng: np.random.Generator, shapes: Sequence[str], size: int):
    """Visible masks of ``shapes`` painted in order, or None if some object is hidden too much."""
    full = []
    for shape in shapes:
        r = rng.uniform(*RADIUS_RANGE) * size
        cy, cx = rng.uniform(r - 2, size - r + 2, 2)
        turn = rng.uniform(0, 2 * np.pi)
        # Every shape lies within 1.2 radii of its centre: test only that box.
        y0, y1 = max(int(cy - 1.2 * r), 0), min(int(cy + 1.2 * r) + 2, size)
        x0, x1 = max(int(cx - 1.2 * r), 0), min(int(cx + 1.2 * r) + 2, size)
        yy, xx = np.mgrid[y0:y1, x0:x1].astype(np.float32) + 0.5
        dy, dx = (yy - cy) / r, (xx - cx) / r
        c, s = np.cos(turn), np.sin(turn)
        u, v = c * dx + s * dy, -s * dx + c * dy
        mask = np.zeros((size, size), bool)
        mask[y0:y1, x0:x1] = _inside(shape, u, v)
        full.append(mask)
    visible = []
    covered = np.zeros((size, size), bool)
    for mask in reversed(full):
        vis = mask & ~covered
        if vis.sum() < max(MIN_VISIBLE * mask.sum(), 4):
            return None
        visible.append(vis)
        covered |= mask
    return visible[::-1]


def scene(seed: int, size: int = SIZE) -> Scene:
    """The scene of ``seed`` (any int >= 0), ``size`` x ``size`` pixels; deterministic."""
    return _make(seed, size)


def _make(seed: int, size: int, paint: bool = True) -> Scene:
    """:func:`scene`; with ``paint=False`` the objects are laid out (the same random draws) but
    not painted, leaving the bare background (tests check the painted pixels are the masks)."""
    if not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be an int >= 0, got {seed!r}")
    if not isinstance(size, (int, np.integer)) or size < 16:
        raise ValueError(f"size must be an int >= 16, got {size!r}")
    rng = np.random.default_rng(int(seed))
    background = BACKGROUNDS[int(rng.integers(len(BACKGROUNDS)))]
    img = _texture(background, rng, size)
    n = int(rng.integers(MIN_OBJECTS, MAX_OBJECTS + 1))
    picks = rng.choice(len(PHRASES), n, replace=False)
    phrases = [PHRASES[int(i)] for i in picks]
    masks = None
    while masks is None:
        for _ in range(20):
            masks = _layout(rng, [p.split(" ")[1] for p in phrases], size)
            if masks is not None:
                break
        else:  # too crowded: one object fewer
            phrases = phrases[:-1]
    noise = rng.normal(0.0, 5.0, (size, size, 3)).astype(np.float32)
    for phrase, mask in zip(phrases, masks):
        colour = np.asarray(COLOURS[phrase.split(" ")[0]], np.float32)
        colour = colour * rng.uniform(0.85, 1.08) + rng.uniform(-10, 10, 3)
        if paint:
            img = np.where(mask[..., None], colour + noise, img)
    image = np.clip(np.rint(img), 0, 255).astype(np.uint8)
    return Scene(image, list(zip(phrases, masks)), background, caption(phrases, background), int(seed))


def scenes(seeds: Sequence[int], size: int = SIZE) -> list[Scene]:
    """:func:`scene` of each seed."""
    return [scene(int(s), size) for s in seeds]
