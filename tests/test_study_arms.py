"""Every arm of the accuracy studies names a config and overrides that merge: a mistyped key
or value would otherwise surface only when its (hours-long) study reaches that arm."""
import json
import os
import sys

import pytest
from yacs.config import CfgNode

from utils import ROOT

sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
import accuracy_study  # noqa: E402

from common import load_config  # noqa: E402

ARMS = [(study, arm, config, opts) for study, arms in accuracy_study.STUDIES.items()
        for arm, config, opts in arms]


@pytest.mark.parametrize("study,arm,config,opts", ARMS, ids=[f"{s}/{a}" for s, a, _, _ in ARMS])
def test_arm_config_merges(study, arm, config, opts):
    cfg = load_config(config, opts)
    # Each key holds its last value, as train_net.py merges them.
    expected = {k: CfgNode._decode_cfg_value(v) for k, v in zip(opts[::2], opts[1::2])}
    for key, value in expected.items():
        node = cfg
        for part in key.split("."):
            node = getattr(node, part)
        if isinstance(value, (list, tuple)):
            node, value = list(node), list(value)
        assert node == value, key


def test_arm_names_are_unique_within_a_study():
    for study, arms in accuracy_study.STUDIES.items():
        names = [accuracy_study.slug(arm) for arm, _, _ in arms]
        assert len(names) == len(set(names)), study


def test_a_run_evaluated_part_way_is_not_read_as_finished(tmp_path):
    # With TEST.EVAL_PERIOD a run writes AP before its end; a study restarted then must
    # resume that run, not report its intermediate AP as the result.
    (tmp_path / "config.yaml").write_text("SOLVER:\n  MAX_ITER: 1200\n")
    records = [{"iteration": 599, "total_loss": 2.0, "loss_ce": 1.0},
               {"iteration": 599, **{f"segm/{m}": 10.0 for m in accuracy_study.METRICS}}]
    metrics = tmp_path / "metrics.json"
    metrics.write_text("".join(json.dumps(r) + "\n" for r in records))
    assert accuracy_study.read_run(str(tmp_path)) is None

    records += [{"iteration": 1199, "total_loss": 1.0, "loss_ce": 0.5},
                {"iteration": 1199, **{f"segm/{m}": 20.0 for m in accuracy_study.METRICS}}]
    metrics.write_text("".join(json.dumps(r) + "\n" for r in records))
    run = accuracy_study.read_run(str(tmp_path))
    assert run["metrics"]["AP"] == 20.0 and run["iterations"] == 1200
