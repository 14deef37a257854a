"""CondInst's loss terms: the three FCOS terms and the dice mask loss.

- loss_fcos_cls: sigmoid focal loss (alpha, gamma) summed over every location and class
  of the batch, divided by the number of positive locations (averaged over processes,
  at least 1), times LOSS_WEIGHT_CLS.
- loss_fcos_loc: 1 - GIoU of the predicted and target (l, t, r, b) at the positives,
  weighted by their centerness targets, divided by the sum of those targets (averaged
  over processes).
- loss_fcos_ctr: BCE-with-logits of the centerness logits against the targets, summed over
  the positives, divided by the number of positives.
- loss_mask: dice loss 1 - 2 sum(p g) / (sum p^2 + sum g^2 + 1e-5) of each instance's
  mask probabilities p (stride 4), averaged over the instances fed to the mask head.
"""
from typing import Dict, Optional, Sequence

import torch
import torch.nn.functional as F
from detectron2.utils import comm
from fvcore.nn import sigmoid_focal_loss
from torch import Tensor

DICE_EPS = 1e-5
LOC_LOSS_TYPES = ("giou", "iou", "linear_iou")
CLS_NORMALIZERS = ("fg", "all")


def mean_over_processes(value: Tensor) -> float:
    """The mean of a scalar over the processes of a distributed run (itself otherwise)."""
    world = comm.get_world_size()
    if world > 1:
        value = value.detach().clone().float()
        torch.distributed.all_reduce(value)
        return value.item() / world
    return float(value.item())


def box_ious(pred: Tensor, target: Tensor):
    """IoU and GIoU of boxes given as (l, t, r, b) distances from a common point: each
    (n, 4) -> two (n,). IoU is smoothed by 1 in numerator and denominator (AdelaiDet's,
    in the units of the distances: strides)."""
    pl, pt, pr, pb = pred.unbind(1)
    tl, tt, tr, tb = target.unbind(1)
    pred_area = (pl + pr) * (pt + pb)
    target_area = (tl + tr) * (tt + tb)
    inter = (torch.minimum(pl, tl) + torch.minimum(pr, tr)) * (
        torch.minimum(pt, tt) + torch.minimum(pb, tb))
    enclosing = (torch.maximum(pl, tl) + torch.maximum(pr, tr)) * (
        torch.maximum(pt, tt) + torch.maximum(pb, tb))
    union = pred_area + target_area - inter
    ious = (inter + 1.0) / (union + 1.0)
    gious = ious - (enclosing - union) / enclosing
    return ious, gious


def fcos_losses(
    cls_logits: Tensor, bbox_reg: Tensor, ctrness: Tensor, labels: Tensor, reg_targets: Tensor,
    ctr_targets: Tensor, *, num_classes: int, focal_alpha: float, focal_gamma: float,
    loc_loss_type: str = "giou", cls_normalizer: str = "fg", cls_weight: float = 1.0,
    terms: Sequence[str] = ("labels", "boxes", "ctrness"),
) -> Dict[str, Tensor]:
    """The FCOS terms over every location of the batch (N of them, images concatenated).

    Args:
        cls_logits: (N, K); bbox_reg: (N, 4) predicted (l, t, r, b) in strides;
        ctrness: (N,) centerness logits.
        labels: (N,) long, K for background; reg_targets: (N, 4) in strides;
        ctr_targets: (N,) centerness targets (read at the positives only).
        terms: which of "labels" (loss_fcos_cls), "boxes" (loss_fcos_loc) and "ctrness"
            (loss_fcos_ctr) to compute.
    """
    positive = labels != num_classes
    num_pos = max(mean_over_processes(positive.sum()), 1.0)
    losses = {}
    if "labels" in terms:
        onehot = torch.zeros_like(cls_logits, dtype=torch.float32)
        pos_idx = torch.nonzero(positive).squeeze(1)
        onehot[pos_idx, labels[pos_idx]] = 1.0
        loss = sigmoid_focal_loss(cls_logits.float(), onehot, focal_alpha, focal_gamma, "sum")
        if cls_normalizer == "fg":
            loss = loss / num_pos
        else:  # "all": every location of the batch
            count = torch.tensor(float(len(labels)), device=labels.device)
            loss = loss / max(mean_over_processes(count), 1.0)
        losses["loss_fcos_cls"] = loss * cls_weight
    pred, target, ctr_t = bbox_reg[positive].float(), reg_targets[positive], ctr_targets[positive]
    if "boxes" in terms:
        ious, gious = box_ious(pred, target)
        if loc_loss_type == "giou":
            per_loc = 1 - gious
        elif loc_loss_type == "iou":
            per_loc = -torch.log(ious)
        else:  # "linear_iou"
            per_loc = 1 - ious
        denom = max(mean_over_processes(ctr_t.sum()), 1e-6)
        losses["loss_fcos_loc"] = (per_loc * ctr_t).sum() / denom
    if "ctrness" in terms:
        losses["loss_fcos_ctr"] = F.binary_cross_entropy_with_logits(
            ctrness[positive].float(), ctr_t, reduction="sum") / num_pos
    return losses


def dice_loss(probs: Tensor, targets: Tensor, weights: Optional[Tensor] = None) -> Tensor:
    """Per-instance dice loss ``1 - 2 sum(w p g) / (sum(w p^2) + sum(w g^2) + 1e-5)``.

    probs, targets: (n, P) probabilities and {0, 1} targets; weights: (n, P) pixel weights
    (all ones when None: AdelaiDet's loss). A pixel of weight 0 carries no loss; with every
    weight 0 the loss is 1 whatever the masks. Returns (n,).
    """
    if weights is not None:
        probs_w, targets_w = probs * weights, targets * weights
    else:
        probs_w, targets_w = probs, targets
    inter = (probs_w * targets).sum(1)
    union = (probs_w * probs).sum(1) + (targets_w * targets).sum(1) + DICE_EPS
    return 1.0 - 2.0 * inter / union


def check_loss_options(loc_loss_type: str, cls_normalizer: str) -> None:
    """ValueErrors naming the config keys of unsupported loss options."""
    if loc_loss_type not in LOC_LOSS_TYPES:
        raise ValueError(
            f"MODEL.FCOS.LOC_LOSS_TYPE = {loc_loss_type!r} must be one of {LOC_LOSS_TYPES}"
        )
    if cls_normalizer not in CLS_NORMALIZERS:
        raise ValueError(
            f"MODEL.FCOS.LOSS_NORMALIZER_CLS = {cls_normalizer!r} must be one of "
            f"{CLS_NORMALIZERS} (AdelaiDet's 'moving_fg' is not implemented)"
        )

