#!/usr/bin/env python
"""Time and peak memory of the cross-image loss alone at COCO scale.

Batch 16 pairs (32 images) x 100 queries against the batch's sampled pixels and a full
memory, C = 256, forward + backward, for several chunk sizes: the chunking keeps the
(queries x pixels) logits from ever existing whole.

    python benchmarks/cross_image_scale.py --memory 100000
"""
import argparse
import json
import os

import torch

from instunique.objectives import external_focal_loss

from common import machine, peak_rss_mb, reset_peak_rss, timed


def peak_mb(device: str) -> float:
    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated() / 2**20
    return peak_rss_mb()


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--images", type=int, default=32)
    p.add_argument("--queries", type=int, default=100)
    p.add_argument("--dim", type=int, default=256)
    p.add_argument("--pixels-per-image", type=int, default=1024)
    p.add_argument("--memory", type=int, default=100000)
    p.add_argument("--chunks", type=int, nargs="+", default=[0, 4096, 16384, 65536],
                   help="pixels per chunk; 0: automatic (from device and queries)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--output", default="benchmarks/results/cross_image_scale.json")
    args = p.parse_args()

    g = torch.Generator().manual_seed(0)
    r = args.images * args.queries
    n = args.images * args.pixels_per_image + args.memory
    queries = torch.randn(r, args.dim, generator=g).div_(args.dim**0.5).to(args.device)
    pixels = torch.randn(n, args.dim, generator=g).to(args.device)
    query_ids = torch.arange(args.images).repeat_interleave(args.queries).to(args.device)
    pixel_ids = torch.cat([torch.arange(args.images).repeat_interleave(args.pixels_per_image),
                           torch.full((args.memory,), -1)]).to(args.device)
    no_cls_q = torch.full((r,), -1, device=args.device)
    no_cls_p = torch.full((n,), -1, device=args.device)
    dense_gb = r * n * 4 / 2**30
    rows = []
    print(f"\nCross-image loss, {r} queries x {n} external pixels, C={args.dim} "
          f"(one dense fp32 logit matrix: {dense_gb:.1f} GiB)\nmachine: {machine()}\n")
    print("| chunk | forward+backward (s) | peak memory (MiB) |\n|---|---|---|")
    for chunk in args.chunks:
        if args.device.startswith("cuda"):
            torch.cuda.reset_peak_memory_stats()
        else:
            reset_peak_rss()
        q = queries.clone().requires_grad_()

        def run(q=q, chunk=chunk):
            external_focal_loss(q, pixels, query_ids, pixel_ids, no_cls_q, no_cls_p,
                                chunk=chunk).backward()

        seconds = timed(run, args.device)
        rows.append({"chunk": chunk, "seconds": seconds, "peak_mb": peak_mb(args.device)})
        print(f"| {chunk or 'auto'} | {seconds:.2f} | {rows[-1]['peak_mb']:.0f} |")
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    with open(args.output, "w") as f:
        json.dump({"machine": machine(), "args": vars(args), "queries": r, "pixels": n,
                   "dense_logits_gib": dense_gb, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
