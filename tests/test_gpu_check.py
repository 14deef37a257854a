"""benchmarks/gpu_check.py without a GPU: it refuses with a clear message, and its training
step and table are sound (run on the CPU at a small size)."""
import math
import os
import sys

import pytest
import torch

from utils import ROOT

sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
import gpu_check  # noqa: E402


def test_refuses_without_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(sys, "argv", ["gpu_check.py"])
    with pytest.raises(SystemExit, match="this machine has no CUDA device"):
        gpu_check.main()


def test_training_step_runs_and_moves_the_weights():
    config = os.path.join(gpu_check.COCO, "instunique_mask2former_R50_bs16_50ep.yaml")
    step = gpu_check._step(config, "pytorch", False, True, device="cpu", size=64)
    model = step.model
    before = model.sem_seg_head.predictor.query_feat.weight.detach().clone()
    step()
    assert not torch.equal(before, model.sem_seg_head.predictor.query_feat.weight)


def test_markdown_table_and_ratio():
    rows = [{"model": m, "amp": a, "impl": i, "step_s": t * (2 if a else 1), "peak_mib": 1.0}
            for m, t in (("Mask2Former R50", 1.0), ("paired views", 2.0), ("InstUnique", 2.5))
            for a in (False, True) for i in ("pytorch", "triton")]
    sampling = [{"values": "float32", "impl": "triton", "forward_ms": 1.0,
                 "forward_backward_ms": 3.0, "peak_mib": 10.0}]
    table = gpu_check.markdown({"machine": "test", "sampling": sampling, "training": rows})
    assert math.isclose(gpu_check._ratio(rows, True, "triton"), 1.25)
    assert "| triton | 1.250 | 1.250 |" in table and "| float32 | triton | 1.00 |" in table
