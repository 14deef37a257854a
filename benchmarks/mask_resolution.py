#!/usr/bin/env python
"""The mask AP that the ground truth itself reaches through each model's mask resolution:
about the most a mask head of that resolution can score, whatever it learns.

- Mask2Former / SparseInst ("stride s"): one mask per query on the mask features at stride
  s of the input, upsampled bilinearly to the image. "fitted logits": stride-s logits
  fitted to each ground-truth mask by gradient descent (close to the bound); plain
  "stride s": the mask's occupancy of each s x s cell, upsampled the same way and cut at
  0.5 (a smooth map, as a network's tends to be).
- Mask R-CNN ("RoI 28 x 28"): each ground-truth mask cropped to its box and resampled to
  the mask head's 28 x 28 (ROIAlign, as its training targets are made), then pasted back
  as detectron2 pastes predictions.

Every "prediction" has its true class and score 1, so only the masks' shapes cost AP.

    python benchmarks/mask_resolution.py --datasets blobs_val shapes_val shapes_crowd_val
"""
import argparse
import json
import logging
import os
from collections import defaultdict
from typing import List

import torch
import torch.nn.functional as F
from detectron2.data import detection_utils as utils
from detectron2.layers.mask_ops import paste_masks_in_image
from detectron2.structures import BitMasks, Instances

from common import coco_mask_ap, dataset_dicts, machine

FIGURES = ("AP", "AP50", "AP75")


def gt_instances(record) -> Instances:
    """The record's annotations as Instances with (N, H, W) bool ``gt_masks``."""
    size = (record["height"], record["width"])
    return utils.annotations_to_instances(record["annotations"], size, mask_format="bitmask")


def _upsample(logits: torch.Tensor, stride: int) -> torch.Tensor:
    return F.interpolate(logits, scale_factor=stride, mode="bilinear", align_corners=False)


def through_stride(masks: torch.Tensor, stride: int) -> torch.Tensor:
    """(N, H, W) bool masks after a stride-``stride`` map: cell occupancy, bilinear back."""
    h, w = masks.shape[-2:]
    pad_h, pad_w = -h % stride, -w % stride
    occupancy = F.avg_pool2d(F.pad(masks[:, None].float(), (0, pad_w, 0, pad_h)), stride)
    return _upsample(occupancy - 0.5, stride)[:, 0, :h, :w] > 0


def _windows(masks: torch.Tensor, stride: int, margin: int):
    """Per mask, the top-left cell (N, 2) of an equal-sized window of cells around it,
    ``margin`` cells beyond its extent, inside the grid; and the window's (cells_y, cells_x)."""
    grid = torch.tensor([-(-masks.shape[1] // stride), -(-masks.shape[2] // stride)])
    lo, hi = [], []
    for m in masks:
        ys, xs = m.nonzero(as_tuple=True)
        if len(ys) == 0:
            ys, xs = torch.zeros(1, dtype=torch.long), torch.zeros(1, dtype=torch.long)
        lo.append(torch.stack([ys.min(), xs.min()]) // stride - margin)
        hi.append(torch.stack([ys.max(), xs.max()]) // stride + 1 + margin)
    lo, hi = torch.stack(lo), torch.stack(hi)
    size = torch.minimum((hi - lo).max(0).values, grid)
    return torch.minimum(lo.clamp(min=0), grid - size), size


def fitted_through_stride(masks: torch.Tensor, stride: int, steps: int = 300,
                          margin: int = 2) -> torch.Tensor:
    """(N, H, W) bool masks from stride-``stride`` logits fitted to them: the logits that
    minimise the binary cross-entropy of their bilinear upsampling against the mask (what
    the models' mask loss asks of them), from the occupancy map's. Each mask is fitted in a
    window of cells ``margin`` beyond its extent (far cells only need to stay negative);
    the window's border is the image's or lies where the logits are negative, so its
    upsampling equals the whole map's."""
    h, w = masks.shape[-2:]
    padded = F.pad(masks.float(), (0, -w % stride, 0, -h % stride))
    valid = F.pad(torch.ones(1, h, w), (0, -w % stride, 0, -h % stride))
    corners, (cells_y, cells_x) = _windows(masks, stride, margin)
    crop = [(slice(y * stride, (y + cells_y) * stride), slice(x * stride, (x + cells_x) * stride))
            for y, x in corners.tolist()]
    target = torch.stack([padded[i][c] for i, c in enumerate(crop)])[:, None]
    weight = torch.stack([valid[0][c] for c in crop])[:, None]  # padding is not the image
    logits = (8 * (F.avg_pool2d(target, stride) - 0.5)).requires_grad_()
    optimizer = torch.optim.Adam([logits], lr=0.2)
    for _ in range(steps):
        loss = F.binary_cross_entropy_with_logits(_upsample(logits, stride), target, weight)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    out = torch.zeros_like(padded, dtype=torch.bool)
    with torch.no_grad():
        for i, (c, up) in enumerate(zip(crop, _upsample(logits, stride))):
            out[i][c] = up[0] > 0
    return out[:, :h, :w]


def through_roi(masks: torch.Tensor, side: int = 28) -> torch.Tensor:
    """(N, H, W) bool masks after Mask R-CNN's per-box side x side mask."""
    bitmasks = BitMasks(masks)
    boxes = bitmasks.get_bounding_boxes()
    patches = bitmasks.crop_and_resize(boxes.tensor, side).float()
    return paste_masks_in_image(patches, boxes, masks.shape[-2:], threshold=0.5)


def reduce_all(gts: List[Instances], reduce, chunk: int = 256) -> List[torch.Tensor]:
    """Every image's reduced masks; masks of equal-sized images go through ``reduce``
    together, ``chunk`` at a time (one fit for many images)."""
    out = [None] * len(gts)
    by_size = defaultdict(list)
    for i, gt in enumerate(gts):
        by_size[gt.image_size].append(i)
    for indices in by_size.values():
        masks = torch.cat([gts[i].gt_masks.tensor for i in indices])
        reduced = torch.cat([reduce(m) for m in masks.split(chunk)]) if len(masks) else masks
        for i, m in zip(indices, reduced.split([len(gts[i]) for i in indices])):
            out[i] = m
    return out


def mask_ap(dataset, records, gts, reduce) -> dict:
    preds = []
    for gt, masks in zip(gts, reduce_all(gts, reduce)):
        preds.append(Instances(gt.image_size, pred_masks=masks, pred_classes=gt.gt_classes,
                               pred_boxes=BitMasks(masks).get_bounding_boxes(),
                               scores=torch.ones(len(gt))))
    return coco_mask_ap(dataset, [{"image_id": r["image_id"]} for r in records], preds, FIGURES)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--datasets", nargs="+", default=["blobs_val", "shapes_val"])
    p.add_argument("--strides", type=int, nargs="+", default=[1, 2, 4, 8])
    p.add_argument("--output", default="benchmarks/results/mask_resolution.json")
    args = p.parse_args()
    logging.getLogger("detectron2").setLevel(logging.WARNING)

    reductions = {f"stride {s}": (lambda m, s=s: through_stride(m, s)) for s in args.strides}
    reductions.update({f"stride {s}, fitted logits": (lambda m, s=s: fitted_through_stride(m, s))
                       for s in args.strides if s > 1})
    reductions["RoI 28 x 28 (Mask R-CNN)"] = through_roi
    rows = []
    for dataset in args.datasets:
        records = dataset_dicts(dataset)
        gts = [gt_instances(r) for r in records]
        areas = torch.cat([gt.gt_masks.tensor.sum((1, 2)) for gt in gts]).float()
        for name, reduce in reductions.items():
            rows.append({"dataset": dataset, "mask": name, "median_area": areas.median().item(),
                         **mask_ap(dataset, records, gts, reduce)})

    print(f"\n| dataset | median instance area (px) | mask | {' | '.join(FIGURES)} |")
    print("|---|---|---|" + "---|" * len(FIGURES))
    for r in rows:
        figures = " | ".join(f"{r[k]:.1f}" for k in FIGURES)
        print(f"| {r['dataset']} | {r['median_area']:.0f} | {r['mask']} | {figures} |")
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    with open(args.output, "w") as f:
        json.dump({"machine": machine(), "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
