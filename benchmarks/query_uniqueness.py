#!/usr/bin/env python
"""Do a model's queries fire on other images? The quantity Eq. 5 trains down.

For every confident query of a validation image A (class score > --score), its mask
probabilities sigmoid(e_q . F_B) on the valid pixels of the other validation images B:
the fraction above 0.5 (false firing) and the mean of its per-image maximum. The same
query on its own image gives the area it claims there, for scale, and duplicates: confident
queries whose mask (logit > 0) overlaps that of a more confident query of the same image
with IoU > 0.5. Several trained models side by side, e.g. the seeds of the accuracy study.

    python benchmarks/query_uniqueness.py --weights run_a/model_final.pth run_b/model_final.pth
"""
import argparse
import json
import os
import statistics

import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.modeling import build_model

from instunique.adapter import SegmenterAdapter, build_adapter

from common import load_config, machine, test_inputs


def embeddings(model, inputs, score_thresh):
    """Per image: confident query embeddings (n, C) sorted by falling class score, and valid
    pixel embeddings (P, C)."""
    adapter = getattr(model, "adapter", None)
    if not isinstance(adapter, SegmenterAdapter):
        adapter = build_adapter(model)
    queries, pixels = [], []
    with torch.no_grad():
        for x in inputs:
            images = adapter.preprocess([x])
            out = adapter.forward_train(images)
            score = out.class_logits[0].float().softmax(-1)[:, :-1].max(-1).values
            order = score.argsort(descending=True)
            keep = order[score[order] > score_thresh]
            queries.append(out.query_embeds[0][keep].float())
            f = out.pixel_embeds[0].float()
            stride = images.tensor.shape[-1] // f.shape[-1]
            h, w = (-(-s // stride) for s in images.image_sizes[0])
            pixels.append(f[:, :h, :w].flatten(1).t())
    return queries, pixels


def uniqueness(queries, pixels):
    fire, peak, own_area, duplicates = [], [], [], 0
    for a, qa in enumerate(queries):
        if len(qa) == 0:
            continue
        masks = (qa @ pixels[a].t()).gt(0).float()  # (n, P), most confident first
        own_area.append(masks.mean(1))
        inter = masks @ masks.t()
        iou = inter / (masks.sum(1)[:, None] + masks.sum(1)[None] - inter).clamp(min=1)
        duplicates += int(iou.tril(-1).gt(0.5).any(1).sum())
        for b, fb in enumerate(pixels):
            if b != a:
                p = (qa @ fb.t()).sigmoid()
                fire.append(p.gt(0.5).float().mean(1))
                peak.append(p.max(1).values)
    cat = lambda xs: torch.cat(xs).mean().item() if xs else float("nan")  # noqa: E731
    return {"queries": sum(len(q) for q in queries), "duplicates": duplicates,
            "external_fire": cat(fire), "external_max_prob": cat(peak),
            "own_area": cat(own_area)}


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", default="configs/shapes/instunique_mask2former_shapes.yaml")
    p.add_argument("--weights", nargs="+", required=True)
    p.add_argument("--labels", nargs="+", help="one per weights file")
    p.add_argument("--images", type=int, default=40)
    p.add_argument("--score", type=float, default=0.5)
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
    cfg = load_config(args.config, ["MODEL.DEVICE", "cpu"])
    name = cfg.DATASETS.TEST[0]
    inputs = test_inputs(cfg, args.images)

    rows = []
    for label, weights in zip(labels, args.weights):
        model = build_model(cfg).eval()
        DetectionCheckpointer(model).load(weights)
        rows.append({"model": label, "weights": weights,
                     **uniqueness(*embeddings(model, inputs, args.score))})

    print(f"\nQuery uniqueness on {len(inputs)} images of {name}, queries with score > "
          f"{args.score}\nmachine: {machine()}\n")
    print("| model | confident queries | duplicates | external pixels > 0.5 | "
          "mean max external prob | own-image area > 0.5 |\n|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['model']} | {r['queries']} | {r['duplicates']} | {r['external_fire']:.4%} | "
              f"{r['external_max_prob']:.3f} | {r['own_area']:.3%} |")
    groups = {}
    for r in rows:
        groups.setdefault(r["model"].rsplit("/", 1)[0], []).append(r)
    if any(len(g) > 1 for g in groups.values()):
        print("\nmean over runs of one label prefix (text before the last '/'):")
        for k, g in groups.items():
            m = {key: statistics.mean(r[key] for r in g) for key in
                 ("queries", "duplicates", "external_fire", "external_max_prob", "own_area")}
            print(f"  {k}: confident queries {m['queries']:.1f}, duplicates "
                  f"{m['duplicates']:.1f}, external pixels > 0.5 {m['external_fire']:.4%}, "
                  f"mean max external prob {m['external_max_prob']:.3f}")
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    with open(args.output, "w") as f:
        json.dump({"machine": machine(), "args": vars(args), "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
