#!/usr/bin/env python
"""Mask AP of trained Mask2Former checkpoints with MODEL.MASK_FORMER.TEST.LARGEST_COMPONENT
off and on: the same weights, the same images, so every checkpoint gives one paired
difference (mean and 95% t interval over the checkpoints).

    python benchmarks/largest_component.py --config configs/blobs/mask2former_blobs.yaml \
        --weights R/seed0/model_final.pth R/seed1/model_final.pth R/seed2/model_final.pth
"""
import argparse
import json
import logging
import os

import torch
from accuracy_study import paired_difference
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.modeling import build_model

from common import coco_mask_ap, dataset_dicts, load_config, machine, test_inputs

FIGURES = ("AP", "AP50", "AP75")


def mask_ap(model, inputs, dataset):
    with torch.no_grad():
        outputs = [model([x])[0] for x in inputs]
    return coco_mask_ap(dataset, inputs, [o["instances"].to("cpu") for o in outputs], FIGURES)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", required=True)
    p.add_argument("--weights", nargs="+", required=True)
    p.add_argument("--opts", nargs="*", default=[], help="config overrides")
    p.add_argument("--output", default="benchmarks/results/largest_component.json")
    args = p.parse_args()

    cfg = load_config(args.config, ["MODEL.DEVICE", "cpu", *args.opts])
    dataset = cfg.DATASETS.TEST[0]
    dicts = dataset_dicts(dataset)
    inputs = test_inputs(cfg, len(dicts))
    for d, x in zip(dicts, inputs):
        x["image_id"] = d["image_id"]
    logging.getLogger("detectron2").setLevel(logging.WARNING)
    rows = []
    for weights in args.weights:
        model = build_model(cfg).eval()
        DetectionCheckpointer(model).load(weights)
        segmenter = getattr(model, "segmenter", model)  # InstUnique wraps the base model
        row = {"weights": weights}
        for key, on in (("off", False), ("on", True)):
            segmenter.largest_component = on
            row[key] = mask_ap(model, inputs, dataset)
        rows.append(row)

    print(f"\nLARGEST_COMPONENT off -> on, {len(inputs)} images of {dataset}")
    print(f"machine: {machine()}\n")
    print("| checkpoint | " + " | ".join(f"{f} off | {f} on" for f in FIGURES) + " |")
    print("|---|" + "---|" * (2 * len(FIGURES)))
    for r in rows:
        cells = " | ".join(f"{r['off'][f]:.1f} | {r['on'][f]:.1f}" for f in FIGURES)
        print(f"| {r['weights']} | {cells} |")
    summary = {f: paired_difference([(r["on"][f], r["off"][f]) for r in rows]) for f in FIGURES}
    print("\npaired difference (on - off), mean [95% t interval]: " + ", ".join(
        f"{f} {m:+.1f}" + ("" if half is None else f" [{m - half:+.1f}, {m + half:+.1f}]")
        for f, (m, half) in summary.items()))
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    with open(args.output, "w") as f:
        json.dump({"machine": machine(), "args": vars(args), "runs": rows,
                   "paired_difference": summary}, f, indent=1)


if __name__ == "__main__":
    main()
