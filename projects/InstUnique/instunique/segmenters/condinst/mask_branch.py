"""CondInst's mask branch (the shared mask features) and the aligned bilinear upsampling
that CondInst uses wherever a map goes to a finer stride."""
from typing import Dict, Sequence

import torch
import torch.nn.functional as F
from detectron2.layers import ShapeSpec, get_norm
from torch import nn


def aligned_bilinear(x: torch.Tensor, factor: int) -> torch.Tensor:
    """Upsample (N, C, h, w) by an integer ``factor`` to (N, C, factor*h, factor*w) so that
    output pixel j sits at input coordinate (j - factor // 2) / factor (clamped to the
    map), i.e. pixel centres of the two strides stay aligned given locations at
    stride * index + stride // 2. Plain ``interpolate`` (align_corners=False) would shift
    the map by a fraction of a pixel.

    Done as: replicate one row/column at the bottom/right, bilinear with align_corners
    (sample k lands exactly on input k / factor), then shift by factor // 2 with
    replicated top/left rows and crop. ``factor`` 1 returns ``x`` itself.
    """
    if x.dim() != 4:
        raise ValueError(f"aligned_bilinear takes (N, C, h, w), got {tuple(x.shape)}")
    if int(factor) != factor or factor < 1:
        raise ValueError(f"aligned_bilinear needs an integer factor >= 1, got {factor}")
    factor = int(factor)
    if factor == 1:
        return x
    h, w = x.shape[-2:]
    x = F.pad(x, (0, 1, 0, 1), mode="replicate")
    x = F.interpolate(x, size=(factor * h + 1, factor * w + 1), mode="bilinear",
                      align_corners=True)
    shift = factor // 2
    x = F.pad(x, (shift, 0, shift, 0), mode="replicate")
    return x[:, :, : factor * h, : factor * w]


def _conv_norm_relu(c_in: int, c_out: int, norm: str) -> nn.Sequential:
    """3x3 conv (no bias when a norm follows) + norm + ReLU; children 0 (conv), 1 (norm)
    and 2 (ReLU) as AdelaiDet's blocks, whose checkpoints then load. Kaiming-uniform
    (a=1) weights: AdelaiDet's init of these convs."""
    conv = nn.Conv2d(c_in, c_out, 3, padding=1, bias=not norm)
    nn.init.kaiming_uniform_(conv.weight, a=1)
    if conv.bias is not None:
        nn.init.zeros_(conv.bias)
    layers = [conv]
    if norm:
        layers.append(get_norm(norm, c_out))
    layers.append(nn.ReLU())
    return nn.Sequential(*layers)


class MaskBranch(nn.Module):
    """FPN levels -> mask features (N, out_channels, H / s, W / s), s the stride of
    ``in_features[0]`` (``out_stride``).

    Each level gets a ``refine`` conv block to ``channels``; the coarser ones are upsampled
    to the first with ``aligned_bilinear`` and summed; then ``tower``: ``num_convs`` conv
    blocks and a 1x1 conv to ``out_channels`` (with bias). Names ``refine.N.M`` /
    ``tower.N.M`` / ``tower.<num_convs>`` are AdelaiDet's.
    """

    def __init__(self, input_shape: Dict[str, ShapeSpec], in_features: Sequence[str],
                 channels: int, out_channels: int, num_convs: int, norm: str):
        super().__init__()
        missing = [f for f in in_features if f not in input_shape]
        if not in_features or missing:
            raise ValueError(
                f"MODEL.CONDINST.MASK_BRANCH.IN_FEATURES = {list(in_features)}: not among the "
                f"backbone outputs {sorted(input_shape)}"
            )
        strides = [input_shape[f].stride for f in in_features]
        if strides != sorted(strides) or any(s % strides[0] for s in strides):
            raise ValueError(
                f"MODEL.CONDINST.MASK_BRANCH.IN_FEATURES = {list(in_features)} must go from "
                f"fine to coarse with strides multiple of the first, got strides {strides}"
            )
        if out_channels < 1:
            raise ValueError(
                f"MODEL.CONDINST.MASK_BRANCH.OUT_CHANNELS = {out_channels} must be >= 1"
            )
        self.in_features = list(in_features)
        self.out_stride = strides[0]
        self.out_channels = out_channels
        self.refine = nn.ModuleList(
            [_conv_norm_relu(input_shape[f].channels, channels, norm) for f in in_features]
        )
        tower = [_conv_norm_relu(channels, channels, norm) for _ in range(num_convs)]
        tower.append(nn.Conv2d(channels, out_channels, 1))
        self.tower = nn.Sequential(*tower)

    def forward(self, features: Dict[str, torch.Tensor]) -> torch.Tensor:
        x = self.refine[0](features[self.in_features[0]])
        for name, refine in zip(self.in_features[1:], self.refine[1:]):
            y = refine(features[name])
            factor = x.shape[-2] // y.shape[-2]
            if (y.shape[-2] * factor, y.shape[-1] * factor) != tuple(x.shape[-2:]):
                raise ValueError(
                    f"mask branch: {name} of size {tuple(y.shape[-2:])} does not upsample to "
                    f"{self.in_features[0]} of size {tuple(x.shape[-2:])}; pad the input to a "
                    f"multiple of the coarsest MASK_BRANCH.IN_FEATURES stride"
                )
            x = x + aligned_bilinear(y, factor)
        return self.tower(x)
