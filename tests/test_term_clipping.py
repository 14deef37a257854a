"""MODEL.INST_UNIQUE.TERMS_CLIP_VALUE: the base loss's and the terms' gradients clipped apart."""
import json
import os
import sys

import pytest
import torch
from detectron2.engine import default_argument_parser

from instunique.data.synthetic.shapes import register_shapes
from instunique.engine.term_clipping import TermClipper, backward_clipped_apart, check_term_clipping
from instunique.meta_arch import is_term_loss

from utils import CONFIGS, ROOT, get_config

sys.path.insert(0, ROOT)
import train_net  # noqa: E402

INSTUNIQUE = "shapes/instunique_sparseinst_shapes.yaml"
KEY = "MODEL.INST_UNIQUE.TERMS_CLIP_VALUE"
PERIOD = "MODEL.INST_UNIQUE.TERMS_CLIP_PERIOD"


def _losses(w, v):
    # base = a . w + |v|^2 / 2: gradients a and v; terms = 4 b . w: gradient 4 b on w only.
    a, b = torch.tensor([3.0, 0.0, 4.0]), torch.tensor([0.0, 1.0, 0.0])
    return (a * w).sum() + 0.5 * (v * v).sum(), 4.0 * (b * w).sum()


def test_each_gradient_is_clipped_by_its_own_norm():
    w = torch.zeros(3, requires_grad=True)
    v = torch.tensor([0.0, 12.0], requires_grad=True)
    base, terms = _losses(w, v)
    norms = backward_clipped_apart([w, v], base, terms, base_clip=1.0, terms_clip=0.5,
                                   norm_type=2.0)
    # Base gradient (3, 0, 4 | 0, 12) has norm 13; the terms' (0, 4, 0 | 0, 0) norm 4.
    assert norms == pytest.approx((13.0, 4.0))
    assert torch.allclose(w.grad, torch.tensor([3 / 13, 0.5, 4 / 13]), atol=1e-6)
    assert torch.allclose(v.grad, torch.tensor([0.0, 12 / 13]), atol=1e-6)


def test_without_clipping_it_is_the_gradient_of_the_sum():
    w = torch.tensor([1.0, -2.0, 0.5], requires_grad=True)
    v = torch.tensor([0.3, 0.7], requires_grad=True)
    base, terms = _losses(w, v)
    backward_clipped_apart([w, v], base, terms, 1e6, 1e6, 2.0)
    apart = (w.grad.clone(), v.grad.clone())
    w.grad = v.grad = None
    sum(_losses(w, v)).backward()
    assert torch.allclose(apart[0], w.grad) and torch.allclose(apart[1], v.grad)


def _loss_dict(w, v, base_scale=1.0):
    base, terms = _losses(w, v)
    return {"loss_mask": base_scale * base, "loss_cross_image": terms}


def test_between_exact_steps_one_pass_reuses_the_last_ratio_and_norm():
    w = torch.zeros(3, requires_grad=True)
    v = torch.tensor([0.0, 12.0], requires_grad=True)
    clipper = TermClipper([w, v], base_clip=1.0, terms_clip=0.5, norm_type=2.0, period=3)
    assert clipper.backward(_loss_dict(w, v), 0) == pytest.approx(
        {"grad_norm/base": 13.0, "grad_norm/terms": 4.0})
    exact = torch.cat([w.grad, v.grad])
    # Same losses: weighting the terms by (0.5 / 4) / (1 / 13) and clipping the sum to the
    # exact step's norm gives the exact step's gradient, in one backward pass.
    w.grad = v.grad = None
    assert clipper.backward(_loss_dict(w, v), 1) == {}
    assert torch.allclose(torch.cat([w.grad, v.grad]), exact, atol=1e-6)
    # The base loss doubled: its share grows as in one pass over base + 13/8 terms, the sum
    # clipped to the same norm as before.
    w.grad = v.grad = None
    assert clipper.backward(_loss_dict(w, v, base_scale=2.0), 2) == {}
    expected = torch.tensor([6.0, 13 / 8 * 4, 8.0, 0.0, 24.0])
    expected *= exact.norm() / expected.norm()
    assert torch.allclose(torch.cat([w.grad, v.grad]), expected, atol=1e-5)
    # Every `period`-th call measures again, with both norms to log.
    w.grad = v.grad = None
    assert set(clipper.backward(_loss_dict(w, v, base_scale=2.0), 3)) == {
        "grad_norm/base", "grad_norm/terms"}
    assert torch.allclose(w.grad, torch.tensor([6 / 26, 0.5, 8 / 26]), atol=1e-6)


def test_term_keys_are_instuniques_own():
    assert all(map(is_term_loss, ["loss_cross_image", "loss_equi_ce", "loss_equi_mask"]))
    assert not any(map(is_term_loss, ["loss_ce", "loss_mask", "loss_dice_0", "loss_objectness"]))


def test_the_optimizer_leaves_clipping_to_the_loop_only_when_terms_are_clipped_apart():
    from instunique.solver import build_optimizer

    model = torch.nn.Linear(3, 2)
    together = build_optimizer(get_config(INSTUNIQUE, KEY, 0.0), model)
    assert type(together).__name__ == "FullModelClipping"
    apart = build_optimizer(get_config(INSTUNIQUE, KEY, 0.1), model)
    assert type(apart) is torch.optim.AdamW


@pytest.mark.parametrize("opts, message", [
    ([KEY, -1.0], ">= 0"),
    ([KEY, 0.1, "MODEL.META_ARCHITECTURE", "SparseInst"], "MODEL.META_ARCHITECTURE"),
    ([KEY, 0.1, "SOLVER.CLIP_GRADIENTS.CLIP_TYPE", "value"], "CLIP_TYPE"),
    ([KEY, 0.1, "SOLVER.CLIP_GRADIENTS.ENABLED", False], "SOLVER.CLIP_GRADIENTS.ENABLED"),
    ([KEY, 0.1, "SOLVER.AMP.ENABLED", True], "SOLVER.AMP.ENABLED"),
    ([KEY, 0.1, PERIOD, 0], ">= 1"),
])
def test_settings_it_cannot_apply_to_fail_naming_the_key(opts, message):
    with pytest.raises(ValueError, match=message) as e:
        check_term_clipping(get_config(INSTUNIQUE, *opts))
    assert (PERIOD if PERIOD in opts else KEY) in str(e.value)


def test_shapes_config_trains_with_the_terms_clipped_apart(tmp_path_factory, tmp_path):
    register_shapes(str(tmp_path_factory.mktemp("clip_shapes")), prefix="clip_shapes",
                    num_train=4, num_val=2)
    argv = [
        "--config-file", os.path.join(CONFIGS, INSTUNIQUE), KEY, "0.1", PERIOD, "2",
        "DATASETS.TRAIN", "('clip_shapes_train',)", "DATASETS.TEST", "('clip_shapes_val',)",
        "INPUT.MIN_SIZE_TRAIN", "(64,)", "INPUT.MAX_SIZE_TRAIN", "64",
        "INPUT.MIN_SIZE_TEST", "64", "INPUT.MAX_SIZE_TEST", "64",
        "SOLVER.IMS_PER_BATCH", "2", "SOLVER.MAX_ITER", "3", "SOLVER.WARMUP_ITERS", "1",
        "TEST.UNIQUENESS.ENABLED", "False", "DATALOADER.NUM_WORKERS", "0",
        "OUTPUT_DIR", str(tmp_path),
    ]
    train_net.main(default_argument_parser().parse_args(argv))
    with open(os.path.join(tmp_path, "metrics.json")) as f:
        train = [r for r in map(json.loads, f) if "total_loss" in r]
    # Iteration 1 took one backward pass; iteration 2, exact again, measured both norms.
    assert train and train[-1]["iteration"] == 2
    for key in ("grad_norm/base", "grad_norm/terms", "loss_cross_image", "loss_equi_mask"):
        assert all(key in r and 0 < r[key] < float("inf") for r in train), key
