"""README command (a) on a shared machine: its seconds per iteration alone and beside one
single-threaded training run, with the OpenMP wait policy train_net chooses, with threads
that sleep (PASSIVE), spin (ACTIVE) or spin as long as OpenMP does by default; conditions
interleaved rep by rep. Prints a table and writes JSON.

    python3 benchmarks/busy_machine.py --reps 3 --output benchmarks/results/busy_machine.json

Each measured run is a fresh ``train_net.py`` process with torch's default thread count; its
figure is detectron2's logged "time" at iteration 39 (the median of iterations 20-39), and
the process is stopped there. The companion job (``--companion``, OMP_NUM_THREADS=1) runs
only during the "beside" conditions and is stopped before the next "alone" ones.
"""
import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MAIN = "configs/shapes/instunique_mask2former_shapes.yaml"
COMPANION = "configs/shapes/mask2former_shapes.yaml"
LAST_ITER = 39  # detectron2 writes metrics every 20 iterations
# libgomp's spin before a thread sleeps, ~100k spins per ms (its own estimate); 300k is its
# default when OMP_WAIT_POLICY is unset, what torch did before train_net chose.
OPENMP_DEFAULT = {"GOMP_SPINCOUNT": "300000"}
CONDITIONS = {  # name: (companion running, environment of the measured run)
    "alone, train_net's choice": (False, {}),
    "alone, sleeping (PASSIVE)": (False, {"OMP_WAIT_POLICY": "PASSIVE"}),
    "alone, spinning (ACTIVE)": (False, {"OMP_WAIT_POLICY": "ACTIVE"}),
    "beside one job, train_net's choice": (True, {}),
    "beside one job, OpenMP's default spin": (True, OPENMP_DEFAULT),
    "beside one job, spinning (ACTIVE)": (True, {"OMP_WAIT_POLICY": "ACTIVE"}),
}
for _spins in (30000, 3000):
    for _where, _beside in (("alone", False), ("beside one job", True)):
        CONDITIONS[f"{_where}, spin {_spins}"] = (_beside, {"GOMP_SPINCOUNT": str(_spins)})


def _train(config, out_dir, env_extra, max_iter):
    env = {k: v for k, v in os.environ.items()
           if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "OMP_NUM_THREADS")}
    env.update(env_extra)
    cmd = [sys.executable, os.path.join(ROOT, "train_net.py"), "--config-file",
           os.path.join(ROOT, config), "SOLVER.MAX_ITER", str(max_iter), "TEST.EVAL_PERIOD",
           "0", "OUTPUT_DIR", out_dir]
    # A session of its own, so that stopping it stops its data-loader workers too.
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.STDOUT, start_new_session=True)


def _logged_time(out_dir, iteration):
    try:
        with open(os.path.join(out_dir, "metrics.json")) as f:
            rows = [json.loads(line) for line in f if line.strip()]
    except (OSError, ValueError):
        return None
    return next((r["time"] for r in rows if r.get("iteration") == iteration and "time" in r),
                None)


def _wait_for(proc, out_dir, iteration, what, timeout):
    start = time.time()
    while time.time() - start < timeout:
        value = _logged_time(out_dir, iteration)
        if value is not None:
            return value
        if proc.poll() is not None:
            raise SystemExit(f"busy_machine: {what} exited with code {proc.returncode} before "
                             f"iteration {iteration}; see {out_dir}/log.txt")
        time.sleep(1.0)
    raise SystemExit(f"busy_machine: {what} did not reach iteration {iteration} in {timeout} s")


def _stop(proc):
    for sig, wait in ((signal.SIGTERM, 30), (signal.SIGKILL, None)):
        try:
            os.killpg(proc.pid, sig)
            proc.wait(wait)
            return
        except ProcessLookupError:
            return
        except subprocess.TimeoutExpired:
            continue


def _chosen_policy(out_dir):
    """The OMP_WAIT_POLICY line train_net logged."""
    try:
        with open(os.path.join(out_dir, "log.txt")) as f:
            return next((line.split("OMP_WAIT_POLICY: ", 1)[1].strip() for line in f
                         if "OMP_WAIT_POLICY: " in line), None)
    except OSError:
        return None


def measure(name, config, companion_config, work, timeout):
    """Seconds per iteration (median of iterations 20-39) of ``config`` under condition
    ``name``, and the wait policy its train_net logged."""
    beside, env = CONDITIONS[name]
    companion = None
    if beside:
        comp_dir = tempfile.mkdtemp(dir=work)
        companion = _train(companion_config, comp_dir, {"OMP_NUM_THREADS": "1"}, 100000)
        _wait_for(companion, comp_dir, 19, "the companion job", timeout)
    out_dir = tempfile.mkdtemp(dir=work)
    run = _train(config, out_dir, env, LAST_ITER + 1)
    try:
        seconds = _wait_for(run, out_dir, LAST_ITER, f"the run '{name}'", timeout)
        return seconds, _chosen_policy(out_dir)
    finally:
        _stop(run)
        if companion is not None:
            _stop(companion)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default=MAIN, help="the measured config (README command (a))")
    p.add_argument("--companion", default=COMPANION, help="the job that runs beside it")
    p.add_argument("--conditions", nargs="+", choices=list(CONDITIONS),
                   default=list(CONDITIONS)[:5], help="the first is the reference")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--timeout", type=float, default=900.0, help="seconds a run may take")
    p.add_argument("--output", default=os.path.join(ROOT, "benchmarks/results/busy_machine.json"))
    args = p.parse_args()
    names = args.conditions
    alone = [n for n in names if not CONDITIONS[n][0]]
    beside = [n for n in names if CONDITIONS[n][0]]
    times = {n: [] for n in names}
    policies = {n: [] for n in names}
    work = tempfile.mkdtemp(prefix="busy_machine_")
    try:
        for rep in range(args.reps):
            # Alternate the order inside each group, so drift does not favour one condition.
            order = alone[::(-1) ** rep] + beside[::(-1) ** rep]
            for name in order:
                seconds, policy = measure(name, args.config, args.companion, work, args.timeout)
                times[name].append(seconds)
                policies[name].append(policy)
                print(f"rep {rep}: {name}: {seconds:.3f} s/it ({policy})", flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    base = times[names[0]]
    rows = []
    print(f"\n| condition | s/it median (runs) | vs {names[0]} (median ratio) |")
    print("|---|---|---|")
    for name in names:
        ratio = statistics.median(t / b for t, b in zip(times[name], base))
        runs = ", ".join(f"{t:.2f}" for t in times[name])
        print(f"| {name} | {statistics.median(times[name]):.3f} ({runs}) | {ratio:.2f} |")
        rows.append({"condition": name, "seconds_per_iteration": times[name],
                     "ratio_to_first": ratio, "omp_wait_policy_logged": policies[name]})
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    with open(args.output, "w") as f:
        json.dump({"config": args.config, "companion": args.companion, "reps": args.reps,
                   "cpus": os.cpu_count(), "rows": rows}, f, indent=1)
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
