"""Mask2Former's masked-attention transformer decoder (the ``predictor`` of the head).

Learnable queries attend, one feature level per layer (coarsest first, round robin), to the
pixel decoder's multi-scale features. Each layer's cross-attention is restricted to the
foreground of the mask predicted by the layer before it (masked attention). A prediction
(class logits, mask embedding, mask logits) is made from the queries before the first
layer and after every layer; all but the last one are the auxiliary outputs.

With ``query_selection`` (ours, after Mask DINO's query selection) the queries are not
learned embeddings: each image's top-Q tokens of the multi-scale memory, scored by the
class head, become its queries, with their own positions. A query then starts on an
object from the first step, where a learned query must first learn where to look (the
convergence gap of docs/results/competent_base.md).

Sub-module names and shapes follow the official implementation so that official
checkpoints load unchanged.
"""
from typing import Dict, List, Optional, Tuple

import fvcore.nn.weight_init as weight_init
import torch
import torch.nn.functional as F
from detectron2.config import configurable
from detectron2.utils.registry import Registry
from torch import Tensor, nn

from .position_encoding import PositionEmbeddingSine

TRANSFORMER_DECODER_REGISTRY = Registry("TRANSFORMER_MODULE")
TRANSFORMER_DECODER_REGISTRY.__doc__ = """
Registry for Mask2Former transformer decoders (the ``sem_seg_head.predictor`` module).
Called with ``(cfg, in_channels, mask_classification)``.
"""

NUM_FEATURE_LEVELS = 3


def build_transformer_decoder(cfg, in_channels: int, mask_classification: bool = True):
    """Build the decoder named by ``cfg.MODEL.MASK_FORMER.TRANSFORMER_DECODER_NAME``."""
    name = cfg.MODEL.MASK_FORMER.TRANSFORMER_DECODER_NAME
    if name not in TRANSFORMER_DECODER_REGISTRY:
        known = sorted(k for k, _ in TRANSFORMER_DECODER_REGISTRY)
        raise ValueError(
            f"MODEL.MASK_FORMER.TRANSFORMER_DECODER_NAME={name!r} is not registered; "
            f"known decoders: {known}"
        )
    return TRANSFORMER_DECODER_REGISTRY.get(name)(cfg, in_channels, mask_classification)


def _with_pos(x: Tensor, pos: Optional[Tensor]) -> Tensor:
    return x if pos is None else x + pos


def _xavier_init(module: nn.Module) -> None:
    for p in module.parameters():
        if p.dim() > 1:
            nn.init.xavier_uniform_(p)


class SelfAttentionLayer(nn.Module):
    """Self-attention among the queries, with a residual connection and LayerNorm.

    Tensors are sequence-first: queries (Q, B, C), query positions (Q, B, C).
    """

    def __init__(self, d_model: int, nhead: int, dropout: float = 0.0, pre_norm: bool = False):
        super().__init__()
        self.self_attn = nn.MultiheadAttention(d_model, nhead, dropout=dropout)
        self.norm = nn.LayerNorm(d_model)
        self.dropout = nn.Dropout(dropout)
        self.pre_norm = pre_norm
        _xavier_init(self)

    def forward(self, tgt: Tensor, query_pos: Optional[Tensor] = None) -> Tensor:
        x = self.norm(tgt) if self.pre_norm else tgt
        q = k = _with_pos(x, query_pos)
        tgt = tgt + self.dropout(self.self_attn(q, k, value=x)[0])
        return tgt if self.pre_norm else self.norm(tgt)


class CrossAttentionLayer(nn.Module):
    """Queries attend to flattened image features, optionally under an attention mask.

    Tensors are sequence-first: queries (Q, B, C), memory and its positions (HW, B, C),
    ``attn_mask`` (B * nhead, Q, HW) bool, True where attention is not allowed.
    """

    def __init__(self, d_model: int, nhead: int, dropout: float = 0.0, pre_norm: bool = False):
        super().__init__()
        self.multihead_attn = nn.MultiheadAttention(d_model, nhead, dropout=dropout)
        self.norm = nn.LayerNorm(d_model)
        self.dropout = nn.Dropout(dropout)
        self.pre_norm = pre_norm
        _xavier_init(self)

    def forward(
        self,
        tgt: Tensor,
        memory: Tensor,
        attn_mask: Optional[Tensor] = None,
        pos: Optional[Tensor] = None,
        query_pos: Optional[Tensor] = None,
    ) -> Tensor:
        x = self.norm(tgt) if self.pre_norm else tgt
        attended = self.multihead_attn(
            query=_with_pos(x, query_pos),
            key=_with_pos(memory, pos),
            value=memory,
            attn_mask=attn_mask,
        )[0]
        tgt = tgt + self.dropout(attended)
        return tgt if self.pre_norm else self.norm(tgt)


class FFNLayer(nn.Module):
    """Two-layer ReLU feed-forward block with a residual connection and LayerNorm."""

    def __init__(
        self, d_model: int, dim_feedforward: int, dropout: float = 0.0, pre_norm: bool = False
    ):
        super().__init__()
        self.linear1 = nn.Linear(d_model, dim_feedforward)
        self.dropout = nn.Dropout(dropout)
        self.linear2 = nn.Linear(dim_feedforward, d_model)
        self.norm = nn.LayerNorm(d_model)
        self.pre_norm = pre_norm
        _xavier_init(self)

    def forward(self, tgt: Tensor) -> Tensor:
        x = self.norm(tgt) if self.pre_norm else tgt
        x = self.linear2(self.dropout(F.relu(self.linear1(x))))
        tgt = tgt + self.dropout(x)
        return tgt if self.pre_norm else self.norm(tgt)


class MLP(nn.Module):
    """``num_layers`` linear layers with ReLU between them (none after the last)."""

    def __init__(self, input_dim: int, hidden_dim: int, output_dim: int, num_layers: int):
        super().__init__()
        dims_in = [input_dim] + [hidden_dim] * (num_layers - 1)
        dims_out = [hidden_dim] * (num_layers - 1) + [output_dim]
        self.layers = nn.ModuleList(nn.Linear(i, o) for i, o in zip(dims_in, dims_out))

    def forward(self, x: Tensor) -> Tensor:
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < len(self.layers) - 1:
                x = F.relu(x)
        return x


@TRANSFORMER_DECODER_REGISTRY.register()
class MultiScaleMaskedTransformerDecoder(nn.Module):
    """Mask2Former's transformer decoder with masked cross-attention."""

    @configurable
    def __init__(
        self,
        in_channels: int,
        mask_classification: bool = True,
        *,
        num_classes: int,
        hidden_dim: int,
        num_queries: int,
        nheads: int,
        dim_feedforward: int,
        dec_layers: int,
        pre_norm: bool,
        mask_dim: int,
        enforce_input_project: bool,
        query_selection: bool = False,
    ):
        """
        Args:
            in_channels: channels of each multi-scale feature map given to ``forward``.
            mask_classification: whether to predict class logits (``class_embed``).
            num_classes: K, the number of foreground classes; logits have K + 1 entries,
                the last one being "no object".
            hidden_dim: width d of queries and attention.
            num_queries: Q.
            nheads: attention heads.
            dim_feedforward: hidden width of the feed-forward blocks.
            dec_layers: number of decoder layers (cross-attn, self-attn, FFN), >= 1.
            pre_norm: LayerNorm before (True) or after (False, official) each block.
            mask_dim: width C of the mask features and of the mask embeddings.
            enforce_input_project: project inputs with a 1x1 conv even when
                ``in_channels == hidden_dim``.
            query_selection: queries from the top-scoring memory tokens of each image
                (``selection_proj``, ``selection_norm``) instead of ``query_feat`` and
                ``query_embed``.
        """
        super().__init__()
        if dec_layers < 1:
            raise ValueError(f"dec_layers must be >= 1, got {dec_layers}")
        if query_selection and not mask_classification:
            raise ValueError("query selection scores tokens with the class head: it needs "
                             "mask_classification (MODEL.MASK_FORMER.QUERY_SELECTION)")
        self.mask_classification = mask_classification
        self.num_heads = nheads
        self.num_layers = dec_layers

        self.pe_layer = PositionEmbeddingSine(hidden_dim // 2, normalize=True)
        self.transformer_self_attention_layers = nn.ModuleList(
            SelfAttentionLayer(hidden_dim, nheads, pre_norm=pre_norm) for _ in range(dec_layers)
        )
        self.transformer_cross_attention_layers = nn.ModuleList(
            CrossAttentionLayer(hidden_dim, nheads, pre_norm=pre_norm) for _ in range(dec_layers)
        )
        self.transformer_ffn_layers = nn.ModuleList(
            FFNLayer(hidden_dim, dim_feedforward, pre_norm=pre_norm) for _ in range(dec_layers)
        )
        self.decoder_norm = nn.LayerNorm(hidden_dim)

        self.num_queries = num_queries
        self.query_selection = query_selection
        if query_selection:
            self.selection_proj = nn.Linear(hidden_dim, hidden_dim)
            self.selection_norm = nn.LayerNorm(hidden_dim)
        else:
            self.query_feat = nn.Embedding(num_queries, hidden_dim)
            self.query_embed = nn.Embedding(num_queries, hidden_dim)
        self.level_embed = nn.Embedding(NUM_FEATURE_LEVELS, hidden_dim)
        self.input_proj = nn.ModuleList(
            self._make_input_proj(in_channels, hidden_dim, enforce_input_project)
            for _ in range(NUM_FEATURE_LEVELS)
        )

        if mask_classification:
            self.class_embed = nn.Linear(hidden_dim, num_classes + 1)
        self.mask_embed = MLP(hidden_dim, hidden_dim, mask_dim, 3)

    @staticmethod
    def _make_input_proj(in_channels: int, hidden_dim: int, enforce: bool) -> nn.Module:
        if in_channels == hidden_dim and not enforce:
            return nn.Sequential()
        proj = nn.Conv2d(in_channels, hidden_dim, kernel_size=1)
        weight_init.c2_xavier_fill(proj)
        return proj

    @classmethod
    def from_config(cls, cfg, in_channels, mask_classification):
        mf = cfg.MODEL.MASK_FORMER
        # DEC_LAYERS counts predictions: the one from the bare queries plus one per layer.
        if mf.DEC_LAYERS < 2:
            raise ValueError(
                "MODEL.MASK_FORMER.DEC_LAYERS must be >= 2 (the decoder has DEC_LAYERS - 1 "
                f"layers), got {mf.DEC_LAYERS}"
            )
        return {
            "in_channels": in_channels,
            "mask_classification": mask_classification,
            "num_classes": cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES,
            "hidden_dim": mf.HIDDEN_DIM,
            "num_queries": mf.NUM_OBJECT_QUERIES,
            "nheads": mf.NHEADS,
            "dim_feedforward": mf.DIM_FEEDFORWARD,
            "dec_layers": mf.DEC_LAYERS - 1,
            "pre_norm": mf.PRE_NORM,
            "enforce_input_project": mf.ENFORCE_INPUT_PROJ,
            "mask_dim": cfg.MODEL.SEM_SEG_HEAD.MASK_DIM,
            "query_selection": mf.QUERY_SELECTION,
        }

    def forward(
        self, x: List[Tensor], mask_features: Tensor, mask: Optional[Tensor] = None
    ) -> Dict[str, object]:
        """
        Args:
            x: 3 feature maps (B, in_channels, h_l, w_l), coarsest first.
            mask_features: (B, mask_dim, H, W), the per-pixel embeddings F.
            mask: unused; kept for the official call signature.

        Returns:
            dict with
            - "pred_logits": (B, Q, K + 1) of the last prediction (if mask_classification),
            - "pred_masks": (B, Q, H, W) mask logits of the last prediction,
            - "pred_embeds": (B, Q, mask_dim) its mask embeddings e_q; pred_masks is
              einsum("bqc,bchw->bqhw", pred_embeds, mask_features),
            - "aux_outputs": list of ``num_layers`` dicts with "pred_logits" (if
              mask_classification) and "pred_masks" of the earlier predictions, in order;
            - "query_states": ``num_layers + 1`` tensors (B, Q, d), the queries each
              prediction was made from, and "query_pos" (B, Q, d) their positions: what
              ``decode_across`` reads.
        """
        del mask
        self._check_inputs(x, mask_features)
        memories, positions = zip(*(self._flatten_level(i, feat) for i, feat in enumerate(x)))
        level_sizes = [feat.shape[-2:] for feat in x]

        batch_size = mask_features.shape[0]
        if self.query_selection:
            queries, query_pos = self._select_queries(memories, positions)
        else:
            query_pos = self.query_embed.weight.unsqueeze(1).expand(-1, batch_size, -1)
            queries = self.query_feat.weight.unsqueeze(1).expand(-1, batch_size, -1)

        predictions = [self._predict(queries, mask_features)]
        states = [queries]
        if self.query_selection:
            # As Mask DINO: the first prediction trains the chosen tokens, the layers start
            # from a detached copy (their gradient reaches the memory through attention).
            queries = queries.detach()
        for i in range(self.num_layers):
            level = i % NUM_FEATURE_LEVELS
            attn_mask = self._attention_mask(predictions[-1]["pred_masks"], level_sizes[level])
            queries = self.transformer_cross_attention_layers[i](
                queries, memories[level], attn_mask, pos=positions[level], query_pos=query_pos
            )
            queries = self.transformer_self_attention_layers[i](queries, query_pos=query_pos)
            queries = self.transformer_ffn_layers[i](queries)
            predictions.append(self._predict(queries, mask_features))
            states.append(queries)

        out = self._outputs(predictions)
        # Batch-first, so that slicing a batch of raw outputs slices these too.
        out["query_states"] = [q.transpose(0, 1) for q in states]
        out["query_pos"] = query_pos.transpose(0, 1)
        return out

    def decode_across(self, query_states: List[Tensor], query_pos: Tensor, x: List[Tensor],
                      mask_features: Tensor) -> Dict[str, object]:
        """Predictions of one batch's queries on the features of other images, as the
        released Mask2Former code of the paper does (JamesLiang819/Instance_Unique_Querying
        6ab0740, ``mask2former_head_contrast.py``): the first prediction is made from the
        bare queries on the other image's mask features; layer i takes the queries *after*
        layer i of their own image's decoding, attends (masked by the previous prediction
        on the other image) to the other image's level, and predicts there.

        Args:
            query_states, query_pos: ``forward``'s "query_states" and "query_pos" of the
                B images whose queries are decoded.
            x, mask_features: the other B images' multi-scale features and mask features,
                as ``forward`` takes them (image b's queries read image b of these).
        Returns:
            "pred_logits", "pred_masks" and "aux_outputs" as ``forward``.
        """
        self._check_inputs(x, mask_features)
        if len(query_states) != self.num_layers + 1:
            raise ValueError(f"expected {self.num_layers + 1} query states, got "
                             f"{len(query_states)}")
        memories, positions = zip(*(self._flatten_level(i, feat) for i, feat in enumerate(x)))
        level_sizes = [feat.shape[-2:] for feat in x]
        states = [q.transpose(0, 1) for q in query_states]
        query_pos = query_pos.transpose(0, 1)
        predictions = [self._predict(states[0], mask_features)]
        for i in range(self.num_layers):
            level = i % NUM_FEATURE_LEVELS
            attn_mask = self._attention_mask(predictions[-1]["pred_masks"], level_sizes[level])
            queries = self.transformer_cross_attention_layers[i](
                states[i + 1], memories[level], attn_mask, pos=positions[level],
                query_pos=query_pos,
            )
            queries = self.transformer_self_attention_layers[i](queries, query_pos=query_pos)
            queries = self.transformer_ffn_layers[i](queries)
            predictions.append(self._predict(queries, mask_features))
        return self._outputs(predictions)

    @staticmethod
    def _outputs(predictions: List[Dict[str, Tensor]]) -> Dict[str, object]:
        out = dict(predictions[-1])
        out["aux_outputs"] = [
            {k: v for k, v in p.items() if k != "pred_embeds"} for p in predictions[:-1]
        ]
        return out

    def _check_inputs(self, x: List[Tensor], mask_features: Tensor) -> None:
        if len(x) != NUM_FEATURE_LEVELS:
            raise ValueError(f"expected {NUM_FEATURE_LEVELS} feature maps, got {len(x)}")
        for i, feat in enumerate(x):
            if feat.dim() != 4 or feat.shape[0] != mask_features.shape[0]:
                raise ValueError(
                    f"feature map {i} has shape {tuple(feat.shape)}; expected (B, C, h, w) with "
                    f"B = {mask_features.shape[0]} as in mask_features"
                )
        mask_dim = self.mask_embed.layers[-1].out_features
        if mask_features.dim() != 4 or mask_features.shape[1] != mask_dim:
            raise ValueError(
                f"mask_features has shape {tuple(mask_features.shape)}; expected "
                f"(B, {mask_dim}, H, W)"
            )

    def _flatten_level(self, level: int, feat: Tensor) -> Tuple[Tensor, Tensor]:
        """(B, C, h, w) -> projected memory and its positions, both (hw, B, d)."""
        pos = self.pe_layer(feat, None).flatten(2).permute(2, 0, 1)
        memory = self.input_proj[level](feat).flatten(2)
        memory = memory + self.level_embed.weight[level][None, :, None]
        return memory.permute(2, 0, 1), pos

    def _select_queries(self, memories, positions) -> Tuple[Tensor, Tensor]:
        """Each image's Q memory tokens (all levels) with the highest foreground class
        probability: their projected features and their positions, both (Q, B, d).

        The choice is not differentiable; the class head learns to score tokens through the
        first prediction, made from the chosen ones (unmatched ones learn "no object").
        No pad mask reaches the decoder, so in a padded batch a padded token can be chosen.
        """
        tokens = self.selection_norm(self.selection_proj(torch.cat(memories)))  # (N, B, d)
        if tokens.shape[0] < self.num_queries:
            raise ValueError(f"query selection needs >= {self.num_queries} memory tokens (the "
                             f"number of queries), got {tokens.shape[0]}: the image is too small")
        with torch.no_grad():
            probs = self.class_embed(self.decoder_norm(tokens)).softmax(-1)[..., :-1]
            top = probs.max(-1).values.topk(self.num_queries, dim=0).indices  # (Q, B)
        index = top.unsqueeze(-1).expand(-1, -1, tokens.shape[-1])
        return tokens.gather(0, index), torch.cat(positions).gather(0, index)

    def _predict(self, queries: Tensor, mask_features: Tensor) -> Dict[str, Tensor]:
        """Heads on (Q, B, d) queries: class logits, mask embeddings and mask logits."""
        decoded = self.decoder_norm(queries).transpose(0, 1)
        pred = {"pred_logits": self.class_embed(decoded)} if self.mask_classification else {}
        pred["pred_embeds"] = self.mask_embed(decoded)
        pred["pred_masks"] = torch.einsum("bqc,bchw->bqhw", pred["pred_embeds"], mask_features)
        return pred

    def _attention_mask(self, mask_logits: Tensor, size) -> Tensor:
        """
        (B, Q, H, W) mask logits -> (B * nheads, Q, h * w) bool, True = do not attend: the
        pixels of the level (size (h, w)) outside the predicted mask.
        """
        resized = F.interpolate(mask_logits, size=size, mode="bilinear", align_corners=False)
        blocked = (resized.sigmoid() < 0.5).flatten(2).detach()
        # A query whose mask is empty at this level would attend to nothing (softmax of an
        # all -inf row is NaN), so let it attend everywhere instead.
        blocked = blocked & ~blocked.all(dim=-1, keepdim=True)
        return blocked.repeat_interleave(self.num_heads, dim=0)
