"""
``shapes``: a small deterministic synthetic instance-segmentation dataset in COCO format.

It exists so that training, evaluation and the tests can run end to end without COCO.
Its content is chosen to need what the method is about, telling instances apart:

* the class is a geometric shape (circle, square, triangle, ring) with a colour family of its
  own (one hue band per class, shade drawn per image), so class is easy to see and the
  hard part is the method's: telling apart instances that look alike;
* inside one image, all instances of a class share one colour and a similar size, so
  two touching circles differ only by where they are, not by how they look;
* instances touch and overlap; they are painted back to front and each mask is the
  *visible* part, so masks within an image never overlap;
* the background is textured and noisy.

``shapes_crowd`` draws the same shapes, 8-20 per image, all of one class and one colour and
nearly all touching: telling look-alike instances apart is the whole difficulty (the
paper's supp. Fig. S1/S3 failure cases: one object split in two, two merged).

Files and registration: :mod:`.spec`.
"""

import functools
from dataclasses import dataclass
from typing import List, Optional, Tuple

import cv2
import numpy as np

from .spec import (
    Rendered,
    SyntheticSpec,
    dataset_paths,
    ensure_splits,
    generate_split,
    register_synthetic,
    visible_masks,
)

__all__ = [
    "SHAPES_CLASSES",
    "SHAPES_COLORS",
    "generate_shapes",
    "ensure_shapes",
    "register_shapes",
    "shapes_paths",
    "SHAPES",
    "SHAPES_CROWD",
]

SHAPES_CLASSES = ["circle", "square", "triangle", "ring"]
# Only for visualization; image colours are random per image.
SHAPES_COLORS = [[220, 20, 60], [0, 130, 200], [60, 180, 75], [245, 130, 48]]

# Bumped when the generator's output changes; stored in the json "info".
_VERSION = 3


@dataclass(frozen=True)
class _Layout:
    """How many shapes an image holds, how big, how packed and how alike."""

    min_instances: int
    max_instances: int
    # Characteristic size (diameter) in pixels.
    min_size: float
    max_size: float
    max_classes: int  # classes drawn per image (fewer than instances: some class repeats)
    touch_prob: float  # chance that a shape is put against an earlier one
    shade_jitter: int  # per-instance colour jitter (+-) around its class colour
    min_visible_px: int  # an instance less visible than this is dropped
    min_visible_frac: float


# shapes: 2-6 instances, sizes large enough that the shape, hence the class, is visible at
# the decoder's coarsest attention levels (strides 8-32) of a 128x128 image.
_SHAPES_LAYOUT = _Layout(2, 6, 24, 60, len(SHAPES_CLASSES), 0.75, 10, 80, 0.3)
# shapes_crowd: 8-20 instances of one class and one colour per image, nearly all touching;
# only where they are tells them apart.
_CROWD_LAYOUT = _Layout(8, 20, 18, 30, 1, 0.95, 0, 50, 0.3)


# ---------------------------------------------------------------------------------------
# Drawing
# ---------------------------------------------------------------------------------------


@dataclass
class _Shape:
    category: int  # index into SHAPES_CLASSES
    center: Tuple[float, float]  # (x, y)
    radius: float  # half the characteristic size
    angle: float  # radians; squares and triangles only
    shade: np.ndarray  # (3,) uint8 BGR


def _polygon(shape: _Shape, sides: int, circumradius: float) -> np.ndarray:
    angles = shape.angle + np.arange(sides) * (2 * np.pi / sides)
    cx, cy = shape.center
    pts = np.stack([cx + circumradius * np.cos(angles), cy + circumradius * np.sin(angles)], 1)
    return np.round(pts).astype(np.int32)


def _full_mask(shape: _Shape, size: int) -> np.ndarray:
    """(size, size) bool mask of the whole shape, clipped to the image."""
    canvas = np.zeros((size, size), np.uint8)
    center = (int(round(shape.center[0])), int(round(shape.center[1])))
    r = shape.radius
    name = SHAPES_CLASSES[shape.category]
    # Circumradii are scaled so the four shapes have roughly equal area at equal size.
    if name == "circle":
        cv2.circle(canvas, center, int(round(r)), 1, -1)
    elif name == "ring":
        cv2.circle(canvas, center, int(round(r * 1.05)), 1, -1)
        cv2.circle(canvas, center, int(round(r * 0.55)), 0, -1)
    elif name == "square":
        cv2.fillPoly(canvas, [_polygon(shape, 4, r * 1.25)], 1)
    elif name == "triangle":
        cv2.fillPoly(canvas, [_polygon(shape, 3, r * 1.45)], 1)
    else:  # pragma: no cover - SHAPES_CLASSES is fixed
        raise ValueError(f"unknown shape {name!r}")
    return canvas.astype(bool)


def _random_palette(rng: np.random.Generator, n: int) -> Tuple[np.ndarray, np.ndarray]:
    """A muted background colour (3,) and one saturated colour per class (n, 3): class c's
    hue stays within a band of its own, its saturation and brightness vary per image."""
    hues = (np.arange(n) * (180 / n) + rng.uniform(-10, 10, n)) % 180
    hsv = np.stack([hues, rng.uniform(150, 255, n), rng.uniform(140, 255, n)], 1)
    colours = cv2.cvtColor(hsv.astype(np.uint8)[None], cv2.COLOR_HSV2BGR)[0]
    bg_hsv = np.array([[[rng.uniform(0, 180), rng.uniform(0, 60), rng.uniform(60, 150)]]])
    background = cv2.cvtColor(bg_hsv.astype(np.uint8), cv2.COLOR_HSV2BGR)[0, 0]
    return background.astype(np.int16), colours.astype(np.int16)


def _background(rng: np.random.Generator, size: int, colour: np.ndarray) -> np.ndarray:
    """(size, size, 3) uint8 textured background: smooth blotches plus faint strokes."""
    coarse = np.clip(colour + rng.normal(0, 28, (5, 5, 3)), 0, 255).astype(np.uint8)
    image = cv2.resize(coarse, (size, size), interpolation=cv2.INTER_CUBIC)
    for _ in range(int(rng.integers(3, 9))):
        p0 = tuple(int(v) for v in rng.integers(0, size, 2))
        p1 = tuple(int(v) for v in rng.integers(0, size, 2))
        stroke = np.clip(colour + int(rng.integers(-35, 36)), 0, 255)
        cv2.line(image, p0, p1, tuple(int(c) for c in stroke), int(rng.integers(1, 3)))
    return image


def _sample_layout(
    rng: np.random.Generator, size: int, colours: np.ndarray, layout: _Layout
) -> List[_Shape]:
    """Shapes in depth order (first is farthest); placed so that many touch or overlap."""
    n = int(rng.integers(layout.min_instances, layout.max_instances + 1))
    # Fewer classes than instances: at least one class repeats in every image.
    num_classes = int(rng.integers(1, min(layout.max_classes, n - 1) + 1))
    classes = rng.choice(len(SHAPES_CLASSES), num_classes, replace=False)
    cats = np.concatenate([classes, rng.choice(classes, n - num_classes)])
    rng.shuffle(cats)
    lo, hi = layout.min_size, layout.max_size
    base_size = {int(c): rng.uniform(lo, hi) for c in classes}
    colour_of = {int(c): colours[int(c)] for c in classes}

    shapes: List[_Shape] = []
    # One row of uniforms per shape (fewer generator calls: generation speed matters).
    for cat, u in zip((int(c) for c in cats), rng.random((n, 11))):
        diameter = min(max(base_size[cat] * (0.9 + 0.2 * u[0]), lo), hi)
        r = diameter / 2
        if shapes and u[1] < layout.touch_prob:
            # Put it against an earlier shape, preferring one of its own class: distance from
            # "just touching" to "half overlapped".
            same = [s for s in shapes if s.category == cat]
            pool = same if same and u[2] < 0.6 else shapes
            anchor = pool[int(u[3] * len(pool))]
            theta = 2 * np.pi * u[4]
            dist = (anchor.radius + r) * (0.6 + 0.42 * u[5])
            cx = anchor.center[0] + dist * np.cos(theta)
            cy = anchor.center[1] + dist * np.sin(theta)
        else:
            cx, cy = size * u[4], size * u[5]
        # Keep most of the shape inside the image.
        cx, cy = (min(max(float(v), 0.6 * r), size - 0.6 * r) for v in (cx, cy))
        j = layout.shade_jitter
        jitter = np.floor(u[7:10] * (2 * j + 1)).astype(np.int16) - j
        shade = np.clip(colour_of[cat] + jitter, 0, 255).astype(np.uint8)
        shapes.append(_Shape(cat, (cx, cy), float(r), float(2 * np.pi * u[10]), shade))
    return shapes


def _render_image(
    rng: np.random.Generator, size: int, layout: _Layout = _SHAPES_LAYOUT
) -> Rendered:
    """Return a (size, size, 3) uint8 BGR image and its (category, visible mask) pairs."""
    background_colour, colours = _random_palette(rng, len(SHAPES_CLASSES))
    while True:
        shapes = _sample_layout(rng, size, colours, layout)
        full = [_full_mask(s, size) for s in shapes]
        # Removing a shape only uncovers the others, so one filtering pass is enough.
        areas = [np.count_nonzero(v) for v in visible_masks(full)]
        keep = [
            i
            for i, area in enumerate(areas)
            if area
            >= max(layout.min_visible_px, layout.min_visible_frac * np.count_nonzero(full[i]))
        ]
        if len(keep) >= layout.min_instances:
            break
    shapes = [shapes[i] for i in keep]
    full = [full[i] for i in keep]

    image = _background(rng, size, background_colour)
    for shape, mask in zip(shapes, full):
        image[mask] = shape.shade
    # Integer sensor noise: as good as Gaussian here and several times cheaper to draw.
    noise = rng.integers(-3, 4, image.shape, dtype=np.int8)
    image = cv2.add(image, noise, dtype=cv2.CV_8U)  # saturating
    return image, [(s.category, m) for s, m in zip(shapes, visible_masks(full))]


# ---------------------------------------------------------------------------------------
# The dataset
# ---------------------------------------------------------------------------------------

SHAPES = SyntheticSpec(
    folder="shapes",
    description="InstUnique synthetic shapes",
    version=_VERSION,
    classes=SHAPES_CLASSES,
    colors=SHAPES_COLORS,
    render=_render_image,
    num_images={"train": 2000, "val": 200},
    image_size=128,
    min_image_size=2 * _SHAPES_LAYOUT.max_size,
)

SHAPES_CROWD = SyntheticSpec(
    folder="shapes_crowd",
    description="InstUnique synthetic crowded look-alike shapes",
    version=1,
    classes=SHAPES_CLASSES,
    colors=SHAPES_COLORS,
    render=functools.partial(_render_image, layout=_CROWD_LAYOUT),
    num_images={"train": 2000, "val": 200},
    image_size=128,
    min_image_size=2 * _CROWD_LAYOUT.max_size,
)


def shapes_paths(root: Optional[str], split: str) -> Tuple[str, str]:
    """Return ``(json_file, image_root)`` of a split; nothing is read or written."""
    return dataset_paths(SHAPES, root, split)


def generate_shapes(
    root: Optional[str], split: str, num_images: int, seed: int, image_size: int = 128
) -> str:
    """Write ``num_images`` images of one split and its COCO json; return the json path."""
    return generate_split(SHAPES, root, split, num_images, seed, image_size)


def ensure_shapes(root: Optional[str] = None, num_train: Optional[int] = None,
                  num_val: Optional[int] = None, image_size: Optional[int] = None) -> None:
    """Generate the train (seed 0) and val (seed 1) splits under ``root`` unless present."""
    ensure_splits(SHAPES, root, num_train, num_val, image_size)


def register_shapes(root: Optional[str] = None, prefix: str = "shapes",
                    num_train: Optional[int] = None, num_val: Optional[int] = None,
                    image_size: Optional[int] = None) -> List[str]:
    """Register ``{prefix}_train`` and ``{prefix}_val``; see :func:`register_synthetic`."""
    return register_synthetic(SHAPES, root, prefix, num_train, num_val, image_size)
