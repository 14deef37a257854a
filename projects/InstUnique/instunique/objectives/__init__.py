from .cross_image import CrossImageLoss
from .cross_scene import CrossSceneLoss
from .equivariance import EquivarianceLoss
from .external_kernel import external_focal_loss
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
