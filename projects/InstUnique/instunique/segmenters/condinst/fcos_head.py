"""The FCOS head and the proposal generator that holds it, with CondInst's controller.

Per FPN level (shared weights): a class tower and a box tower of 3x3 convs (GroupNorm,
ReLU); class logits from the class tower; box regression (l, t, r, b) in units of the
level's stride (a learnable per-level Scale, then ReLU) and the centerness logit from the
box tower; and the controller (CondInst's top-level 3x3 conv, passed in) on the box
tower's output, predicting each location's dynamic mask-head parameters.
"""
import math
from typing import Dict, List, Sequence

import torch
import torch.nn.functional as F
from detectron2.config import configurable
from detectron2.layers import ShapeSpec
from torch import Tensor, nn

from .targets import compute_locations

NORMS = ("GN", "none", "")


class Scale(nn.Module):
    """A learnable scalar multiplier (parameter ``scale``, (1,))."""

    def __init__(self, init_value: float = 1.0):
        super().__init__()
        self.scale = nn.Parameter(torch.tensor([float(init_value)]))

    def forward(self, x: Tensor) -> Tensor:
        return x * self.scale


def _tower(num_convs: int, channels: int, norm: str) -> nn.Sequential:
    """``num_convs`` x (conv3x3 with bias, GroupNorm(32) if norm "GN", ReLU): children
    conv at 3i (2i without norm), so the names are AdelaiDet's."""
    layers: List[nn.Module] = []
    for _ in range(num_convs):
        layers.append(nn.Conv2d(channels, channels, 3, padding=1))
        if norm == "GN":
            layers.append(nn.GroupNorm(32, channels))
        layers.append(nn.ReLU())
    return nn.Sequential(*layers)


class FCOSHead(nn.Module):
    """The FCOS head on ``num_levels`` maps of ``in_channels`` channels.

    Submodules (AdelaiDet's names and order): cls_tower, bbox_tower, share_tower,
    cls_logits, bbox_pred, ctrness, scales.K.scale. Convs start at N(0, 0.01) with zero
    bias, the class bias at -log((1 - PRIOR_PROB) / PRIOR_PROB).
    """

    def __init__(self, *, in_channels: int, num_levels: int, num_classes: int,
                 num_cls_convs: int, num_box_convs: int, num_share_convs: int, norm: str,
                 prior_prob: float, use_scale: bool):
        super().__init__()
        if norm not in NORMS:
            raise ValueError(f"MODEL.FCOS.NORM = {norm!r} must be one of {NORMS[:2]}")
        if norm == "GN" and in_channels % 32:
            raise ValueError(
                f"MODEL.FCOS.NORM 'GN' uses 32 groups: MODEL.FPN.OUT_CHANNELS = {in_channels} "
                "must be a multiple of 32"
            )
        self.num_classes = num_classes
        self.cls_tower = _tower(num_cls_convs, in_channels, norm)
        self.bbox_tower = _tower(num_box_convs, in_channels, norm)
        self.share_tower = _tower(num_share_convs, in_channels, norm)
        self.cls_logits = nn.Conv2d(in_channels, num_classes, 3, padding=1)
        self.bbox_pred = nn.Conv2d(in_channels, 4, 3, padding=1)
        self.ctrness = nn.Conv2d(in_channels, 1, 3, padding=1)
        self.scales = nn.ModuleList([Scale() for _ in range(num_levels)]) if use_scale else None
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.normal_(module.weight, std=0.01)
                nn.init.zeros_(module.bias)
        # Focal-loss init: every location starts as background with probability 1 - prior.
        nn.init.constant_(self.cls_logits.bias, -math.log((1 - prior_prob) / prior_prob))

    def forward(self, features: Sequence[Tensor], controller: nn.Module):
        """Per level l, for (B, C, H_l, W_l) features: class logits (B, K, H_l, W_l), box
        regression (B, 4, H_l, W_l) in strides, centerness logits (B, 1, H_l, W_l) and
        controller outputs (B, P_gen, H_l, W_l); four lists over the levels."""
        logits, regs, ctrs, params = [], [], [], []
        for level, x in enumerate(features):
            x = self.share_tower(x)
            cls_feat, box_feat = self.cls_tower(x), self.bbox_tower(x)
            logits.append(self.cls_logits(cls_feat))
            ctrs.append(self.ctrness(box_feat))
            reg = self.bbox_pred(box_feat)
            if self.scales is not None:
                reg = self.scales[level](reg)
            # ReLU rather than exp (the improved FCOS): distances in strides, >= 0.
            regs.append(F.relu(reg))
            params.append(controller(box_feat))
        return logits, regs, ctrs, params


def _flatten_levels(maps: Sequence[Tensor]) -> Tensor:
    """Per-level (B, C, H_l, W_l) -> (B, sum_l H_l W_l, C), levels in order, row-major."""
    return torch.cat([m.permute(0, 2, 3, 1).flatten(1, 2) for m in maps], dim=1)


class FCOS(nn.Module):
    """CondInst's proposal generator: the FCOS head on MODEL.FCOS.IN_FEATURES and the
    raw, batch-first, level-flattened predictions (``forward``). Assignment, losses and
    post-processing are functions of targets.py, losses.py and inference.py.

    Built as ``FCOS(cfg, input_shape)`` (MODEL.FCOS.*) or with explicit arguments."""

    @configurable
    def __init__(self, input_shape: Dict[str, ShapeSpec], *, in_features: Sequence[str],
                 strides: Sequence[int], **head_kwargs):
        super().__init__()
        missing = [f for f in in_features if f not in input_shape]
        if not in_features or missing:
            raise ValueError(
                f"MODEL.FCOS.IN_FEATURES = {list(in_features)}: {missing} not among the "
                f"backbone outputs {sorted(input_shape)} (MODEL.FCOS.TOP_LEVELS adds p6/p7)"
            )
        actual = [input_shape[f].stride for f in in_features]
        if list(strides) != actual:
            raise ValueError(
                f"MODEL.FCOS.FPN_STRIDES = {list(strides)} differ from the strides {actual} "
                f"of MODEL.FCOS.IN_FEATURES {list(in_features)}"
            )
        channels = {input_shape[f].channels for f in in_features}
        if len(channels) != 1:
            raise ValueError(f"MODEL.FCOS.IN_FEATURES {list(in_features)} differ in channels")
        self.in_features = list(in_features)
        self.strides = [int(s) for s in strides]
        self.in_channels = channels.pop()
        self.fcos_head = FCOSHead(in_channels=self.in_channels, num_levels=len(in_features),
                                  **head_kwargs)

    @classmethod
    def from_config(cls, cfg, input_shape: Dict[str, ShapeSpec]):
        fcos = cfg.MODEL.FCOS
        for key, value in (("USE_DEFORMABLE", fcos.USE_DEFORMABLE),
                           ("YIELD_PROPOSAL", fcos.YIELD_PROPOSAL),
                           ("YIELD_BOX_FEATURES", fcos.YIELD_BOX_FEATURES)):
            if value:
                raise ValueError(f"MODEL.FCOS.{key} = True is not implemented (must be False)")
        if fcos.BOX_QUALITY != "ctrness":
            raise ValueError(
                f"MODEL.FCOS.BOX_QUALITY = {fcos.BOX_QUALITY!r}: only 'ctrness' is implemented"
            )
        return {
            "input_shape": input_shape,
            "in_features": list(fcos.IN_FEATURES),
            "strides": list(fcos.FPN_STRIDES),
            "num_classes": fcos.NUM_CLASSES,
            "num_cls_convs": fcos.NUM_CLS_CONVS,
            "num_box_convs": fcos.NUM_BOX_CONVS,
            "num_share_convs": fcos.NUM_SHARE_CONVS,
            "norm": fcos.NORM,
            "prior_prob": fcos.PRIOR_PROB,
            "use_scale": fcos.USE_SCALE,
        }

    def forward(self, features: Dict[str, Tensor], controller: nn.Module) -> Dict[str, Tensor]:
        """Raw FCOS predictions of a batch, locations flattened over the levels (L total):

        "cls_logits" (B, L, K), "bbox_reg" (B, L, 4) (l, t, r, b) in strides,
        "ctrness" (B, L, 1), "params" (B, L, P_gen), "locations" (B, L, 2) input-pixel
        (x, y) and "levels" (B, L) long level index (both expanded views, the same for
        every image).
        """
        maps = [features[f] for f in self.in_features]
        logits, regs, ctrs, params = self.fcos_head(maps, controller)
        batch, device = maps[0].shape[0], maps[0].device
        locations = torch.cat([compute_locations(m.shape[-2], m.shape[-1], s, device)
                               for m, s in zip(maps, self.strides)])
        levels = torch.cat([torch.full((m.shape[-2] * m.shape[-1],), i, dtype=torch.long,
                                       device=device) for i, m in enumerate(maps)])
        return {
            "cls_logits": _flatten_levels(logits),
            "bbox_reg": _flatten_levels(regs),
            "ctrness": _flatten_levels(ctrs),
            "params": _flatten_levels(params),
            "locations": locations[None].expand(batch, -1, -1),
            "levels": levels[None].expand(batch, -1),
        }
