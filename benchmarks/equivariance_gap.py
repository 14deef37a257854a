#!/usr/bin/env python
"""How far a trained model is from equivariant: Eq. 8's prediction m~ = e'.T(F_x) against
the model's own prediction on x', both scored by the base criterion on T(ground truth).

Each transform is fixed (not sampled), so the two columns see the same pairs: pure
translations whose offset falls at every phase of the stride-4 pixel-embedding grid
(phase 0 moves T(F_x) by whole cells; other phases blend neighbouring cells), and a
horizontal flip. A model that is equivariant up to the sampling gives ratios near 1.

    python benchmarks/equivariance_gap.py --weights output/*/model_final.pth
"""
import argparse
import json
import os
from collections import defaultdict

import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.modeling import build_model
from detectron2.utils.events import EventStorage

from instunique.data import PairedViewMapper
from instunique.transforms import AffineWarp

from common import dataset_dicts, load_config, machine

TERMS = ("loss_mask", "loss_dice")


def transforms(crop: int, stride: int):
    """name -> make_warp(h, w) of the fixed transforms."""
    out = {}
    for phase in range(stride):
        def crop_at(h, w, phase=phase):
            y0, x0 = ((h - crop) // 2 // stride * stride + phase,
                      (w - crop) // 2 // stride * stride + phase)
            return AffineWarp.crop(h, w, y0, x0, crop, crop)
        out[f"translation, phase {phase}/{stride}"] = crop_at
    out["horizontal flip"] = AffineWarp.hflip
    return out


@torch.no_grad()
def gap(model, pairs, batch):
    """Mean base-criterion terms of x' (own) and of m~ (equivariant), over batches."""
    adapter, sums, count = model.adapter, defaultdict(float), 0
    for k in range(0, len(pairs), batch):
        chunk = pairs[k : k + batch]
        p = len(chunk)
        views = chunk + [x["paired_view"] for x in chunk]
        images = adapter.preprocess(views)
        targets = adapter.targets(views, images)
        out = adapter.forward_train(images)
        own = adapter.final_layer_outputs(
            out.class_logits[p:], out.query_embeds[p:], out.pixel_embeds[p:])
        torch.manual_seed(k)  # the criterion samples points: same draws for both
        own_losses, _ = adapter.base_losses(own, targets[p:])
        torch.manual_seed(k)
        equi = model.equivariance(
            adapter, out, targets, [x["warp"] for x in chunk], images.image_sizes)
        for t in TERMS:
            sums[("own", t)] += own_losses[t].item()
            sums[("equi", t)] += (
                equi[t.replace("loss_", "loss_equi_")].item() / model.equivariance.weight)
        count += 1
    return {f"{side} {t}": v / count for (side, t), v in sums.items()}


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--weights", nargs="+", required=True)
    p.add_argument("--config", default="configs/shapes/instunique_mask2former_shapes.yaml")
    p.add_argument("--images", type=int, default=64, help="first images of the test set")
    p.add_argument("--crop", type=int, default=96, help="side of the translated window")
    p.add_argument("--batch", type=int, default=8, help="pairs per forward")
    p.add_argument("--output", default="benchmarks/results/equivariance_gap.json")
    p.add_argument("opts", nargs=argparse.REMAINDER, help="config overrides KEY VALUE ...")
    args = p.parse_args()

    # No random flip of the base view: the pairs must be the same for every model.
    cfg = load_config(args.config, [
        "MODEL.INST_UNIQUE.CROSS_IMAGE.ENABLED", False,
        "MODEL.INST_UNIQUE.EQUIVARIANCE.ENABLED", True, "INPUT.RANDOM_FLIP", "none",
        *args.opts])
    model = build_model(cfg).eval()  # running BatchNorm statistics, as at test time
    name = cfg.DATASETS.TEST[0]
    dicts = dataset_dicts(name)[: args.images]
    mapper = PairedViewMapper(cfg, is_train=True)
    stride = model.adapter.pixel_stride
    fixed = transforms(args.crop, stride)
    pairs = {t: [mapper.pair(d, make) for d in dicts] for t, make in fixed.items()}

    rows = []
    for weights in args.weights:
        DetectionCheckpointer(model).load(weights)
        with EventStorage():
            for t in fixed:
                rows.append({"weights": weights, "transform": t,
                             **gap(model, pairs[t], args.batch)})

    print(f"\nEq. 8 prediction vs own prediction on x', {len(dicts)} images of {name}, "
          f"{args.crop}-pixel translations; machine: {machine()}\n")
    print("| model | transform | mask (own) | mask (m~) | m~/own | dice (own) | dice (m~) "
          "| m~/own |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        cells = " | ".join(
            f"{r['own ' + t]:.3f} | {r['equi ' + t]:.3f} | {r['equi ' + t] / r['own ' + t]:.2f}"
            for t in TERMS)
        label = os.path.join(*os.path.normpath(r["weights"]).split(os.sep)[-3:-1])
        print(f"| {label} | {r['transform']} | {cells} |")
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    with open(args.output, "w") as f:
        json.dump({"machine": machine(), "args": vars(args), "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
