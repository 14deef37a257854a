#!/usr/bin/env python
"""Do a model's queries fire on other images, and does each instance get one query?

A thin caller of instunique.evaluation.QueryUniquenessEvaluator (definitions in its
docstring: external firing share, mean max external probability, duplicate, merged and
split rates) on the first --images validation images, for several trained models side by
side, e.g. the seeds of the accuracy study. train_net.py runs the same evaluator beside
COCOEvaluator when TEST.UNIQUENESS.ENABLED.

    python benchmarks/query_uniqueness.py --weights run_a/model_final.pth run_b/model_final.pth
"""
import argparse
import json
import os
import statistics

import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.modeling import build_model

from instunique.evaluation import QueryUniquenessEvaluator

from common import dataset_dicts, load_config, machine, test_inputs

KEYS = ("confident_per_image", "duplicate_rate", "merged_rate", "split_rate", "external_fire",
        "external_max_prob")


def evaluate(cfg, model, inputs):
    """The evaluator's results over ``inputs``, one image per forward."""
    evaluator = QueryUniquenessEvaluator(cfg, cfg.DATASETS.TEST[0], model)
    evaluator.reset()
    model.eval()
    with torch.no_grad():
        for x in inputs:
            evaluator.process([x], model([x]))
    return evaluator.evaluate()["uniqueness"]


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", default="configs/shapes/instunique_mask2former_shapes.yaml")
    p.add_argument("--weights", nargs="+", required=True)
    p.add_argument("--labels", nargs="+", help="one per weights file")
    p.add_argument("--images", type=int, default=40)
    p.add_argument("--score", type=float, default=0.5, help="TEST.UNIQUENESS.SCORE_THRESH")
    p.add_argument("--group-size", type=int, default=8, help="TEST.UNIQUENESS.GROUP_SIZE")
    p.add_argument("--output", default="benchmarks/results/query_uniqueness.json")
    args = p.parse_args()
    # Default label: the checkpoint's last two folders, e.g. "instunique/seed0".
    labels = args.labels or ["/".join(os.path.dirname(os.path.abspath(w)).split(os.sep)[-2:])
                             for w in args.weights]
    if len(labels) != len(args.weights):
        raise SystemExit(f"--labels: {len(labels)} labels for {len(args.weights)} weights")
    missing = [w for w in args.weights if not os.path.isfile(w)]
    if missing:
        raise SystemExit(f"--weights: no such checkpoint: {', '.join(missing)}")

    cfg = load_config(args.config, ["MODEL.DEVICE", "cpu", "TEST.UNIQUENESS.SCORE_THRESH",
                                    args.score, "TEST.UNIQUENESS.GROUP_SIZE", args.group_size])
    name = cfg.DATASETS.TEST[0]
    inputs = test_inputs(cfg, args.images)
    # The evaluator finds each image's ground truth by its dataset image_id.
    for x, d in zip(inputs, dataset_dicts(name)):
        x["image_id"] = d["image_id"]

    rows = []
    for label, weights in zip(labels, args.weights):
        model = build_model(cfg)
        DetectionCheckpointer(model).load(weights)
        rows.append({"model": label, "weights": weights, **evaluate(cfg, model, inputs)})

    print(f"\nQuery uniqueness on {len(inputs)} images of {name} (groups of {args.group_size}), "
          f"queries with score > {args.score}\nmachine: {machine()}\n")
    print("| model | confident / image | duplicates | merged | split | external pixels > 0.5 "
          "| mean max external prob |\n|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['model']} | {r['confident_per_image']:.2f} | {r['duplicate_rate']:.1f}% | "
              f"{r['merged_rate']:.1f}% | {r['split_rate']:.1f}% | {r['external_fire']:.3f}% | "
              f"{r['external_max_prob']:.3f} |")
    groups = {}
    for r in rows:
        groups.setdefault(r["model"].rsplit("/", 1)[0], []).append(r)
    if any(len(g) > 1 for g in groups.values()):
        print("\nmean over runs of one label prefix (text before the last '/'):")
        for k, g in groups.items():
            print(f"  {k}: " + ", ".join(
                f"{key} {statistics.mean(r[key] for r in g):.3f}" for key in KEYS))
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    with open(args.output, "w") as f:
        json.dump({"machine": machine(), "args": vars(args), "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
