#!/usr/bin/env python
"""Accuracy studies on the built-in data, several seeds each, paired by seed.

Every arm is a full ``train_net.py`` run (training, then evaluation on the config's test
set: COCO mask AP, or PQ for the panoptic study); within a study, arms see the same number
of images per iteration and the same schedule, and a seed gives every arm the same data
order. Each table is followed by every arm's paired difference to the first arm with a 95%
t interval. Runs already finished are read back and a run stopped part-way resumes from its
last checkpoint, so an interrupted study goes on where it stopped. The studies themselves
are data, in ``benchmarks/studies/``:

``main``, ``transforms`` (Table S3), ``memory`` (Table S4): InstUnique vs its
paired-view baseline on shapes; ``base_shapes``, ``base_blobs``: the base Mask2Former
recipe against detectron2's Mask R-CNN, and one-change ablations of the recipe;
``uniqueness_crowd``, ``uniqueness_shapes``: Eq. 5 / Eq. 8 variants on shapes_crowd and
shapes; ``sparseinst``: InstUnique vs its paired-view baseline with SparseInst as the base
segmenter; ``panoptic``: the same with panoptic Mask2Former on shapes_panoptic, scored by PQ;
``pretrained_shapes``, ``pretrained_blobs``: from scratch (R18) against the ImageNet-pretrained
EfficientNet-Lite0, for our Mask2Former and detectron2's Mask R-CNN; ``regime_diverse``,
``regime_shapes``, ``regime_diverse_warm``: the method in the paper's regime (instances that
differ in appearance, a pretrained backbone), with the released variants, from scratch or
warm-started from the baseline's half-way checkpoint.

    python benchmarks/accuracy_study.py --study main --seeds 0 1 2
    python benchmarks/accuracy_study.py --study transforms --seeds 0 --opts SOLVER.MAX_ITER 900
    python benchmarks/accuracy_study.py --study memory --seeds 0 --opts SOLVER.MAX_ITER 900
    python benchmarks/accuracy_study.py --study base_blobs --seeds 0 1 2 --jobs 2 --threads 1
    python benchmarks/accuracy_study.py --study regime_diverse --seeds 0 1 2 3 4 --jobs 2 \
        --threads 1 --opts SOLVER.MAX_ITER 600
"""
import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import yaml
from scipy import stats

from common import ROOT, load_config, machine
from studies import STUDIES, TASKS

METRICS = ["AP", "AP50", "AP75", "APs", "APm", "APl"]


def slug(text):
    return "".join(c if c.isalnum() else "_" for c in text).strip("_").lower()


def read_run(out_dir, task=("segm", METRICS)):
    """The final figures of ``task`` (evaluator group, names; mask AP by default) and the
    mean of every loss over the last 10% of iterations, or None."""
    group, names = task
    path = os.path.join(out_dir, "metrics.json")
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        records = [json.loads(line) for line in f if line.strip()]
    final = [r for r in records if f"{group}/{names[0]}" in r]
    # An evaluation during training (TEST.EVAL_PERIOD) is not the run's result: the run is
    # finished only once its last iteration has been evaluated.
    if not final or final[-1]["iteration"] + 1 < _run_length(out_dir):
        return None
    train = [r for r in records if "total_loss" in r]
    tail = train[-max(1, len(train) // 10):]
    losses = {
        k: statistics.mean(r[k] for r in tail if k in r)
        for k in sorted({k for r in tail for k in r})
        if k.startswith("loss_") and not k[-1].isdigit()
    }
    minutes_file = os.path.join(out_dir, "wall_minutes.txt")
    minutes = None
    if os.path.isfile(minutes_file):
        with open(minutes_file) as f:
            minutes = float(f.read())
    return {
        "metrics": {m: final[-1][f"{group}/{m}"] for m in names},
        "wall_minutes": minutes,
        # The query-uniqueness evaluator's figures, where the run had it on.
        "uniqueness": {k.split("/", 1)[1]: v for k, v in final[-1].items()
                       if k.startswith("uniqueness/")},
        "iterations": final[-1]["iteration"] + 1,
        "final_losses": losses,
    }


def _run_length(out_dir):
    """SOLVER.MAX_ITER of the run, from the config detectron2 saved in its output folder."""
    with open(os.path.join(out_dir, "config.yaml")) as f:
        return yaml.safe_load(f)["SOLVER"]["MAX_ITER"]


def run_arm(config, opts, seed, out_dir, threads, task):
    result = read_run(out_dir, task)
    if result is not None:
        return result
    os.makedirs(out_dir, exist_ok=True)
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    # A run stopped part-way continues from its last checkpoint (resume is exact).
    resume = ["--resume"] if os.path.isfile(os.path.join(out_dir, "last_checkpoint")) else []
    cmd = [sys.executable, os.path.join(ROOT, "train_net.py"), "--config-file", config,
           *resume, "SEED", str(seed), "OUTPUT_DIR", out_dir, *opts]
    start = time.perf_counter()
    with open(os.path.join(out_dir, "stdout.log"), "a") as log:
        proc = subprocess.run(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    if proc.returncode != 0:
        raise RuntimeError(f"training failed ({proc.returncode}); see {out_dir}/stdout.log")
    with open(os.path.join(out_dir, "wall_minutes.txt"), "w") as f:
        f.write(f"{(time.perf_counter() - start) / 60:.2f}\n")
    result = read_run(out_dir, task)
    if result is None:
        raise RuntimeError(f"no {task[0]}/{task[1][0]} in {out_dir}/metrics.json")
    return result


_EVAL_ON_TRAIN = (
    "import json, sys; sys.path.insert(0, sys.argv[2]); import train_net; "
    "from detectron2.engine import default_argument_parser; "
    "r = train_net.main(default_argument_parser().parse_args(sys.argv[3:])); "
    "json.dump({k: dict(v) for k, v in r.items()}, open(sys.argv[1], 'w'))"
)


def train_ap(config, opts, out_dir, threads):
    """Mask AP of a finished run's final model on its own training set (memorization gap)."""
    path = os.path.join(out_dir, "train_eval.json")
    if not os.path.isfile(path):
        env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
        train_set = _config_value(out_dir, "DATASETS.TRAIN")
        cmd = [sys.executable, "-c", _EVAL_ON_TRAIN, path, ROOT, "--config-file", config,
               "--eval-only", *opts, "OUTPUT_DIR", os.path.join(out_dir, "train_eval"),
               "MODEL.WEIGHTS", os.path.join(out_dir, "model_final.pth"),
               "DATASETS.TEST", train_set]
        with open(os.path.join(out_dir, "train_eval.log"), "w") as log:
            subprocess.run(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                           check=True)
    with open(path) as f:
        return json.load(f)["segm"]["AP"]


def _config_value(out_dir, key):
    """A key of the run's own resolved config.yaml, as a string for merge_from_list."""
    from detectron2.config import CfgNode

    with open(os.path.join(out_dir, "config.yaml")) as f:
        node = CfgNode.load_cfg(f)
    for part in key.split("."):
        node = node[part]
    return str(tuple(node))


def half_checkpoint(study_dir, first_arm, config, opts, seed):
    """The checkpoint of the study's first arm (same seed) at the half-way iteration."""
    cfg = load_config(config, _max_iter(opts))
    half = cfg.SOLVER.MAX_ITER // 2 - 1
    path = os.path.join(study_dir, slug(first_arm), f"seed{seed}", f"model_{half:07d}.pth")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: run the arm {first_arm!r} (seed {seed}) first; its "
                                f"checkpoint of iteration {half} starts the warm arms")
    return path


def _max_iter(opts):
    """The SOLVER.MAX_ITER override among KEY VALUE ``opts`` (as a list), if any."""
    pairs = dict(zip(opts[::2], opts[1::2]))
    return ["SOLVER.MAX_ITER", pairs["SOLVER.MAX_ITER"]] if "SOLVER.MAX_ITER" in pairs else []


def mean_std(values):
    if any(math.isnan(v) for v in values):  # e.g. APl where no instance is large
        return math.nan, math.nan
    return statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def paired_difference(pairs):
    """Mean of (arm - reference) over shared seeds and its 95% t interval (None: < 2 seeds)."""
    diffs = [a - b for a, b in pairs if not (math.isnan(a) or math.isnan(b))]
    if len(diffs) < 2:
        return (diffs[0], None) if diffs else (math.nan, None)
    half = stats.t.ppf(0.975, len(diffs) - 1) * statistics.stdev(diffs) / math.sqrt(len(diffs))
    return statistics.mean(diffs), half


def print_paired(rows, key, names):
    """Per arm, its paired difference to the first arm (same seeds) on ``names``."""
    ref = {r["seed"]: r for r in rows[0]["runs"]}
    print(f"\npaired difference to {rows[0]['arm']!r} (mean [95% interval] over shared seeds):\n")
    print("| arm | seeds | " + " | ".join(names) + " |")
    print("|---|---|" + "---|" * len(names))
    for row in rows[1:]:
        runs = [r for r in row["runs"] if r["seed"] in ref]
        cells = []
        for name in names:
            pairs = [(r[key].get(name, math.nan), ref[r["seed"]][key].get(name, math.nan))
                     for r in runs]
            mean, half = paired_difference(pairs)
            cells.append("n/a" if math.isnan(mean) else f"{mean:+.2f}" if half is None
                         else f"{mean:+.2f} [{mean - half:+.2f}, {mean + half:+.2f}]")
            row.setdefault("paired", {})[name] = {"mean": mean, "half_width_95": half}
        print(f"| {row['arm']} | {len(runs)} | " + " | ".join(cells) + " |")


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--study", choices=sorted(STUDIES), default="main")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--arms", nargs="+", help="only these arms (names as in the table)")
    p.add_argument("--jobs", type=int, default=1, help="runs at a time")
    p.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads per run")
    p.add_argument("--root", default="benchmarks/results/accuracy")
    p.add_argument("--opts", nargs="*", default=[], help="config overrides for every arm")
    p.add_argument("--train-ap", action="store_true",
                   help="also evaluate each final model on its training set (memorization)")
    args = p.parse_args()

    suffix = "" if not args.opts else "_" + slug("_".join(args.opts[1::2]))
    study_dir = os.path.join(os.path.abspath(args.root), args.study + suffix)
    task = TASKS.get(args.study, ("segm", METRICS))
    metrics = task[1]
    arms = [a for a in STUDIES[args.study] if not args.arms or a[0] in args.arms]
    unknown = set(args.arms or ()) - {a[0] for a in arms}
    if unknown:
        p.error(f"--arms: {sorted(unknown)} not in study {args.study!r}: "
                f"{[a[0] for a in STUDIES[args.study]]}")
    # Arms vary fastest so that partial results already cover every arm.
    jobs = [(arm, config, opts, seed) for seed in args.seeds for arm, config, opts in arms]

    def work(job):
        arm, config, opts, seed = job
        out_dir = os.path.join(study_dir, slug(arm), f"seed{seed}")
        if "{half_checkpoint}" in opts:
            opts = [half_checkpoint(study_dir, arms[0][0], config, [*opts, *args.opts], seed)
                    if o == "{half_checkpoint}" else o for o in opts]
        result = run_arm(config, [*opts, *args.opts], seed, out_dir, args.threads, task)
        if args.train_ap:
            result["train_AP"] = train_ap(config, [*opts, *args.opts], out_dir, args.threads)
        return arm, seed, dict(result, seed=seed)

    with ThreadPoolExecutor(args.jobs) as pool:
        results = list(pool.map(work, jobs))

    rows = []
    print(f"\n{args.study} study, overrides {args.opts or 'none'}; seeds {args.seeds}\n")
    columns = metrics + (["train AP"] if args.train_ap else []) + ["minutes"]
    print("| arm | seeds | " + " | ".join(columns) + " |")
    print("|---|---|" + "---|" * len(columns))
    for arm, _, _ in arms:
        runs = [r for a, _, r in results if a == arm]
        stats = {m: mean_std([r["metrics"][m] for r in runs]) for m in metrics}
        if args.train_ap:
            stats["train AP"] = mean_std([r["train_AP"] for r in runs])
        minutes = [r["wall_minutes"] for r in runs if r.get("wall_minutes") is not None]
        stats["minutes"] = mean_std(minutes) if minutes else (math.nan, math.nan)
        losses = {k: statistics.mean(r["final_losses"].get(k, 0.0) for r in runs)
                  for k in runs[0]["final_losses"]}
        rows.append({"arm": arm, "runs": runs, "mean_std": stats, "final_losses": losses})
        cells = " | ".join("n/a" if math.isnan(m) else f"{m:.1f}" if len(runs) == 1
                           else f"{m:.1f} ± {s:.1f}" for m, s in stats.values())
        print(f"| {arm} | {len(runs)} | {cells} |")
    print_paired(rows, "metrics", metrics[:3])
    uniqueness = sorted({k for row in rows for r in row["runs"] for k in r["uniqueness"]})
    if uniqueness:
        print("\nquery uniqueness (mean ± std):\n")
        print("| arm | " + " | ".join(uniqueness) + " |")
        print("|---|" + "---|" * len(uniqueness))
        for row in rows:
            cells = []
            for k in uniqueness:
                m, sd = mean_std([r["uniqueness"].get(k, math.nan) for r in row["runs"]])
                cells.append("n/a" if math.isnan(m) else f"{m:.2f} ± {sd:.2f}")
            print(f"| {row['arm']} | " + " | ".join(cells) + " |")
        print_paired(rows, "uniqueness", uniqueness)
    print("\nmean of each loss over the last 10% of iterations:")
    for row in rows:
        losses = ", ".join(f"{k} {v:.3f}" for k, v in row["final_losses"].items())
        print(f"  {row['arm']}: {losses}")

    out = os.path.join(study_dir + ".json")
    if args.arms and os.path.isfile(out):  # keep the rows of the arms not run this time
        with open(out) as f:
            kept = {r["arm"]: r for r in json.load(f)["rows"]}
        kept.update({r["arm"]: r for r in rows})
        rows = [kept[a] for a, _, _ in STUDIES[args.study] if a in kept]
    with open(out, "w") as f:
        json.dump({"study": args.study, "overrides": args.opts, "seeds": args.seeds,
                   "machine": machine(), "rows": rows}, f, indent=1)
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
