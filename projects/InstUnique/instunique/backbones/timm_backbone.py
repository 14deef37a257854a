"""A timm feature extractor as a detectron2 backbone with outputs res2..res5.

``build_timm_backbone`` wraps ``timm.create_model(MODEL.TIMM.NAME, pretrained=False,
features_only=True, out_indices=...)``. The feature levels are addressed from the deepest one:
res5 is timm's last level (-1), res4 the one before it, and so on, which holds for timm's
hierarchical models whether or not they have a stride-2 level (ResNet has, Swin and ConvNeXt
have not); the strides timm reports are checked against 4, 8, 16, 32. Nothing is downloaded:
weights come from MODEL.WEIGHTS (see tools/convert_swin_to_d2.py for the official Swin files).
"""
import difflib
from typing import Dict, List, Optional, Sequence

import torch
from detectron2.layers import ShapeSpec
from detectron2.modeling import BACKBONE_REGISTRY, Backbone
from torch import nn

__all__ = ["TimmBackbone", "build_timm_backbone"]

_STRIDES = {"res2": 4, "res3": 8, "res4": 16, "res5": 32}


def _stage(name: str) -> int:
    """0 for res2 up to 3 for res5: the stage index in Swin's (and timm's) numbering."""
    return int(name[3:]) - 2


class TimmBackbone(Backbone):
    """detectron2 ``Backbone`` over a timm ``features_only`` model (``body``).

    ``forward``: images (N, C, H, W) -> {name: (N, C_name, H / s, W / s)} for each name of
    ``out_features`` at its stride s, H and W multiples of ``size_divisibility``; always NCHW,
    whatever layout timm returns. At other sizes Swin gives ceil(H / s) rows as the official
    Swin does (it pads); CNNs mostly round down.
    With ``output_norms``, each output first passes a LayerNorm over its channels, ``norm{i}``
    for res{i + 2} as in Mask2Former's D2SwinTransformer, so its checkpoints load by name.
    """

    def __init__(self, body: nn.Module, out_features: Sequence[str], output_norms: bool):
        super().__init__()
        self.body = body
        info = body.feature_info
        self._out_features = list(out_features)
        self._out_feature_strides = dict(zip(self._out_features, info.reduction()))
        self._out_feature_channels = dict(zip(self._out_features, info.channels()))
        # Swin's stages return (N, H, W, C); CNNs (N, C, H, W).
        self._channels_last = getattr(body, "output_fmt", "NCHW") == "NHWC"
        self._norm_names: Dict[str, Optional[str]] = {}
        for name in self._out_features:
            norm_name = f"norm{_stage(name)}" if output_norms else None
            if norm_name is not None:
                self.add_module(norm_name, nn.LayerNorm(self._out_feature_channels[name]))
            self._norm_names[name] = norm_name

    def forward(self, x: torch.Tensor) -> Dict[str, torch.Tensor]:
        if x.dim() != 4:
            raise ValueError(f"TimmBackbone takes images (N, C, H, W), got {tuple(x.shape)}")
        outputs = {}
        for name, feat in zip(self._out_features, self.body(x)):
            channels_last = self._channels_last
            norm_name = self._norm_names[name]
            if norm_name is not None:
                if not channels_last:  # nn.LayerNorm normalizes the last dimension
                    feat = feat.permute(0, 2, 3, 1)
                    channels_last = True
                feat = getattr(self, norm_name)(feat)
            if channels_last:
                feat = feat.permute(0, 3, 1, 2).contiguous()
            outputs[name] = feat
        return outputs

    def output_shape(self) -> Dict[str, ShapeSpec]:
        return {
            name: ShapeSpec(
                channels=self._out_feature_channels[name],
                stride=self._out_feature_strides[name],
            )
            for name in self._out_features
        }

    @property
    def size_divisibility(self) -> int:
        # A multiple of the coarsest stride gives every level exactly H / stride rows, so
        # upsampled coarse features align with the finer ones in the pixel decoder.
        return max(self._out_feature_strides.values())


def _check_name(timm, name: str) -> None:
    if not timm.is_model(name):
        close = difflib.get_close_matches(name, timm.list_models(), n=5, cutoff=0.6)
        raise ValueError(
            f"MODEL.TIMM.NAME = {name!r} is not a timm model; close names: "
            f"{', '.join(close) if close else 'none'} (timm.list_models() lists them all)"
        )


def _check_out_features(out_features: Sequence[str]) -> List[str]:
    unknown = [n for n in out_features if n not in _STRIDES]
    if not out_features or unknown or len(set(out_features)) != len(out_features):
        raise ValueError(
            f"MODEL.TIMM.OUT_FEATURES = {list(out_features)} must name distinct levels among "
            f"{list(_STRIDES)}"
        )
    return sorted(out_features, key=_STRIDES.get)


def _create_body(timm, cfg, out_features: List[str], in_channels: int) -> nn.Module:
    from .swin import is_swin, swin_create_kwargs, use_official_window_order

    name = cfg.MODEL.TIMM.NAME
    kwargs = {
        "pretrained": False,
        "features_only": True,
        # Counted from the deepest level, res5 being timm's last (-1); see the module doc.
        "out_indices": tuple(_stage(n) - 4 for n in out_features),
        "in_chans": in_channels,
        "drop_path_rate": cfg.MODEL.TIMM.DROP_PATH_RATE,
    }
    swin = is_swin(name)
    if swin:
        kwargs.update(swin_create_kwargs())
    try:
        body = timm.create_model(name, **kwargs)
    except (RuntimeError, TypeError, IndexError) as e:
        raise ValueError(
            f"MODEL.TIMM.NAME = {name!r}: timm cannot build it as a feature extractor "
            f"({type(e).__name__}: {e})"
        ) from e
    strides = list(body.feature_info.reduction())
    expected = [_STRIDES[n] for n in out_features]
    if strides != expected:
        raise ValueError(
            f"MODEL.TIMM.NAME = {name!r} gives features at strides {strides} for "
            f"MODEL.TIMM.OUT_FEATURES = {out_features}, which need {expected}: the adapter "
            "takes hierarchical models whose last four levels have strides 4, 8, 16, 32"
        )
    if swin:
        use_official_window_order(body)
    return body


@BACKBONE_REGISTRY.register()
def build_timm_backbone(cfg, input_shape: Optional[ShapeSpec] = None) -> TimmBackbone:
    """MODEL.BACKBONE.NAME "build_timm_backbone": the timm model MODEL.TIMM.NAME."""
    import timm  # here, so that importing instunique stays light and R50 runs need no timm

    _check_name(timm, cfg.MODEL.TIMM.NAME)
    out_features = _check_out_features(cfg.MODEL.TIMM.OUT_FEATURES)
    rate = cfg.MODEL.TIMM.DROP_PATH_RATE
    if not 0.0 <= rate < 1.0:
        raise ValueError(f"MODEL.TIMM.DROP_PATH_RATE = {rate} must lie in [0, 1)")
    if cfg.MODEL.BACKBONE.FREEZE_AT != 0:
        raise ValueError(
            f"MODEL.BACKBONE.FREEZE_AT = {cfg.MODEL.BACKBONE.FREEZE_AT}: the timm adapter trains "
            "every stage (as Mask2Former's Swin, frozen_stages -1); set it to 0"
        )
    in_channels = input_shape.channels if input_shape is not None else 3
    body = _create_body(timm, cfg, out_features, in_channels)
    return TimmBackbone(body, out_features, cfg.MODEL.TIMM.OUTPUT_NORMS)
