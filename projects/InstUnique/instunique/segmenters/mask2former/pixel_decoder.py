"""Mask2Former's pixel decoder: a deformable-attention encoder over the coarse backbone levels
plus an FPN-style top-down path to the mask-feature stride.

Module and parameter names are the official ones (``sem_seg_head.pixel_decoder.*``), so the
official checkpoints load unchanged. The attention is plain PyTorch (see ``ms_deform_attn``).
"""

import contextlib
import math
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

import fvcore.nn.weight_init as weight_init
import torch
import torch.nn.functional as F
from detectron2.config import configurable
from detectron2.layers import Conv2d, ShapeSpec, get_norm
from detectron2.utils.registry import Registry
from torch import nn

from .ms_deform_attn import MSDeformAttn, check_impl
from .position_encoding import PositionEmbeddingSine

__all__ = [
    "PIXEL_DECODER_REGISTRY",
    "build_pixel_decoder",
    "MSDeformAttnEncoderLayer",
    "MSDeformAttnTransformerEncoder",
    "MSDeformAttnTransformerEncoderOnly",
    "MSDeformAttnPixelDecoder",
]

PIXEL_DECODER_REGISTRY = Registry("PIXEL_DECODER")
PIXEL_DECODER_REGISTRY.__doc__ = """
Registry for Mask2Former pixel decoders. A registered class is called as ``cls(cfg,
input_shape)`` with ``input_shape: Dict[str, ShapeSpec]`` of the backbone, and must provide
``forward_features(features) -> (mask_features, encoder_out, multi_scale_features)``.
"""


def build_pixel_decoder(cfg, input_shape: Dict[str, ShapeSpec]) -> nn.Module:
    """Build the pixel decoder named by ``cfg.MODEL.SEM_SEG_HEAD.PIXEL_DECODER_NAME``."""
    name = cfg.MODEL.SEM_SEG_HEAD.PIXEL_DECODER_NAME
    if name not in PIXEL_DECODER_REGISTRY:
        known = sorted(k for k, _ in PIXEL_DECODER_REGISTRY)
        raise KeyError(
            f"MODEL.SEM_SEG_HEAD.PIXEL_DECODER_NAME={name!r} is not registered in "
            f"PIXEL_DECODER_REGISTRY; registered: {known}"
        )
    model = PIXEL_DECODER_REGISTRY.get(name)(cfg, input_shape)
    if not callable(getattr(model, "forward_features", None)):
        raise ValueError(f"pixel decoder {name!r} has no forward_features(features) method")
    return model


class MSDeformAttnEncoderLayer(nn.Module):
    """Post-norm encoder layer: deformable self-attention then a ReLU feed-forward block, each
    followed by residual + LayerNorm."""

    def __init__(
        self,
        d_model: int = 256,
        d_ffn: int = 1024,
        dropout: float = 0.1,
        n_levels: int = 4,
        n_heads: int = 8,
        n_points: int = 4,
    ):
        super().__init__()
        self.self_attn = MSDeformAttn(d_model, n_levels, n_heads, n_points)
        self.dropout1 = nn.Dropout(dropout)
        self.norm1 = nn.LayerNorm(d_model)
        self.linear1 = nn.Linear(d_model, d_ffn)
        self.dropout2 = nn.Dropout(dropout)
        self.linear2 = nn.Linear(d_ffn, d_model)
        self.dropout3 = nn.Dropout(dropout)
        self.norm2 = nn.LayerNorm(d_model)

    def forward(
        self,
        src: torch.Tensor,
        pos: torch.Tensor,
        reference_points: torch.Tensor,
        spatial_shapes: torch.Tensor,
        level_start_index: torch.Tensor,
        padding_mask: Optional[torch.Tensor] = None,
        spatial_shapes_list: Optional[Sequence[Tuple[int, int]]] = None,
    ) -> torch.Tensor:
        """
        Args:
            src: (B, S, d) tokens of all levels; pos: (B, S, d) their position + level embedding.
            reference_points: (B, S, L, 2); the rest as in ``MSDeformAttn.forward``.

        Returns:
            (B, S, d).
        """
        # Positions steer where to look (queries) but are not part of the sampled values.
        attn = self.self_attn(
            src + pos,
            reference_points,
            src,
            spatial_shapes,
            level_start_index,
            padding_mask,
            spatial_shapes_list=spatial_shapes_list,
        )
        src = self.norm1(src + self.dropout1(attn))
        ffn = self.linear2(self.dropout2(F.relu(self.linear1(src))))
        return self.norm2(src + self.dropout3(ffn))


class MSDeformAttnTransformerEncoder(nn.Module):
    """A stack of ``MSDeformAttnEncoderLayer`` where every token attends from its own pixel
    centre."""

    def __init__(self, layers: Sequence[nn.Module]):
        super().__init__()
        self.layers = nn.ModuleList(layers)

    @staticmethod
    def get_reference_points(
        spatial_shapes_list: Sequence[Tuple[int, int]],
        valid_ratios: torch.Tensor,
    ) -> torch.Tensor:
        """Normalized pixel centres of every token, as seen from every level.

        Args:
            spatial_shapes_list: (H_l, W_l) of each level.
            valid_ratios: (B, L, 2) unpadded fraction (x, y) of each level's map.

        Returns:
            (B, S, L, 2) (x, y); a centre is normalized by its level's valid extent and then
            rescaled into each level's padded frame.
        """
        device, dtype = valid_ratios.device, valid_ratios.dtype
        per_level = []
        for level, (h, w) in enumerate(spatial_shapes_list):
            ys = (torch.arange(h, device=device, dtype=dtype) + 0.5) / h
            xs = (torch.arange(w, device=device, dtype=dtype) + 0.5) / w
            ref_y, ref_x = torch.meshgrid(ys, xs, indexing="ij")
            ref = torch.stack((ref_x.reshape(-1), ref_y.reshape(-1)), dim=-1)  # (HW, 2)
            per_level.append(ref[None] / valid_ratios[:, None, level])
        reference = torch.cat(per_level, dim=1)  # (B, S, 2)
        return reference[:, :, None] * valid_ratios[:, None]

    def forward(
        self,
        src: torch.Tensor,
        spatial_shapes: torch.Tensor,
        level_start_index: torch.Tensor,
        valid_ratios: torch.Tensor,
        pos: torch.Tensor,
        padding_mask: Optional[torch.Tensor] = None,
        spatial_shapes_list: Optional[Sequence[Tuple[int, int]]] = None,
    ) -> torch.Tensor:
        """(B, S, d) tokens -> (B, S, d) encoded tokens; arguments as in the layers."""
        if spatial_shapes_list is None:
            spatial_shapes_list = [tuple(s) for s in spatial_shapes.tolist()]
        reference_points = self.get_reference_points(spatial_shapes_list, valid_ratios)
        out = src
        for layer in self.layers:
            out = layer(
                out,
                pos,
                reference_points,
                spatial_shapes,
                level_start_index,
                padding_mask,
                spatial_shapes_list=spatial_shapes_list,
            )
        return out


class MSDeformAttnTransformerEncoderOnly(nn.Module):
    """Flattens a pyramid, adds level embeddings to the positions and runs the encoder."""

    def __init__(
        self,
        d_model: int = 256,
        nhead: int = 8,
        num_encoder_layers: int = 6,
        dim_feedforward: int = 1024,
        dropout: float = 0.1,
        num_feature_levels: int = 4,
        enc_n_points: int = 4,
    ):
        super().__init__()
        self.d_model = d_model
        self.nhead = nhead
        self.num_feature_levels = num_feature_levels
        layers = [
            MSDeformAttnEncoderLayer(
                d_model, dim_feedforward, dropout, num_feature_levels, nhead, enc_n_points
            )
            for _ in range(num_encoder_layers)
        ]
        self.encoder = MSDeformAttnTransformerEncoder(layers)
        self.level_embed = nn.Parameter(torch.empty(num_feature_levels, d_model))
        self.reset_parameters()

    def reset_parameters(self):
        """Official init: Xavier for every matrix, Deformable-DETR init inside the attention,
        standard normal level embeddings."""
        for p in self.parameters():
            if p.dim() > 1:
                nn.init.xavier_uniform_(p)
        for m in self.modules():
            if isinstance(m, MSDeformAttn):
                m.reset_parameters()
        nn.init.normal_(self.level_embed)

    def forward(
        self, srcs: Sequence[torch.Tensor], pos_embeds: Sequence[torch.Tensor]
    ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """
        Args:
            srcs: L maps (B, d, H_l, W_l), in the level order of ``level_embed``.
            pos_embeds: L position embeddings of the same shapes.

        Returns:
            memory (B, S, d) encoded tokens, levels concatenated row-major;
            spatial_shapes (L, 2) long (H_l, W_l); level_start_index (L,) long.
        """
        if len(srcs) != self.num_feature_levels or len(pos_embeds) != len(srcs):
            raise ValueError(
                f"expected {self.num_feature_levels} feature maps and as many position "
                f"embeddings, got {len(srcs)} and {len(pos_embeds)}"
            )
        shapes = [(int(s.shape[-2]), int(s.shape[-1])) for s in srcs]
        tokens = torch.cat([s.flatten(2).transpose(1, 2) for s in srcs], dim=1)
        pos = torch.cat(
            [
                p.flatten(2).transpose(1, 2) + self.level_embed[level].view(1, 1, -1)
                for level, p in enumerate(pos_embeds)
            ],
            dim=1,
        )
        device = tokens.device
        spatial_shapes = torch.as_tensor(shapes, dtype=torch.long, device=device)
        sizes = spatial_shapes.prod(1)
        level_start_index = torch.cat((sizes.new_zeros(1), sizes.cumsum(0)[:-1]))
        # Inputs are never padded here (the caller pads images to the size divisibility and
        # the official model attends over the padding too): every valid ratio is 1.
        valid_ratios = tokens.new_ones(tokens.shape[0], len(shapes), 2)
        memory = self.encoder(
            tokens,
            spatial_shapes,
            level_start_index,
            valid_ratios,
            pos,
            spatial_shapes_list=shapes,
        )
        return memory, spatial_shapes, level_start_index


def _autocast_disabled(device_type: str):
    is_available = getattr(torch.amp, "is_autocast_available", None)
    if is_available is not None and not is_available(device_type):
        return contextlib.nullcontext()
    return torch.autocast(device_type=device_type, enabled=False)


@PIXEL_DECODER_REGISTRY.register()
class MSDeformAttnPixelDecoder(nn.Module):
    """Backbone features -> per-pixel mask features and the multi-scale memory of the
    transformer decoder.

    The transformer levels (res3..res5 by default) are projected to ``conv_dim`` and encoded
    jointly by deformable self-attention; finer levels (res2) join through a top-down path
    (lateral 1x1 "adapter" + upsampled coarser map, then a 3x3 "layer") down to
    ``common_stride``.
    """

    @configurable
    def __init__(
        self,
        input_shape: Dict[str, ShapeSpec],
        *,
        transformer_dropout: float,
        transformer_nheads: int,
        transformer_dim_feedforward: int,
        transformer_enc_layers: int,
        conv_dim: int,
        mask_dim: int,
        norm: Optional[Union[str, Callable]] = None,
        transformer_in_features: List[str],
        common_stride: int,
        transformer_n_points: int = 4,
        deform_attn_impl: str = "auto",
    ):
        """
        Args:
            input_shape: channels and stride of every backbone feature the decoder reads.
            transformer_dropout: dropout inside the encoder layers.
            transformer_nheads: attention heads of the encoder.
            transformer_dim_feedforward: hidden width of the encoder feed-forward blocks.
            transformer_enc_layers: number of encoder layers.
            conv_dim: width of all internal maps (a multiple of 32: GroupNorm(32)).
            mask_dim: channels C of the output mask features.
            norm: norm of the top-down convs ("GN", "" for none, ...).
            transformer_in_features: features the encoder attends over (e.g. res3..res5).
            common_stride: stride of the output mask features.
            transformer_n_points: sampled points per head and level.
            deform_attn_impl: how the encoder's deformable attention samples ("auto",
                "pytorch", "triton"; MODEL.SEM_SEG_HEAD.DEFORM_ATTN_IMPL).
        """
        super().__init__()
        for name in transformer_in_features:
            if name not in input_shape:
                raise ValueError(
                    f"transformer feature {name!r} (DEFORMABLE_TRANSFORMER_ENCODER_IN_FEATURES)"
                    f" is not among the decoder's input features {sorted(input_shape)}"
                )
        for name, spec in input_shape.items():
            if spec.channels is None or spec.stride is None:
                raise ValueError(f"input_shape[{name!r}] needs channels and stride, got {spec}")
        if conv_dim % 32 != 0:
            raise ValueError(f"conv_dim (CONVS_DIM) must be a multiple of 32, got {conv_dim}")

        by_stride = sorted(input_shape.items(), key=lambda kv: kv[1].stride)
        self.in_features = [k for k, _ in by_stride]
        self.feature_strides = [v.stride for _, v in by_stride]
        self.feature_channels = [v.channels for _, v in by_stride]
        self.transformer_in_features = [k for k in self.in_features if k in transformer_in_features]
        self.transformer_feature_strides = [
            input_shape[k].stride for k in self.transformer_in_features
        ]
        self.transformer_num_feature_levels = len(self.transformer_in_features)

        # Coarsest level first: the level order of the encoder and of its outputs.
        self.input_proj = nn.ModuleList(
            nn.Sequential(
                nn.Conv2d(input_shape[k].channels, conv_dim, kernel_size=1),
                nn.GroupNorm(32, conv_dim),
            )
            for k in self.transformer_in_features[::-1]
        )
        for proj in self.input_proj:
            nn.init.xavier_uniform_(proj[0].weight, gain=1)
            nn.init.constant_(proj[0].bias, 0)

        self.transformer = MSDeformAttnTransformerEncoderOnly(
            d_model=conv_dim,
            nhead=transformer_nheads,
            num_encoder_layers=transformer_enc_layers,
            dim_feedforward=transformer_dim_feedforward,
            dropout=transformer_dropout,
            num_feature_levels=self.transformer_num_feature_levels,
            enc_n_points=transformer_n_points,
        )
        for module in self.transformer.modules():
            if isinstance(module, MSDeformAttn):
                module.impl = check_impl(deform_attn_impl)
        self.pe_layer = PositionEmbeddingSine(conv_dim // 2, normalize=True)

        self.mask_dim = mask_dim
        self.mask_features = Conv2d(conv_dim, mask_dim, kernel_size=1, stride=1, padding=0)
        weight_init.c2_xavier_fill(self.mask_features)

        # The transformer decoder reads this many encoder/FPN outputs, coarsest first.
        self.maskformer_num_feature_levels = 3
        self.common_stride = common_stride
        finest = min(self.transformer_feature_strides)
        ratio = finest / common_stride
        if ratio < 1 or not float(math.log2(ratio)).is_integer():
            raise ValueError(
                f"COMMON_STRIDE={common_stride} must be the finest transformer stride ({finest}) "
                "divided by a power of two"
            )
        self.num_fpn_levels = int(math.log2(ratio))
        fpn_features = self.in_features[: self.num_fpn_levels]
        if len(fpn_features) < self.num_fpn_levels or any(
            input_shape[k].stride >= finest for k in fpn_features
        ):
            raise ValueError(
                f"reaching COMMON_STRIDE={common_stride} from stride {finest} needs "
                f"{self.num_fpn_levels} input features finer than the transformer's; "
                f"IN_FEATURES give {self.in_features} with strides {self.feature_strides}"
            )

        use_bias = norm == ""
        lateral_convs, output_convs = [], []
        for idx, name in enumerate(fpn_features):  # finest first: adapter_1 is res2
            lateral_conv = Conv2d(
                input_shape[name].channels,
                conv_dim,
                kernel_size=1,
                bias=use_bias,
                norm=get_norm(norm, conv_dim),
            )
            output_conv = Conv2d(
                conv_dim,
                conv_dim,
                kernel_size=3,
                stride=1,
                padding=1,
                bias=use_bias,
                norm=get_norm(norm, conv_dim),
                activation=F.relu,
            )
            weight_init.c2_xavier_fill(lateral_conv)
            weight_init.c2_xavier_fill(output_conv)
            self.add_module(f"adapter_{idx + 1}", lateral_conv)
            self.add_module(f"layer_{idx + 1}", output_conv)
            lateral_convs.append(lateral_conv)
            output_convs.append(output_conv)
        # Plain lists (already registered above), in top-down processing order: coarse first.
        self.fpn_features = fpn_features[::-1]
        self.lateral_convs = lateral_convs[::-1]
        self.output_convs = output_convs[::-1]

    @classmethod
    def from_config(cls, cfg, input_shape: Dict[str, ShapeSpec]):
        head = cfg.MODEL.SEM_SEG_HEAD
        missing = [k for k in head.IN_FEATURES if k not in input_shape]
        if missing:
            raise ValueError(
                f"MODEL.SEM_SEG_HEAD.IN_FEATURES {missing} are not backbone outputs "
                f"{sorted(input_shape)}"
            )
        return {
            "input_shape": {k: v for k, v in input_shape.items() if k in head.IN_FEATURES},
            "conv_dim": head.CONVS_DIM,
            "mask_dim": head.MASK_DIM,
            "norm": head.NORM,
            "transformer_dropout": cfg.MODEL.MASK_FORMER.DROPOUT,
            "transformer_nheads": head.DEFORMABLE_TRANSFORMER_ENCODER_N_HEADS,
            # Fixed in the official model (not a config key).
            "transformer_dim_feedforward": 1024,
            "transformer_enc_layers": head.TRANSFORMER_ENC_LAYERS,
            "transformer_in_features": list(head.DEFORMABLE_TRANSFORMER_ENCODER_IN_FEATURES),
            "transformer_n_points": head.DEFORMABLE_TRANSFORMER_ENCODER_N_POINTS,
            "common_stride": head.COMMON_STRIDE,
            "deform_attn_impl": check_impl(head.DEFORM_ATTN_IMPL, cfg.MODEL.DEVICE),
        }

    def forward_features(
        self, features: Dict[str, torch.Tensor]
    ) -> Tuple[torch.Tensor, torch.Tensor, List[torch.Tensor]]:
        """
        Args:
            features: backbone maps by name, each (B, C_k, H_k, W_k); at least
                ``self.in_features``. Any spatial sizes work (e.g. 3x5 at stride 32).

        Returns:
            mask_features: (B, mask_dim, H_c, W_c) at ``common_stride``.
            encoder_out: (B, conv_dim, H, W) the coarsest encoded level.
            multi_scale_features: ``maskformer_num_feature_levels`` maps (B, conv_dim, h, w),
                coarsest first.
        """
        missing = [k for k in self.in_features if k not in features]
        if missing:
            raise KeyError(
                f"pixel decoder needs features {self.in_features}; missing {missing} "
                f"(got {sorted(features)})"
            )
        device_type = features[self.in_features[0]].device.type
        # As official: the whole decoder runs in full precision, even under AMP.
        with _autocast_disabled(device_type):
            return self._forward(features)

    def forward(self, features: Dict[str, torch.Tensor]):
        """Same as ``forward_features``."""
        return self.forward_features(features)

    def _forward(self, features: Dict[str, torch.Tensor]):
        dtype = self.input_proj[0][0].weight.dtype
        srcs, pos = [], []
        for proj, name in zip(self.input_proj, self.transformer_in_features[::-1]):
            x = features[name].to(dtype)
            srcs.append(proj(x))
            pos.append(self.pe_layer(x))
        memory, _, _ = self.transformer(srcs, pos)

        batch = memory.shape[0]
        sizes = [s.shape[-2] * s.shape[-1] for s in srcs]
        outs = [
            tokens.transpose(1, 2).reshape(batch, -1, s.shape[-2], s.shape[-1])
            for tokens, s in zip(memory.split(sizes, dim=1), srcs)
        ]

        for lateral_conv, output_conv, name in zip(
            self.lateral_convs, self.output_convs, self.fpn_features
        ):
            lateral = lateral_conv(features[name].to(dtype))
            top_down = F.interpolate(
                outs[-1], size=lateral.shape[-2:], mode="bilinear", align_corners=False
            )
            outs.append(output_conv(lateral + top_down))

        multi_scale_features = outs[: self.maskformer_num_feature_levels]
        return self.mask_features(outs[-1]), outs[0], multi_scale_features
