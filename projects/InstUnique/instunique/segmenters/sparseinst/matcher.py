"""SparseInst's one-to-one matching of instance predictions to ground-truth instances.

The matching score of prediction i and target j is dice(i, j)^alpha * p_i(c_j)^beta
(SparseInst paper Eq. 2), p the sigmoid class probability of j's class c_j; the Hungarian
algorithm maximises the total score. As in the official code, masks are compared at the
prediction's resolution: targets, padded like the input batch, are bilinearly resized
down to it. An optional per-pixel validity map (pixels a geometric transform left
undefined) weights every pixel's contribution to the dice score.
"""
from typing import Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from detectron2.config import configurable
from detectron2.utils.registry import Registry
from scipy.optimize import linear_sum_assignment
from torch import Tensor, nn

from ..finite_cost import check_cost_finite
from ..registry import lookup

SPARSE_INST_MATCHER_REGISTRY = Registry("SPARSE_INST_MATCHER")
SPARSE_INST_MATCHER_REGISTRY.__doc__ = """
Matchers of SparseInst, called as ``Matcher(cfg)``; ``matcher(outputs, targets,
pixel_valid)`` returns per image (prediction indices, target indices).
"""

# Added to the dice denominator (the official constant).
DICE_EPS = 1e-4


def resize_to(maps: Tensor, size: Tuple[int, int]) -> Tensor:
    """(N, H, W) masks or validity maps -> (N, *size) float, bilinearly resized (the
    official way of bringing input-resolution targets to the mask logits' resolution)."""
    maps = maps.float()
    if maps.shape[0] == 0:
        return maps.new_zeros((0, *size))
    if tuple(maps.shape[-2:]) == tuple(size):
        return maps
    return F.interpolate(maps[:, None], size=size, mode="bilinear", align_corners=False)[:, 0]


def pairwise_dice_score(logits: Tensor, targets: Tensor, weights: Optional[Tensor] = None):
    """
    Dice score ``2 sum(w p t) / (sum(w p^2) + sum(w t^2) + 1e-4)`` of every prediction
    against every target (SparseInst's squared-denominator dice).

    Args:
        logits: (N, P) mask logits (p = sigmoid); targets: (M, P) in [0, 1];
        weights: optional (P,) pixel weights w (all ones when None).
    Returns:
        (N, M) scores in [0, 1].
    """
    probs = logits.sigmoid()
    if weights is not None:
        probs_w, targets_w = probs * weights, targets * weights
    else:
        probs_w, targets_w = probs, targets
    numerator = 2 * probs_w @ targets.t()
    denominator = (probs_w * probs).sum(-1)[:, None] + (targets_w * targets).sum(-1)[None]
    return numerator / (denominator + DICE_EPS)


@SPARSE_INST_MATCHER_REGISTRY.register()
class SparseInstMatcher(nn.Module):
    """Hungarian matching maximising dice^alpha * prob^beta."""

    @configurable
    def __init__(self, *, alpha: float, beta: float):
        """alpha, beta: exponents of the dice score and of the class probability."""
        super().__init__()
        if alpha < 0 or beta < 0:
            raise ValueError(
                f"MODEL.SPARSE_INST.MATCHER.ALPHA/BETA must be >= 0, got {alpha}, {beta}"
            )
        self.alpha = alpha
        self.beta = beta

    @classmethod
    def from_config(cls, cfg):
        m = cfg.MODEL.SPARSE_INST.MATCHER
        return {"alpha": m.ALPHA, "beta": m.BETA}

    @torch.no_grad()
    def forward(self, outputs: Dict[str, Tensor], targets: List[Dict[str, Tensor]],
                pixel_valid: Optional[Tensor] = None) -> List[Tuple[Tensor, Tensor]]:
        """
        Args:
            outputs: "pred_logits" (B, N, K) class logits, "pred_masks" (B, N, H, W) mask
                logits.
            targets: B dicts with "labels" (M_b,) and "masks" (M_b, Ht, Wt) in [0, 1],
                padded like the input batch (resized here to (H, W) unless already so).
            pixel_valid: optional (B, Hv, Wv) in [0, 1], resized to (H, W): weights of
                every pixel in the dice score.
        Returns:
            B pairs (prediction indices, target indices), int64 on the CPU, each of
            length min(N, M_b).
        """
        logits, masks = outputs["pred_logits"], outputs["pred_masks"]
        if len(targets) != logits.shape[0]:
            raise ValueError(
                f"got {len(targets)} targets for a batch of {logits.shape[0]} predictions"
            )
        size = tuple(masks.shape[-2:])
        if pixel_valid is not None:
            pixel_valid = resize_to(pixel_valid, size)
        indices = []
        # Near-ties flip the assignment under half precision: score in float32.
        with torch.autocast(device_type=masks.device.type, enabled=False):
            for b, target in enumerate(targets):
                labels = target["labels"]
                if len(labels) == 0:
                    empty = torch.zeros(0, dtype=torch.int64)
                    indices.append((empty, empty.clone()))
                    continue
                tgt = resize_to(target["masks"].to(masks.device), size).flatten(1)
                weights = None if pixel_valid is None else pixel_valid[b].flatten()
                dice = pairwise_dice_score(masks[b].float().flatten(1), tgt, weights)
                prob = logits[b].float().sigmoid()[:, labels.long()]
                score = (dice.pow(self.alpha) * prob.pow(self.beta)).cpu().numpy()
                check_cost_finite(score, outputs, b)
                rows, cols = linear_sum_assignment(score, maximize=True)
                indices.append((torch.as_tensor(rows, dtype=torch.int64),
                                torch.as_tensor(cols, dtype=torch.int64)))
        return indices

    def extra_repr(self) -> str:
        return f"alpha={self.alpha}, beta={self.beta}"


def build_sparseinst_matcher(cfg) -> nn.Module:
    """The matcher named by MODEL.SPARSE_INST.MATCHER.NAME."""
    name = cfg.MODEL.SPARSE_INST.MATCHER.NAME
    return lookup(SPARSE_INST_MATCHER_REGISTRY, name, "MODEL.SPARSE_INST.MATCHER.NAME")(cfg)
