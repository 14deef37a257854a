"""The mask-resolution bound (benchmarks/mask_resolution.py) reduces masks as it says: edges
on cell borders pass any stride, corners round, detail finer than a cell is lost unless the
logits are fitted, and Mask R-CNN's per-box 28 x 28 keeps a rectangle."""
import os
import sys

import torch

from utils import ROOT

sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
from mask_resolution import fitted_through_stride, through_roi, through_stride  # noqa: E402


def test_bands_of_whole_cells_pass_every_stride_and_corners_round():
    bands = torch.zeros(2, 32, 40, dtype=torch.bool)
    bands[0, 8:24, :] = True
    bands[1, :, 24:40] = True  # touches the border
    for stride in (1, 2, 4, 8):
        assert torch.equal(through_stride(bands, stride), bands)
    box = torch.zeros(1, 32, 40, dtype=torch.bool)
    box[0, 8:24, 8:16] = True
    lost = box & ~through_stride(box, 4)
    assert lost.sum() == 4 and lost[0, [8, 8, 23, 23], [8, 15, 8, 15]].all()  # the corners
    assert not (through_stride(box, 4) & ~box).any()


def test_detail_below_a_cell_is_lost_by_occupancy_and_kept_by_fitted_logits():
    mask = torch.zeros(1, 32, 32, dtype=torch.bool)
    mask[0, 10:13, 10:13] = True  # 9 px of an 8 x 8 cell
    assert not through_stride(mask, 8).any()
    fitted = fitted_through_stride(mask, 4)
    iou = (fitted & mask).sum() / (fitted | mask).sum()
    assert iou > 0.5


def test_fitting_in_a_window_equals_fitting_the_whole_map():
    masks = torch.zeros(2, 64, 48, dtype=torch.bool)
    masks[0, 20:27, 30:34] = True
    masks[0, 27:29, 31:33] = True
    masks[1, 0:9, 0:5] = True  # at the corner: its window is cut by the image's border
    window = fitted_through_stride(masks, 4, steps=100)
    whole = fitted_through_stride(masks, 4, steps=100, margin=100)
    assert torch.equal(window, whole)


def test_odd_sizes_keep_their_shape():
    mask = torch.zeros(1, 37, 29, dtype=torch.bool)
    mask[0, 5:30, 3:20] = True
    assert through_stride(mask, 4).shape == mask.shape
    assert fitted_through_stride(mask, 4, steps=5).shape == mask.shape


def test_roi_mask_keeps_a_rectangle():
    masks = torch.zeros(2, 64, 64, dtype=torch.bool)
    masks[0, 5:20, 30:60] = True
    masks[1, 40:41, 10:50] = True  # one pixel high
    assert torch.equal(through_roi(masks), masks)
