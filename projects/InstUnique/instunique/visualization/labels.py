"""Instance labels that stay readable on crowded images.

detectron2's Visualizer writes each label at its box's top-left corner, whatever is there
already; where instances touch or overlap (shapes_crowd, blobs, a dense COCO image) the
labels cover each other. Here the labels are placed one at a time, best-scoring first, at
the first of a few spots around the instance's box where the label stays inside the picture
and off every label placed before it; a label with no such spot is left out (its instance
keeps its outline and colour).
"""
import colorsys
from typing import List, Optional, Sequence

import numpy as np
from detectron2.utils.colormap import random_color
from detectron2.utils.visualizer import Visualizer

__all__ = ["instance_colours", "label_colour", "place_labels"]

# Labels are kept apart by this fraction of their height (the text's dark backing box
# reaches a little beyond the glyphs).
_MARGIN = 0.25


def instance_colours(n: int) -> List[np.ndarray]:
    """The colours ``Visualizer.overlay_instances`` draws for ``n`` instances when given
    none (RGB in [0, 1]), drawn from numpy's global generator the same way."""
    return [random_color(rgb=True, maximum=1) for _ in range(n)]


def label_colour(colour: Sequence[float]) -> np.ndarray:
    """A lighter copy of an instance's ``colour`` (RGB in [0, 1]) for its text, which sits on
    a dark backing box (``Visualizer.draw_text`` brightens it further where it is dark)."""
    h, lightness, s = colorsys.rgb_to_hls(*(float(c) for c in colour[:3]))
    return np.array(colorsys.hls_to_rgb(h, min(1.0, lightness * 1.7), s))


def _font_size(vis: Visualizer, box: np.ndarray) -> float:
    # As the Visualizer sizes its labels: by the instance's height relative to the image.
    height, width = vis.output.height, vis.output.width
    default = max(np.sqrt(height * width) // 90, 10 // vis.output.scale)
    ratio = (box[3] - box[1]) / np.sqrt(height * width)
    return float(np.clip((ratio - 0.02) / 0.08 + 1, 1.2, 2) * 0.5 * default)


def _spots(box: np.ndarray, tw: float, th: float) -> List[tuple]:
    """Top-left corners (image pixels) to try for a tw x th label of an (x0, y0, x1, y1)
    box: inside its top-left corner (the Visualizer's spot), above it, below it, inside its
    bottom-left corner, at its centre, inside its top-right corner."""
    x0, y0, x1, y1 = (float(v) for v in box)
    cx, cy = (x0 + x1 - tw) / 2, (y0 + y1 - th) / 2
    return [(x0, y0), (x0, y0 - th), (x0, y1), (x0, y1 - th), (cx, cy), (x1 - tw, y0)]


def _overlaps(a: np.ndarray, b: np.ndarray) -> bool:
    return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]


def place_labels(vis: Visualizer, labels: Sequence[str], boxes: np.ndarray,
                 colours: Sequence[Sequence[float]], order: Optional[Sequence[int]] = None
                 ) -> List[Optional[tuple]]:
    """Draw ``labels`` on ``vis`` without overlaps.

    Args:
        vis: the Visualizer the instances are drawn on.
        labels: N strings.
        boxes: (N, 4) x0, y0, x1, y1 in image pixels (scale 1), one per label.
        colours: N instance colours (RGB in [0, 1]); the text takes a lighter copy.
        order: the labels' indices, most important first (e.g. by descending score);
            default 0..N-1.
    Returns:
        N entries: the (x0, y0, x1, y1) extent in image pixels of each label drawn, None for
        one left out.
    """
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    if not len(labels) == len(boxes) == len(colours):
        raise ValueError(f"{len(labels)} labels, {len(boxes)} boxes and {len(colours)} "
                         f"colours: one of each per instance")
    ax = vis.output.ax
    renderer = vis.output.canvas.get_renderer()
    to_image = ax.transData.inverted()
    width, height = vis.output.width, vis.output.height
    placed: List[Optional[tuple]] = [None] * len(labels)
    taken: List[np.ndarray] = []
    for i in range(len(labels)) if order is None else order:
        box = boxes[i]
        vis.draw_text(labels[i], (box[0], box[1]), font_size=_font_size(vis, box),
                      color=label_colour(colours[i]), horizontal_alignment="left")
        text = ax.texts[-1]
        text.set_verticalalignment("bottom")  # the position is then the label's bottom-left
        # The label's size in image pixels (display y points up, image y down).
        (ex0, ey0), (ex1, ey1) = to_image.transform(text.get_window_extent(renderer).get_points())
        tw, th = abs(ex1 - ex0), abs(ey1 - ey0)
        pad = _MARGIN * th
        for x, y in _spots(box, tw, th):
            extent = np.array([x - pad, y - pad, x + tw + pad, y + th + pad])
            inside = x >= 0 and y >= 0 and x + tw <= width and y + th <= height
            if inside and not any(_overlaps(extent, t) for t in taken):
                text.set_position((x, y + th))
                taken.append(extent)
                placed[i] = (x, y, x + tw, y + th)
                break
        else:
            text.remove()
    return placed
