"""Painting predictions on large images within bounded memory.

Asked for outputs at the image's own size, a query-based model up-samples every query's
mask logits to it: Q x H x W floats, 4.8 GB for 100 queries on a 4000x3000 photo. Asked
for outputs at its input size instead (a few hundred pixels a side), it returns small
masks, and here each one is brought to the image's size only while its outline is traced,
so a large image never holds its instances' full-size masks at once.

Matplotlib, which detectron2's Visualizer draws with, resamples the background image
through several float copies (1.3 GB for 4000x3000); :func:`render_drawing` renders the
drawing alone and :func:`composite` lays it over the image in uint8.
"""
from typing import Dict, List, Optional, Tuple

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from detectron2.structures import Instances
from detectron2.utils.visualizer import VisImage

__all__ = [
    "check_same_frame",
    "composite",
    "fit_label_map",
    "instance_overlay",
    "mask_outline",
    "render_drawing",
]

# Rows composited at a time: bounds the uint16 temporaries of a large image.
_COMPOSITE_ROWS = 256
# Largest distance (image pixels) of a simplified mask border from the traced one.
_OUTLINE_TOLERANCE = 0.5


def check_same_frame(pred_size: Tuple[int, int], image_size: Tuple[int, int],
                     what: str = "instances") -> None:
    """ValueError unless ``pred_size`` is ``image_size`` or a resized copy of it (one scale
    for both sides, each side rounded to the pixel, as ResizeShortestEdge does)."""
    (ph, pw), (h, w) = (int(s) for s in pred_size), (int(s) for s in image_size)
    if (ph, pw) == (h, w):
        return
    # The scales that round h to ph and w to pw, with a pixel of slack each.
    low, high = max((ph - 1) / h, (pw - 1) / w), min((ph + 1) / h, (pw + 1) / w)
    if ph < 1 or pw < 1 or low > high:
        raise ValueError(
            f"the {what} were predicted for an image of size {(ph, pw)}, which is not a "
            f"resized copy of the image to draw on, of size {(h, w)}"
        )


def mask_outline(mask: torch.Tensor, size: Tuple[int, int]) -> List[np.ndarray]:
    """Polygons [x0, y0, x1, y1, ...] at ``size`` (H, W) of one (h, w) mask (bool or {0,1}
    float), outer borders and holes alike, as detectron2's GenericMask traces them; a
    smaller mask is up-sampled bilinearly and cut at one half.

    The borders are simplified to within ``_OUTLINE_TOLERANCE`` pixels: an up-sampled mask
    has long smooth borders whose every pixel would otherwise be a vertex for matplotlib.
    """
    m = (mask.detach().to("cpu") > 0.5).to(torch.uint8).numpy() * 255
    if m.shape != tuple(size):
        m = cv2.resize(m, (size[1], size[0]), interpolation=cv2.INTER_LINEAR)
    contours, _ = cv2.findContours((m >= 128).astype(np.uint8), cv2.RETR_CCOMP,
                                   cv2.CHAIN_APPROX_SIMPLE)
    polygons = [cv2.approxPolyDP(c, _OUTLINE_TOLERANCE, True).reshape(-1) for c in contours]
    # Pixel centres, and only polygons of 3 points or more (GenericMask's conventions).
    return [p.astype(np.float64) + 0.5 for p in polygons if len(p) >= 6]


def _labels(inst: Instances, metadata) -> Optional[List[str]]:
    """'class 97%' per instance, detectron2's Visualizer format."""
    names = metadata.get("thing_classes", None) if metadata is not None else None
    labels = None
    if inst.has("pred_classes"):
        classes = inst.pred_classes.tolist()
        labels = [names[c] if names and 0 <= c < len(names) else str(c) for c in classes]
    if inst.has("scores"):
        scores = [f"{s * 100:.0f}%" for s in inst.scores.tolist()]
        labels = scores if labels is None else [f"{n} {s}" for n, s in zip(labels, scores)]
    return labels


def instance_overlay(inst: Instances, image_size: Tuple[int, int], metadata) -> Dict:
    """Arguments of ``Visualizer.overlay_instances`` for ``inst`` on an image of
    ``image_size``: outlines (one mask at full size at a time), boxes scaled to the image
    and labels. ``inst`` may be predicted at a resized copy of the image."""
    check_same_frame(tuple(inst.image_size), image_size)
    (ph, pw), (h, w) = inst.image_size, image_size
    out = {"labels": _labels(inst, metadata)}
    if inst.has("pred_masks"):
        out["masks"] = [mask_outline(m, (h, w)) for m in inst.pred_masks]
    if inst.has("pred_boxes"):
        boxes = inst.pred_boxes.clone()
        boxes.scale(w / pw, h / ph)
        out["boxes"] = boxes
    return out


def fit_label_map(labels: torch.Tensor, image_size: Tuple[int, int],
                  what: str = "segmentation") -> torch.Tensor:
    """An (h, w) integer label map (semantic classes, panoptic ids) at ``image_size`` by
    nearest neighbour; unchanged when it is already that size."""
    check_same_frame(tuple(labels.shape[-2:]), image_size, what)
    if tuple(labels.shape[-2:]) == tuple(image_size):
        return labels
    moved = F.interpolate(labels[None, None].double(), size=tuple(image_size), mode="nearest")
    return moved[0, 0].to(labels.dtype)


def render_drawing(output: VisImage) -> np.ndarray:
    """What a Visualizer drew on ``output``, without the image under it: (h, w, 4) uint8
    RGBA, straight alpha, at the figure's size. Removes the image VisImage put first."""
    if output.ax.images:
        output.ax.images[0].remove()
    data, (width, height) = output.canvas.print_to_buffer()
    return np.frombuffer(data, np.uint8).reshape(height, width, 4)


def composite(drawing: np.ndarray, background: np.ndarray) -> np.ndarray:
    """(h, w, 4) RGBA ``drawing`` over an (h, w, 3) uint8 ``background``; (h, w, 3) uint8."""
    if drawing.shape[:2] != background.shape[:2]:
        raise ValueError(f"drawing of size {drawing.shape[:2]} over a background of size "
                         f"{background.shape[:2]}")
    out = np.empty(background.shape, np.uint8)
    for top in range(0, background.shape[0], _COMPOSITE_ROWS):
        rows = slice(top, top + _COMPOSITE_ROWS)
        alpha = drawing[rows, :, 3:].astype(np.uint16)
        mixed = background[rows] * (255 - alpha) + drawing[rows, :, :3] * alpha + 127
        out[rows] = mixed // 255
    return out
