"""
``shapes_diverse``: synthetic instances whose class is their shape alone and whose look is
their own, so that two instances of one class differ in appearance inside an image and
across images (as on COCO; the opposite of ``shapes``, where one class shares one colour).

* six shape classes (circle, square, triangle, ring, cross, star);
* every instance draws its own appearance: two colours of any hue and one texture from a
  procedural bank (solid, stripes and checks at a random period and angle, smooth noise,
  a linear gradient); same-class instances of one image are redrawn until their mean
  colours lie apart;
* 3-12 instances per image, at least one class repeated, most placed against an earlier
  instance (of their own class by preference) so that they touch and overlap; each mask
  is the visible part;
* the background is a muted texture of the same bank under blotches and noise, so neither
  colour nor texture tells an object from the background: the outline does.

Files and registration: :mod:`.spec`.
"""
from typing import List, Tuple

import cv2
import numpy as np

from .spec import Rendered, SyntheticSpec, visible_masks

__all__ = ["DIVERSE_CLASSES", "SHAPES_DIVERSE", "TEXTURES"]

DIVERSE_CLASSES = ["circle", "square", "triangle", "ring", "cross", "star"]
# Only for visualization; instance colours are drawn per instance.
_COLORS = [[220, 20, 60], [0, 130, 200], [60, 180, 75], [245, 130, 48], [145, 30, 180],
           [70, 240, 240]]
TEXTURES = ("solid", "stripes", "checks", "noise", "gradient")
_MIN_INSTANCES, _MAX_INSTANCES = 3, 12
_MIN_SIZE, _MAX_SIZE = 18.0, 44.0  # characteristic size (diameter), px at 128 px
_TOUCH_PROB = 0.75
_MIN_VISIBLE_PX, _MIN_VISIBLE_FRAC = 60, 0.35
# Same-class instances of one image: mean colours at least this far apart (RGB, 0-255).
_MIN_COLOUR_GAP = 60.0


def _polygon(center, radius, angle, radii) -> np.ndarray:
    """Vertices at ``radii`` (relative) around ``center``, evenly spaced from ``angle``."""
    k = len(radii)
    angles = angle + np.arange(k) * (2 * np.pi / k)
    r = radius * np.asarray(radii)
    pts = np.stack([center[0] + r * np.cos(angles), center[1] + r * np.sin(angles)], 1)
    return np.round(pts).astype(np.int32)


def _cross(center, radius, angle) -> np.ndarray:
    """A plus sign of arm half-width 0.36 r: 12 vertices."""
    a, b = 0.36, 1.05
    local = np.array([[a, b], [a, a], [b, a], [b, -a], [a, -a], [a, -b], [-a, -b], [-a, -a],
                      [-b, -a], [-b, a], [-a, a], [-a, b]]) * radius
    rot = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    return np.round(local @ rot.T + np.asarray(center)).astype(np.int32)


def _full_mask(category: int, center, radius: float, angle: float, size: int) -> np.ndarray:
    """(size, size) bool mask of the whole shape; the six have similar areas at one size."""
    canvas = np.zeros((size, size), np.uint8)
    c = (int(round(center[0])), int(round(center[1])))
    name = DIVERSE_CLASSES[category]
    if name == "circle":
        cv2.circle(canvas, c, int(round(radius)), 1, -1)
    elif name == "ring":
        cv2.circle(canvas, c, int(round(radius * 1.05)), 1, -1)
        cv2.circle(canvas, c, int(round(radius * 0.55)), 0, -1)
    elif name == "square":
        cv2.fillPoly(canvas, [_polygon(center, radius, angle, [1.25] * 4)], 1)
    elif name == "triangle":
        cv2.fillPoly(canvas, [_polygon(center, radius, angle, [1.45] * 3)], 1)
    elif name == "cross":
        cv2.fillPoly(canvas, [_cross(center, radius, angle)], 1)
    else:  # star: five points
        cv2.fillPoly(canvas, [_polygon(center, radius, angle, [1.35, 0.58] * 5)], 1)
    return canvas.astype(bool)


def _colours(rng: np.random.Generator, n: int, muted: bool) -> np.ndarray:
    """(n, 3) float BGR colours of any hue: saturated, or muted for backgrounds."""
    sat = rng.uniform(0, 70, n) if muted else rng.uniform(90, 255, n)
    val = rng.uniform(70, 190, n) if muted else rng.uniform(70, 255, n)
    hsv = np.stack([rng.uniform(0, 180, n), sat, val], 1).astype(np.uint8)
    return cv2.cvtColor(hsv[None], cv2.COLOR_HSV2BGR)[0].astype(np.float32)


def _texture(rng: np.random.Generator, size: int, kind: str, c0, c1) -> np.ndarray:
    """(size, size, 3) float image of texture ``kind`` in colours c0 and c1."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    theta = rng.uniform(0, np.pi)
    u = xx * np.cos(theta) + yy * np.sin(theta)
    if kind == "solid":
        t = np.zeros((size, size), np.float32)
    elif kind == "stripes":
        t = (np.sin(2 * np.pi * u / rng.uniform(3, 10)) > 0).astype(np.float32)
    elif kind == "checks":
        v = -xx * np.sin(theta) + yy * np.cos(theta)
        period = rng.uniform(3, 10)
        t = ((np.floor(u / period) + np.floor(v / period)) % 2).astype(np.float32)
    elif kind == "noise":
        cells = int(rng.integers(4, 12))
        coarse = rng.random((cells, cells)).astype(np.float32)
        t = cv2.resize(coarse, (size, size), interpolation=cv2.INTER_CUBIC).clip(0, 1)
    else:  # gradient along theta, across a random span
        span = rng.uniform(0.3, 1.0) * size
        t = ((u - u.min()) / span) % 1.0
    return c0 + t[..., None] * (c1 - c0)


def _appearance(rng: np.random.Generator, size: int) -> Tuple[np.ndarray, np.ndarray]:
    """An instance's look: its (size, size, 3) texture image and its mean colour (3,)."""
    kind = TEXTURES[int(rng.integers(len(TEXTURES)))]
    c0, c1 = _colours(rng, 2, muted=False)
    image = _texture(rng, size, kind, c0, c1)
    return image, image.reshape(-1, 3).mean(0)


def _layout(rng: np.random.Generator, size: int):
    """[(category, center, radius, angle)] back to front; at least one class repeats."""
    n = int(rng.integers(_MIN_INSTANCES, _MAX_INSTANCES + 1))
    num_classes = int(rng.integers(1, min(len(DIVERSE_CLASSES), n - 1) + 1))
    classes = rng.choice(len(DIVERSE_CLASSES), num_classes, replace=False)
    cats = np.concatenate([classes, rng.choice(classes, n - num_classes)])
    rng.shuffle(cats)
    shapes: List[Tuple[int, Tuple[float, float], float, float]] = []
    for cat in (int(c) for c in cats):
        u = rng.random(6)
        r = rng.uniform(_MIN_SIZE, _MAX_SIZE) / 2
        if shapes and u[0] < _TOUCH_PROB:
            same = [s for s in shapes if s[0] == cat]
            pool = same if same and u[1] < 0.7 else shapes
            _, (ax, ay), ar, _ = pool[int(u[2] * len(pool))]
            dist = (ar + r) * (0.6 + 0.42 * u[3])
            cx, cy = ax + dist * np.cos(2 * np.pi * u[4]), ay + dist * np.sin(2 * np.pi * u[4])
        else:
            cx, cy = size * u[3], size * u[4]
        cx, cy = (min(max(float(v), 0.6 * r), size - 0.6 * r) for v in (cx, cy))
        shapes.append((cat, (cx, cy), float(r), float(2 * np.pi * u[5])))
    return shapes


def _render_image(rng: np.random.Generator, size: int) -> Rendered:
    """Return a (size, size, 3) uint8 BGR image and its (category, visible mask) pairs."""
    while True:
        shapes = _layout(rng, size)
        full = [_full_mask(c, ctr, r, a, size) for c, ctr, r, a in shapes]
        areas = [np.count_nonzero(v) for v in visible_masks(full)]
        keep = [i for i, area in enumerate(areas)
                if area >= max(_MIN_VISIBLE_PX, _MIN_VISIBLE_FRAC * np.count_nonzero(full[i]))]
        if len(keep) >= _MIN_INSTANCES:
            break
    shapes, full = [shapes[i] for i in keep], [full[i] for i in keep]

    c0, c1 = _colours(rng, 2, muted=True)
    image = _texture(rng, size, TEXTURES[int(rng.integers(len(TEXTURES)))], c0, c1)
    blotches = cv2.resize(rng.normal(0, 18, (5, 5, 3)).astype(np.float32), (size, size),
                          interpolation=cv2.INTER_CUBIC)
    image = image + blotches
    means: List[Tuple[int, np.ndarray]] = []
    for (category, *_), mask in zip(shapes, full):
        for _ in range(8):  # same-class instances of one image must look different
            texture, mean = _appearance(rng, size)
            if all(c != category or np.linalg.norm(mean - m) >= _MIN_COLOUR_GAP
                   for c, m in means):
                break
        means.append((category, mean))
        image[mask] = texture[mask]
    image += rng.integers(-4, 5, image.shape)
    image = np.clip(np.round(image), 0, 255).astype(np.uint8)
    return image, [(s[0], m) for s, m in zip(shapes, visible_masks(full))]


SHAPES_DIVERSE = SyntheticSpec(
    folder="shapes_diverse",
    description="InstUnique synthetic shapes with per-instance appearance",
    version=1,
    classes=DIVERSE_CLASSES,
    colors=_COLORS,
    render=_render_image,
    num_images={"train": 2000, "val": 200},
    image_size=128,
    min_image_size=2 * int(_MAX_SIZE),
)
