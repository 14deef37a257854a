"""Overlay labels stay apart and inside the picture on crowded images; on sparse ones they
sit where detectron2's Visualizer puts them, and the instance colours stay the Visualizer's."""
import numpy as np
import pytest
import torch
from detectron2.data import MetadataCatalog
from detectron2.structures import Boxes, Instances
from detectron2.utils.visualizer import ColorMode, Visualizer

from instunique.visualization import draw_outputs
from instunique.visualization.comparison import _visualizer_output
from instunique.visualization.labels import instance_colours, place_labels
from instunique.visualization.painting import instance_overlay

H, W = 240, 320


def _vis():
    return Visualizer(np.zeros((H, W, 3), np.uint8), None, instance_mode=ColorMode.IMAGE)


def _rendered_extent(vis, text):
    """A drawn label's glyph extent in image pixels (x0, y0, x1, y1)."""
    renderer = vis.output.canvas.get_renderer()
    points = vis.output.ax.transData.inverted().transform(
        text.get_window_extent(renderer).get_points())
    return np.concatenate([points.min(axis=0), points.max(axis=0)])


def _disjoint(a, b):
    return a[2] <= b[0] or b[2] <= a[0] or a[3] <= b[1] or b[3] <= a[1]


def test_crowded_labels_do_not_cover_each_other():
    # 40 instances stacked around one spot: the Visualizer would write 40 labels there.
    rng = np.random.default_rng(0)
    x0, y0 = rng.uniform(100, 120, 40), rng.uniform(90, 110, 40)
    boxes = np.stack([x0, y0, x0 + 60, y0 + 50], axis=1)
    labels = [f"class{i} {90 - i}%" for i in range(40)]
    vis = _vis()
    placed = place_labels(vis, labels, boxes, instance_colours(40), order=list(range(40)))
    drawn = [p for p in placed if p is not None]
    assert placed[0] is not None  # the best label always gets a spot
    assert 1 < len(drawn) < 40  # several fit, not all 40
    assert len(vis.output.ax.texts) == len(drawn)
    for i, a in enumerate(drawn):
        assert 0 <= a[0] and 0 <= a[1] and a[2] <= W and a[3] <= H
        for b in drawn[i + 1:]:
            assert _disjoint(a, b)
    # The extents returned are where the text really is.
    for text, extent in zip(vis.output.ax.texts, drawn):
        np.testing.assert_allclose(_rendered_extent(vis, text), extent, atol=1.0)


def test_sparse_labels_sit_on_the_box_corner_as_the_visualizer_puts_them():
    boxes = np.array([[10, 20, 80, 90], [150, 30, 230, 100], [40, 150, 140, 220]], float)
    vis = _vis()
    placed = place_labels(vis, ["a 90%", "b 80%", "c 70%"], boxes, instance_colours(3))
    for extent, box in zip(placed, boxes):
        np.testing.assert_allclose(extent[:2], box[:2])


def test_order_decides_who_keeps_a_contested_spot():
    boxes = np.array([[5, 5, 300, 230]] * 7, float)  # one spot per corner, fewer than 7
    labels = [f"instance {i}" for i in range(7)]
    first = place_labels(_vis(), labels, boxes, instance_colours(7), order=[6, 5, 4, 3, 2, 1, 0])
    assert first[6] is not None and first[6][:2] == (5.0, 5.0)
    assert first[0] is None


def test_mismatched_inputs_are_refused():
    with pytest.raises(ValueError, match="one of each per instance"):
        place_labels(_vis(), ["a", "b"], np.zeros((3, 4)), instance_colours(2))


def test_instance_colours_are_the_visualizers_own():
    # Without labels (no classes, no scores), the overlay equals detectron2's own drawing.
    masks = torch.zeros(3, H, W, dtype=torch.bool)
    masks[0, 20:100, 30:120] = masks[1, 60:200, 100:220] = masks[2, 150:230, 200:310] = True
    inst = Instances((H, W), pred_masks=masks,
                     pred_boxes=Boxes(torch.tensor([[30, 20, 120, 100], [100, 60, 220, 200],
                                                    [200, 150, 310, 230]], dtype=torch.float)))
    image = np.random.default_rng(1).integers(0, 255, (H, W, 3), dtype=np.uint8)
    metadata = MetadataCatalog.get("shapes_train")
    ours = draw_outputs(image, {"instances": inst}, metadata)
    vis = Visualizer(image, metadata, instance_mode=ColorMode.IMAGE)
    theirs = _visualizer_output(image, 1.0, lambda: vis.overlay_instances(
        **instance_overlay(inst, (H, W), metadata), alpha=0.5))
    np.testing.assert_array_equal(ours, theirs)


def test_outlines_without_boxes_still_get_their_labels():
    masks = torch.zeros(2, H, W, dtype=torch.bool)
    masks[0, 20:100, 30:120] = masks[1, 120:200, 150:260] = True
    image = np.full((H, W, 3), 90, np.uint8)
    plain = Instances((H, W), pred_masks=masks)
    labelled = Instances((H, W), pred_masks=masks, scores=torch.tensor([0.9, 0.8]),
                         pred_classes=torch.tensor([0, 1]))
    metadata = MetadataCatalog.get("shapes_train")
    without = draw_outputs(image, {"instances": plain}, metadata)
    with_labels = draw_outputs(image, {"instances": labelled}, metadata)
    changed = np.any(without != with_labels, axis=2)
    # The text lands at each outline's top-left corner (the box the outline spans).
    assert changed[20:40, 30:80].any() and changed[120:140, 150:200].any()
    assert not changed[200:, :140].any()
