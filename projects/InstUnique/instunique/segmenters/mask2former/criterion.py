"""Mask2Former's set criterion: classification and point-sampled mask losses on the
Hungarian matching of queries to targets, for the final prediction and every auxiliary one.

Mask losses are evaluated on PointRend-style importance-sampled points rather than on full
masks. An optional per-pixel validity map (pixels a geometric transform left undefined)
keeps the sampled points off invalid pixels where possible and weights every point's
contribution by its validity; without it the losses are the official ones.
"""
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from detectron2.projects.point_rend.point_features import (
    get_uncertain_point_coords_with_randomness,
    point_sample,
)
from torch import Tensor, nn

from ...adapter import check_targets
from ...distributed import average_num_masks

_EPS = 1e-6
_SUPPORTED_LOSSES = ("labels", "masks")


def sigmoid_bce_loss(
    logits: Tensor, labels: Tensor, num_masks: float, weights: Optional[Tensor] = None
) -> Tensor:
    """
    Sigmoid BCE averaged over the points of each mask (weighted mean if ``weights``), summed
    over masks and divided by ``num_masks``. logits, labels, weights: (N, P).
    """
    loss = F.binary_cross_entropy_with_logits(logits, labels, reduction="none")
    if weights is None:
        per_mask = loss.mean(1)
    else:
        per_mask = (loss * weights).sum(1) / weights.sum(1).clamp(min=_EPS)
    return per_mask.sum() / num_masks


def dice_loss(
    logits: Tensor, labels: Tensor, num_masks: float, weights: Optional[Tensor] = None
) -> Tensor:
    """
    ``1 - (2 sum(w p t) + 1) / (sum(w p) + sum(w t) + 1)`` per mask (w = 1 without
    ``weights``), p = sigmoid(logits), summed over masks and divided by ``num_masks``.
    logits, labels, weights: (N, P).
    """
    probs = logits.sigmoid()
    if weights is not None:
        # Weighting p once weights both sum(p t) and sum(p).
        probs = probs * weights
        labels_sum = (labels * weights).sum(-1)
    else:
        labels_sum = labels.sum(-1)
    numerator = 2 * (probs * labels).sum(-1)
    denominator = probs.sum(-1) + labels_sum
    loss = 1 - (numerator + 1) / (denominator + 1)
    return loss.sum() / num_masks


def _uncertainty(point_logits: Tensor) -> Tensor:
    """(N, C, P) point values, logits first -> (N, 1, P): high where the logit is near 0."""
    return -point_logits[:, :1].abs()


def _uncertainty_on_valid(point_values: Tensor) -> Tensor:
    """Like ``_uncertainty`` for (N, 2, P) (logit, invalidity) values; invalid points are
    treated as certain so importance sampling does not pick them."""
    uncertainty = _uncertainty(point_values)
    return uncertainty.masked_fill(point_values[:, 1:] > 0.5, float("-inf"))


class SetCriterion(nn.Module):
    """Losses of Mask2Former given its outputs and the ground truth of a batch."""

    def __init__(
        self,
        num_classes: int,
        matcher: nn.Module,
        weight_dict: Dict[str, float],
        eos_coef: float,
        losses: Sequence[str],
        num_points: int,
        oversample_ratio: float,
        importance_sample_ratio: float,
    ):
        """
        Args:
            num_classes: K, number of foreground classes (class K is "no object").
            matcher: called as ``matcher(outputs, targets, pixel_valid)``, returns
                per-image (query indices, target indices).
            weight_dict: loss name -> weight; kept for the caller (losses are returned
                unweighted).
            eos_coef: cross-entropy weight of the "no object" class.
            losses: subset of ("labels", "masks").
            num_points: points sampled per matched mask for the mask losses.
            oversample_ratio, importance_sample_ratio: PointRend importance sampling.
        """
        super().__init__()
        unknown = [name for name in losses if name not in _SUPPORTED_LOSSES]
        if unknown:
            raise ValueError(f"unknown losses {unknown}; supported: {list(_SUPPORTED_LOSSES)}")
        self.num_classes = num_classes
        self.matcher = matcher
        self.weight_dict = weight_dict
        self.eos_coef = eos_coef
        self.losses = list(losses)
        self.num_points = num_points
        self.oversample_ratio = oversample_ratio
        self.importance_sample_ratio = importance_sample_ratio
        empty_weight = torch.ones(num_classes + 1)
        empty_weight[-1] = eos_coef
        self.register_buffer("empty_weight", empty_weight)

    def forward(
        self,
        outputs: Dict[str, object],
        targets: List[Dict[str, Tensor]],
        pixel_valid: Optional[Tensor] = None,
        indices: Optional[List[Tuple[Tensor, Tensor]]] = None,
        terms: Optional[Sequence[str]] = None,
    ) -> Tuple[Dict[str, Tensor], List[Tuple[Tensor, Tensor]]]:
        """
        Args:
            outputs: "pred_logits" (B, Q, K + 1), "pred_masks" (B, Q, H, W) and optionally
                "aux_outputs", a list of dicts with the same two keys.
            targets: B dicts with "labels" (N_b,) int64 and "masks" (N_b, Ht, Wt) in [0, 1].
            pixel_valid: optional (B, Hv, Wv) validity in [0, 1].
            indices: the final prediction's matching to use; None: the matcher's.
            terms: the subset of the criterion's losses to compute; None: all of them.

        Returns:
            (losses, indices): unweighted losses "loss_ce", "loss_mask", "loss_dice" and,
            for auxiliary output i, the same names suffixed "_i"; indices is the final
            prediction's matching, B pairs (query indices, target indices).
        """
        check_targets(outputs["pred_logits"].shape[0], targets, pixel_valid)
        terms = self.losses if terms is None else [t for t in self.losses if t in terms]
        num_masks = average_num_masks(targets, outputs["pred_logits"].device)
        final = {k: v for k, v in outputs.items() if k != "aux_outputs"}
        if indices is None:
            indices = self.matcher(final, targets, pixel_valid)
        losses = self._losses(final, targets, indices, num_masks, pixel_valid, terms)
        for i, aux in enumerate(outputs.get("aux_outputs", [])):
            aux_indices = self.matcher(aux, targets, pixel_valid)
            aux_losses = self._losses(aux, targets, aux_indices, num_masks, pixel_valid, terms)
            losses.update({f"{name}_{i}": value for name, value in aux_losses.items()})
        return losses, indices

    def _losses(
        self, outputs, targets, indices, num_masks, pixel_valid, terms
    ) -> Dict[str, Tensor]:
        losses = {}
        if "labels" in terms:
            losses.update(self.loss_labels(outputs, targets, indices))
        if "masks" in terms:
            losses.update(self.loss_masks(outputs, targets, indices, num_masks, pixel_valid))
        return losses

    def loss_labels(self, outputs, targets, indices) -> Dict[str, Tensor]:
        """Cross-entropy over all queries; unmatched queries target "no object"."""
        logits = outputs["pred_logits"].float()
        target_classes = torch.full(
            logits.shape[:2], self.num_classes, dtype=torch.int64, device=logits.device
        )
        batch_idx, query_idx = _matched_queries(indices, logits.device)
        matched_labels = [t["labels"][j] for t, (_, j) in zip(targets, indices)]
        target_classes[batch_idx, query_idx] = torch.cat(matched_labels).to(logits.device)
        loss = F.cross_entropy(logits.transpose(1, 2), target_classes, self.empty_weight)
        return {"loss_ce": loss}

    def loss_masks(self, outputs, targets, indices, num_masks, pixel_valid) -> Dict[str, Tensor]:
        """Point-sampled sigmoid BCE and dice between matched masks and their targets."""
        pred_masks = outputs["pred_masks"]
        batch_idx, query_idx = _matched_queries(indices, pred_masks.device)
        if batch_idx.numel() == 0:
            # Keep the graph connected so DDP sees every mask parameter used.
            zero = pred_masks.sum() * 0.0
            return {"loss_mask": zero, "loss_dice": zero}

        matched = pred_masks[batch_idx, query_idx][:, None].float()
        with torch.no_grad():
            coords = self._sample_points(matched, batch_idx, pixel_valid)
        point_logits = point_sample(matched, coords, align_corners=False)[:, 0]

        counts = [len(j) for _, j in indices]
        per_image_coords = coords.split(counts)
        point_labels = torch.cat(
            [
                _sample_masks(t["masks"][j.to(t["masks"].device)], c)
                for t, (_, j), c in zip(targets, indices, per_image_coords)
            ]
        )
        weights = None
        if pixel_valid is not None:
            weights = torch.cat(
                [_sample_validity(pixel_valid[b], c) for b, c in enumerate(per_image_coords)]
            )
        return {
            "loss_mask": sigmoid_bce_loss(point_logits, point_labels, num_masks, weights),
            "loss_dice": dice_loss(point_logits, point_labels, num_masks, weights),
        }

    def _sample_points(
        self, matched: Tensor, batch_idx: Tensor, pixel_valid: Optional[Tensor]
    ) -> Tensor:
        """(N, 1, H, W) matched mask logits -> (N, num_points, 2) coords in [0, 1]^2."""
        if pixel_valid is None:
            values, uncertainty = matched, _uncertainty
        else:
            # Invalidity rather than validity: sampling pads with zeros, which must not make
            # the border of a fully valid image look invalid.
            invalid = 1 - F.interpolate(
                pixel_valid[:, None].float(),
                size=matched.shape[-2:],
                mode="bilinear",
                align_corners=False,
            )
            values = torch.cat([matched, invalid[batch_idx]], 1)
            uncertainty = _uncertainty_on_valid
        return get_uncertain_point_coords_with_randomness(
            values,
            uncertainty,
            self.num_points,
            self.oversample_ratio,
            self.importance_sample_ratio,
        )

    def __repr__(self) -> str:
        matcher = repr(self.matcher).replace("\n", "\n    ")
        lines = [
            f"matcher: {matcher}",
            f"losses: {self.losses}",
            f"weight_dict: {self.weight_dict}",
            f"num_classes: {self.num_classes}",
            f"eos_coef: {self.eos_coef}",
            f"num_points: {self.num_points}",
            f"oversample_ratio: {self.oversample_ratio}",
            f"importance_sample_ratio: {self.importance_sample_ratio}",
        ]
        return "Criterion " + type(self).__name__ + "".join("\n    " + line for line in lines)


def _matched_queries(indices, device) -> Tuple[Tensor, Tensor]:
    """Flatten per-image matches into (image index, query index), each (N,)."""
    batch_idx = torch.cat([torch.full_like(i, b) for b, (i, _) in enumerate(indices)])
    query_idx = torch.cat([i for i, _ in indices])
    return batch_idx.to(device), query_idx.to(device)


def _sample_masks(masks: Tensor, coords: Tensor) -> Tensor:
    """(n, H, W) masks, each sampled at its own (n, P, 2) coords -> (n, P) float."""
    masks = masks.to(device=coords.device, dtype=coords.dtype)
    return point_sample(masks[:, None], coords, align_corners=False)[:, 0]


def _sample_validity(valid: Tensor, coords: Tensor) -> Tensor:
    """One (H, W) validity map sampled at (n, P, 2) coords -> (n, P) float. Outside the map
    the nearest border value holds, so a fully valid image weighs every point 1."""
    n, p, _ = coords.shape
    valid = valid.to(device=coords.device, dtype=coords.dtype)[None, None]
    coords = coords.reshape(1, n * p, 2)
    sampled = point_sample(valid, coords, align_corners=False, padding_mode="border")
    return sampled.reshape(n, p)
