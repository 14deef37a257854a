import pytest
import torch

from instunique.segmenters.mask2former.matcher import (
    HungarianMatcher,
    pairwise_dice,
    pairwise_sigmoid_bce,
)

NUM_CLASSES = 4
NUM_QUERIES = 6


def confident_copy(labels, masks, perm):
    """Predictions where query perm[k] is a confident copy of target k; the other queries
    predict "no object" with empty masks. Returns (logits (Q, K+1), mask logits (Q, H, W))."""
    logits = torch.zeros(NUM_QUERIES, NUM_CLASSES + 1)
    logits[:, NUM_CLASSES] = 8.0
    mask_logits = torch.full((NUM_QUERIES,) + masks.shape[1:], -8.0)
    for k, q in enumerate(perm):
        logits[q] = 0.0
        logits[q, labels[k]] = 8.0
        mask_logits[q] = 8.0 * (2 * masks[k] - 1)
    return logits, mask_logits


def as_dict(matches):
    i, j = matches
    assert i.dtype == torch.int64 and j.dtype == torch.int64
    return dict(zip(i.tolist(), j.tolist()))


@pytest.mark.parametrize("num_points", [0, 200])
def test_recovers_known_permutation(num_points):
    torch.manual_seed(0)
    counts = [3, 0, 5]
    targets, logits, masks, perms = [], [], [], []
    for n in counts:
        labels = torch.randint(NUM_CLASSES, (n,))
        gt = (torch.rand(n, 24, 24) > 0.5).float()  # distinct random masks
        perm = torch.randperm(NUM_QUERIES)[:n].tolist()
        lg, mk = confident_copy(labels, gt, perm)
        targets.append({"labels": labels, "masks": gt})
        logits.append(lg)
        masks.append(mk)
        perms.append(perm)
    outputs = {"pred_logits": torch.stack(logits), "pred_masks": torch.stack(masks)}

    matcher = HungarianMatcher(cost_class=2, cost_mask=5, cost_dice=5, num_points=num_points)
    indices = matcher(outputs, targets)
    assert len(indices) == 3
    for n, perm, matches in zip(counts, perms, indices):
        assert len(matches[0]) == len(matches[1]) == n
        assert as_dict(matches) == {q: k for k, q in enumerate(perm)}


def test_predictions_at_lower_resolution_than_targets():
    torch.manual_seed(1)
    gt = torch.zeros(3, 32, 32)
    gt[0, :16], gt[1, 16:, :16], gt[2, 16:, 16:] = 1, 1, 1
    labels = torch.tensor([0, 0, 0])  # classes cannot tell them apart
    logits, mask_logits = confident_copy(labels, gt[:, ::4, ::4], [4, 0, 2])  # stride 4
    outputs = {"pred_logits": logits[None], "pred_masks": mask_logits[None]}
    (matches,) = HungarianMatcher(num_points=100)(outputs, [{"labels": labels, "masks": gt}])
    assert as_dict(matches) == {4: 0, 0: 1, 2: 2}


def _half_right_case():
    """Two same-class targets: top half and bottom half of a 16x16 image. Query 0 is right
    about target 0 on the 5 left columns and looks like target 1 on the 11 others; query 1
    the other way round. So over the whole image the matching swaps them."""
    top = torch.zeros(16, 16)
    top[:8] = 1
    bottom = 1 - top
    masks = torch.stack([top, bottom])
    q0, q1 = bottom.clone(), top.clone()
    q0[:, :5], q1[:, :5] = top[:, :5], bottom[:, :5]
    outputs = {
        "pred_logits": torch.tensor([[[5.0, 0.0], [5.0, 0.0]]]),
        "pred_masks": (8.0 * (2 * torch.stack([q0, q1]) - 1))[None],
    }
    targets = [{"labels": torch.tensor([0, 0]), "masks": masks}]
    valid = torch.zeros(1, 16, 16)
    valid[:, :, :5] = 1
    return outputs, targets, valid


@pytest.mark.parametrize("num_points", [0, 300])
def test_pixel_valid_ignores_wrong_invalid_region(num_points):
    torch.manual_seed(0)
    outputs, targets, valid = _half_right_case()
    matcher = HungarianMatcher(cost_class=1, cost_mask=1, cost_dice=1, num_points=num_points)
    assert as_dict(matcher(outputs, targets)[0]) == {0: 1, 1: 0}
    assert as_dict(matcher(outputs, targets, pixel_valid=valid)[0]) == {0: 0, 1: 1}


@pytest.mark.parametrize("num_points", [0, 500])
def test_all_ones_pixel_valid_changes_nothing(num_points):
    outputs, targets, _ = _half_right_case()
    logits, masks = outputs["pred_logits"][0], outputs["pred_masks"][0]
    matcher = HungarianMatcher(num_points=num_points)
    torch.manual_seed(0)
    cost = matcher._cost_matrix(logits, masks, targets[0], None)
    torch.manual_seed(0)
    cost_valid = matcher._cost_matrix(logits, masks, targets[0], torch.ones(16, 16))
    torch.testing.assert_close(cost, cost_valid)


def test_pairwise_costs_by_hand():
    logits = torch.tensor([[2.0, -1.0]])
    labels = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    sp = torch.nn.functional.softplus
    s2, sm1 = torch.sigmoid(torch.tensor(2.0)), torch.sigmoid(torch.tensor(-1.0))

    bce = pairwise_sigmoid_bce(logits, labels)
    torch.testing.assert_close(bce[0, 0], (sp(torch.tensor(-2.0)) + sp(torch.tensor(-1.0))) / 2)
    torch.testing.assert_close(bce[0, 1], (sp(torch.tensor(2.0)) + sp(torch.tensor(1.0))) / 2)
    dice = pairwise_dice(logits, labels)
    torch.testing.assert_close(dice[0, 0], 1 - (2 * s2 + 1) / (s2 + sm1 + 1 + 1))

    weights = torch.tensor([1.0, 0.0])  # only the first point counts
    bce_w = pairwise_sigmoid_bce(logits, labels, weights)
    torch.testing.assert_close(
        bce_w[0], torch.stack([sp(-torch.tensor(2.0)), sp(torch.tensor(2.0))])
    )
    dice_w = pairwise_dice(logits, labels, weights)
    torch.testing.assert_close(
        dice_w[0], torch.stack([1 - (2 * s2 + 1) / (s2 + 2), 1 - 1 / (s2 + 1)])
    )


def test_costs_in_float32_under_autocast():
    torch.manual_seed(0)
    labels = torch.tensor([1, 2])
    gt = (torch.rand(2, 16, 16) > 0.5).float()
    logits, mask_logits = confident_copy(labels, gt, [3, 1])
    outputs = {"pred_logits": logits[None].bfloat16(), "pred_masks": mask_logits[None].bfloat16()}
    matcher = HungarianMatcher(num_points=0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        cost = matcher._cost_matrix(
            logits.bfloat16(), mask_logits.bfloat16(), {"labels": labels, "masks": gt}, None
        )
        (matches,) = matcher(outputs, [{"labels": labels, "masks": gt}])
    assert cost.dtype == torch.float32
    assert as_dict(matches) == {3: 0, 1: 1}


def test_bad_inputs():
    with pytest.raises(ValueError, match="num_points"):
        HungarianMatcher(num_points=-1)
    outputs = {"pred_logits": torch.zeros(2, 3, 2), "pred_masks": torch.zeros(2, 3, 4, 4)}
    targets = [{"labels": torch.tensor([0]), "masks": torch.ones(1, 4, 4)}]
    with pytest.raises(ValueError, match="targets"):
        HungarianMatcher()(outputs, targets)
    with pytest.raises(ValueError, match="pixel_valid"):
        HungarianMatcher()(outputs, targets * 2, pixel_valid=torch.ones(1, 4, 4))


def test_repr_names_costs():
    text = repr(HungarianMatcher(cost_class=2.0, cost_mask=5.0, cost_dice=5.0, num_points=9))
    assert "HungarianMatcher" in text
    assert "cost_class: 2.0" in text and "cost_dice: 5.0" in text and "num_points: 9" in text
