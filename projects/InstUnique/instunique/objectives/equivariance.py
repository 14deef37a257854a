"""Transformation equivariance, paper Eq. 8 and Algorithm 1.

For a pair (x, x' = T(x)), the query embeddings e' of x' read the *warped* pixel
embeddings of x: m~_q = e'_q . T(F_x). The base criterion (matching included) supervises
m~, with the class logits of x', against the transformed ground truth Y'. Gradients reach
both e' and F_x. Feature cells that T maps from outside x carry no loss.
"""
from typing import Dict, List, Tuple

from torch import nn

from ..adapter import SegmenterAdapter, SegmenterOutputs
from ..transforms import AffineWarp, warp_feature_batch


class EquivarianceLoss(nn.Module):
    def __init__(self, *, weight: float, stride: int):
        super().__init__()
        self.weight = weight  # lambda of Alg. 1
        self.stride = stride

    def forward(
        self, adapter: SegmenterAdapter, outputs: SegmenterOutputs, targets: List[Dict],
        warps: List[AffineWarp], image_sizes: List[Tuple[int, int]],
    ) -> Dict:
        """
        Args:
            outputs: one forward over 2P images: the P views x, then their P views x'.
            targets: the 2P images' targets, same order.
            warps: P transforms, warps[i] maps view i onto view P + i.
            image_sizes: the 2P unpadded image sizes (h, w).
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
        losses, _ = adapter.base_losses(raw, targets[p:], pixel_valid=valid.float())
        return {k.replace("loss_", "loss_equi_", 1): v * self.weight for k, v in losses.items()}
