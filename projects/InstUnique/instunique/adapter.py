"""The one interface between the InstUnique objectives and a base segmenter.

A query-based segmenter plugs into InstUnique by registering a ``SegmenterAdapter`` for
its meta-architecture class. The objectives see only ``SegmenterOutputs``: pixel
embeddings F, query embeddings e, class logits p, and the base loss as a function.
"""
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import torch
from detectron2.structures import ImageList
from detectron2.utils.registry import Registry
from torch import nn

ADAPTER_REGISTRY = Registry("SEGMENTER_ADAPTER")
ADAPTER_REGISTRY.__doc__ = "The adapter of meta-architecture class X is registered as XAdapter."

Matching = List[Tuple[torch.Tensor, torch.Tensor]]


@dataclass
class SegmenterOutputs:
    """What one forward of the base segmenter gives the objectives.

    pixel_embeds: (B, C, H_f, W_f) pixel embeddings F at ``pixel_stride`` of the padded input.
    query_embeds: (B, Q, C) mask embeddings e of the final decoder layer; mask logits are
        ``einsum('bqc,bchw->bqhw', e, F)``.
    class_logits: (B, Q, K+1) final-layer class logits p.
    raw: the segmenter's own output structure (auxiliary layers included), which its base
        loss consumes.
    """

    pixel_embeds: torch.Tensor
    query_embeds: torch.Tensor
    class_logits: torch.Tensor
    raw: Dict


class SegmenterAdapter(ABC):
    """Wraps a base meta-architecture for InstUnique training (inference stays its own)."""

    #: stride of ``pixel_embeds`` with respect to the padded input image.
    pixel_stride: int = 4

    def __init__(self, model: nn.Module):
        self.model = model

    @property
    @abstractmethod
    def embed_dim(self) -> int:
        """C, the width of the pixel and query embeddings."""

    @abstractmethod
    def preprocess(self, batched_inputs: List[Dict]) -> ImageList:
        """Normalized, padded images of detectron2 dicts."""

    @abstractmethod
    def targets(self, batched_inputs: List[Dict], images: ImageList) -> List[Dict]:
        """Per image ``{"labels": (N,) long, "masks": (N, H_pad, W_pad) bool}``."""

    @abstractmethod
    def forward_train(self, images: ImageList) -> SegmenterOutputs:
        """One forward of the base segmenter in training mode."""

    @abstractmethod
    def base_losses(
        self, raw: Dict, targets: List[Dict], pixel_valid: Optional[torch.Tensor] = None,
        matching: Optional[Matching] = None, mask_only: bool = False,
    ) -> Tuple[Dict[str, torch.Tensor], Matching]:
        """The base segmenter's weighted losses and its final-layer query<->target matching.

        pixel_valid: optional (B, H_f, W_f) weights; pixels with weight 0 carry no loss.
        matching: a final-layer matching to use instead of the base matcher's.
        mask_only: only the mask terms, no classification term (the matching still
            uses whatever the base matcher uses).
        """

    @abstractmethod
    def final_layer_outputs(
        self, class_logits: torch.Tensor, query_embeds: torch.Tensor, pixel_embeds: torch.Tensor
    ) -> Dict:
        """A raw output structure for ``base_losses`` holding only a final layer whose
        class logits are (B, Q, K+1) and whose masks are ``e . F`` of the given query
        embeddings (B, Q, C) and pixel embeddings (B, C, H_f, W_f)."""


def build_adapter(model: nn.Module) -> SegmenterAdapter:
    name = type(model).__name__ + "Adapter"
    if name not in ADAPTER_REGISTRY:
        raise KeyError(
            f"No InstUnique adapter for base meta-architecture {type(model).__name__!r} "
            f"(MODEL.INST_UNIQUE.BASE_META_ARCHITECTURE); adapters: "
            f"{sorted(k for k, _ in ADAPTER_REGISTRY)}"
        )
    return ADAPTER_REGISTRY.get(name)(model)
