"""Hungarian matching of Mask2Former's queries to ground-truth instances.

The cost of assigning query q to target t is a weighted sum of
- the negative softmax probability of t's class,
- the sigmoid binary cross-entropy between q's mask logits and t's mask,
- the dice loss between them,
with both mask costs evaluated on the same random points for every prediction and target.
An optional per-pixel validity map (e.g. pixels a geometric transform left undefined)
weights each point's contribution, so invalid pixels do not influence the matching.
"""
from typing import Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from detectron2.projects.point_rend.point_features import point_sample
from scipy.optimize import linear_sum_assignment
from torch import Tensor, nn

from ..finite_cost import check_cost_finite

_EPS = 1e-6


def pairwise_sigmoid_bce(
    logits: Tensor, labels: Tensor, weights: Optional[Tensor] = None
) -> Tensor:
    """
    Mean sigmoid BCE of every prediction against every target over P points.

    Args:
        logits: (N, P) prediction logits; labels: (M, P) targets in [0, 1];
        weights: optional (P,) non-negative point weights (weighted mean over points).

    Returns:
        (N, M) cost.
    """
    pos = F.binary_cross_entropy_with_logits(logits, torch.ones_like(logits), reduction="none")
    neg = F.binary_cross_entropy_with_logits(logits, torch.zeros_like(logits), reduction="none")
    if weights is None:
        return (pos @ labels.T + neg @ (1 - labels).T) / logits.shape[1]
    pos, neg = pos * weights, neg * weights
    return (pos @ labels.T + neg @ (1 - labels).T) / weights.sum().clamp(min=_EPS)


def pairwise_dice(logits: Tensor, labels: Tensor, weights: Optional[Tensor] = None) -> Tensor:
    """
    Dice loss ``1 - (2 sum(w p t) + 1) / (sum(w p) + sum(w t) + 1)`` of every prediction
    (probabilities p = sigmoid(logits), (N, P)) against every target t ((M, P)), with point
    weights w ((P,), all ones when None). Returns (N, M).
    """
    probs = logits.sigmoid()
    if weights is None:
        label_sums = labels.sum(-1)
    else:
        # Weighting p once weights both sum(p t) and sum(p).
        probs = probs * weights
        label_sums = labels @ weights
    numerator = 2 * probs @ labels.T
    denominator = probs.sum(-1)[:, None] + label_sums[None, :]
    return 1 - (numerator + 1) / (denominator + 1)


def _pixel_centers(height: int, width: int, device) -> Tensor:
    """(H * W, 2) normalized (x, y) coordinates of the centres of an H x W grid."""
    ys = (torch.arange(height, device=device, dtype=torch.float32) + 0.5) / height
    xs = (torch.arange(width, device=device, dtype=torch.float32) + 0.5) / width
    grid_y, grid_x = torch.meshgrid(ys, xs, indexing="ij")
    return torch.stack([grid_x.flatten(), grid_y.flatten()], dim=1)


def _sample(maps: Tensor, coords: Tensor, **kwargs) -> Tensor:
    """Sample (N, H, W) maps at shared (P, 2) coords in [0, 1]^2 -> (N, P)."""
    coords = coords[None].expand(maps.shape[0], -1, -1)
    return point_sample(maps[:, None], coords, align_corners=False, **kwargs)[:, 0]


class HungarianMatcher(nn.Module):
    """One-to-one assignment of queries to targets minimizing the matching cost."""

    def __init__(
        self,
        cost_class: float = 1,
        cost_mask: float = 1,
        cost_dice: float = 1,
        num_points: int = 0,
    ):
        """
        Args:
            cost_class, cost_mask, cost_dice: weights of the three costs.
            num_points: random points on which mask costs are computed; 0 evaluates them
                on every pixel centre of the prediction grid instead.
        """
        super().__init__()
        if cost_class == 0 and cost_mask == 0 and cost_dice == 0:
            raise ValueError("HungarianMatcher: all costs are 0")
        if num_points < 0:
            raise ValueError(f"HungarianMatcher: num_points must be >= 0, got {num_points}")
        self.cost_class = cost_class
        self.cost_mask = cost_mask
        self.cost_dice = cost_dice
        self.num_points = num_points

    @torch.no_grad()
    def forward(
        self,
        outputs: Dict[str, Tensor],
        targets: List[Dict[str, Tensor]],
        pixel_valid: Optional[Tensor] = None,
    ) -> List[Tuple[Tensor, Tensor]]:
        """
        Args:
            outputs: "pred_logits" (B, Q, K + 1) and "pred_masks" (B, Q, H, W) logits.
            targets: B dicts with "labels" (N_b,) int and "masks" (N_b, Ht, Wt) in [0, 1].
            pixel_valid: optional (B, Hv, Wv) in [0, 1]; mask costs weight each point by the
                validity there.

        Returns:
            B pairs (query indices, target indices), int64 of equal length min(Q, N_b):
            query ``i[k]`` is matched to target ``j[k]``.
        """
        logits, masks = outputs["pred_logits"], outputs["pred_masks"]
        if len(targets) != logits.shape[0]:
            raise ValueError(
                f"got {len(targets)} targets for a batch of {logits.shape[0]} predictions"
            )
        if pixel_valid is not None and pixel_valid.shape[0] != logits.shape[0]:
            raise ValueError(
                f"pixel_valid has shape {tuple(pixel_valid.shape)}; expected (B, H, W) with "
                f"B = {logits.shape[0]}"
            )
        indices = []
        for b, target in enumerate(targets):
            valid = None if pixel_valid is None else pixel_valid[b]
            cost = self._cost_matrix(logits[b], masks[b], target, valid).cpu().numpy()
            check_cost_finite(cost, outputs, b)
            rows, cols = linear_sum_assignment(cost)
            indices.append(
                (torch.as_tensor(rows, dtype=torch.int64), torch.as_tensor(cols, dtype=torch.int64))
            )
        return indices

    def _cost_matrix(
        self, logits: Tensor, masks: Tensor, target: Dict[str, Tensor], valid: Optional[Tensor]
    ) -> Tensor:
        """(Q, N) matching cost of one image, in float32."""
        labels = target["labels"]
        if len(labels) == 0:
            return logits.new_zeros((logits.shape[0], 0), dtype=torch.float32)
        # Autocast would run the matmuls in half precision; near-ties in the costs then
        # flip the matching, so keep everything in float32.
        with torch.autocast(device_type=logits.device.type, enabled=False):
            prob = logits.float().softmax(-1)
            cost_class = -prob[:, labels.long()]

            coords = self._points(masks)
            pred_points = _sample(masks.float(), coords)
            tgt_points = _sample(target["masks"].to(device=masks.device).float(), coords)
            weights = None
            if valid is not None:
                # Border padding: a fully valid image weighs every point 1, edges included.
                valid = valid[None].to(device=masks.device, dtype=torch.float32)
                weights = _sample(valid, coords, padding_mode="border")[0]
            cost_mask = pairwise_sigmoid_bce(pred_points, tgt_points, weights)
            cost_dice = pairwise_dice(pred_points, tgt_points, weights)
        return (
            self.cost_class * cost_class
            + self.cost_mask * cost_mask
            + self.cost_dice * cost_dice
        )

    def _points(self, masks: Tensor) -> Tensor:
        if self.num_points == 0:
            return _pixel_centers(masks.shape[-2], masks.shape[-1], masks.device)
        return torch.rand(self.num_points, 2, device=masks.device)

    def __repr__(self) -> str:
        lines = [
            f"cost_class: {self.cost_class}",
            f"cost_mask: {self.cost_mask}",
            f"cost_dice: {self.cost_dice}",
            f"num_points: {self.num_points}",
        ]
        return "Matcher " + type(self).__name__ + "".join("\n    " + line for line in lines)
