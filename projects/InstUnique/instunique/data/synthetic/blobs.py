"""
``blobs``: few images with many small, touching, look-alike instances (nuclei-like).

Small real datasets often look like this (cells, nuclei, grains, seeds): a dozen images
of 256 px, 20-40 instances each, one class, every instance a few dozen pixels, packed in
clusters so that most touch a neighbour. It measures what ``shapes`` does not: small
instances at the mask stride's resolution and learning from few images.

* each instance is an ellipse (diameters ~8-20 px, random aspect and angle) of one colour
  per image, with a per-instance shade jitter of a few levels and darker spots inside;
* instances are painted back to front; masks are the visible parts, never overlapping;
  half the images draw a faint dark rim on each instance, the others none, so touching
  instances are told apart by shape alone there;
* the background is a blotchy texture; the image is blurred slightly and gets sensor noise.
"""

from typing import List, Tuple

import cv2
import numpy as np

from .spec import Rendered, SyntheticSpec

__all__ = ["BLOBS", "BLOBS_CLASSES"]

BLOBS_CLASSES = ["blob"]
_MIN_INSTANCES, _MAX_INSTANCES = 30, 60
_MIN_SEMI_AXIS, _MAX_SEMI_AXIS = 4.0, 10.0
_MIN_VISIBLE_PX = 15
_MIN_VISIBLE_FRAC = 0.4


def _ellipse_mask(size: int, center, axes, angle: float) -> np.ndarray:
    canvas = np.zeros((size, size), np.uint8)
    # Sub-pixel centres and axes (shift=4: fixed point with 16 steps per pixel).
    c = tuple(int(round(v * 16)) for v in center)
    a = tuple(int(round(v * 16)) for v in axes)
    cv2.ellipse(canvas, c, a, angle, 0, 360, 1, -1, cv2.LINE_8, 4)
    return canvas.astype(bool)


def _visible(full: List[np.ndarray]) -> List[np.ndarray]:
    """Each mask minus everything painted after it."""
    covered = np.zeros_like(full[0]) if full else None
    visible = []
    for mask in reversed(full):
        visible.append(mask & ~covered)
        covered |= mask
    return visible[::-1]


def _layout(rng: np.random.Generator, size: int) -> List[Tuple[Tuple, Tuple, float]]:
    """(center, semi-axes, angle in degrees) of each ellipse, back to front, in clusters."""
    n = int(rng.integers(_MIN_INSTANCES, _MAX_INSTANCES + 1))
    clusters = rng.uniform(0.15 * size, 0.85 * size, (int(rng.integers(2, 6)), 2))
    out = []
    for u in rng.random((n, 7)):
        a = _MIN_SEMI_AXIS + (_MAX_SEMI_AXIS - _MIN_SEMI_AXIS) * u[0]
        b = a * (0.6 + 0.4 * u[1])
        if out and u[2] < 0.8:
            # Against an earlier ellipse: from slightly overlapped to just apart.
            (cx, cy), (pa, pb), _ = out[int(u[3] * len(out))]
            theta = 2 * np.pi * u[4]
            dist = (0.5 * (pa + pb) + 0.5 * (a + b)) * (0.85 + 0.25 * u[5])
            cx, cy = cx + dist * np.cos(theta), cy + dist * np.sin(theta)
        else:
            cx, cy = clusters[int(u[3] * len(clusters))] + rng.normal(0, 0.15 * size, 2)
        cx, cy = (min(max(float(v), 0.5 * a), size - 0.5 * a) for v in (cx, cy))
        out.append(((cx, cy), (a, b), 180.0 * u[6]))
    return out


def _render(rng: np.random.Generator, size: int) -> Rendered:
    """Return a (size, size, 3) uint8 BGR image and its (category, visible mask) pairs."""
    hue = rng.uniform(120, 170)  # purple to magenta, as stained nuclei
    hsv = [[[hue, rng.uniform(90, 200), rng.uniform(70, 150)]]]
    colour = cv2.cvtColor(np.uint8(hsv), cv2.COLOR_HSV2BGR)[0, 0].astype(np.int16)
    bg_hsv = [[[hue + rng.uniform(-20, 20), rng.uniform(10, 60), rng.uniform(170, 235)]]]
    bg = cv2.cvtColor(np.uint8(bg_hsv), cv2.COLOR_HSV2BGR)[0, 0].astype(np.int16)
    rim = rng.random() < 0.5

    layout = _layout(rng, size)
    full = [_ellipse_mask(size, c, ax, ang) for c, ax, ang in layout]
    # Removing an ellipse only uncovers the others, so one filtering pass is enough.
    full = [
        f for f, v in zip(full, _visible(full))
        if v.sum() >= max(_MIN_VISIBLE_PX, _MIN_VISIBLE_FRAC * f.sum())
    ]
    visible = _visible(full)
    covered = np.any(full, axis=0) if full else np.zeros((size, size), bool)

    blotches = rng.normal(0, 12, (8, 8, 1)) + rng.normal(0, 4, (8, 8, 3))
    coarse = np.clip(bg + blotches, 0, 255).astype(np.uint8)
    image = cv2.resize(coarse, (size, size), interpolation=cv2.INTER_CUBIC).astype(np.int16)
    for mask, jitter in zip(full, rng.integers(-8, 9, (len(full), 3))):
        image[mask] = colour + jitter
        if rim:
            edge = mask & ~cv2.erode(mask.astype(np.uint8), np.ones((3, 3), np.uint8)).astype(bool)
            image[edge] -= 25
    spots = rng.random((size, size)) < 0.02
    image[spots & covered] -= 30
    image = cv2.GaussianBlur(np.clip(image, 0, 255).astype(np.uint8), (3, 3), 0.7)
    noise = rng.integers(-6, 7, image.shape, dtype=np.int8)
    image = cv2.add(image, noise, dtype=cv2.CV_8U)  # saturating
    return image, [(0, v) for v in visible]


BLOBS = SyntheticSpec(
    folder="blobs",
    description="InstUnique synthetic blobs (small touching look-alike instances)",
    version=1,
    classes=BLOBS_CLASSES,
    colors=[[160, 60, 200]],
    render=_render,
    num_images={"train": 12, "val": 6},
    image_size=256,
    min_image_size=64,
)
