#!/usr/bin/env python
"""Inference of an InstUnique model vs its base segmenter with the same weights.

Both are timed on the same validation images, interleaved, and every output is compared
bit for bit: InstUnique changes training only.

    python benchmarks/inference_parity.py [--weights model.pth]
"""
import argparse
import json
import os
import statistics

import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.modeling import build_model

from common import load_config, machine, test_inputs, timed


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", default="configs/shapes/instunique_mask2former_shapes.yaml")
    p.add_argument("--weights", default="", help="InstUnique checkpoint (random init if empty)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--images", type=int, default=50)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--output", default="benchmarks/results/inference_parity.json")
    args = p.parse_args()

    cfg = load_config(args.config, ["MODEL.DEVICE", args.device])
    base_cfg = cfg.clone()
    base_cfg.MODEL.META_ARCHITECTURE = cfg.MODEL.INST_UNIQUE.BASE_META_ARCHITECTURE
    torch.manual_seed(0)
    model, base = build_model(cfg).eval(), build_model(base_cfg).eval()
    if args.weights:
        DetectionCheckpointer(model).load(args.weights)
    # The base model takes the InstUnique weights through an ordinary checkpoint load.
    base.load_state_dict(model.state_dict(), strict=False)

    name = cfg.DATASETS.TEST[0]
    inputs = test_inputs(cfg, args.images)

    identical = True
    times = {"InstUnique": [], "base": []}
    with torch.no_grad():
        for x in inputs[:2]:  # warm-up
            model([x]), base([x])
        for _ in range(args.reps):
            for x in inputs:
                out = {}
                for label, m in (("InstUnique", model), ("base", base)):

                    def run(label=label, m=m, x=x, out=out):
                        out[label] = m([x])[0]["instances"]

                    times[label].append(timed(run, args.device))
                a, b = out["InstUnique"], out["base"]
                identical &= all(torch.equal(a.get(k), b.get(k)) for k in
                                 ("scores", "pred_classes", "pred_masks"))

    ips = {k: 1.0 / statistics.median(v) for k, v in times.items()}
    ratio = ips["InstUnique"] / ips["base"]
    print(f"\nInference parity on {len(inputs)} images of {name}, {args.reps} interleaved reps"
          f"\nmachine: {machine()}\n")
    print("| model | images/s (median) |\n|---|---|")
    for k, v in ips.items():
        print(f"| {k} | {v:.2f} |")
    print(f"\nratio InstUnique / base: {ratio:.3f}; outputs identical: {identical}")
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    with open(args.output, "w") as f:
        json.dump({"machine": machine(), "args": vars(args), "images_per_s": ips,
                   "ratio": ratio, "identical_outputs": identical}, f, indent=1)
    if not identical:
        raise SystemExit("outputs differ")


if __name__ == "__main__":
    main()
