"""benchmarks/busy_machine.py: the logged figure it reads, the environment its runs get."""
import json
import os
import sys

from utils import ROOT

sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
import busy_machine  # noqa: E402


def test_logged_time_reads_the_training_row_of_that_iteration(tmp_path):
    rows = [{"iteration": 19, "time": 0.9}, {"iteration": 39, "segm/AP": 1.0},
            {"iteration": 39, "time": 0.5, "total_loss": 3.0}]
    (tmp_path / "metrics.json").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    assert busy_machine._logged_time(str(tmp_path), 39) == 0.5
    assert busy_machine._logged_time(str(tmp_path), 59) is None
    assert busy_machine._logged_time(str(tmp_path / "missing"), 39) is None


def test_runs_get_only_their_own_wait_policy(monkeypatch, tmp_path):
    seen = []
    monkeypatch.setattr(busy_machine.subprocess, "Popen",
                        lambda cmd, env, **kw: seen.append((cmd, env, kw)))
    monkeypatch.setenv("OMP_WAIT_POLICY", "ACTIVE")
    monkeypatch.setenv("GOMP_SPINCOUNT", "10")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    for name in ("alone, train_net's choice", "alone, spin 3000"):
        busy_machine._train("c.yaml", str(tmp_path), busy_machine.CONDITIONS[name][1], 40)
    (cmd, chosen, kw), (_, spin, _) = seen
    assert not {"OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "OMP_NUM_THREADS"} & set(chosen)
    assert kw["start_new_session"]  # stopped with its data-loader workers
    assert spin["GOMP_SPINCOUNT"] == "3000" and "OMP_WAIT_POLICY" not in spin
    assert cmd[cmd.index("SOLVER.MAX_ITER") + 1] == "40"
