#!/usr/bin/env python
"""Training step time and peak memory as functions of memory capacity and of batch size.

Two sweeps on the same model: InstUnique (both terms) over memory capacities at a fixed
batch, and baseline vs InstUnique over batch sizes at a fixed memory. Within a sweep the
repetitions are interleaved; peak memory is measured per point in a fresh child process.

    python benchmarks/scaling.py --plot benchmarks/results/scaling.png
"""
import argparse
import json
import os
import statistics

import torch

from common import build_step, interleaved_times, machine, peaks_in_children


def measure(args, points):
    """points: {label: (pairs, cross, memory, equi)} -> {label: (median s, peak MiB)}."""
    steps = {k: build_step(args.config, args.device, p, c, m, e, args.opts)
             for k, (p, c, m, e) in points.items()}
    times = interleaved_times(steps, args.reps, args.warmup, args.device)
    del steps
    peaks = peaks_in_children({
        k: (args.config, args.device, *spec, args.opts, args.memory_steps)
        for k, spec in points.items()})
    return {k: (statistics.median(times[k]), peaks[k]) for k in points}


def plot(rows, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(10, 7))
    mem = [r for r in rows if r["sweep"] == "memory" and r["arm"] == "InstUnique"]
    base = next(r for r in rows if r["sweep"] == "memory" and r["arm"] == "baseline")
    caps = [r["memory"] / 1000 for r in mem]
    for col, (key, unit) in enumerate((("step_s", "step time (s)"), ("peak_mb", "peak (MiB)"))):
        ax = axes[0, col]
        ax.plot(caps, [r[key] for r in mem], "o-", label="InstUnique")
        ax.axhline(base[key], color="gray", linestyle="--", label="baseline (no memory)")
        ax.set(xlabel="memory capacity (k pixels)", ylabel=unit)
        ax = axes[1, col]
        for arm in ("baseline", "InstUnique"):
            pts = [r for r in rows if r["sweep"] == "batch" and r["arm"] == arm]
            ax.plot([r["pairs"] for r in pts], [r[key] for r in pts], "o-", label=arm)
        ax.set(xlabel="pairs per step (2 images each)", ylabel=unit)
        for ax in axes[:, col]:
            ax.grid(alpha=0.3)
            ax.legend()
    batch_memory = max(r["memory"] for r in rows if r["sweep"] == "batch")
    fig.suptitle(f"Training step scaling: memory sweep at {base['pairs']} pairs, batch sweep "
                 f"at memory {batch_memory} px", fontsize=11)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=110)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", default="configs/shapes/instunique_mask2former_shapes.yaml")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--memories", type=int, nargs="+",
                   default=[0, 10000, 25000, 50000, 100000, 200000])
    p.add_argument("--pairs", type=int, default=4, help="batch of the memory sweep")
    p.add_argument("--batches", type=int, nargs="+", default=[1, 2, 4, 8])
    p.add_argument("--batch-memory", type=int, default=100000, help="memory of the batch sweep")
    p.add_argument("--reps", type=int, default=6)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--memory-steps", type=int, default=3)
    p.add_argument("--output", default="benchmarks/results/scaling.json")
    p.add_argument("--plot", default="benchmarks/results/scaling.png")
    p.add_argument("opts", nargs=argparse.REMAINDER, help="config overrides KEY VALUE ...")
    args = p.parse_args()

    rows = []
    memory_points = {("InstUnique", m): (args.pairs, True, m, True) for m in args.memories}
    memory_points[("baseline", 0)] = (args.pairs, False, 0, False)
    for (arm, m), (t, peak) in measure(args, memory_points).items():
        rows.append({"sweep": "memory", "arm": arm, "pairs": args.pairs, "memory": m,
                     "step_s": t, "peak_mb": peak})
    batch_points = {}
    for b in args.batches:
        batch_points[("baseline", b)] = (b, False, 0, False)
        batch_points[("InstUnique", b)] = (b, True, args.batch_memory, True)
    for (arm, b), (t, peak) in measure(args, batch_points).items():
        memory = 0 if arm == "baseline" else args.batch_memory
        rows.append({"sweep": "batch", "arm": arm, "pairs": b, "memory": memory,
                     "step_s": t, "peak_mb": peak})

    unit = "max allocated" if args.device.startswith("cuda") else "peak RSS"
    print(f"\nStep scaling, {args.config}\nmachine: {machine()}\n")
    print(f"| sweep | arm | pairs | memory (pixels) | step (s, median) | {unit} (MiB) |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['sweep']} | {r['arm']} | {r['pairs']} | {r['memory']} | "
              f"{r['step_s']:.3f} | {r['peak_mb']:.0f} |")
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    with open(args.output, "w") as f:
        json.dump({"machine": machine(), "args": vars(args), "rows": rows}, f, indent=1)
    if args.plot:
        plot(rows, args.plot)
        print(f"\nwrote {args.output} and {args.plot}")


if __name__ == "__main__":
    main()
