"""Painting predictions made at a resized copy of an image: same picture as full-size
predictions, one full-size mask at a time, and clear errors for predictions of another
image."""
import tracemalloc

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from detectron2.data import MetadataCatalog
from detectron2.structures import BitMasks, Instances

from instunique.visualization import draw_outputs
from instunique.visualization.painting import (
    check_same_frame,
    composite,
    fit_label_map,
    mask_outline,
)

META = MetadataCatalog.get("painting_test").set(thing_classes=["a", "b"])


def _instances(masks: torch.Tensor, scores=None) -> Instances:
    n = len(masks)
    inst = Instances(tuple(masks.shape[1:]))
    inst.pred_masks = masks.float()
    inst.pred_boxes = BitMasks(masks > 0).get_bounding_boxes()
    inst.scores = torch.full((n,), 0.9) if scores is None else torch.tensor(scores)
    inst.pred_classes = torch.arange(n) % 2
    return inst


def _squares(n: int, h: int, w: int, side: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    masks = torch.zeros(n, h, w, dtype=torch.bool)
    for i in range(n):
        y = int(torch.randint(0, h - side, (1,), generator=g))
        x = int(torch.randint(0, w - side, (1,), generator=g))
        masks[i, y: y + side, x: x + side] = True
    return masks


def _differ(a, b) -> float:
    return float(np.abs(a.astype(int) - b.astype(int)).max(-1).__gt__(3).mean())


def _mean_difference(a, b) -> float:
    return float(np.abs(a.astype(float) - b.astype(float)).mean())


def test_small_predictions_paint_like_full_size_ones():
    image = np.full((120, 160, 3), 100, np.uint8)
    small = _squares(3, 30, 40, 12)
    full = F.interpolate(small[None].float(), size=(120, 160), mode="nearest")[0].bool()
    on_small = draw_outputs(image, {"instances": _instances(small)}, META)
    on_full = draw_outputs(image, {"instances": _instances(full)}, META)
    assert on_small.shape == on_full.shape == image.shape
    # The same picture but for the squares' corners, which the bilinear up-sampling cuts
    # (and, the outlines then not being rectilinear, matplotlib's pixel snapping of them).
    assert _mean_difference(on_small, on_full) < 2
    assert _mean_difference(on_small, image) > 10
    # Predictions a few (small) pixels away give a different picture.
    moved = draw_outputs(image, {"instances": _instances(small.roll(3, dims=2))}, META)
    assert _mean_difference(moved, on_small) > 10


def test_frames_must_be_resized_copies_of_the_image():
    check_same_frame((64, 85), (120, 160))  # ResizeShortestEdge(64) of 120 x 160
    check_same_frame((120, 160), (120, 160))
    with pytest.raises(ValueError, match=r"instances were predicted for an image of size "
                                         r"\(64, 64\), which is not a resized copy of the "
                                         r"image to draw on, of size \(120, 160\)"):
        check_same_frame((64, 64), (120, 160))
    image = np.zeros((120, 160, 3), np.uint8)
    with pytest.raises(ValueError, match=r"size \(30, 30\)"):
        draw_outputs(image, {"instances": _instances(_squares(1, 30, 30, 5))}, META)


def test_outline_of_an_upsampled_mask():
    mask = torch.zeros(10, 10)
    mask[2:6, 3:8] = 1
    [polygon] = mask_outline(mask, (40, 40))
    xs, ys = polygon[0::2], polygon[1::2]
    # The 4 x 5 cell block, 4x larger, within a pixel of its exact border.
    assert abs(xs.min() - 12) <= 1.5 and abs(xs.max() - 32) <= 1.5
    assert abs(ys.min() - 8) <= 1.5 and abs(ys.max() - 24) <= 1.5
    assert len(polygon) // 2 < 20  # a simplified border, not one vertex per pixel
    assert mask_outline(torch.zeros(10, 10), (40, 40)) == []


def test_composite_and_label_maps():
    background = np.full((2, 3, 3), 100, np.uint8)
    drawing = np.zeros((2, 3, 4), np.uint8)
    drawing[0, 0] = (200, 0, 50, 255)
    drawing[0, 1] = (200, 0, 50, 128)
    out = composite(drawing, background)
    assert out[0, 0].tolist() == [200, 0, 50]
    assert out[0, 1].tolist() == [150, 50, 75]
    assert (out[1] == 100).all() and (out[0, 2] == 100).all()
    with pytest.raises(ValueError, match="drawing of size"):
        composite(drawing, background[:1])

    labels = torch.tensor([[0, 1], [2, 3]], dtype=torch.int32)
    moved = fit_label_map(labels, (4, 4))
    assert moved.dtype == torch.int32 and moved.tolist()[3] == [2, 2, 3, 3]
    with pytest.raises(ValueError, match="segmentation were predicted .* of size \\(2, 2\\)"):
        fit_label_map(labels, (4, 16))


def _peak_bytes(fn) -> int:
    tracemalloc.start()
    try:
        fn()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_painting_holds_one_full_size_mask_at_a_time():
    """32 instances predicted at 60 x 80, painted on a 600 x 800 image: holding their masks
    at full size would take 31 image areas more than painting one instance does."""
    h, w, n = 600, 800, 32
    image = np.full((h, w, 3), 100, np.uint8)
    masks = _squares(n, 60, 80, 8)
    one = _peak_bytes(lambda: draw_outputs(image, {"instances": _instances(masks[:1])}, META))
    pictures = []
    many = _peak_bytes(lambda: pictures.append(
        draw_outputs(image, {"instances": _instances(masks)}, META)))
    assert _mean_difference(pictures[0], image) > 10
    assert many - one < 8 * h * w, f"{(many - one) / (h * w):.1f} image areas more"
