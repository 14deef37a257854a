"""SparseInst's IAM decoder: instance activation maps -> per-instance class, objectness and
mask kernel; mask features from a parallel branch; masks = kernels . features.

Parameter names (``inst_branch.*``, ``mask_branch.*``) are the official ones.
"""
import math
from typing import Dict

import torch
import torch.nn.functional as F
from detectron2.config import configurable
from detectron2.layers import Conv2d
from detectron2.utils.registry import Registry
from fvcore.nn.weight_init import c2_msra_fill, c2_xavier_fill
from torch import nn

from ..registry import lookup

SPARSE_INST_DECODER_REGISTRY = Registry("SPARSE_INST_DECODER")
SPARSE_INST_DECODER_REGISTRY.__doc__ = """
Decoders of SparseInst, called as ``Decoder(cfg)``; their forward maps the encoder's
(B, C, H/8, W/8) features to the raw prediction dict of ``GroupIAMDecoder.forward``.
"""

# Initial foreground probability of the activation maps and class scores (focal-loss prior).
_PRIOR_PROB = 0.01


def kernel_masks(kernels: torch.Tensor, mask_features: torch.Tensor,
                 scale_factor: float) -> torch.Tensor:
    """Mask logits of instance kernels (B, N, D) on mask features (B, D, h, w), bilinearly
    upsampled by ``scale_factor``: (B, N, h * s, w * s)."""
    masks = torch.einsum("bnd,bdhw->bnhw", kernels, mask_features)
    return F.interpolate(masks, scale_factor=scale_factor, mode="bilinear", align_corners=False)


def _conv_stack(num_convs: int, in_channels: int, channels: int) -> nn.Sequential:
    """``num_convs`` x (3x3 conv, ReLU); index 2i holds conv i (the official names)."""
    layers = []
    for i in range(num_convs):
        layers += [Conv2d(in_channels if i == 0 else channels, channels, 3, padding=1),
                   nn.ReLU(inplace=True)]
    return nn.Sequential(*layers)


def coordinate_features(x: torch.Tensor) -> torch.Tensor:
    """(B, 2, H, W) normalised (x, y) cell coordinates in [-1, 1], first and last cell at
    the ends (the official layout; the decoder's input channels 0 and 1)."""
    b, _, h, w = x.shape
    ys = torch.linspace(-1.0, 1.0, h, device=x.device, dtype=x.dtype)
    xs = torch.linspace(-1.0, 1.0, w, device=x.device, dtype=x.dtype)
    grid_y, grid_x = torch.meshgrid(ys, xs, indexing="ij")
    return torch.stack([grid_x, grid_y])[None].expand(b, -1, -1, -1)


class GroupInstanceBranch(nn.Module):
    """Group instance activation maps (SparseInst paper Sec. 3.3): each of the N instances
    has G activation maps; each map pools the branch features, the G pooled vectors are
    concatenated and fused by a linear layer into the instance feature."""

    def __init__(self, in_channels: int, dim: int, num_convs: int, num_masks: int,
                 num_groups: int, num_classes: int, kernel_dim: int):
        super().__init__()
        self.num_groups = num_groups
        self.inst_convs = _conv_stack(num_convs, in_channels, dim)
        self.iam_conv = nn.Conv2d(dim, num_masks * num_groups, 3, padding=1, groups=num_groups)
        self.fc = nn.Linear(dim * num_groups, dim * num_groups)
        self.cls_score = nn.Linear(dim * num_groups, num_classes)
        self.mask_kernel = nn.Linear(dim * num_groups, kernel_dim)
        self.objectness = nn.Linear(dim * num_groups, 1)
        self._init_weights()

    def _init_weights(self):
        for m in self.inst_convs.modules():
            if isinstance(m, nn.Conv2d):
                c2_msra_fill(m)
        prior_bias = -math.log((1 - _PRIOR_PROB) / _PRIOR_PROB)
        for m in (self.iam_conv, self.cls_score):
            nn.init.normal_(m.weight, std=0.01)
            nn.init.constant_(m.bias, prior_bias)
        nn.init.normal_(self.mask_kernel.weight, std=0.01)
        nn.init.constant_(self.mask_kernel.bias, 0.0)
        c2_xavier_fill(self.fc)

    def forward(self, x: torch.Tensor):
        """x: (B, C_in, H, W). Returns class logits (B, N, K), kernels (B, N, D), objectness
        logits (B, N, 1) and the activation map logits (B, G * N, H, W)."""
        feats = self.inst_convs(x)
        iam = self.iam_conv(feats)
        b, gn = iam.shape[:2]
        prob = iam.sigmoid().flatten(2)  # (B, G*N, HW)
        # Each map is a weighted mean over pixels, its weights the normalised activations.
        prob = prob / prob.sum(-1, keepdim=True).clamp(min=1e-6)
        pooled = torch.bmm(prob, feats.flatten(2).transpose(1, 2))  # (B, G*N, C)
        # The grouped conv lays group g's maps out at [g*N, (g+1)*N): gather an instance's
        # G vectors side by side.
        n = gn // self.num_groups
        inst = pooled.reshape(b, self.num_groups, n, -1).transpose(1, 2).reshape(b, n, -1)
        inst = F.relu(self.fc(inst))
        return self.cls_score(inst), self.mask_kernel(inst), self.objectness(inst), iam


class MaskBranch(nn.Module):
    """3x3 convs and a 1x1 projection to the kernel width: the mask features F."""

    def __init__(self, in_channels: int, dim: int, num_convs: int, kernel_dim: int):
        super().__init__()
        self.mask_convs = _conv_stack(num_convs, in_channels, dim)
        self.projection = nn.Conv2d(dim, kernel_dim, kernel_size=1)
        for m in self.mask_convs.modules():
            if isinstance(m, nn.Conv2d):
                c2_msra_fill(m)
        c2_msra_fill(self.projection)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C_in, H, W) -> (B, kernel_dim, H, W)."""
        return self.projection(self.mask_convs(x))


@SPARSE_INST_DECODER_REGISTRY.register()
class GroupIAMDecoder(nn.Module):
    """Both branches read the encoder features with two coordinate channels prepended."""

    @configurable
    def __init__(self, *, in_channels: int, num_masks: int, num_classes: int,
                 kernel_dim: int, num_groups: int, inst_dim: int, inst_convs: int,
                 mask_dim: int, mask_convs: int, scale_factor: float, output_iam: bool):
        """
        Args:
            in_channels: width of the encoder features.
            num_masks: N, instances predicted per image.
            num_classes: K (sigmoid scores).
            kernel_dim: D, width of the kernels and mask features.
            num_groups: G, activation maps per instance.
            inst_dim, inst_convs, mask_dim, mask_convs: widths and depths of the branches.
            scale_factor: upsampling of the stride-8 mask logits (2: stride 4).
            output_iam: also return the activation maps as "pred_iam".
        """
        super().__init__()
        if inst_dim % num_groups:
            raise ValueError(
                f"MODEL.SPARSE_INST.DECODER.INST.DIM={inst_dim} must be divisible by "
                f"MODEL.SPARSE_INST.DECODER.GROUPS={num_groups} (grouped activation conv)"
            )
        self.scale_factor = scale_factor
        self.output_iam = output_iam
        self.inst_branch = GroupInstanceBranch(
            in_channels + 2, inst_dim, inst_convs, num_masks, num_groups, num_classes,
            kernel_dim,
        )
        self.mask_branch = MaskBranch(in_channels + 2, mask_dim, mask_convs, kernel_dim)

    @classmethod
    def from_config(cls, cfg):
        si = cfg.MODEL.SPARSE_INST
        d = si.DECODER
        return {
            "in_channels": si.ENCODER.NUM_CHANNELS, "num_masks": d.NUM_MASKS,
            "num_classes": d.NUM_CLASSES, "kernel_dim": d.KERNEL_DIM, "num_groups": d.GROUPS,
            "inst_dim": d.INST.DIM, "inst_convs": d.INST.CONVS, "mask_dim": d.MASK.DIM,
            "mask_convs": d.MASK.CONVS, "scale_factor": d.SCALE_FACTOR,
            "output_iam": d.OUTPUT_IAM,
        }

    def forward(self, features: torch.Tensor) -> Dict[str, torch.Tensor]:
        """
        Args:
            features: (B, C, h, w) encoder output at stride 8.
        Returns:
            "pred_logits" (B, N, K) class logits, "pred_scores" (B, N, 1) objectness
            logits, "pred_masks" (B, N, h * s, w * s) mask logits (s = scale_factor),
            "pred_kernels" (B, N, D) and "mask_features" (B, D, h, w), with
            pred_masks = kernel_masks(pred_kernels, mask_features); with ``output_iam``
            also "pred_iam" (B, G * N, h * s, w * s).
        """
        x = torch.cat([coordinate_features(features), features], dim=1)
        logits, kernels, scores, iam = self.inst_branch(x)
        mask_features = self.mask_branch(x)
        out = {
            "pred_logits": logits,
            "pred_scores": scores,
            "pred_masks": kernel_masks(kernels, mask_features, self.scale_factor),
            "pred_kernels": kernels,
            "mask_features": mask_features,
        }
        if self.output_iam:
            out["pred_iam"] = F.interpolate(iam, scale_factor=self.scale_factor,
                                            mode="bilinear", align_corners=False)
        return out


def build_sparseinst_decoder(cfg) -> nn.Module:
    """The decoder named by MODEL.SPARSE_INST.DECODER.NAME."""
    name = cfg.MODEL.SPARSE_INST.DECODER.NAME
    return lookup(SPARSE_INST_DECODER_REGISTRY, name, "MODEL.SPARSE_INST.DECODER.NAME")(cfg)
