"""FPN backbones with P6/P7 computed from P5, as FCOS and CondInst use.

``build_fcos_resnet_fpn_backbone`` is detectron2's ResNet under detectron2's FPN; the only
difference from detectron2's ``build_retinanet_resnet_fpn_backbone`` is that P6 is a
stride-2 conv of P5 (256 channels), not of res5 (2048), so AdelaiDet's checkpoints load
(``backbone.top_block.p6.weight`` is (256, 256, 3, 3) there).
"""
from typing import Optional

from detectron2.layers import ShapeSpec
from detectron2.modeling import BACKBONE_REGISTRY
from detectron2.modeling.backbone.fpn import FPN, LastLevelP6P7
from detectron2.modeling.backbone.resnet import build_resnet_backbone
from fvcore.nn import weight_init
from torch import nn

from ...backbones.efficientnet_lite import build_efficientnet_lite0_trunk

__all__ = ["build_fcos_efficientnet_lite0_fpn_backbone", "build_fcos_resnet_fpn_backbone"]


class LastLevelP6(nn.Module):
    """One extra level: P6 = conv3x3 stride 2 of ``in_feature`` (TOP_LEVELS 1)."""

    def __init__(self, in_channels: int, out_channels: int, in_feature: str = "p5"):
        super().__init__()
        self.num_levels = 1
        self.in_feature = in_feature
        self.p6 = nn.Conv2d(in_channels, out_channels, 3, 2, 1)
        weight_init.c2_xavier_fill(self.p6)

    def forward(self, x):
        return [self.p6(x)]


def _top_block(cfg) -> Optional[nn.Module]:
    """P6/P7 from P5 (MODEL.FCOS.TOP_LEVELS 2), P6 only (1) or none (0)."""
    levels = cfg.MODEL.FCOS.TOP_LEVELS
    channels = cfg.MODEL.FPN.OUT_CHANNELS
    if levels == 2:
        return LastLevelP6P7(channels, channels, "p5")
    if levels == 1:
        return LastLevelP6(channels, channels, "p5")
    if levels == 0:
        return None
    raise ValueError(f"MODEL.FCOS.TOP_LEVELS = {levels} must be 0, 1 or 2")


def _fpn(cfg, bottom_up) -> FPN:
    return FPN(
        bottom_up=bottom_up,
        in_features=cfg.MODEL.FPN.IN_FEATURES,
        out_channels=cfg.MODEL.FPN.OUT_CHANNELS,
        norm=cfg.MODEL.FPN.NORM,
        top_block=_top_block(cfg),
        fuse_type=cfg.MODEL.FPN.FUSE_TYPE,
    )


@BACKBONE_REGISTRY.register()
def build_fcos_resnet_fpn_backbone(cfg, input_shape: Optional[ShapeSpec] = None):
    """MODEL.BACKBONE.NAME "build_fcos_resnet_fpn_backbone": detectron2's ResNet
    (MODEL.RESNETS.*) under detectron2's FPN on MODEL.FPN.IN_FEATURES (res3..res5 give
    p3..p5), plus MODEL.FCOS.TOP_LEVELS levels from P5. State-dict keys are
    ``fpn_lateral*/fpn_output*``, ``top_block.p6/p7`` and ``bottom_up.*`` in that order."""
    if input_shape is None:
        input_shape = ShapeSpec(channels=len(cfg.MODEL.PIXEL_MEAN))
    return _fpn(cfg, build_resnet_backbone(cfg, input_shape))


@BACKBONE_REGISTRY.register()
def build_fcos_efficientnet_lite0_fpn_backbone(cfg, input_shape: Optional[ShapeSpec] = None):
    """MODEL.BACKBONE.NAME "build_fcos_efficientnet_lite0_fpn_backbone": our EfficientNet-
    Lite0 trunk (MODEL.EFFICIENTNET.*, its ImageNet weights loaded and frozen as
    build_efficientnet_lite0_fpn_backbone does) with outputs MODEL.FPN.IN_FEATURES, under
    detectron2's FPN with MODEL.FCOS.TOP_LEVELS levels from P5."""
    return _fpn(cfg, build_efficientnet_lite0_trunk(cfg, cfg.MODEL.FPN.IN_FEATURES, input_shape))
