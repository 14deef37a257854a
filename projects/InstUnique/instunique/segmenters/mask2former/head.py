"""Mask2Former's segmentation head: pixel decoder followed by the transformer decoder."""
from typing import Dict

from detectron2.config import configurable
from detectron2.layers import ShapeSpec
from detectron2.modeling import SEM_SEG_HEADS_REGISTRY
from torch import nn

from .pixel_decoder import build_pixel_decoder
from .transformer_decoder import build_transformer_decoder


@SEM_SEG_HEADS_REGISTRY.register()
class MaskFormerHead(nn.Module):
    """Holds ``pixel_decoder`` and ``predictor`` under the official names."""

    @configurable
    def __init__(self, *, pixel_decoder: nn.Module, predictor: nn.Module, num_classes: int):
        super().__init__()
        self.pixel_decoder = pixel_decoder
        self.predictor = predictor
        self.num_classes = num_classes

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
        outputs = self.predictor(multi_scale_features, mask_features)
        outputs["pixel_embeds"] = mask_features
        return outputs
