"""
``shapes_panoptic``: the ``shapes`` scenes over stuff, a small panoptic dataset in
COCO-panoptic format, so that panoptic training and PQ evaluation run without COCO.

* things: the four ``shapes`` classes, drawn exactly as ``shapes`` draws them (same
  layouts, look-alike touching instances, visible masks);
* stuff: the background is cut into 2-3 horizontal bands with wavy borders, each one of
  ``sky``, ``ground``, ``water`` with a texture of its own (sky: bright gradient with soft
  clouds; ground: grainy earth tones; water: dark blue with horizontal ripples), so stuff
  is told apart by colour and texture, and a stuff class may appear in both images of a
  pair (what supp. S1's stuff targets of cross-image querying are about);
* every pixel belongs to one segment; a stuff class has one segment per image.

Files, class ids and registration: :mod:`.panoptic_files`, :mod:`.spec`.
"""
from typing import List, Tuple

import cv2
import numpy as np

from .shapes import SHAPES, SHAPES_CLASSES, SHAPES_COLORS, _render_image
from .spec import Rendered, SyntheticSpec

__all__ = ["SHAPES_PANOPTIC", "STUFF_CLASSES"]

STUFF_CLASSES = ["sky", "ground", "water"]
_SKY, _GROUND, _WATER = range(len(STUFF_CLASSES))
_STUFF_COLORS = [[135, 206, 235], [139, 90, 43], [28, 60, 140]]
# Band orders, top to bottom: sky stays above, as in a photograph.
_BAND_ORDERS = ((_SKY, _GROUND), (_SKY, _WATER), (_SKY, _WATER, _GROUND), (_WATER, _GROUND))
_MIN_BAND_FRAC = 0.2  # of the image height, measured between mean border heights


def _borders(rng: np.random.Generator, size: int, count: int) -> np.ndarray:
    """(count, size) float row of each border at every column, top border first."""
    gap = _MIN_BAND_FRAC * size
    # Evenly spaced means, jittered by less than half the spare room: bands keep >= gap.
    spare = size - (count + 1) * gap
    means = gap * np.arange(1, count + 1) + np.sort(rng.uniform(0, spare, count))
    x = np.arange(size) / size
    waves = []
    for mean, u in zip(means, rng.random((count, 4))):
        amplitude = 0.25 * gap * u[0]
        waves.append(mean + amplitude * np.sin(2 * np.pi * ((1 + 2 * u[1]) * x + u[2]))
                     + 0.3 * amplitude * np.sin(2 * np.pi * (5 * x + u[3])))
    return np.stack(waves) if waves else np.zeros((0, size))


def _hsv_colour(h: float, s: float, v: float) -> np.ndarray:
    hsv = np.array([[[h, s, v]]], dtype=np.float64).clip(0, 255).astype(np.uint8)
    return cv2.cvtColor(hsv, cv2.COLOR_HSV2BGR)[0, 0].astype(np.float32)


def _texture(rng: np.random.Generator, size: int, stuff: int) -> np.ndarray:
    """(size, size, 3) float32 BGR texture of one stuff class."""
    rows = np.arange(size, dtype=np.float32)[:, None, None] / size
    if stuff == _SKY:
        top = _hsv_colour(rng.uniform(95, 110), rng.uniform(60, 120), rng.uniform(190, 240))
        bottom = _hsv_colour(rng.uniform(95, 110), rng.uniform(20, 60), rng.uniform(220, 255))
        clouds = cv2.resize(rng.uniform(0, 1, (4, 4)).astype(np.float32), (size, size),
                            interpolation=cv2.INTER_CUBIC)
        image = top + (bottom - top) * rows
        return image + 40 * np.clip(clouds - 0.5, 0, None)[..., None]
    if stuff == _GROUND:
        base = _hsv_colour(rng.uniform(10, 35), rng.uniform(90, 170), rng.uniform(70, 140))
        blotches = cv2.resize(rng.normal(0, 14, (8, 8, 3)).astype(np.float32), (size, size),
                              interpolation=cv2.INTER_CUBIC)
        grain = rng.normal(0, 10, (size, size, 1)).astype(np.float32)
        return base + blotches + grain
    base = _hsv_colour(rng.uniform(100, 120), rng.uniform(120, 210), rng.uniform(60, 120))
    period, phase = rng.uniform(4, 9), rng.uniform(0, 2 * np.pi)
    cols = np.arange(size, dtype=np.float32)[None, :] / size
    wobble = 1.5 * np.sin(2 * np.pi * 3 * cols + phase)
    ripples = np.sin(2 * np.pi * (rows[..., 0] * size + wobble) / period + phase)
    return base + 18 * ripples[..., None] + np.array([12, 6, 0], np.float32) * rows


def _stuff_bands(rng: np.random.Generator, size: int) -> Tuple[np.ndarray, List]:
    """(size, size, 3) uint8 BGR stuff image and its (stuff index, (size, size) bool
    mask) bands, which tile the image."""
    order = _BAND_ORDERS[int(rng.integers(len(_BAND_ORDERS)))]
    borders = _borders(rng, size, len(order) - 1)
    rows = np.arange(size)[:, None]
    image = np.zeros((size, size, 3), np.float32)
    bands = []
    for k, stuff in enumerate(order):
        upper = borders[k - 1] if k > 0 else np.full(size, -np.inf)
        lower = borders[k] if k < len(borders) else np.full(size, np.inf)
        mask = (rows >= upper[None]) & (rows < lower[None])
        image[mask] = _texture(rng, size, stuff)[mask]
        bands.append((stuff, mask))
    return np.clip(image, 0, 255).astype(np.uint8), bands


def _render(rng: np.random.Generator, size: int) -> Rendered:
    """(size, size, 3) uint8 BGR image and its (category, visible mask) segments:
    categories 0-3 the shapes classes, 4-6 the stuff classes."""
    shapes_image, things = _render_image(rng, size)
    stuff_image, bands = _stuff_bands(rng, size)
    covered = np.zeros((size, size), bool)
    for _, mask in things:
        covered |= mask
    noise = rng.integers(-3, 4, stuff_image.shape, dtype=np.int8)
    stuff_image = cv2.add(stuff_image, noise, dtype=cv2.CV_8U)  # saturating
    image = np.where(covered[..., None], shapes_image, stuff_image)
    stuff = [(len(SHAPES_CLASSES) + s, band & ~covered) for s, band in bands]
    return image, things + [(c, m) for c, m in stuff if m.any()]


SHAPES_PANOPTIC = SyntheticSpec(
    folder="shapes_panoptic",
    description="InstUnique synthetic panoptic shapes over sky / ground / water",
    version=1,
    classes=SHAPES_CLASSES,
    colors=[*SHAPES_COLORS, *_STUFF_COLORS],
    render=_render,
    num_images={"train": 256, "val": 32},
    image_size=128,
    min_image_size=SHAPES.min_image_size,
    stuff_classes=STUFF_CLASSES,
)
