"""FCOS locations and training targets (Tian et al., "FCOS", ICCV 2019, as AdelaiDet's
CondInst trains it).

A location of FPN level i (stride s) at grid cell (row y, column x) sits at input pixel
(s * x + s // 2, s * y + s // 2). It is positive for a ground-truth instance when

- it lies inside the instance's "centre region": the box of half-side POS_RADIUS * s
  around the centre of mass of the instance's mask, clipped to its box (CENTER_SAMPLE;
  otherwise: inside the box);
- the largest of its distances (l, t, r, b) to the box sides lies in the level's size
  range [SOI[i-1], SOI[i]] (both ends included);

and among several such instances it takes the one of smallest box area.
"""
import math
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import torch
from torch import Tensor


def compute_locations(h: int, w: int, stride: int, device) -> Tensor:
    """(h * w, 2) float32 input-pixel (x, y) of a level's grid, row-major: cell (y, x) at
    (stride * x + stride // 2, stride * y + stride // 2)."""
    xs = torch.arange(w, dtype=torch.float32, device=device) * stride
    ys = torch.arange(h, dtype=torch.float32, device=device) * stride
    grid_y, grid_x = torch.meshgrid(ys, xs, indexing="ij")
    return torch.stack((grid_x.reshape(-1), grid_y.reshape(-1)), dim=1) + stride // 2


def level_size_ranges(sizes_of_interest: Sequence[float]) -> List[Tuple[float, float]]:
    """Per level, the (lo, hi) range of max(l, t, r, b) it is responsible for:
    [-1, SOI[0]], [SOI[0], SOI[1]], ..., [SOI[-1], 1e8] (AdelaiDet's ends)."""
    bounds = [-1.0] + [float(s) for s in sizes_of_interest] + [1e8]
    return list(zip(bounds[:-1], bounds[1:]))


def mask_centers(masks: Tensor) -> Tensor:
    """(M, 2) centre of mass (x, y) of (M, H, W) masks in pixel-index coordinates (pixel
    (i, j) at (j, i), as AdelaiDet computes it); an empty mask gives (0, 0)."""
    # Row and column counts first: no float copy of the (M, H, W) masks.
    h, w = masks.shape[-2:]
    masks = masks.bool()  # a no-op for the bool masks of prepare_targets
    per_col = masks.sum(1).float()  # (M, W)
    per_row = masks.sum(2).float()  # (M, H)
    area = per_col.sum(1).clamp(min=1e-6)
    xs = torch.arange(w, dtype=torch.float32, device=masks.device)
    ys = torch.arange(h, dtype=torch.float32, device=masks.device)
    cx = (per_col * xs).sum(1) / area
    cy = (per_row * ys).sum(1) / area
    return torch.stack((cx, cy), dim=1)


def centerness_targets(reg_targets: Tensor) -> Tensor:
    """sqrt(min(l, r) / max(l, r) * min(t, b) / max(t, b)) of (n, 4) positive (l, t, r, b)
    (any common unit): (n,)."""
    lr = reg_targets[:, [0, 2]]
    tb = reg_targets[:, [1, 3]]
    ratio = (lr.min(1).values / lr.max(1).values) * (tb.min(1).values / tb.max(1).values)
    return ratio.sqrt()


@dataclass
class FCOSTargets:
    """One image's per-location targets (L locations over all levels).

    labels: (L,) long class, ``num_classes`` for background.
    reg_targets: (L, 4) (l, t, r, b) to the assigned box in units of the location's
        stride (0 for background).
    gt_inds: (L,) long index of the assigned instance, -1 for background.
    ctrness: (L,) centerness target (0 for background).
    """

    labels: Tensor
    reg_targets: Tensor
    gt_inds: Tensor
    ctrness: Tensor

    @property
    def positive(self) -> Tensor:
        return self.gt_inds >= 0


def assign_fcos_targets(
    locations: Tensor, strides: Tensor, size_ranges: Tensor, boxes: Tensor, labels: Tensor,
    num_classes: int, centers: Optional[Tensor] = None, radius: float = 1.5,
) -> FCOSTargets:
    """FCOS targets of one image.

    Args:
        locations: (L, 2) input-pixel (x, y) of every location.
        strides: (L,) stride of each location's level.
        size_ranges: (L, 2) (lo, hi) size range of each location's level.
        boxes: (M, 4) XYXY boxes in input pixels; labels: (M,) classes.
        centers: (M, 2) centres of the centre regions (CondInst: the masks' centres of
            mass); None: no centre sampling (positives anywhere inside the box).
        radius: POS_RADIUS, the centre region's half-side in strides.
    """
    num_loc, num_gt = len(locations), len(boxes)
    device = locations.device
    if num_gt == 0:
        return FCOSTargets(
            labels=torch.full((num_loc,), num_classes, dtype=torch.long, device=device),
            reg_targets=locations.new_zeros((num_loc, 4)),
            gt_inds=torch.full((num_loc,), -1, dtype=torch.long, device=device),
            ctrness=locations.new_zeros(num_loc),
        )
    boxes = boxes.to(locations.dtype)
    xs, ys = locations[:, 0:1], locations[:, 1:2]  # (L, 1)
    x0, y0, x1, y1 = (boxes[:, i][None] for i in range(4))  # (1, M)
    reg = torch.stack((xs - x0, ys - y0, x1 - xs, y1 - ys), dim=2)  # (L, M, 4)

    if centers is not None:
        r = strides.to(locations.dtype)[:, None] * radius
        cx, cy = centers[:, 0].to(locations.dtype)[None], centers[:, 1].to(locations.dtype)[None]
        # The centre region, never outside the box.
        region = torch.stack((
            xs - torch.maximum(cx - r, x0), ys - torch.maximum(cy - r, y0),
            torch.minimum(cx + r, x1) - xs, torch.minimum(cy + r, y1) - ys,
        ), dim=2)
        inside = region.min(2).values > 0
    else:
        inside = reg.min(2).values > 0
    largest = reg.max(2).values
    in_range = (largest >= size_ranges[:, 0:1]) & (largest <= size_ranges[:, 1:2])

    area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    # Ambiguous locations go to the smallest box; inf marks "not a candidate".
    cost = torch.where(inside & in_range, area[None].expand(num_loc, -1),
                       torch.full_like(largest, math.inf))
    min_cost, gt_inds = cost.min(dim=1)
    positive = torch.isfinite(min_cost)

    reg = reg[torch.arange(num_loc, device=device), gt_inds] / strides.to(reg.dtype)[:, None]
    reg = torch.where(positive[:, None], reg, torch.zeros_like(reg))
    cls = torch.where(positive, labels.to(device)[gt_inds], torch.full_like(gt_inds, num_classes))
    ctrness = locations.new_zeros(num_loc)
    ctrness[positive] = centerness_targets(reg[positive])
    return FCOSTargets(labels=cls, reg_targets=reg,
                       gt_inds=torch.where(positive, gt_inds, torch.full_like(gt_inds, -1)),
                       ctrness=ctrness)


def masks_to_boxes(masks: Tensor) -> Tensor:
    """(M, 4) XYXY boxes of (M, H, W) bool masks, x1/y1 one past the last pixel (as
    detectron2's ``BitMasks.get_bounding_boxes``); an empty mask gives (0, 0, 0, 0)."""
    masks = masks.bool()
    h, w = masks.shape[-2:]
    boxes = torch.zeros((len(masks), 4), dtype=torch.float32, device=masks.device)
    if len(masks) == 0:
        return boxes
    cols, rows = masks.any(1), masks.any(2)  # (M, W), (M, H)
    nonempty = cols.any(1)
    # argmax of a bool row finds its first True; on the flipped row, its last.
    boxes[:, 0] = cols.float().argmax(1).float()
    boxes[:, 1] = rows.float().argmax(1).float()
    boxes[:, 2] = w - cols.flip(1).float().argmax(1).float()
    boxes[:, 3] = h - rows.flip(1).float().argmax(1).float()
    return torch.where(nonempty[:, None], boxes, torch.zeros_like(boxes))
