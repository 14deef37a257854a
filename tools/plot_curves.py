#!/usr/bin/env python
"""Training curves of one or more runs from detectron2's metrics.json, to one PNG.

    python tools/plot_curves.py output/mask2former_shapes output/instunique_mask2former_shapes \
        --output curves.png

Each argument is a metrics.json or an OUTPUT_DIR holding one. One panel per metric
(total_loss, every loss_* term, segm/AP when evaluated, and the query-uniqueness rates
uniqueness/external_fire, external_max_prob, duplicate_rate, merged_rate, split_rate when
TEST.UNIQUENESS.ENABLED), one line per run.
"""
import argparse
import os
import sys
from typing import List, Optional, Sequence

from instunique.visualization import curve_keys, load_metrics, plot_curves


def get_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("runs", nargs="+", help="metrics.json files or output folders")
    p.add_argument("--output", required=True, help="PNG file to write")
    p.add_argument("--labels", nargs="+", help="one legend label per run (default: folder name)")
    p.add_argument("--keys", nargs="+", help="metrics to plot (default: losses, APs, uniqueness)")
    p.add_argument("--aux", action="store_true", help="also plot deep-supervision terms")
    p.add_argument("--log", action="store_true", help="logarithmic y axis for losses")
    p.add_argument("--columns", type=int, default=4, help="panels per row")
    return p


def _metrics_path(run: str) -> str:
    return os.path.join(run, "metrics.json") if os.path.isdir(run) else run


def main(argv: Optional[Sequence[str]] = None) -> str:
    args = get_parser().parse_args(argv)
    paths: List[str] = [_metrics_path(r) for r in args.runs]
    labels = args.labels or [os.path.basename(os.path.dirname(os.path.abspath(p))) for p in paths]
    if len(labels) != len(paths):
        raise ValueError(f"--labels: got {len(labels)} labels for {len(paths)} runs")
    if len(set(labels)) != len(labels):
        raise ValueError(f"run labels must differ, got {labels}; pass --labels")
    runs = {label: load_metrics(p) for label, p in zip(labels, paths)}
    keys = args.keys or curve_keys(list(runs.values()), include_aux=args.aux)
    out = plot_curves(runs, args.output, keys=keys, columns=args.columns, log_scale=args.log)
    print(f"wrote {out}", file=sys.stderr)
    return out


if __name__ == "__main__":
    main()
