#!/usr/bin/env python
"""Where a trained model's confident masks lie: on one instance, on its neighbours, or on
background.

For every prediction above ``--score`` on the first ``--images`` test images, the share of
its area on the ground-truth instance it overlaps most, on other instances and on
background; its best IoU; and how many pieces (connected components of at least
``--min-piece`` px) it has. A model that cannot tell touching look-alike instances apart
puts a large share on other instances, in several pieces.

    python benchmarks/mask_spread.py benchmarks/results/accuracy/base_blobs/*/seed0
"""
import argparse
import json
import os
import statistics

import cv2
import numpy as np
import torch
from detectron2.data import detection_utils as utils
from detectron2.modeling import build_model

from instunique.checkpoint import AtomicCheckpointer

from common import dataset_dicts, load_config, machine, test_inputs


def gt_masks(record) -> np.ndarray:
    """(N, H, W) bool masks of a dataset dict's annotations (polygons or RLE)."""
    size = (record["height"], record["width"])
    inst = utils.annotations_to_instances(record["annotations"], size, mask_format="bitmask")
    return inst.gt_masks.tensor.numpy().astype(bool)


def spread(pred: np.ndarray, gts: np.ndarray, min_piece: int):
    area = max(int(pred.sum()), 1)
    inter = (gts & pred).reshape(len(gts), -1).sum(1)
    union = (gts | pred).reshape(len(gts), -1).sum(1)
    best = int(np.argmax(inter / np.maximum(union, 1)))
    _, _, stats, _ = cv2.connectedComponentsWithStats(pred.astype(np.uint8))
    return {
        "best_iou": float(inter[best] / max(union[best], 1)),
        "on_best": float(inter[best] / area),
        "on_others": float((pred & gts.any(0) & ~gts[best]).sum() / area),
        "on_background": float((pred & ~gts.any(0)).sum() / area),
        "pieces": int((stats[1:, cv2.CC_STAT_AREA] >= min_piece).sum()),
    }


def measure(run_dir: str, images: int, score: float, min_piece: int):
    cfg = load_config(os.path.join(run_dir, "config.yaml"), ["MODEL.DEVICE", "cpu"])
    model = build_model(cfg).eval()
    AtomicCheckpointer(model).load(os.path.join(run_dir, "model_final.pth"))
    records = dataset_dicts(cfg.DATASETS.TEST[0])[:images]
    rows = []
    for record, inputs in zip(records, test_inputs(cfg, images)):
        with torch.no_grad():
            inst = model([inputs])[0]["instances"]
        gts = gt_masks(record)
        for pred in inst.pred_masks[inst.scores > score].numpy().astype(bool):
            rows.append(spread(pred, gts, min_piece))
    out = {k: statistics.mean(r[k] for r in rows) for k in rows[0]} if rows else {}
    if rows:
        out["best_iou_median"] = statistics.median(r["best_iou"] for r in rows)
        out["several_pieces"] = statistics.mean(r["pieces"] >= 2 for r in rows)
    out["masks"] = len(rows)
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("runs", nargs="+", help="train_net.py output folders (config.yaml, "
                   "model_final.pth)")
    p.add_argument("--images", type=int, default=6)
    p.add_argument("--score", type=float, default=0.3)
    p.add_argument("--min-piece", type=int, default=5)
    p.add_argument("--output", default="benchmarks/results/mask_spread.json")
    args = p.parse_args()
    torch.set_num_threads(1)
    results = {run: measure(run, args.images, args.score, args.min_piece) for run in args.runs}
    print(f"\nconfident masks (score > {args.score}) on the first {args.images} test images\n")
    print("| run | masks | on best instance | on other instances | on background | "
          "median best IoU | in >= 2 pieces |")
    print("|---|---|---|---|---|---|---|")
    for run, r in results.items():
        if not r["masks"]:
            print(f"| {run} | 0 | | | | | |")
            continue
        print(f"| {run} | {r['masks']} | {r['on_best']:.2f} | {r['on_others']:.2f} | "
              f"{r['on_background']:.2f} | {r['best_iou_median']:.2f} | "
              f"{r['several_pieces']:.2f} |")
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    with open(args.output, "w") as f:
        json.dump({"machine": machine(), "args": vars(args), "results": results}, f, indent=1)
    print(f"\nwrote {args.output}")


if __name__ == "__main__":
    main()
