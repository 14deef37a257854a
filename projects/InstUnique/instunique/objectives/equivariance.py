"""Transformation equivariance, paper Eq. 8 and Algorithm 1.

For a pair (x, x' = T(x)), the query embeddings e' of x' read the *warped* pixel
embeddings of x: m~_q = e'_q . T(F_x). The base criterion (matching included) supervises
m~, with the class logits of x', against the transformed ground truth Y'. Gradients reach
both e' and F_x. Feature cells that T maps from outside x carry no loss.

Which query answers for which target: the criterion's own matching on m~ ("recompute",
Alg. 1 read literally), or the matching x' already got in L_base ("view"): then a query
must find its instance in T(F_x) exactly where it found it in F_x', and the class terms
of the two losses never disagree about which query is an object.

Whether the criterion's class term joins: Eq. 8 applies the base loss, which also scores
the class logits of x' (yes); Alg. 1 hands the criterion only mask predictions and masks (no).
"""
from typing import Dict, List, Optional, Tuple

from torch import nn

from ..adapter import Matching, SegmenterAdapter, SegmenterOutputs
from ..transforms import AffineWarp, warp_feature_batch


class EquivarianceLoss(nn.Module):
    MATCHINGS = ("recompute", "view")

    def __init__(self, *, weight: float, stride: int, matching: str = "recompute",
                 class_term: bool = True):
        super().__init__()
        if matching not in self.MATCHINGS:
            raise ValueError(f"equivariance matching (MODEL.INST_UNIQUE.EQUIVARIANCE.MATCHING) "
                             f"must be one of {self.MATCHINGS}, got {matching!r}")
        self.weight = weight  # lambda of Alg. 1
        self.stride = stride
        self.matching = matching
        self.class_term = class_term

    def forward(
        self, adapter: SegmenterAdapter, outputs: SegmenterOutputs, targets: List[Dict],
        warps: List[AffineWarp], image_sizes: List[Tuple[int, int]],
        view_matching: Optional[Matching] = None,
    ) -> Dict:
        """
        Args:
            outputs: one forward over 2P images: the P views x, then their P views x'.
            targets: the 2P images' targets, same order.
            warps: P transforms, warps[i] maps view i onto view P + i.
            image_sizes: the 2P unpadded image sizes (h, w).
            view_matching: the P views x' final-layer matching from L_base (needed when
                ``matching == "view"``).
        Returns:
            the base criterion's final-layer terms on m~, weighted, renamed ``loss_equi_*``.
        """
        p = len(warps)
        f = outputs.pixel_embeds
        warped, valid = warp_feature_batch(
            f[:p], warps, self.stride, image_sizes[:p], tuple(f.shape[-2:])
        )
        raw = adapter.final_layer_outputs(
            outputs.class_logits[p:], outputs.query_embeds[p:], warped
        )
        if self.matching == "view" and view_matching is None:
            raise ValueError('equivariance matching "view" needs the views\' base matching')
        given = view_matching if self.matching == "view" else None
        losses, _ = adapter.base_losses(
            raw, targets[p:], valid.float(), given, mask_only=not self.class_term
        )
        return {k.replace("loss_", "loss_equi_", 1): v * self.weight for k, v in losses.items()}
