from .cross_image import CrossImageLoss, external_focal_loss
from .cross_scene import CrossSceneLoss
from .equivariance import EquivarianceLoss
from .memory import PixelMemory
from .sampling import sample_pixels, semantic_label_maps

__all__ = [
    "CrossImageLoss",
    "CrossSceneLoss",
    "EquivarianceLoss",
    "PixelMemory",
    "external_focal_loss",
    "sample_pixels",
    "semantic_label_maps",
]
