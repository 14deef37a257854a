"""Geometric transforms of the equivariance pair (x, x' = T(x)), paper Eq. 8 and Table S3."""

from .affine import AffineWarp, warp_feature_batch
from .family import TransformFamily

__all__ = ["AffineWarp", "TransformFamily", "warp_feature_batch"]
