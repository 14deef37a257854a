#!/usr/bin/env python
"""Training-step time of the ImageNet-pretrained EfficientNet-Lite0 configs against the R18
from-scratch configs they replace, side by side in one run.

Each pair is the same recipe with the other backbone (same batch of paired views, same
seed, the terms as the config has them); repetitions are interleaved over all configs so
that drifts of the machine hit every one alike. Peak memory: as train_step_cost.py.

    python benchmarks/backbone_step_cost.py --output benchmarks/results/backbone_step_cost.json
"""
import argparse
import json
import os
import statistics

import torch

from common import build_step, interleaved_times, machine, peaks_in_children

S = "configs/shapes/"
# name -> (R18 config, EfficientNet-Lite0 config, terms on)
PAIRS = {
    "Mask2Former, paired views": (S + "paired_views_mask2former_shapes.yaml",
                                  S + "paired_views_mask2former_effl0_shapes.yaml", False),
    "InstUnique-Mask2Former": (S + "instunique_mask2former_shapes.yaml",
                               S + "instunique_mask2former_effl0_shapes.yaml", True),
    "InstUnique-SparseInst": (S + "instunique_sparseinst_shapes.yaml",
                              S + "instunique_sparseinst_effl0_shapes.yaml", True),
}


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--pairs", type=int, default=4, help="dataset samples (pairs) per step")
    p.add_argument("--reps", type=int, default=10, help="timed steps per config")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--memory-steps", type=int, default=3)
    p.add_argument("--output", default="benchmarks/results/backbone_step_cost.json")
    args = p.parse_args()

    specs = {(name, backbone): (config, terms)
             for name, (r18, effl0, terms) in PAIRS.items()
             for backbone, config in (("R18", r18), ("EfficientNet-Lite0", effl0))}
    steps = {k: build_step(c, args.device, args.pairs, t, None, t) for k, (c, t) in specs.items()}
    times = interleaved_times(steps, args.reps, args.warmup, args.device)
    del steps
    peaks = peaks_in_children({
        k: (config, args.device, args.pairs, terms, None, terms, (), args.memory_steps)
        for k, (config, terms) in specs.items()})

    rows = []
    for name in PAIRS:
        r18, effl0 = times[(name, "R18")], times[(name, "EfficientNet-Lite0")]
        # Repetition i of both ran back to back: their ratio is a paired measurement.
        ratios = sorted(e / r for e, r in zip(effl0, r18))
        rows.append({
            "recipe": name, "r18_median_s": statistics.median(r18),
            "effl0_median_s": statistics.median(effl0),
            "ratio_median": statistics.median(ratios),
            "ratio_q1": ratios[len(ratios) // 4], "ratio_q3": ratios[(3 * len(ratios)) // 4],
            "r18_peak_mb": peaks[(name, "R18")],
            "effl0_peak_mb": peaks[(name, "EfficientNet-Lite0")],
        })
    unit = "max allocated" if args.device.startswith("cuda") else "peak RSS"
    print(f"\nTraining step, R18 from scratch vs EfficientNet-Lite0 (ImageNet), {args.pairs} "
          f"pairs/step, {args.reps} interleaved reps\nmachine: {machine()}\n")
    print(f"| recipe | R18 step (s) | EffL0 step (s) | EffL0 / R18 (median [q1, q3]) | "
          f"R18 {unit} (MiB) | EffL0 {unit} (MiB) |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['recipe']} | {r['r18_median_s']:.3f} | {r['effl0_median_s']:.3f} | "
              f"{r['ratio_median']:.3f} [{r['ratio_q1']:.3f}, {r['ratio_q3']:.3f}] | "
              f"{r['r18_peak_mb']:.0f} | {r['effl0_peak_mb']:.0f} |")
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    with open(args.output, "w") as f:
        json.dump({"machine": machine(), "args": vars(args), "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
