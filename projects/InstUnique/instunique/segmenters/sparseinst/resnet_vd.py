"""ResNet-vd (the "D" variant of "Bag of Tricks", He et al. 2019) with optional deformable 3x3
convolutions: the backbone of SparseInst's R50-vd-DCN models.

Against detectron2's ResNet it differs in three places: a deep stem of three 3x3 convs
(32-32-64 channels), the stride in the 3x3 conv of a bottleneck, and an average-pooled projection
shortcut (pool, then a 1x1 conv at stride 1). Parameter names are timm's, as the official
SparseInst code builds them (``conv1.{0,1,3,4,6}``, ``bn1``, ``layerN.i.{conv,bn}k``,
``layerN.i.downsample.{1,2}``, ``conv2_offset``), so the official checkpoints load unchanged.

The deformable conv is ``torchvision.ops.DeformConv2d``, which runs forward and backward on the
CPU as well as on CUDA; detectron2's own ``DeformConv`` needs its compiled extension. Both read
the offset channels as (dy, dx) pairs per kernel tap, row-major over the 3x3 window, so the
official ``conv2_offset`` weights keep their meaning.
"""

from typing import Dict, Optional, Sequence

import fvcore.nn.weight_init as weight_init
import torch
import torch.nn.functional as F
from detectron2.config import configurable
from detectron2.layers import FrozenBatchNorm2d, ShapeSpec, get_norm
from detectron2.modeling import BACKBONE_REGISTRY, Backbone
from torch import nn
from torchvision.ops import DeformConv2d

__all__ = [
    "BasicBlockVd",
    "BottleneckVd",
    "ResNetVd",
    "build_resnet_vd_backbone",
]

# Blocks per stage and block type for each supported depth (He et al. 2016, Table 1).
_ARCH = {
    18: ("basic", (2, 2, 2, 2)),
    34: ("basic", (3, 4, 6, 3)),
    50: ("bottleneck", (3, 4, 6, 3)),
    101: ("bottleneck", (3, 4, 23, 3)),
    152: ("bottleneck", (3, 8, 36, 3)),
}
_STAGE_NAMES = ("res2", "res3", "res4", "res5")
_STAGE_STRIDES = (4, 8, 16, 32)
# Bottleneck widths of res2..res5; a stage outputs width * block expansion channels.
_STAGE_WIDTHS = (64, 128, 256, 512)
# The deep stem's two hidden widths; its output width is the first stage's input.
_STEM_WIDTHS = (32, 32)
_STEM_OUT = 64


def _norm(norm: str, channels: int) -> nn.Module:
    try:
        layer = get_norm(norm, channels)
    except KeyError:
        layer = None
    if layer is None:
        raise ValueError(
            f"norm (MODEL.RESNETS.NORM) = {norm!r} is not a normalization detectron2's get_norm "
            "knows; ResNet-vd needs one of 'FrozenBN', 'BN', 'SyncBN', 'GN'"
        )
    return layer


def _shortcut(in_channels: int, out_channels: int, stride: int, norm: str) -> nn.Sequential:
    """The vd projection shortcut: average pooling carries the stride, so the 1x1 conv sees
    every input pixel instead of one in four.

    The pool rounds up and ignores padding so that, at odd sizes, the shortcut has the
    ``ceil(H / 2)`` rows of the strided 3x3 conv on the main path. Index 0 stays a module (an
    identity at stride 1) to keep the official names ``downsample.1`` / ``downsample.2``.
    """
    if stride == 1:
        pool = nn.Identity()
    else:
        pool = nn.AvgPool2d(stride, stride, ceil_mode=True, count_include_pad=False)
    return nn.Sequential(
        pool,
        nn.Conv2d(in_channels, out_channels, kernel_size=1, bias=False),
        _norm(norm, out_channels),
    )


class BasicBlockVd(nn.Module):
    """Two 3x3 convs (ResNet-18/34); the first carries the stride.

    Maps (N, C_in, H, W) to (N, planes, ceil(H / stride), ceil(W / stride)).
    """

    expansion = 1

    def __init__(self, in_channels: int, planes: int, *, stride: int = 1, norm: str = "BN"):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = _norm(norm, planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=1, bias=False)
        self.bn2 = _norm(norm, planes)
        self.downsample = (
            _shortcut(in_channels, planes, stride, norm)
            if stride != 1 or in_channels != planes
            else None
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu_(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        shortcut = x if self.downsample is None else self.downsample(x)
        return F.relu_(out + shortcut)


class BottleneckVd(nn.Module):
    """1x1 reduce, 3x3 (strided, optionally deformable), 1x1 expand by 4.

    Maps (N, C_in, H, W) to (N, 4 * planes, ceil(H / stride), ceil(W / stride)).

    With ``deform``, ``conv2_offset`` predicts from the reduced features, at the 3x3 conv's
    stride, ``2 * 9 * deform_num_groups`` offset channels (plus ``9 * deform_num_groups`` mask
    logits when ``deform_modulated``, DCNv2, in detectron2's channel order: offsets first). It
    starts at zero, so an untrained block samples the regular grid and equals a plain conv.
    """

    expansion = 4

    def __init__(
        self,
        in_channels: int,
        planes: int,
        *,
        stride: int = 1,
        norm: str = "BN",
        deform: bool = False,
        deform_modulated: bool = False,
        deform_num_groups: int = 1,
    ):
        super().__init__()
        out_channels = planes * self.expansion
        self.deform = deform
        self.deform_modulated = deform_modulated
        self.conv1 = nn.Conv2d(in_channels, planes, 1, bias=False)
        self.bn1 = _norm(norm, planes)
        if deform:
            if planes % deform_num_groups:
                raise ValueError(
                    f"deform_num_groups (MODEL.RESNETS.DEFORM_NUM_GROUPS) = {deform_num_groups} "
                    f"must divide the deformable conv's {planes} channels"
                )
            taps = 9 * deform_num_groups
            self.conv2_offset = nn.Conv2d(
                planes, (3 if deform_modulated else 2) * taps, 3, stride=stride, padding=1
            )
            self.conv2 = DeformConv2d(planes, planes, 3, stride=stride, padding=1, bias=False)
        else:
            self.conv2 = nn.Conv2d(planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = _norm(norm, planes)
        self.conv3 = nn.Conv2d(planes, out_channels, 1, bias=False)
        self.bn3 = _norm(norm, out_channels)
        self.downsample = (
            _shortcut(in_channels, out_channels, stride, norm)
            if stride != 1 or in_channels != out_channels
            else None
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu_(self.bn1(self.conv1(x)))
        if self.deform:
            offset = self.conv2_offset(out)
            mask = None
            if self.deform_modulated:
                taps = offset.shape[1] // 3
                offset, mask = offset[:, : 2 * taps], offset[:, 2 * taps :].sigmoid()
            out = self.conv2(out, offset, mask)
        else:
            out = self.conv2(out)
        out = F.relu_(self.bn2(out))
        out = self.bn3(self.conv3(out))
        shortcut = x if self.downsample is None else self.downsample(x)
        return F.relu_(out + shortcut)


class ResNetVd(Backbone):
    """ResNet-vd returning ``{"res2".."res5": (N, C_k, H_k, W_k)}`` for the requested names,
    where each level halves the previous one rounding up (H_2 = ceil(ceil(H / 2) / 2)).

    Only the stages up to the deepest requested output are built, as in detectron2's ResNet.
    """

    @configurable
    def __init__(
        self,
        *,
        depth: int = 50,
        in_channels: int = 3,
        norm: str = "FrozenBN",
        out_features: Sequence[str] = _STAGE_NAMES,
        deform_on_per_stage: Sequence[bool] = (False, False, False, False),
        deform_modulated: bool = False,
        deform_num_groups: int = 1,
        freeze_at: int = 0,
    ):
        """
        Args:
            depth: 18, 34 (basic blocks), 50, 101 or 152 (bottlenecks).
            in_channels: image channels.
            norm: a detectron2 ``get_norm`` name for every normalization layer.
            out_features: subset of res2..res5 to return.
            deform_on_per_stage: for res2..res5, whether the bottlenecks' 3x3 conv is
                deformable (every block of the stage, as in the official model).
            deform_modulated: DCNv2 (a sigmoid mask per tap) instead of DCNv1.
            deform_num_groups: offset groups; each has its own offsets for a slice of channels.
            freeze_at: 0 trains everything; k >= 1 freezes the stem and the first k - 1
                stages (no gradients, batch norms turned into FrozenBatchNorm2d).
        """
        super().__init__()
        if depth not in _ARCH:
            raise ValueError(
                f"depth (MODEL.RESNETS.DEPTH) = {depth} is not supported; known: {sorted(_ARCH)}"
            )
        unknown = [f for f in out_features if f not in _STAGE_NAMES]
        if unknown or not out_features:
            raise ValueError(
                f"out_features (MODEL.RESNETS.OUT_FEATURES) = {list(out_features)}: each must be "
                f"one of {list(_STAGE_NAMES)}, and at least one is needed"
            )
        if len(deform_on_per_stage) != 4:
            raise ValueError(
                "deform_on_per_stage (MODEL.RESNETS.DEFORM_ON_PER_STAGE) needs 4 entries "
                f"(res2..res5), got {list(deform_on_per_stage)}"
            )
        block_type, blocks_per_stage = _ARCH[depth]
        if block_type == "basic" and any(deform_on_per_stage):
            raise ValueError(
                f"deformable convs (MODEL.RESNETS.DEFORM_ON_PER_STAGE) need bottleneck blocks; "
                f"ResNet-vd-{depth} has basic blocks"
            )
        if deform_num_groups < 1:
            raise ValueError(
                f"deform_num_groups (MODEL.RESNETS.DEFORM_NUM_GROUPS) = {deform_num_groups} "
                "must be >= 1"
            )
        if not 0 <= freeze_at <= 5:
            raise ValueError(
                f"freeze_at (MODEL.BACKBONE.FREEZE_AT) = {freeze_at} must lie in 0..5 "
                "(0: nothing, 1: stem, k: stem and the first k - 1 stages)"
            )

        self.conv1 = nn.Sequential(
            nn.Conv2d(in_channels, _STEM_WIDTHS[0], 3, stride=2, padding=1, bias=False),
            _norm(norm, _STEM_WIDTHS[0]),
            nn.ReLU(inplace=True),
            nn.Conv2d(_STEM_WIDTHS[0], _STEM_WIDTHS[1], 3, padding=1, bias=False),
            _norm(norm, _STEM_WIDTHS[1]),
            nn.ReLU(inplace=True),
            nn.Conv2d(_STEM_WIDTHS[1], _STEM_OUT, 3, padding=1, bias=False),
        )
        self.bn1 = _norm(norm, _STEM_OUT)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)

        num_stages = max(_STAGE_NAMES.index(f) for f in out_features) + 1
        channels = _STEM_OUT
        self._out_feature_channels: Dict[str, int] = {}
        self._out_feature_strides: Dict[str, int] = {}
        self._stage_names = []
        for idx in range(num_stages):
            layers = []
            for i in range(blocks_per_stage[idx]):
                # res2 follows the max pool at stride 4 already; later stages halve once.
                stride = 2 if idx > 0 and i == 0 else 1
                if block_type == "basic":
                    block = BasicBlockVd(channels, _STAGE_WIDTHS[idx], stride=stride, norm=norm)
                else:
                    block = BottleneckVd(
                        channels,
                        _STAGE_WIDTHS[idx],
                        stride=stride,
                        norm=norm,
                        deform=bool(deform_on_per_stage[idx]),
                        deform_modulated=deform_modulated,
                        deform_num_groups=deform_num_groups,
                    )
                layers.append(block)
                channels = _STAGE_WIDTHS[idx] * block.expansion
            self.add_module(f"layer{idx + 1}", nn.Sequential(*layers))
            self._stage_names.append(f"layer{idx + 1}")
            self._out_feature_channels[_STAGE_NAMES[idx]] = channels
            self._out_feature_strides[_STAGE_NAMES[idx]] = _STAGE_STRIDES[idx]
        self._out_features = [f for f in _STAGE_NAMES if f in out_features]

        self._init_weights()
        self.freeze(freeze_at)

    @classmethod
    def from_config(cls, cfg, input_shape: ShapeSpec):
        res = cfg.MODEL.RESNETS
        depth = res.DEPTH
        # Keys detectron2's ResNet reads whose other values would ask for a different
        # network than ResNet-vd; refuse them rather than ignore them.
        expansion = 1 if depth in (18, 34) else 4
        fixed = {
            "MODEL.RESNETS.NUM_GROUPS": (res.NUM_GROUPS, 1),
            "MODEL.RESNETS.WIDTH_PER_GROUP": (res.WIDTH_PER_GROUP, 64),
            "MODEL.RESNETS.RES5_DILATION": (res.RES5_DILATION, 1),
            "MODEL.RESNETS.STEM_OUT_CHANNELS": (res.STEM_OUT_CHANNELS, _STEM_OUT),
            "MODEL.RESNETS.RES2_OUT_CHANNELS": (res.RES2_OUT_CHANNELS, 64 * expansion),
        }
        if expansion == 4:
            fixed["MODEL.RESNETS.STRIDE_IN_1X1"] = (res.STRIDE_IN_1X1, False)
        for key, (value, needed) in fixed.items():
            if value != needed:
                raise ValueError(
                    f"{key} = {value!r}: build_resnet_vd_backbone (ResNet-vd-{depth}) only "
                    f"builds {needed!r}"
                )
        return {
            "depth": depth,
            "in_channels": input_shape.channels,
            "norm": res.NORM,
            "out_features": list(res.OUT_FEATURES),
            "deform_on_per_stage": list(res.DEFORM_ON_PER_STAGE),
            "deform_modulated": res.DEFORM_MODULATED,
            "deform_num_groups": res.DEFORM_NUM_GROUPS,
            "freeze_at": cfg.MODEL.BACKBONE.FREEZE_AT,
        }

    def _init_weights(self) -> None:
        # detectron2's ResNet initialisation (MSRA fill for the convs, norms at identity): the
        # model is meant to start from ImageNet weights, which replace all of it. The offset
        # convs start at zero so that an untrained deformable conv is a plain conv.
        for module in self.modules():
            if isinstance(module, (nn.Conv2d, DeformConv2d)):
                weight_init.c2_msra_fill(module)
        for module in self.modules():
            if isinstance(module, BottleneckVd) and module.deform:
                nn.init.zeros_(module.conv2_offset.weight)
                nn.init.zeros_(module.conv2_offset.bias)

    def freeze(self, freeze_at: int = 0) -> "ResNetVd":
        """Stop training the stem (``freeze_at >= 1``) and the first ``freeze_at - 1`` stages.

        Their parameters get no gradient and their batch norms become FrozenBatchNorm2d, so
        their running statistics stay fixed in training mode too.
        """
        groups = [("conv1", "bn1")] + [(name,) for name in self._stage_names]
        for names in groups[:freeze_at]:
            for name in names:
                module = FrozenBatchNorm2d.convert_frozen_batchnorm(getattr(self, name))
                for p in module.parameters():
                    p.requires_grad_(False)
                setattr(self, name, module)
        return self

    def forward(self, x: torch.Tensor) -> Dict[str, torch.Tensor]:
        """(N, C, H, W) images -> {name: (N, C_k, H_k, W_k)} for the names in out_features."""
        if x.dim() != 4:
            raise ValueError(f"ResNetVd takes images of shape (N, C, H, W), got {tuple(x.shape)}")
        x = self.maxpool(F.relu_(self.bn1(self.conv1(x))))
        outputs = {}
        for name, stage_name in zip(_STAGE_NAMES, self._stage_names):
            x = getattr(self, stage_name)(x)
            if name in self._out_features:
                outputs[name] = x
        return outputs

    def output_shape(self) -> Dict[str, ShapeSpec]:
        return {
            name: ShapeSpec(
                channels=self._out_feature_channels[name], stride=self._out_feature_strides[name]
            )
            for name in self._out_features
        }


@BACKBONE_REGISTRY.register()
def build_resnet_vd_backbone(cfg, input_shape: Optional[ShapeSpec] = None) -> ResNetVd:
    """The official SparseInst name for this backbone (``MODEL.BACKBONE.NAME``). Reads
    MODEL.RESNETS.{DEPTH, NORM, OUT_FEATURES, DEFORM_ON_PER_STAGE, DEFORM_MODULATED,
    DEFORM_NUM_GROUPS} and MODEL.BACKBONE.FREEZE_AT."""
    if input_shape is None:
        input_shape = ShapeSpec(channels=len(cfg.MODEL.PIXEL_MEAN))
    return ResNetVd(cfg, input_shape)
