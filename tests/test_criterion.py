import math

import pytest
import torch
import torch.nn.functional as F

from instunique.segmenters.mask2former.criterion import SetCriterion, dice_loss, sigmoid_bce_loss
from instunique.segmenters.mask2former.matcher import HungarianMatcher

EOS = 0.1


def make_criterion(num_classes=2, num_points=16):
    matcher = HungarianMatcher(cost_class=2.0, cost_mask=5.0, cost_dice=5.0, num_points=0)
    weights = {"loss_ce": 2.0, "loss_mask": 5.0, "loss_dice": 5.0}
    return SetCriterion(
        num_classes,
        matcher,
        weights,
        eos_coef=EOS,
        losses=["labels", "masks"],
        num_points=num_points,
        oversample_ratio=3.0,
        importance_sample_ratio=0.75,
    )


def test_hand_computed_losses():
    # 2 queries, 3 logits (2 classes + no object), 1 target of class 1.
    logits = torch.tensor([[[0.0, 3.0, 0.0], [1.0, 0.0, 2.0]]])
    # Zero mask logits: p = 0.5 and BCE = log 2 at every point, whatever the sampling.
    outputs = {"pred_logits": logits, "pred_masks": torch.zeros(1, 2, 4, 4)}
    targets = [{"labels": torch.tensor([1]), "masks": torch.zeros(1, 4, 4)}]
    losses, indices = make_criterion(num_points=16)(outputs, targets)

    assert indices[0][0].tolist() == [0] and indices[0][1].tolist() == [0]
    ce_matched = -math.log(math.exp(3) / (2 + math.exp(3)))  # query 0 -> class 1
    ce_unmatched = -math.log(math.exp(2) / (math.exp(1) + 1 + math.exp(2)))  # -> no object
    expected_ce = (1.0 * ce_matched + EOS * ce_unmatched) / (1.0 + EOS)
    assert losses["loss_ce"].item() == pytest.approx(expected_ce, rel=1e-6)
    assert losses["loss_mask"].item() == pytest.approx(math.log(2), rel=1e-6)
    # sum(p t) = sum(t) = 0, sum(p) = 16 * 0.5.
    assert losses["loss_dice"].item() == pytest.approx(1 - 1 / (8 + 1), rel=1e-6)
    assert set(losses) == {"loss_ce", "loss_mask", "loss_dice"}


def test_point_losses_by_hand():
    logits = torch.tensor([[2.0, -1.0], [0.0, 4.0]])
    labels = torch.tensor([[1.0, 0.0], [1.0, 1.0]])
    s = torch.sigmoid(logits)
    sp = F.softplus
    bce = ((sp(-logits[0, 0]) + sp(logits[0, 1])) / 2 + (sp(-logits[1]).mean())) / 2
    torch.testing.assert_close(sigmoid_bce_loss(logits, labels, num_masks=2), bce)
    dice0 = 1 - (2 * s[0, 0] + 1) / (s[0].sum() + 1 + 1)
    dice1 = 1 - (2 * s[1].sum() + 1) / (s[1].sum() + 2 + 1)
    torch.testing.assert_close(dice_loss(logits, labels, num_masks=2), (dice0 + dice1) / 2)

    # Weight 0 drops a point; weight 0.5 counts it half.
    weights = torch.tensor([[1.0, 0.0], [0.5, 1.0]])
    bce_w = (sp(-logits[0, 0]) + (0.5 * sp(-logits[1, 0]) + sp(-logits[1, 1])) / 1.5) / 2
    torch.testing.assert_close(sigmoid_bce_loss(logits, labels, 2, weights), bce_w)
    wp1 = 0.5 * s[1, 0] + s[1, 1]
    dice_w = (1 - (2 * s[0, 0] + 1) / (s[0, 0] + 1 + 1)) + (1 - (2 * wp1 + 1) / (wp1 + 1.5 + 1))
    torch.testing.assert_close(dice_loss(logits, labels, 2, weights), dice_w / 2)


def _random_batch(counts, num_queries=5, num_classes=2, size=(8, 10), target_size=(32, 40)):
    outputs = {
        "pred_logits": torch.randn(len(counts), num_queries, num_classes + 1, requires_grad=True),
        "pred_masks": torch.randn(len(counts), num_queries, *size, requires_grad=True),
    }
    targets = [
        {
            "labels": torch.randint(num_classes, (n,)),
            "masks": (torch.rand(n, *target_size) > 0.5).float(),
        }
        for n in counts
    ]
    return outputs, targets


def test_image_without_targets():
    torch.manual_seed(0)
    outputs, targets = _random_batch([2, 0])
    criterion = make_criterion(num_points=20)
    torch.manual_seed(1)
    losses, indices = criterion(outputs, targets)
    assert len(indices[1][0]) == 0 and len(indices[1][1]) == 0
    assert all(torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()
    assert outputs["pred_masks"].grad[1].abs().sum() == 0  # nothing to learn there
    assert outputs["pred_logits"].grad[1].abs().sum() > 0  # every query learns "no object"

    # The mask losses are those of the first image alone (same num_masks, same points).
    first = {k: v[:1] for k, v in outputs.items()}
    torch.manual_seed(1)
    alone, _ = criterion(first, targets[:1])
    torch.testing.assert_close(losses["loss_mask"], alone["loss_mask"])
    torch.testing.assert_close(losses["loss_dice"], alone["loss_dice"])


def test_batch_without_targets_keeps_graph_connected():
    torch.manual_seed(0)
    outputs, targets = _random_batch([0, 0])
    aux = {k: v.detach().clone().requires_grad_(True) for k, v in outputs.items()}
    outputs["aux_outputs"] = [aux]
    losses, _ = make_criterion()(outputs, targets)
    assert set(losses) == {
        "loss_ce",
        "loss_mask",
        "loss_dice",
        "loss_ce_0",
        "loss_mask_0",
        "loss_dice_0",
    }
    for name in ("loss_mask", "loss_dice", "loss_mask_0", "loss_dice_0"):
        assert losses[name].item() == 0 and losses[name].requires_grad
    sum(losses.values()).backward()
    assert outputs["pred_masks"].grad is not None and aux["pred_masks"].grad is not None
    # With no objects at all the ideal prediction is "no object" everywhere.
    assert losses["loss_ce"].item() > 0


def test_aux_losses_and_returned_indices():
    torch.manual_seed(0)
    outputs, targets = _random_batch([2, 3])
    outputs["aux_outputs"] = [
        {k: torch.randn_like(v) for k, v in outputs.items() if k != "aux_outputs"} for _ in range(2)
    ]
    criterion = make_criterion()
    losses, indices = criterion(outputs, targets)
    assert len(losses) == 9
    assert {"loss_ce_1", "loss_mask_1", "loss_dice_1"} <= set(losses)
    final = {k: v for k, v in outputs.items() if k != "aux_outputs"}
    for got, want in zip(indices, criterion.matcher(final, targets)):
        assert got[0].tolist() == want[0].tolist() and got[1].tolist() == want[1].tolist()


def test_all_ones_pixel_valid_equals_none():
    torch.manual_seed(0)
    outputs, targets = _random_batch([2, 1])
    criterion = make_criterion(num_points=30)
    torch.manual_seed(5)
    plain, _ = criterion(outputs, targets)
    torch.manual_seed(5)
    valid, _ = criterion(outputs, targets, pixel_valid=torch.ones(2, 32, 40))
    for name in plain:
        torch.testing.assert_close(valid[name], plain[name], rtol=1e-6, atol=1e-7)


def test_pixel_valid_masks_out_wrong_region():
    # One target: the top half of a 64 x 64 image. Predictions at stride 4 are right on the
    # left half and inverted on the right half; pixel_valid covers the left 28 columns.
    target = torch.zeros(1, 64, 64)
    target[:, :32] = 1
    right = 10.0 * (2 * target[:, ::4, ::4] - 1)
    wrong = right.clone()
    wrong[:, :, 8:] *= -1
    valid = torch.zeros(1, 64, 64)
    valid[:, :, :28] = 1
    targets = [{"labels": torch.tensor([0]), "masks": target}]
    criterion = make_criterion(num_classes=1, num_points=200)

    def run(pred_masks, pixel_valid):
        outputs = {"pred_logits": torch.zeros(1, 1, 2), "pred_masks": pred_masks[None]}
        torch.manual_seed(3)
        return criterion(outputs, targets, pixel_valid=pixel_valid)[0]

    wrong_all, wrong_valid, right_valid = run(wrong, None), run(wrong, valid), run(right, valid)
    for name in ("loss_mask", "loss_dice"):
        assert wrong_valid[name] < 0.25 * wrong_all[name]
        # The invalid region, wrong or right, makes no difference.
        torch.testing.assert_close(wrong_valid[name], right_valid[name])


def test_empty_weight_buffer_and_repr():
    criterion = make_criterion(num_classes=80)
    assert "empty_weight" in criterion.state_dict()
    weight = criterion.empty_weight
    assert weight.shape == (81,) and weight[-1] == EOS and torch.all(weight[:-1] == 1)
    text = repr(criterion)
    for part in (
        "SetCriterion",
        "HungarianMatcher",
        "cost_class: 2.0",
        "eos_coef: 0.1",
        "'loss_dice': 5.0",
        "num_points: 16",
        "importance_sample_ratio: 0.75",
    ):
        assert part in text


def test_bad_inputs():
    with pytest.raises(ValueError, match="unknown losses"):
        SetCriterion(2, HungarianMatcher(), {}, 0.1, ["boxes"], 16, 3.0, 0.75)
    outputs, targets = _random_batch([1, 1])
    criterion = make_criterion()
    with pytest.raises(ValueError, match="targets"):
        criterion(outputs, targets[:1])
    bad = [targets[0], {"labels": torch.tensor([0, 1]), "masks": torch.zeros(1, 32, 40)}]
    with pytest.raises(ValueError, match=r"targets\[1\]"):
        criterion(outputs, bad)
    with pytest.raises(ValueError, match="pixel_valid"):
        criterion(outputs, targets, pixel_valid=torch.ones(1, 32, 40))
