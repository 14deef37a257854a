"""Prediction and ground-truth overlays, and rows of captioned panels.

The paper's qualitative figures (Fig. S1/S2) put, per image, the input next to the
baseline's and InstUnique's predictions and the ground truth; the equivariance view puts
the prediction on x next to the prediction on T(x) mapped back by T^-1. Everything here
takes and returns RGB uint8 arrays (H, W, 3) and runs no model.
"""
import contextlib
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import cv2
import numpy as np
import torch
from detectron2.structures import BitMasks, Boxes, BoxMode, Instances
from detectron2.utils.visualizer import ColorMode, Visualizer

from ..transforms import AffineWarp
from .labels import instance_colours, place_labels
from .painting import composite, fit_label_map, instance_overlay, render_drawing

__all__ = [
    "caption_height",
    "check_image",
    "compose_row",
    "comparison_row",
    "draw_ground_truth",
    "draw_outputs",
    "equivariance_row",
    "scale_image",
    "stack_rows",
    "warp_outputs",
]

_WHITE = 255
# The Visualizer draws random instance colours from numpy's global generator; a fixed seed
# per picture makes a picture a function of the predictions alone.
_COLOUR_SEED = 0


def check_image(image: np.ndarray, what: str = "image") -> np.ndarray:
    """An (H, W, 3) uint8 RGB array, or ValueError naming the problem."""
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[2] != 3 or image.shape[0] < 1 or image.shape[1] < 1:
        raise ValueError(f"{what} must be an RGB array of shape (H, W, 3), got {image.shape}")
    if image.dtype != np.uint8:
        raise ValueError(f"{what} must be uint8, got {image.dtype}")
    return image


@contextlib.contextmanager
def _fixed_colours() -> Iterator[None]:
    state = np.random.get_state()
    np.random.seed(_COLOUR_SEED)
    try:
        yield
    finally:
        np.random.set_state(state)


def _scaled_size(image: np.ndarray, scale: float) -> Tuple[int, int]:
    if not scale > 0:
        raise ValueError(f"scale must be > 0, got {scale}")
    return max(1, int(round(image.shape[0] * scale))), max(1, int(round(image.shape[1] * scale)))


def _resize(image: np.ndarray, hw: Tuple[int, int], nearest: bool = False) -> np.ndarray:
    if image.shape[:2] == tuple(hw):
        return image
    interp = cv2.INTER_NEAREST if nearest else cv2.INTER_LINEAR
    return cv2.resize(image, (hw[1], hw[0]), interpolation=interp)


def scale_image(image: np.ndarray, scale: float = 1.0) -> np.ndarray:
    """The plain image at the size the overlays of the same ``scale`` have."""
    image = check_image(image)
    return _resize(image, _scaled_size(image, scale), nearest=scale >= 1)


def _visualizer_output(image: np.ndarray, scale: float, draw) -> np.ndarray:
    with _fixed_colours():
        drawing = render_drawing(draw())
    out = composite(drawing, _resize(image, drawing.shape[:2], nearest=scale >= 1))
    # The Visualizer's figure may be off by a pixel; pin the size so panels line up.
    return _resize(out, _scaled_size(image, scale))


def draw_outputs(
    image: np.ndarray,
    outputs: Dict,
    metadata,
    confidence_threshold: float = 0.5,
    scale: float = 1.0,
) -> np.ndarray:
    """Overlay a model's outputs on ``image`` with detectron2's Visualizer.

    Args:
        image: (H, W, 3) uint8 RGB, the image the outputs were predicted for.
        outputs: a detectron2 model output of one image: "panoptic_seg" (a pair
            (seg (H, W) int, segments_info)), else "instances" (pred_masks (N, H, W), scores,
            pred_classes, pred_boxes), else "sem_seg" (K, H, W). (H, W) may also be the
            size of a resized copy of the image (e.g. the model's input): see ``painting``.
        metadata: the dataset's Metadata (class names and colours).
        confidence_threshold: instances scoring below it are not drawn.
        scale: output size relative to ``image``.
    Returns:
        (round(H * scale), round(W * scale), 3) uint8 RGB.
    """
    image = check_image(image)
    vis = Visualizer(image, metadata, scale=scale, instance_mode=ColorMode.IMAGE)
    size = image.shape[:2]
    if "panoptic_seg" in outputs:
        seg, segments_info = outputs["panoptic_seg"]
        seg = fit_label_map(seg.to("cpu"), size, "panoptic segments")
        return _visualizer_output(
            image, scale, lambda: vis.draw_panoptic_seg(seg, segments_info)
        )
    if "instances" in outputs:
        inst = outputs["instances"].to("cpu")
        if inst.has("scores"):
            inst = inst[inst.scores >= confidence_threshold]
        # What Visualizer.draw_instance_predictions draws, one full-size mask at a time.
        overlay = instance_overlay(inst, size, metadata)
        order = inst.scores.argsort(descending=True).tolist() if inst.has("scores") else None
        return _visualizer_output(image, scale, lambda: _draw_instances(vis, overlay, order))
    if "sem_seg" in outputs:
        labels = fit_label_map(outputs["sem_seg"].argmax(dim=0).to("cpu"), size)
        return _visualizer_output(image, scale, lambda: vis.draw_sem_seg(labels))
    raise ValueError(
        f"outputs hold none of 'panoptic_seg', 'instances', 'sem_seg'; keys: {sorted(outputs)}"
    )


def draw_ground_truth(
    image: np.ndarray, dataset_dict: Dict, metadata, scale: float = 1.0
) -> np.ndarray:
    """Overlay a detectron2 dataset dict's annotations (polygons, RLE, boxes) on ``image``."""
    image = check_image(image)
    size = (dataset_dict.get("height"), dataset_dict.get("width"))
    if None not in size and tuple(size) != image.shape[:2]:
        raise ValueError(
            f"dataset dict of {dataset_dict.get('file_name', '?')} is for an image of size "
            f"{size}, got an image of size {image.shape[:2]}"
        )
    vis = Visualizer(image, metadata, scale=scale, instance_mode=ColorMode.IMAGE)
    annotations = dataset_dict.get("annotations") or []
    # The Visualizer draws the rest (semantic and panoptic maps); the instances are drawn
    # here, so that their labels are placed apart.
    rest = {k: v for k, v in dataset_dict.items() if k != "annotations"}
    names = metadata.get("thing_classes", None) if metadata is not None else None
    overlay = {
        "boxes": np.array([BoxMode.convert(a["bbox"], a["bbox_mode"], BoxMode.XYXY_ABS)
                           for a in annotations]).reshape(-1, 4),
        "labels": [(names[a["category_id"]] if names else str(a["category_id"]))
                   + ("|crowd" if a.get("iscrowd") else "") for a in annotations],
    }
    if annotations and "segmentation" in annotations[0]:
        overlay["masks"] = [a["segmentation"] for a in annotations]
    if annotations and "keypoints" in annotations[0]:
        overlay["keypoints"] = np.array([a["keypoints"] for a in annotations]).reshape(
            len(annotations), -1, 3)

    def draw():
        if annotations:
            _draw_instances(vis, overlay)
        return vis.draw_dataset_dict(rest)

    return _visualizer_output(image, scale, draw)


def _draw_instances(vis: Visualizer, overlay: Dict, order: Optional[List[int]] = None):
    """``Visualizer.overlay_instances`` with ``overlay``'s masks and boxes, and its labels
    placed apart (``labels.place_labels``); the instance colours are the Visualizer's own."""
    overlay = dict(overlay)
    labels = overlay.pop("labels", None)
    boxes, masks = overlay.get("boxes"), overlay.get("masks")
    n = len(labels) if labels else len(boxes) if boxes is not None else len(masks or [])
    colours = instance_colours(n)
    vis.overlay_instances(**overlay, assigned_colors=colours, alpha=0.5)
    if labels and (boxes is not None or masks is not None):
        if boxes is None:  # outlines only: a label goes by its outline's bounding box
            boxes = [_outline_box(polygons) for polygons in masks]
        boxes = boxes.tensor.numpy() if isinstance(boxes, Boxes) else np.asarray(boxes)
        place_labels(vis, labels, boxes, colours, order)
    return vis.output


def _outline_box(polygons: List[np.ndarray]) -> np.ndarray:
    if not len(polygons):
        return np.zeros(4)
    points = np.concatenate([np.asarray(p).reshape(-1, 2) for p in polygons])
    return np.concatenate([points.min(axis=0), points.max(axis=0)])


def caption_height(width: int) -> int:
    """Height of the caption strip above a panel of the given width."""
    return int(np.clip(round(width * 0.09), 14, 40))


def _caption(panel: np.ndarray, text: str, strip_h: int) -> np.ndarray:
    w = panel.shape[1]
    strip = np.full((strip_h, w, 3), _WHITE, np.uint8)
    font, thickness = cv2.FONT_HERSHEY_SIMPLEX, 1
    # The largest font that fits the strip's height and the panel's width.
    (tw, th), base = cv2.getTextSize(text, font, 1.0, thickness)
    font_scale = min(0.6 * strip_h / max(th + base, 1), 0.95 * w / max(tw, 1))
    (tw, th), base = cv2.getTextSize(text, font, font_scale, thickness)
    origin = (max(0, (w - tw) // 2), (strip_h + th) // 2)
    cv2.putText(strip, text, origin, font, font_scale, (0, 0, 0), thickness, cv2.LINE_AA)
    return np.concatenate([strip, panel], axis=0)


def compose_row(
    panels: Sequence[np.ndarray], captions: Optional[Sequence[str]] = None, gap: int = 4
) -> np.ndarray:
    """Panels side by side, each resized to the tallest one's height, under its caption.

    Returns (H_max + caption_height(max W_i), sum(W_i) + gap * (n - 1), 3) uint8 RGB when
    captions are given (widths after resizing to H_max), else without the caption strip.
    """
    if not panels:
        raise ValueError("compose_row needs at least one panel")
    panels = [check_image(p, f"panel {i}") for i, p in enumerate(panels)]
    if captions is not None and len(captions) != len(panels):
        raise ValueError(f"got {len(captions)} captions for {len(panels)} panels")
    height = max(p.shape[0] for p in panels)
    sized = [
        _resize(p, (height, max(1, int(round(p.shape[1] * height / p.shape[0]))))) for p in panels
    ]
    if captions is not None:
        strip_h = caption_height(max(p.shape[1] for p in sized))
        sized = [_caption(p, c, strip_h) for p, c in zip(sized, captions)]
    out = []
    for i, p in enumerate(sized):
        if i:
            out.append(np.full((p.shape[0], gap, 3), _WHITE, np.uint8))
        out.append(p)
    return np.concatenate(out, axis=1)


def stack_rows(rows: Sequence[np.ndarray], gap: int = 8) -> np.ndarray:
    """Rows one under the other, left-aligned, padded with white to the widest."""
    if not rows:
        raise ValueError("stack_rows needs at least one row")
    rows = [check_image(r, f"row {i}") for i, r in enumerate(rows)]
    width = max(r.shape[1] for r in rows)
    out = []
    for i, r in enumerate(rows):
        if i:
            out.append(np.full((gap, width, 3), _WHITE, np.uint8))
        pad = np.full((r.shape[0], width - r.shape[1], 3), _WHITE, np.uint8)
        out.append(np.concatenate([r, pad], axis=1))
    return np.concatenate(out, axis=0)


def comparison_row(
    image: np.ndarray,
    predictions: Sequence[Tuple[str, Dict]],
    metadata,
    dataset_dict: Optional[Dict] = None,
    confidence_threshold: float = 0.5,
    scale: float = 1.0,
) -> np.ndarray:
    """[image | prediction of each model | ground truth, when ``dataset_dict`` is given].

    Args:
        predictions: (caption, outputs) per model, e.g. [("baseline", ...), ("InstUnique", ...)].
    """
    panels = [scale_image(image, scale)]
    captions = ["image"]
    for caption, outputs in predictions:
        panels.append(draw_outputs(image, outputs, metadata, confidence_threshold, scale))
        captions.append(caption)
    if dataset_dict is not None:
        panels.append(draw_ground_truth(image, dataset_dict, metadata, scale))
        captions.append("ground truth")
    return compose_row(panels, captions)


def _warp_instances(inst: Instances, warp: AffineWarp) -> Instances:
    masks = inst.pred_masks.to("cpu")
    dtype = masks.dtype
    # (N, H, W) -> (H, W, N): one nearest-neighbour warp moves all masks.
    stack = masks.permute(1, 2, 0).numpy()
    warped = torch.from_numpy(np.ascontiguousarray(warp.apply_segmentation(stack, fill=0)))
    warped = warped.permute(2, 0, 1).to(dtype)
    out = Instances(warp.dst_size)
    for name, value in inst.get_fields().items():
        if name not in ("pred_masks", "pred_boxes"):
            out.set(name, value.to("cpu") if hasattr(value, "to") else value)
    out.pred_masks = warped
    out.pred_boxes = BitMasks(warped > 0).get_bounding_boxes()
    return out


def warp_outputs(outputs: Dict, warp: AffineWarp) -> Dict:
    """Move predictions from the frame of ``warp.src_size`` to that of ``warp.dst_size``.

    With ``warp = T.inverse()`` this maps the prediction on T(x) back onto x. Masks and
    panoptic ids move by nearest neighbour; pixels with no pre-image become background
    (panoptic id -1, void). Boxes are recomputed from the warped masks.
    """
    out = {}
    if "instances" in outputs:
        inst = outputs["instances"]
        if tuple(inst.image_size) != warp.src_size:
            raise ValueError(
                f"instances of size {tuple(inst.image_size)} cannot take a warp whose "
                f"src_size is {warp.src_size}"
            )
        if not inst.has("pred_masks"):
            raise ValueError("warp_outputs needs instances with pred_masks")
        out["instances"] = _warp_instances(inst, warp)
    if "panoptic_seg" in outputs:
        seg, segments_info = outputs["panoptic_seg"]
        moved = warp.apply_segmentation(seg.to("cpu").numpy(), fill=-1)
        out["panoptic_seg"] = (torch.from_numpy(np.ascontiguousarray(moved)), segments_info)
    if "sem_seg" in outputs:
        logits = outputs["sem_seg"].to("cpu")
        moved = warp.apply_segmentation(logits.permute(1, 2, 0).numpy(), fill=0)
        out["sem_seg"] = torch.from_numpy(np.ascontiguousarray(moved)).permute(2, 0, 1)
    if not out:
        raise ValueError(
            f"outputs hold none of 'panoptic_seg', 'instances', 'sem_seg'; keys: {sorted(outputs)}"
        )
    return out


def _dim_outside(panel: np.ndarray, valid: np.ndarray) -> np.ndarray:
    valid = _resize(valid.astype(np.uint8), panel.shape[:2], nearest=True).astype(bool)
    out = panel.copy()
    out[~valid] = (0.35 * panel[~valid] + 0.65 * 160).astype(np.uint8)
    return out


def equivariance_row(
    image: np.ndarray,
    outputs: Dict,
    warp: AffineWarp,
    warped_outputs: Dict,
    metadata,
    confidence_threshold: float = 0.5,
    scale: float = 1.0,
    prefix: str = "",
) -> np.ndarray:
    """[f(x) | f(T(x)) on T(x) | T^-1 f(T(x)) on x]: an equivariant model gives the same
    first and last panel. Parts of x that T crops away are dimmed in the last panel.

    Args:
        image: x, (H, W, 3) uint8 RGB.
        outputs: the model's outputs on x.
        warp: T, from x (src_size (H, W)) to x' = T(x).
        warped_outputs: the model's outputs on T(x).
        prefix: prepended to every caption (e.g. the model's name).
    """
    image = check_image(image)
    if warp.src_size != image.shape[:2]:
        raise ValueError(
            f"warp.src_size {warp.src_size} differs from the image size {image.shape[:2]}"
        )
    moved = warp.apply_image(image)
    back = warp_outputs(warped_outputs, warp.inverse())
    seen = warp.inverse().valid_mask()
    panels = [
        draw_outputs(image, outputs, metadata, confidence_threshold, scale),
        draw_outputs(moved, warped_outputs, metadata, confidence_threshold, scale),
        _dim_outside(draw_outputs(image, back, metadata, confidence_threshold, scale), seen),
    ]
    captions: List[str] = [f"{prefix}f(x)", f"{prefix}f(T(x))", f"{prefix}T^-1 f(T(x))"]
    return compose_row(panels, captions)
