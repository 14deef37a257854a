"""SparseInst's criterion (SparseInst paper Eq. 3-4) on the one-to-one matching.

- "loss_ce": sigmoid focal loss (alpha 0.25, gamma 2) over every prediction and class,
  unmatched predictions being background; summed, divided by the number of targets.
- "loss_dice": dice loss ``1 - 2 sum(p t) / (sum(p^2) + sum(t^2) + 1e-4)`` per matched
  mask, summed, divided by the number of targets.
- "loss_mask": sigmoid BCE averaged over every pixel of every matched mask.
- "loss_objectness": BCE of each matched prediction's objectness logit against the IoU of
  its binarised mask (p >= 0.4) with its target (t > 0.5), averaged over matches.

Targets (padded like the input batch) are bilinearly resized to the mask logits'
resolution, as in the official code. An optional per-pixel validity map weights every
pixel of the three mask-based terms (weight 0: no loss there); without it the losses are
the official ones.
"""
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from detectron2.config import configurable
from detectron2.utils.registry import Registry
from fvcore.nn import sigmoid_focal_loss
from torch import Tensor, nn

from ...adapter import check_targets
from ...distributed import average_num_masks
from ..registry import lookup
from .matcher import DICE_EPS, build_sparseinst_matcher, resize_to

SPARSE_INST_CRITERION_REGISTRY = Registry("SPARSE_INST_CRITERION")
SPARSE_INST_CRITERION_REGISTRY.__doc__ = """
Criteria of SparseInst, called as ``Criterion(cfg)``; see ``SparseInstCriterion.forward``.
"""

# Focal loss parameters of the class term (the official constants, not config keys).
FOCAL_ALPHA = 0.25
FOCAL_GAMMA = 2.0
# Probability at which a predicted mask is binarised for its IoU target (official).
IOU_MASK_THRESHOLD = 0.4
# LOSS.ITEMS -> the criterion's terms: the official "masks" item computes the objectness
# term with the mask terms (it needs the matched masks' IoU).
_ITEM_TERMS = {"labels": ("labels",), "masks": ("masks", "objectness")}


def dice_loss(logits: Tensor, targets: Tensor, weights: Optional[Tensor] = None) -> Tensor:
    """Per-mask dice loss ``1 - 2 sum(w p t) / (sum(w p^2) + sum(w t^2) + 1e-4)``.
    logits, targets, weights: (M, P); weights all ones when None. Returns (M,)."""
    probs = logits.sigmoid()
    if weights is not None:
        probs_w, targets_w = probs * weights, targets * weights
    else:
        probs_w, targets_w = probs, targets
    numerator = 2 * (probs_w * targets).sum(-1)
    denominator = (probs_w * probs).sum(-1) + (targets_w * targets).sum(-1)
    return 1 - numerator / (denominator + DICE_EPS)


def mask_iou(logits: Tensor, targets: Tensor, weights: Optional[Tensor] = None) -> Tensor:
    """IoU of each mask binarised at p >= 0.4 with its target binarised at 0.5, pixels
    weighted by ``weights``. logits, targets, weights: (M, P). Returns (M,)."""
    pred = (logits.sigmoid() >= IOU_MASK_THRESHOLD).float()
    tgt = (targets > 0.5).float()
    if weights is not None:
        pred = pred * weights  # weighting one factor weights the intersection too
        inter = (pred * tgt).sum(-1)
        union = (tgt * weights).sum(-1) + pred.sum(-1) - inter
    else:
        inter = (pred * tgt).sum(-1)
        union = tgt.sum(-1) + pred.sum(-1) - inter
    return inter / (union + 1e-6)


@SPARSE_INST_CRITERION_REGISTRY.register()
class SparseInstCriterion(nn.Module):
    """Weighted losses of SparseInst's predictions given the ground truth of a batch."""

    @configurable
    def __init__(self, *, matcher: nn.Module, num_classes: int, items: Sequence[str],
                 class_weight: float, mask_pixel_weight: float, mask_dice_weight: float,
                 objectness_weight: float):
        """
        Args:
            matcher: called as ``matcher(outputs, targets, pixel_valid)``.
            num_classes: K.
            items: subset of ("labels", "masks") (MODEL.SPARSE_INST.LOSS.ITEMS).
            class_weight, mask_pixel_weight, mask_dice_weight, objectness_weight: weights
                of loss_ce, loss_mask, loss_dice and loss_objectness.
        """
        super().__init__()
        unknown = [i for i in items if i not in _ITEM_TERMS]
        if unknown:
            raise ValueError(
                f"MODEL.SPARSE_INST.LOSS.ITEMS: unknown items {unknown}; supported: "
                f"{sorted(_ITEM_TERMS)}"
            )
        self.matcher = matcher
        self.num_classes = num_classes
        self.terms = [t for i in items for t in _ITEM_TERMS[i]]
        self.weight_dict = {"loss_ce": class_weight, "loss_objectness": objectness_weight,
                            "loss_dice": mask_dice_weight, "loss_mask": mask_pixel_weight}

    @classmethod
    def from_config(cls, cfg):
        si = cfg.MODEL.SPARSE_INST
        return {
            "matcher": build_sparseinst_matcher(cfg),
            "num_classes": si.DECODER.NUM_CLASSES,
            "items": list(si.LOSS.ITEMS),
            "class_weight": si.LOSS.CLASS_WEIGHT,
            "mask_pixel_weight": si.LOSS.MASK_PIXEL_WEIGHT,
            "mask_dice_weight": si.LOSS.MASK_DICE_WEIGHT,
            "objectness_weight": si.LOSS.OBJECTNESS_WEIGHT,
        }

    def forward(
        self, outputs: Dict[str, Tensor], targets: List[Dict[str, Tensor]],
        pixel_valid: Optional[Tensor] = None, indices: Optional[List[Tuple[Tensor, Tensor]]] = None,
        terms: Optional[Sequence[str]] = None,
    ) -> Tuple[Dict[str, Tensor], List[Tuple[Tensor, Tensor]]]:
        """
        Args:
            outputs: "pred_logits" (B, N, K), "pred_scores" (B, N, 1) objectness logits,
                "pred_masks" (B, N, H, W) mask logits.
            targets: B dicts with "labels" (M_b,) int64 and "masks" (M_b, Ht, Wt) in [0, 1],
                padded like the input batch.
            pixel_valid: optional (B, Hv, Wv) pixel weights in [0, 1].
            indices: the matching to use; None: the matcher's.
            terms: subset of "labels", "masks", "objectness" to compute; None: all that
                LOSS.ITEMS enables.
        Returns:
            (weighted losses, matching): the losses among "loss_ce", "loss_objectness",
            "loss_dice", "loss_mask"; the matching as B pairs (prediction indices, target
            indices).
        """
        logits, masks = outputs["pred_logits"], outputs["pred_masks"]
        check_targets(logits.shape[0], targets, pixel_valid)
        terms = self.terms if terms is None else [t for t in self.terms if t in terms]
        size = tuple(masks.shape[-2:])
        # Resized once, for the matcher and the mask terms alike.
        small = [{"labels": t["labels"], "masks": resize_to(t["masks"].to(masks.device), size)}
                 for t in targets]
        valid = None if pixel_valid is None else resize_to(pixel_valid.to(masks.device), size)
        if indices is None:
            indices = self.matcher(outputs, small, valid)
        num_instances = average_num_masks(targets, logits.device)

        losses = {}
        if "labels" in terms:
            losses["loss_ce"] = self.loss_labels(logits, small, indices, num_instances)
        wanted = {"loss_dice", "loss_mask"} if "masks" in terms else set()
        if "objectness" in terms:
            wanted.add("loss_objectness")
        if wanted:
            mask_losses = self.loss_masks(outputs, small, indices, num_instances, valid)
            losses.update({k: v for k, v in mask_losses.items() if k in wanted})
        return {k: v * self.weight_dict[k] for k, v in losses.items()}, indices

    def loss_labels(self, logits: Tensor, targets, indices, num_instances: float) -> Tensor:
        """Focal loss of (B, N, K) class logits against one-hot matched labels."""
        onehot = torch.zeros_like(logits, dtype=torch.float32)
        batch_idx, src_idx = _matched(indices, logits.device)
        labels = torch.cat([t["labels"][j.to(t["labels"].device)]
                            for t, (_, j) in zip(targets, indices)])
        onehot[batch_idx, src_idx, labels.to(logits.device).long()] = 1.0
        loss = sigmoid_focal_loss(logits.float(), onehot, FOCAL_ALPHA, FOCAL_GAMMA, "sum")
        return loss / num_instances

    def loss_masks(self, outputs, targets, indices, num_instances: float,
                   valid: Optional[Tensor]) -> Dict[str, Tensor]:
        """Dice, BCE and IoU-aware objectness of the matched masks (targets and ``valid``
        already at the masks' resolution)."""
        masks, scores = outputs["pred_masks"], outputs["pred_scores"]
        batch_idx, src_idx = _matched(indices, masks.device)
        if batch_idx.numel() == 0:
            # Keep the graph connected so DDP sees the mask and objectness parameters used.
            zero = masks.sum() * 0.0 + scores.sum() * 0.0
            return {"loss_objectness": zero, "loss_dice": zero, "loss_mask": zero}
        src = masks[batch_idx, src_idx].float().flatten(1)
        tgt = torch.cat([t["masks"][j.to(t["masks"].device)]
                         for t, (_, j) in zip(targets, indices)]).flatten(1)
        weights = None if valid is None else valid[batch_idx].flatten(1)

        with torch.no_grad():
            iou = mask_iou(src, tgt, weights)
        bce = F.binary_cross_entropy_with_logits(src, tgt, reduction="none")
        if weights is None:
            loss_mask = bce.mean()
        else:
            loss_mask = (bce * weights).sum() / weights.sum().clamp(min=1e-6)
        return {
            "loss_objectness": F.binary_cross_entropy_with_logits(
                scores[batch_idx, src_idx, 0].float(), iou),
            "loss_dice": dice_loss(src, tgt, weights).sum() / num_instances,
            "loss_mask": loss_mask,
        }


def _matched(indices, device) -> Tuple[Tensor, Tensor]:
    """Flatten per-image matches into (image index, prediction index), each (M,)."""
    batch_idx = torch.cat([torch.full_like(i, b) for b, (i, _) in enumerate(indices)])
    src_idx = torch.cat([i for i, _ in indices])
    return batch_idx.to(device), src_idx.to(device)


def build_sparseinst_criterion(cfg) -> nn.Module:
    """The criterion named by MODEL.SPARSE_INST.LOSS.NAME."""
    name = cfg.MODEL.SPARSE_INST.LOSS.NAME
    return lookup(SPARSE_INST_CRITERION_REGISTRY, name, "MODEL.SPARSE_INST.LOSS.NAME")(cfg)
