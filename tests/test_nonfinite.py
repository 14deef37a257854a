"""A diverging run stops at the first NaN or inf with a FloatingPointError naming the
iteration and the model output, loss key or parameter, before scipy's Hungarian matching
fails with "matrix contains invalid numeric entries"."""
import math
from collections import OrderedDict

import pytest
import torch
from detectron2.engine import SimpleTrainer
from detectron2.modeling import build_model
from detectron2.utils.events import EventStorage
from torch import nn

from instunique.engine.finite import (
    at_iteration,
    check_gradients,
    check_losses,
    install_nonfinite_checks,
)
from instunique.segmenters.mask2former.matcher import HungarianMatcher
from instunique.segmenters.sparseinst.matcher import SparseInstMatcher

from utils import fake_view, get_config, tiny_opts


def _outputs_and_targets(classes: int, batch: int = 2):
    g = torch.Generator().manual_seed(0)
    outputs = {"pred_logits": torch.randn(batch, 5, classes, generator=g),
               "pred_masks": torch.randn(batch, 5, 8, 8, generator=g)}
    targets = [{"labels": torch.tensor([0, 1]), "masks": torch.rand(2, 8, 8, generator=g) > 0.5}
               for _ in range(batch)]
    return outputs, targets


@pytest.mark.parametrize("key, value, kind", [("pred_masks", math.nan, "NaN"),
                                              ("pred_logits", math.inf, "inf")])
def test_mask2former_matcher_names_the_nonfinite_output(key, value, kind):
    outputs, targets = _outputs_and_targets(3)
    outputs[key][1, 2].view(-1)[0] = value
    with pytest.raises(FloatingPointError, match=(
            f"matching cost of image 1 of the batch is not finite: model output '{key}' has "
            f"{kind}; training has diverged")):
        HungarianMatcher(num_points=0)(outputs, targets)


def test_sparseinst_matcher_names_the_nonfinite_output():
    outputs, targets = _outputs_and_targets(2)
    outputs["pred_logits"][0] = math.nan
    with pytest.raises(FloatingPointError, match=(
            "matching cost of image 0 of the batch is not finite: model output 'pred_logits' "
            "has NaN")):
        SparseInstMatcher(alpha=0.8, beta=0.2)(outputs, targets)


def test_finite_outputs_are_matched_as_before():
    outputs, targets = _outputs_and_targets(3)
    assert all(len(rows) == 2 for rows, _ in HungarianMatcher(num_points=0)(outputs, targets))


def test_loss_check_names_the_first_nonfinite_key():
    check_losses({"loss_ce": torch.tensor(1.0), "loss_mask": 0.5})
    losses = {"loss_ce": torch.tensor(1.0), "loss_mask": torch.tensor(math.nan),
              "loss_dice": torch.tensor(math.inf)}
    with pytest.raises(FloatingPointError, match=r"^loss 'loss_mask' is NaN \(a too high "
                                                 r"SOLVER.BASE_LR is the usual cause\)$"):
        check_losses(losses)


def _model():
    return nn.Sequential(OrderedDict(stem=nn.Linear(2, 2), head=nn.Linear(2, 1)))


def test_gradient_check_names_the_parameter_and_stops_the_step():
    model = _model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    handles = install_nonfinite_checks(model, optimizer)
    model(torch.ones(1, 2)).sum().backward()
    model.head.weight.grad[0, 1] = math.inf
    before = model.head.bias.detach().clone()
    with pytest.raises(FloatingPointError, match="^gradient of parameter 'head.weight' has inf"):
        optimizer.step()
    assert torch.equal(model.head.bias, before)  # nothing was updated
    for handle in handles:
        handle.remove()
    optimizer.step()
    check_gradients([("stem.bias", model.stem.bias)])


class _Toy(nn.Module):
    """Returns a loss dict; the input decides how it goes wrong."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.ones(()))

    def forward(self, x):
        # sqrt at 0: a finite loss with a NaN gradient.
        return {"loss_a": self.w * 0.1, "loss_b": torch.sqrt(self.w * x)}


class _Loop(SimpleTrainer):
    def run_step(self):
        with at_iteration(self.iter):
            super().run_step()


@pytest.mark.parametrize("bad, message", [
    (math.inf, "iteration 2: loss 'loss_b' is inf"),
    (0.0, "iteration 2: gradient of parameter 'w' has NaN"),
])
def test_training_loop_stops_naming_the_iteration_and_the_term(bad, message):
    model = _Toy().train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    install_nonfinite_checks(model, optimizer)
    loop = _Loop(model, [torch.tensor(1.0), torch.tensor(1.0), torch.tensor(bad)], optimizer)
    with pytest.raises(FloatingPointError, match=f"^{message} "):
        loop.train(0, 3)


def test_at_iteration_prefixes_only_once():
    with pytest.raises(FloatingPointError, match="^iteration 4: loss 'x' is NaN$"):
        with at_iteration(5), at_iteration(4):
            raise FloatingPointError("loss 'x' is NaN")


def test_diverged_mask2former_stops_in_the_matcher_naming_its_outputs():
    torch.manual_seed(0)
    model = build_model(get_config("shapes/mask2former_shapes.yaml", *tiny_opts())).train()
    with torch.no_grad():
        next(model.parameters()).fill_(math.inf)  # as after a step with a huge learning rate
    with EventStorage(), pytest.raises(FloatingPointError, match=(
            "^iteration 7: matching cost of image 0 of the batch is not finite: model output "
            "'pred_logits' has NaN")):
        with at_iteration(7):
            model([fake_view(64, 64, 2, seed=0)])
