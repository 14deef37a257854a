"""Backbones beyond detectron2's ResNet, through one adapter over timm feature extractors.

Importing this package registers ``build_timm_backbone`` in detectron2's BACKBONE_REGISTRY;
timm itself is imported only when a model is built.
"""
from .config import add_timm_backbone_config
from .timm_backbone import TimmBackbone, build_timm_backbone

__all__ = ["TimmBackbone", "add_timm_backbone_config", "build_timm_backbone"]
