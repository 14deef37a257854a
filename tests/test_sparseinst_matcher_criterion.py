"""SparseInst's matcher and criterion on hand-built predictions, against the formulas
computed here."""
import pytest
import torch
import torch.nn.functional as F

from instunique.segmenters.sparseinst.criterion import SparseInstCriterion
from instunique.segmenters.sparseinst.matcher import SparseInstMatcher, pairwise_dice_score

WEIGHTS = {"class_weight": 2.0, "mask_pixel_weight": 5.0, "mask_dice_weight": 2.0,
           "objectness_weight": 1.0}


def criterion(num_classes=3, items=("labels", "masks")):
    return SparseInstCriterion(matcher=SparseInstMatcher(alpha=0.8, beta=0.2),
                               num_classes=num_classes, items=items, **WEIGHTS)


def rect(h, w, y0, y1, x0, x1):
    m = torch.zeros(h, w)
    m[y0:y1, x0:x1] = 1.0
    return m


def scene():
    """Two targets on an 8 x 8 grid; prediction 2 is target 0 exactly (logits +-20),
    prediction 0 is target 1, prediction 1 is blank."""
    t0, t1 = rect(8, 8, 0, 4, 0, 4), rect(8, 8, 4, 8, 2, 8)
    masks = torch.full((1, 3, 8, 8), -20.0)
    masks[0, 2] = t0 * 40 - 20
    masks[0, 0] = t1 * 40 - 20
    logits = torch.zeros(1, 3, 3)
    outputs = {"pred_logits": logits, "pred_masks": masks, "pred_scores": torch.zeros(1, 3, 1)}
    targets = [{"labels": torch.tensor([1, 2]), "masks": torch.stack([t0, t1]).bool()}]
    return outputs, targets


def focal(x, t, alpha=0.25, gamma=2.0):
    p = x.sigmoid()
    ce = -(t * torch.log(p) + (1 - t) * torch.log(1 - p))
    p_t = p * t + (1 - p) * (1 - t)
    return ((alpha * t + (1 - alpha) * (1 - t)) * (1 - p_t) ** gamma * ce).sum()


def test_perfect_predictions_are_matched_with_near_zero_dice():
    outputs, targets = scene()
    (rows, cols), = SparseInstMatcher(alpha=0.8, beta=0.2)(outputs, targets)
    assert dict(zip(cols.tolist(), rows.tolist())) == {0: 2, 1: 0}
    losses, _ = criterion()(outputs, targets, terms=("masks",))
    assert set(losses) == {"loss_dice", "loss_mask"}
    assert losses["loss_dice"] < 1e-4 and losses["loss_mask"] < 1e-6


def test_swapped_predictions_swap_the_matching():
    outputs, targets = scene()
    matcher = SparseInstMatcher(alpha=0.8, beta=0.2)
    (rows, cols), = matcher(outputs, targets)
    swapped = dict(outputs, pred_masks=outputs["pred_masks"][:, [2, 1, 0]])
    (rows2, cols2), = matcher(swapped, targets)
    before = dict(zip(cols.tolist(), rows.tolist()))
    after = dict(zip(cols2.tolist(), rows2.tolist()))
    assert after == {t: {0: 2, 2: 0}.get(q, q) for t, q in before.items()}


def test_class_probability_breaks_mask_ties_with_exponent_beta():
    # Two identical masks: the one whose class probability for the target is higher wins.
    masks = torch.zeros(1, 2, 4, 4)
    logits = torch.tensor([[[0.0, -2.0], [0.0, 2.0]]])
    targets = [{"labels": torch.tensor([1]), "masks": torch.ones(1, 4, 4, dtype=torch.bool)}]
    (rows, _), = SparseInstMatcher(alpha=0.8, beta=0.2)(
        {"pred_logits": logits, "pred_masks": masks}, targets)
    assert rows.tolist() == [1]


def test_exponents_weigh_mask_against_class():
    """Prediction 0: the exact mask (dice 1) with class probability 0.018; prediction 1:
    half the mask (dice 2/3) with probability 0.982. dice^0.8 p^0.2 is 0.45 against 0.72;
    without the class (beta 0) the exact mask wins."""
    masks = torch.full((1, 2, 4, 4), 20.0)
    masks[0, 1, 2:] = -20.0
    logits = torch.tensor([[[-4.0], [4.0]]])
    targets = [{"labels": torch.tensor([0]), "masks": torch.ones(1, 4, 4, dtype=torch.bool)}]
    outputs = {"pred_logits": logits, "pred_masks": masks}
    (rows, _), = SparseInstMatcher(alpha=0.8, beta=0.2)(outputs, targets)
    assert rows.tolist() == [1]
    (rows, _), = SparseInstMatcher(alpha=0.8, beta=0.0)(outputs, targets)
    assert rows.tolist() == [0]


def test_pairwise_dice_score_is_the_squared_denominator_dice():
    torch.manual_seed(0)
    logits, targets = torch.randn(3, 10), torch.rand(2, 10)
    score = pairwise_dice_score(logits, targets)
    for i in range(3):
        for j in range(2):
            p, t = logits[i].sigmoid(), targets[j]
            expected = 2 * (p * t).sum() / ((p * p).sum() + (t * t).sum() + 1e-4)
            torch.testing.assert_close(score[i, j], expected)
    w = (torch.rand(10) > 0.3).float()
    weighted = pairwise_dice_score(logits, targets, w)
    torch.testing.assert_close(weighted, pairwise_dice_score(logits[:, w > 0], targets[:, w > 0]))


def test_loss_values_follow_the_formulas():
    torch.manual_seed(0)
    b, n, k, h, w = 2, 3, 4, 4, 4
    outputs = {"pred_logits": torch.randn(b, n, k), "pred_masks": torch.randn(b, n, h, w),
               "pred_scores": torch.randn(b, n, 1)}
    targets = [
        {"labels": torch.tensor([3, 0]), "masks": torch.rand(2, h, w) > 0.5},
        {"labels": torch.tensor([1]), "masks": torch.rand(1, h, w) > 0.5},
    ]
    indices = [(torch.tensor([2, 0]), torch.tensor([0, 1])), (torch.tensor([1]), torch.tensor([0]))]
    losses, used = criterion(num_classes=k)(outputs, targets, indices=indices)
    assert used is indices
    num = 3.0  # target masks in the batch

    onehot = torch.zeros(b, n, k)
    onehot[0, 2, 3] = onehot[0, 0, 0] = onehot[1, 1, 1] = 1.0
    torch.testing.assert_close(losses["loss_ce"], 2.0 * focal(outputs["pred_logits"], onehot) / num)

    src = torch.stack([outputs["pred_masks"][0, 2], outputs["pred_masks"][0, 0],
                       outputs["pred_masks"][1, 1]]).flatten(1)
    tgt = torch.cat([targets[0]["masks"], targets[1]["masks"]]).float().flatten(1)
    p = src.sigmoid()
    dice = 1 - 2 * (p * tgt).sum(1) / ((p * p).sum(1) + (tgt * tgt).sum(1) + 1e-4)
    torch.testing.assert_close(losses["loss_dice"], 2.0 * dice.sum() / num)
    bce = -(tgt * torch.log(p) + (1 - tgt) * torch.log(1 - p)).mean()
    torch.testing.assert_close(losses["loss_mask"], 5.0 * bce)
    binary = (p >= 0.4).float()
    inter = (binary * tgt).sum(1)
    iou = inter / (binary.sum(1) + tgt.sum(1) - inter + 1e-6)
    s = torch.stack([outputs["pred_scores"][0, 2, 0], outputs["pred_scores"][0, 0, 0],
                     outputs["pred_scores"][1, 1, 0]])
    objectness = -(iou * torch.log(s.sigmoid()) + (1 - iou) * torch.log(1 - s.sigmoid())).mean()
    torch.testing.assert_close(losses["loss_objectness"], objectness)


def test_targets_at_input_resolution_are_downsampled_bilinearly():
    """Targets of the padded input (2x the masks here) give the losses of their bilinear
    resize, which for a factor of 2 is 2 x 2 average pooling."""
    torch.manual_seed(1)
    outputs = {"pred_logits": torch.randn(1, 4, 2), "pred_masks": torch.randn(1, 4, 5, 6),
               "pred_scores": torch.randn(1, 4, 1)}
    full = torch.rand(2, 10, 12) > 0.5
    labels = torch.tensor([0, 1])
    crit = criterion(num_classes=2)
    big, idx = crit(outputs, [{"labels": labels, "masks": full}])
    pooled = F.avg_pool2d(full.float()[:, None], 2)[:, 0]
    small, idx2 = crit(outputs, [{"labels": labels, "masks": pooled}])
    assert all(torch.equal(a, c) and torch.equal(b_, d) for (a, b_), (c, d) in zip(idx, idx2))
    for key in big:
        torch.testing.assert_close(big[key], small[key])


def test_pixels_of_weight_zero_carry_no_mask_loss():
    torch.manual_seed(2)
    outputs = {"pred_logits": torch.randn(1, 3, 2), "pred_masks": torch.randn(1, 3, 6, 6),
               "pred_scores": torch.randn(1, 3, 1)}
    targets = [{"labels": torch.tensor([1]), "masks": torch.rand(1, 6, 6) > 0.5}]
    valid = torch.ones(1, 6, 6)
    valid[:, :, 4:] = 0.0
    crit = criterion(num_classes=2)
    losses, indices = crit(outputs, targets, valid)
    # Whatever the predictions on invalid pixels, nothing changes (matching included).
    changed = outputs["pred_masks"].clone()
    changed[..., 4:] = torch.randn(1, 3, 6, 2) * 10
    losses2, indices2 = crit(dict(outputs, pred_masks=changed), targets, valid)
    assert torch.equal(indices[0][0], indices2[0][0])
    for key in ("loss_mask", "loss_dice", "loss_objectness", "loss_ce"):
        torch.testing.assert_close(losses[key], losses2[key])
    # A fully valid map is the unweighted loss; the weighted loss is the loss of the
    # valid columns alone.
    unweighted, _ = crit(outputs, targets, indices=indices)
    ones, _ = crit(outputs, targets, torch.ones(1, 6, 6), indices)
    cut = dict(outputs, pred_masks=outputs["pred_masks"][..., :4])
    cropped, _ = crit(cut, [{"labels": targets[0]["labels"],
                            "masks": targets[0]["masks"][..., :4]}], indices=indices)
    for key in unweighted:
        torch.testing.assert_close(ones[key], unweighted[key])
        torch.testing.assert_close(losses[key], cropped[key])
    assert losses["loss_mask"] != unweighted["loss_mask"]


def test_terms_and_empty_targets():
    outputs, targets = scene()
    crit = criterion()
    all_terms, _ = crit(outputs, targets)
    assert list(all_terms) == ["loss_ce", "loss_objectness", "loss_dice", "loss_mask"]
    labels_only, _ = criterion(items=("labels",))(outputs, targets)
    assert list(labels_only) == ["loss_ce"]
    empty = [{"labels": torch.zeros(0, dtype=torch.long), "masks": torch.zeros(0, 8, 8)}]
    masks = outputs["pred_masks"].clone().requires_grad_()
    losses, indices = crit(dict(outputs, pred_masks=masks), empty)
    assert indices[0][0].numel() == 0 and indices[0][0].dtype == torch.int64
    assert losses["loss_ce"] > 0
    for key in ("loss_objectness", "loss_dice", "loss_mask"):
        assert losses[key].item() == 0.0
    sum(losses.values()).backward()
    assert masks.grad is not None  # the graph stays connected
    with pytest.raises(ValueError, match="LOSS.ITEMS"):
        criterion(items=("labels", "boxes"))
