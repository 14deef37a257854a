#!/usr/bin/env python
"""How much Mask2Former's Hungarian matching depends on its random points.

The matcher scores every (query, instance) pair on TRAIN_NUM_POINTS points drawn uniformly
over the image, the same for all pairs. An instance of a few dozen pixels in a 256 px image
gets one or two of 1,024 points, so its mask costs, hence which query it is assigned, are
mostly noise. For each point budget this script matches the same predictions (a checkpoint,
or the untrained model) to the same training images' instances with fresh random points,
and reports how often an instance's query differs from the one the dense matching (every
cell of the mask grid) gives, and the mean number of points that land in an instance.

    python benchmarks/matching_stability.py --config configs/blobs/mask2former_blobs.yaml \\
        --weights output/mask2former_blobs/model_final.pth
"""
import argparse
import json
import os
import statistics

import torch
from detectron2.modeling import build_model

from instunique.checkpoint import AtomicCheckpointer
from instunique.data import InstanceViewMapper
from instunique.segmenters.mask2former.matcher import HungarianMatcher

from common import ROOT, dataset_dicts, load_config, machine


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", default="configs/blobs/mask2former_blobs.yaml")
    p.add_argument("--weights", nargs="*", default=[""], help="checkpoints ('' = untrained)")
    p.add_argument("--points", type=int, nargs="+", default=[1024, 4096, 12544])
    p.add_argument("--images", type=int, default=8)
    p.add_argument("--draws", type=int, default=5, help="random point draws per budget")
    p.add_argument("--output", default="benchmarks/results/matching_stability.json")
    p.add_argument("opts", nargs=argparse.REMAINDER, help="config overrides")
    args = p.parse_args()

    cfg = load_config(args.config, args.opts)
    mf = cfg.MODEL.MASK_FORMER
    mapper = InstanceViewMapper(cfg, is_train=False)
    inputs = [mapper(d) for d in dataset_dicts(cfg.DATASETS.TRAIN[0])[: args.images]]
    rows = []
    for weights in args.weights:
        torch.manual_seed(0)
        model = build_model(cfg).eval()
        if weights:
            AtomicCheckpointer(model).load(weights)
        with torch.no_grad():
            images = model.preprocess_image(inputs)
            raw = model.predict(images)
            targets = model.prepare_targets(inputs, images)
        outputs = {"pred_logits": raw["pred_logits"], "pred_masks": raw["pred_masks"]}
        costs = dict(cost_class=mf.CLASS_WEIGHT, cost_mask=mf.MASK_WEIGHT,
                     cost_dice=mf.DICE_WEIGHT)
        dense = HungarianMatcher(**costs, num_points=0)(outputs, targets)
        dense_query = [dict(zip(j.tolist(), i.tolist())) for i, j in dense]
        area = torch.cat([t["masks"].flatten(1).float().mean(1) for t in targets])
        for points in args.points:
            matcher = HungarianMatcher(**costs, num_points=points)
            changed = []
            for draw in range(args.draws):
                torch.manual_seed(1000 + draw)
                for (i, j), ref in zip(matcher(outputs, targets), dense_query):
                    changed += [ref[t] != q for q, t in zip(i.tolist(), j.tolist())]
            rows.append({
                "weights": weights or "untrained",
                "points": points,
                "instances": int(len(area)),
                "mean_points_in_instance": float(area.mean() * points),
                "changed_vs_dense_pct": 100.0 * statistics.mean(changed),
            })

    print(f"\n{args.config}: {len(inputs)} training images, {args.draws} draws of points\n")
    print("| model | points | instances | points per instance (mean) | "
          "query differs from dense matching |")
    print("|---|---|---|---|---|")
    for r in rows:
        name = os.path.relpath(r["weights"], ROOT) if r["weights"] != "untrained" else "untrained"
        print(f"| {name} | {r['points']} | {r['instances']} | "
              f"{r['mean_points_in_instance']:.1f} | {r['changed_vs_dense_pct']:.1f}% |")
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    with open(args.output, "w") as f:
        json.dump({"config": args.config, "machine": machine(), "rows": rows}, f, indent=1)
    print(f"\nwrote {args.output}")


if __name__ == "__main__":
    main()
