from .cross_image import CrossImageLoss, external_focal_loss
from .equivariance import EquivarianceLoss
from .memory import PixelMemory
from .sampling import sample_pixels, semantic_label_maps

__all__ = [
    "CrossImageLoss",
    "EquivarianceLoss",
    "PixelMemory",
    "external_focal_loss",
    "sample_pixels",
    "semantic_label_maps",
]
