"""Mask2Former's segmentation head: pixel decoder followed by the transformer decoder.

The official ``mask2former`` package registers a ``MaskFormerHead`` in detectron2's
SEM_SEG_HEADS registry. Ours is registered as ``InstUniqueMaskFormerHead`` so that both
packages import side by side; configs keep the official name, which
:func:`build_mask2former_head` resolves to ours (``HEAD_ALIASES``).
"""
from typing import Dict, Optional

from detectron2.config import configurable
from detectron2.layers import ShapeSpec
from detectron2.modeling import SEM_SEG_HEADS_REGISTRY
from torch import nn

from .mask_position import MaskFeaturePosition
from .pixel_decoder import build_pixel_decoder
from .transformer_decoder import build_transformer_decoder

__all__ = ["HEAD_ALIASES", "InstUniqueMaskFormerHead", "build_mask2former_head"]


@SEM_SEG_HEADS_REGISTRY.register()
class InstUniqueMaskFormerHead(nn.Module):
    """Holds ``pixel_decoder`` and ``predictor`` under the official names.

    State-dict version 2, as the official head: that head reads a checkpoint whose metadata
    says version 1 (or nothing) as the pre-release layout and moves every
    ``sem_seg_head.*`` key outside ``predictor`` under ``pixel_decoder.``, which would break
    ours. Version-1 files of ours already have today's layout and load unchanged (this head
    renames nothing, whatever the version).
    """

    _version = 2

    @configurable
    def __init__(self, *, pixel_decoder: nn.Module, predictor: nn.Module, num_classes: int,
                 mask_position: Optional[nn.Module] = None):
        super().__init__()
        self.pixel_decoder = pixel_decoder
        self.predictor = predictor
        self.num_classes = num_classes
        # Registered only when on, so the official state_dict is unchanged otherwise.
        if mask_position is not None:
            self.mask_position = mask_position

    @classmethod
    def from_config(cls, cfg, input_shape: Dict[str, ShapeSpec]):
        in_features = cfg.MODEL.SEM_SEG_HEAD.IN_FEATURES
        missing = [f for f in in_features if f not in input_shape]
        if missing:
            raise ValueError(
                f"MODEL.SEM_SEG_HEAD.IN_FEATURES names {missing}, which the backbone does not "
                f"output (it has {sorted(input_shape)})"
            )
        if cfg.MODEL.MASK_FORMER.TRANSFORMER_IN_FEATURE != "multi_scale_pixel_decoder":
            raise ValueError(
                "MODEL.MASK_FORMER.TRANSFORMER_IN_FEATURE must be 'multi_scale_pixel_decoder', "
                f"got {cfg.MODEL.MASK_FORMER.TRANSFORMER_IN_FEATURE!r}"
            )
        shapes = {k: v for k, v in input_shape.items() if k in in_features}
        return {
            "pixel_decoder": build_pixel_decoder(cfg, shapes),
            "predictor": build_transformer_decoder(cfg, cfg.MODEL.SEM_SEG_HEAD.CONVS_DIM),
            "num_classes": cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES,
            "mask_position": MaskFeaturePosition(cfg.MODEL.SEM_SEG_HEAD.MASK_DIM)
            if cfg.MODEL.MASK_FORMER.MASK_POSITION_FEATURES else None,
        }

    def forward(self, features):
        """
        Args:
            features: backbone outputs, name -> (B, C_l, H_l, W_l).
        Returns:
            the predictor's dict (pred_logits (B, Q, K+1), pred_masks (B, Q, H/4, W/4),
            pred_embeds (B, Q, C), aux_outputs) plus ``pixel_embeds`` (B, C, H/4, W/4): the
            mask features F whose dot product with pred_embeds gives pred_masks.
        """
        mask_features, _, multi_scale_features = self.pixel_decoder.forward_features(features)
        if hasattr(self, "mask_position"):
            mask_features = self.mask_position(mask_features)
        outputs = self.predictor(multi_scale_features, mask_features)
        outputs["pixel_embeds"] = mask_features
        return outputs


# Official head names in configs -> the registered head of ours they mean. Looked up only by
# our meta-architecture, so another package's registration of the official name is never
# used by our models nor overwritten by us.
HEAD_ALIASES = {"MaskFormerHead": "InstUniqueMaskFormerHead"}


def build_mask2former_head(cfg, input_shape: Dict[str, ShapeSpec]) -> nn.Module:
    """The head named by ``cfg.MODEL.SEM_SEG_HEAD.NAME``, official names going through
    ``HEAD_ALIASES``; other names are looked up in SEM_SEG_HEADS_REGISTRY."""
    name = cfg.MODEL.SEM_SEG_HEAD.NAME
    registered = HEAD_ALIASES.get(name, name)
    if registered not in SEM_SEG_HEADS_REGISTRY:
        known = sorted(set(k for k, _ in SEM_SEG_HEADS_REGISTRY) | set(HEAD_ALIASES))
        raise KeyError(
            f"MODEL.SEM_SEG_HEAD.NAME={name!r} is not a registered segmentation head; "
            f"known: {known}"
        )
    return SEM_SEG_HEADS_REGISTRY.get(registered)(cfg, input_shape)
