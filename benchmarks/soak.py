"""Soak: a long InstUnique run with a small pixel memory that wraps many times, sampling the
resident memory of the training process and of its data-loader workers. Prints a table and
writes benchmarks/results/soak.json.

    python3 benchmarks/soak.py                      # shapes config, 400 iterations
    python3 benchmarks/soak.py --iters 2000 --memory-pixels 4096

A leak shows as resident memory that keeps growing after warm-up; the run also checks that
every logged loss stayed finite. Reads /proc, so Linux only.
"""
import argparse
import json
import math
import os
import subprocess
import sys
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PAGE_KB = os.sysconf("SC_PAGE_SIZE") / 1024


def _rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/statm") as f:
        return int(f.read().split()[1]) * PAGE_KB / 1024


def _children(pid: int):
    kids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    # The command name may hold spaces; the parent id follows its ")".
                    if int(f.read().rsplit(")", 1)[1].split()[1]) == pid:
                        kids.append(int(entry))
            except (OSError, IndexError, ValueError):
                pass
    return kids


def _last_iteration(metrics_path: str) -> int:
    try:
        with open(metrics_path) as f:
            lines = f.read().splitlines()
    except OSError:
        return -1
    for line in reversed(lines):
        row = json.loads(line)
        if "iteration" in row and "total_loss" in row:
            return row["iteration"]
    return -1


def sample(proc, metrics_path: str, period: float, samples: list):
    """Append (seconds, iteration, main MB, workers MB, workers) every ``period`` seconds."""
    start = time.perf_counter()
    while proc.poll() is None:
        try:
            workers = _children(proc.pid)
            row = (time.perf_counter() - start, _last_iteration(metrics_path), _rss_mb(proc.pid),
                   sum(_rss_mb(w) for w in workers), len(workers))
            samples.append(row)
        except OSError:  # the process ended between listing and reading
            pass
        time.sleep(period)


def slope_per_100(points):
    """Least-squares slope of (iteration, MB) points, in MB per 100 iterations."""
    if len(points) < 2:
        return math.nan
    n = len(points)
    mx = sum(p[0] for p in points) / n
    my = sum(p[1] for p in points) / n
    var = sum((p[0] - mx) ** 2 for p in points)
    return 100 * sum((p[0] - mx) * (p[1] - my) for p in points) / var if var else math.nan


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default="configs/shapes/instunique_mask2former_shapes.yaml")
    p.add_argument("--iters", type=int, default=400)
    p.add_argument("--memory-pixels", type=int, default=2048,
                   help="small, so the queue wraps every few iterations")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--period", type=float, default=2.0, help="seconds between samples")
    p.add_argument("--out", default="benchmarks/results/soak")
    args = p.parse_args()

    out_dir = os.path.abspath(args.out)
    os.makedirs(out_dir, exist_ok=True)
    metrics = os.path.join(out_dir, "metrics.json")
    if os.path.exists(metrics):
        os.remove(metrics)
    opts = ["SOLVER.MAX_ITER", args.iters, "SOLVER.CHECKPOINT_PERIOD", 10 ** 9,
            "TEST.EVAL_PERIOD", 0, "DATALOADER.NUM_WORKERS", args.workers,
            "MODEL.INST_UNIQUE.CROSS_IMAGE.MEMORY_PIXELS", args.memory_pixels,
            "OUTPUT_DIR", out_dir]
    cmd = [sys.executable, os.path.join(ROOT, "train_net.py"), "--config-file", args.config,
           *map(str, opts)]
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads))
    samples = []
    with open(os.path.join(out_dir, "stdout.log"), "w") as log:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
        watcher = threading.Thread(target=sample, args=(proc, metrics, args.period, samples))
        watcher.start()
        proc.wait()
        watcher.join()
    if proc.returncode != 0:
        sys.exit(f"training failed ({proc.returncode}); see {out_dir}/stdout.log")

    with open(metrics) as f:
        rows = [json.loads(line) for line in f]
    losses = [(r["iteration"], k, v) for r in rows if "total_loss" in r
              for k, v in r.items() if k.startswith("loss") or k == "total_loss"]
    bad = [(i, k) for i, k, v in losses if not math.isfinite(v)]
    from detectron2.config import CfgNode

    with open(os.path.join(out_dir, "config.yaml")) as f:
        cfg = CfgNode.load_cfg(f)
    # Pixels offered to the queue (at least: one view's sample per image of each pair).
    offered = (args.iters * cfg.SOLVER.IMS_PER_BATCH
               * cfg.MODEL.INST_UNIQUE.CROSS_IMAGE.PIXELS_PER_IMAGE)
    # Warm-up: the first quarter of the iterations (allocator pools, worker start-up). The
    # last logged iteration is the final one: from then on the evaluation runs, with its
    # own loader workers.
    steady = [s for s in samples
              if args.iters // 4 <= s[1] < args.iters - 1 and s[4] == args.workers]
    first, last = (steady[0], steady[-1]) if steady else (None, None)
    result = {
        "config": args.config, "iterations": args.iters, "memory_pixels": args.memory_pixels,
        "memory_wraps": offered / args.memory_pixels if args.memory_pixels else 0,
        "loader_workers": args.workers, "samples": samples,
        "non_finite_losses": bad, "loss_rows": len({i for i, _, _ in losses}),
        "main_mb_after_warmup": first and first[2], "main_mb_end": last and last[2],
        "workers_mb_after_warmup": first and first[3], "workers_mb_end": last and last[3],
        "main_mb_per_100_iters": slope_per_100([(s[1], s[2]) for s in steady]),
        "workers_mb_per_100_iters": slope_per_100([(s[1], s[3]) for s in steady]),
    }
    print(f"\nsoak: {args.config}, {args.iters} iterations, memory of {args.memory_pixels} "
          f"pixels wrapped ~{result['memory_wraps']:.0f} times, {args.workers} loader workers\n")
    print("| process | MB after warm-up | MB at end | MB per 100 iterations |")
    print("|---|---|---|---|")
    for name in ("main", "workers"):
        print(f"| {name} | {result[name + '_mb_after_warmup'] or math.nan:.0f} | "
              f"{result[name + '_mb_end'] or math.nan:.0f} | "
              f"{result[name + '_mb_per_100_iters']:+.1f} |")
    print(f"\nlogged loss rows: {result['loss_rows']}, non-finite: {len(bad)}")
    path = os.path.join(ROOT, "benchmarks/results/soak.json")
    with open(path, "w") as f:
        json.dump(result, f, indent=1)
    print(f"wrote {path}")
    if bad:
        sys.exit(f"non-finite losses: {bad[:5]}")


if __name__ == "__main__":
    main()
