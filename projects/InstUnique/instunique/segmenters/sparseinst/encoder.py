"""SparseInst's instance context encoder: backbone features -> one stride-8 feature map.

Parameter names (``fpn_laterals``, ``fpn_outputs``, ``ppm``, ``fusion``) are the official
ones, so the official checkpoints load unchanged.
"""
from typing import Dict, Sequence

import torch
import torch.nn.functional as F
from detectron2.config import configurable
from detectron2.layers import Conv2d, ShapeSpec
from detectron2.utils.registry import Registry
from fvcore.nn.weight_init import c2_msra_fill, c2_xavier_fill
from torch import nn

from ..registry import lookup

SPARSE_INST_ENCODER_REGISTRY = Registry("SPARSE_INST_ENCODER")
SPARSE_INST_ENCODER_REGISTRY.__doc__ = """
Encoders of SparseInst, called as ``Encoder(cfg, input_shape)`` with the backbone's
output shapes; their forward maps the backbone's feature dict to one (B, C, H/8, W/8) map.
"""


class PyramidPoolingModule(nn.Module):
    """PSPNet's pyramid pooling: global context at several grid sizes, concatenated with
    the input and fused by a 1x1 conv. (B, C, H, W) -> (B, C, H, W)."""

    def __init__(self, in_channels: int, channels: int, sizes: Sequence[int] = (1, 2, 3, 6)):
        super().__init__()
        self.stages = nn.ModuleList(
            nn.Sequential(nn.AdaptiveAvgPool2d((s, s)), Conv2d(in_channels, channels, 1))
            for s in sizes
        )
        self.bottleneck = Conv2d(in_channels + len(sizes) * channels, in_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        size = x.shape[-2:]
        pooled = [
            F.interpolate(F.relu(stage(x)), size=size, mode="bilinear", align_corners=False)
            for stage in self.stages
        ]
        return F.relu(self.bottleneck(torch.cat(pooled + [x], dim=1)))


@SPARSE_INST_ENCODER_REGISTRY.register()
class InstanceContextEncoder(nn.Module):
    """Top-down FPN over ``in_features`` (a PPM enlarges the coarsest level's receptive
    field), then every level is resized to the finest and the concatenation fused by a
    1x1 conv (SparseInst paper Sec. 3.2)."""

    @configurable
    def __init__(self, *, input_shape: Dict[str, ShapeSpec], in_features: Sequence[str],
                 num_channels: int):
        """
        Args:
            input_shape: the backbone's output shapes.
            in_features: backbone features to fuse, finest first (res3, res4, res5).
            num_channels: width of every level and of the output.
        """
        super().__init__()
        missing = [f for f in in_features if f not in input_shape]
        if missing:
            raise ValueError(
                f"MODEL.SPARSE_INST.ENCODER.IN_FEATURES: {missing} are not backbone outputs "
                f"(MODEL.RESNETS.OUT_FEATURES or the backbone's own); it gives "
                f"{sorted(input_shape)}"
            )
        self.in_features = list(in_features)
        # Coarsest first: the top-down path starts at the top of the pyramid.
        in_channels = [input_shape[f].channels for f in reversed(self.in_features)]
        self.fpn_laterals = nn.ModuleList(Conv2d(c, num_channels, 1) for c in in_channels)
        self.fpn_outputs = nn.ModuleList(
            Conv2d(num_channels, num_channels, 3, padding=1) for _ in in_channels
        )
        for conv in [*self.fpn_laterals, *self.fpn_outputs]:
            c2_xavier_fill(conv)
        self.ppm = PyramidPoolingModule(num_channels, num_channels // 4)
        self.fusion = nn.Conv2d(num_channels * len(in_channels), num_channels, 1)
        c2_msra_fill(self.fusion)
        self.out_channels = num_channels

    @classmethod
    def from_config(cls, cfg, input_shape):
        enc = cfg.MODEL.SPARSE_INST.ENCODER
        if enc.NORM:
            raise ValueError(
                f"MODEL.SPARSE_INST.ENCODER.NORM={enc.NORM!r}: the encoder has no norm layers "
                f"(as the official one, which ignores the key); use ''"
            )
        return {"input_shape": input_shape, "in_features": enc.IN_FEATURES,
                "num_channels": enc.NUM_CHANNELS}

    def forward(self, features: Dict[str, torch.Tensor]) -> torch.Tensor:
        """features: backbone outputs, ``in_features`` at strides 8, 16, 32 of an input
        padded to a multiple of 32. Returns (B, num_channels, H/8, W/8)."""
        levels = [features[f] for f in reversed(self.in_features)]
        top = self.ppm(self.fpn_laterals[0](levels[0]))
        outputs = [self.fpn_outputs[0](top)]
        for x, lateral, output in zip(levels[1:], self.fpn_laterals[1:], self.fpn_outputs[1:]):
            lat = lateral(x)
            top = lat + F.interpolate(top, size=lat.shape[-2:], mode="nearest")
            outputs.insert(0, output(top))
        size = outputs[0].shape[-2:]
        fused = [outputs[0]] + [
            F.interpolate(o, size=size, mode="bilinear", align_corners=False)
            for o in outputs[1:]
        ]
        return self.fusion(torch.cat(fused, dim=1))


def build_sparseinst_encoder(cfg, input_shape: Dict[str, ShapeSpec]) -> nn.Module:
    """The encoder named by MODEL.SPARSE_INST.ENCODER.NAME."""
    name = cfg.MODEL.SPARSE_INST.ENCODER.NAME
    encoder = lookup(SPARSE_INST_ENCODER_REGISTRY, name, "MODEL.SPARSE_INST.ENCODER.NAME")
    return encoder(cfg, input_shape)
