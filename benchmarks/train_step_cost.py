#!/usr/bin/env python
"""Training-step cost of the InstUnique terms, side by side in one run.

Variants (same model, same batch of paired views, same seed): the baseline trains on the
paired views as plain samples; then + cross-image querying with memory 0 / 10k / 50k /
100k pixels, + equivariance, and all terms. Repetitions are interleaved so drifts of the
machine hit every variant alike. The memory is filled to capacity first: the cost measured
is the steady state. Peak memory: max allocated on CUDA; on the CPU, the peak RSS of a
child process that runs the variant alone.

    python benchmarks/train_step_cost.py --output benchmarks/results/train_step_cost.json
"""
import argparse
import json
import os
import statistics

import torch

from common import build_step, interleaved_times, machine, peaks_in_children

BASELINE = "baseline (paired views)"
# name -> (cross-image on, memory pixels, equivariance on, config overrides of the variant)
VARIANTS = {
    BASELINE: (False, 0, False, ()),
    "+ cross-image, memory 0": (True, 0, False, ()),
    "+ cross-image, memory 10k": (True, 10000, False, ()),
    "+ cross-image, memory 50k": (True, 50000, False, ()),
    "+ cross-image, memory 100k": (True, 100000, False, ()),
    "+ equivariance": (False, 0, True, ()),
    "all (memory 100k)": (True, 100000, True, ()),
    # The cross-image term of the released Mask2Former code (objectives/cross_scene.py).
    "+ cross-scene decoding (released Mask2Former)":
        (True, 0, False, ("MODEL.INST_UNIQUE.CROSS_IMAGE.MODE", "cross_scene")),
    # What a user of the config trains: every term at the config's own memory capacity.
    "all (the config's defaults)": (True, None, True, ()),
    # The same with the terms' gradient clipped with the base loss's, or apart from it (a
    # second backward pass), whatever the config says (MODEL.INST_UNIQUE.TERMS_CLIP_VALUE).
    "all (the config's defaults), terms clipped together":
        (True, None, True, ("MODEL.INST_UNIQUE.TERMS_CLIP_VALUE", 0.0)),
    "all (the config's defaults), terms clipped apart to 0.25":
        (True, None, True, ("MODEL.INST_UNIQUE.TERMS_CLIP_VALUE", 0.25,
                            "MODEL.INST_UNIQUE.TERMS_CLIP_PERIOD", 1)),
    # ... with the second backward pass once every 10 steps (TERMS_CLIP_PERIOD): its steps
    # differ, so compare this one by the mean ratio, over a multiple of 10 repetitions.
    "all (the config's defaults), terms clipped apart to 0.25, exact every 10 steps":
        (True, None, True, ("MODEL.INST_UNIQUE.TERMS_CLIP_VALUE", 0.25,
                            "MODEL.INST_UNIQUE.TERMS_CLIP_PERIOD", 10)),
}


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", default="configs/shapes/instunique_mask2former_shapes.yaml")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--pairs", type=int, default=4, help="dataset samples (pairs) per step")
    p.add_argument("--reps", type=int, default=10, help="timed steps per variant")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--memory-steps", type=int, default=3)
    p.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS),
                   help="a subset of the variants (the baseline is always run)")
    p.add_argument("--output", default="benchmarks/results/train_step_cost.json")
    p.add_argument("opts", nargs=argparse.REMAINDER, help="config overrides KEY VALUE ...")
    args = p.parse_args()
    variants = {v: spec for v, spec in VARIANTS.items()
                if v in args.variants or v == BASELINE}

    steps = {v: build_step(args.config, args.device, args.pairs, *spec[:3],
                           [*spec[3], *args.opts])
             for v, spec in variants.items()}
    times = interleaved_times(steps, args.reps, args.warmup, args.device)
    del steps
    peaks = peaks_in_children({
        v: (args.config, args.device, args.pairs, *spec[:3], [*spec[3], *args.opts],
            args.memory_steps)
        for v, spec in variants.items()})

    base_t = statistics.median(times[BASELINE])
    base_m = peaks[BASELINE]
    rows = []
    for v in variants:
        ratios = sorted(t / base_t for t in times[v])
        q1, q3 = ratios[len(ratios) // 4], ratios[(3 * len(ratios)) // 4]
        rows.append({
            "variant": v, "median_s": statistics.median(times[v]),
            "ratio_median": statistics.median(ratios), "ratio_q1": q1, "ratio_q3": q3,
            "ratio_mean": statistics.mean(times[v]) / statistics.mean(times[BASELINE]),
            "peak_mb": peaks[v], "peak_ratio": peaks[v] / base_m,
        })
    unit = "max allocated" if args.device.startswith("cuda") else "peak RSS"
    print(f"\nTraining step cost, {args.pairs} pairs/step, {args.reps} interleaved reps, "
          f"{args.config}\nmachine: {machine()}\n")
    print(f"| variant | step (s, median) | ratio to baseline (median [q1, q3]) | mean ratio | "
          f"{unit} (MiB) | memory ratio |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['variant']} | {r['median_s']:.3f} | {r['ratio_median']:.3f} "
              f"[{r['ratio_q1']:.3f}, {r['ratio_q3']:.3f}] | {r['ratio_mean']:.3f} | "
              f"{r['peak_mb']:.0f} | "
              f"{r['peak_ratio']:.3f} |")
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    with open(args.output, "w") as f:
        json.dump({"machine": machine(), "args": vars(args), "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
