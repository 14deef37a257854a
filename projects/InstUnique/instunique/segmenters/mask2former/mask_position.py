"""Position features added to Mask2Former's mask features F (ours, off in official configs).

A mask logit is a dot product e_q . F(p). When two touching instances look alike, their
pixels have nearly equal F, so no query embedding can fire on one and not the other: the
query's mask spreads over look-alikes (measured on ``blobs``: docs/results/competent_base.md).
SOLO, CondInst and SparseInst give their mask features coordinates for this reason.
Here F' = F + W . PE(p): PE is the sine embedding of the absolute feature-cell position
(as the pixel decoder's, not normalised, so padding does not move it) and W a 1x1 conv,
zero at build, so a new model starts as the official one. A query can then add a
positional template W^T e_q . PE(p) to its mask logits.
"""
import torch
from torch import nn

from .position_encoding import PositionEmbeddingSine


class MaskFeaturePosition(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        if dim % 2:
            raise ValueError(f"MODEL.SEM_SEG_HEAD.MASK_DIM must be even for position "
                             f"features (MODEL.MASK_FORMER.MASK_POSITION_FEATURES), got {dim}")
        self.embedding = PositionEmbeddingSine(dim // 2, normalize=False)
        self.proj = nn.Conv2d(dim, dim, 1)
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) mask features -> (B, C, H, W) with the projected positions added."""
        pos = self.embedding(features).to(features.dtype)
        return features + self.proj(pos)
