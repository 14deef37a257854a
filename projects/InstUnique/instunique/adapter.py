"""The one interface between the InstUnique objectives and a base segmenter.

A query-based segmenter plugs into InstUnique by registering a ``SegmenterAdapter`` for
its meta-architecture class. The objectives see only ``SegmenterOutputs``: pixel
embeddings F, query embeddings e, class logits p, and the base loss as a function.
"""
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
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
    query_embeds: (B, Q, D) query embeddings e of the final decoder layer; their mask logits
        on F are the adapter's ``mask_logits`` (for most segmenters D = C and the logit of
        e on a pixel f is e . f).
    class_logits: (B, Q, K+1) final-layer per-query logits p, in the segmenter's own layout
        (Mask2Former: K classes + "no object"; SparseInst: K sigmoid classes + objectness);
        only the adapter interprets them (``query_scores``, ``final_layer_outputs``).
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
    #: whether the adapter has ``scene(raw)`` and ``decode_across(raw, scene)``: one batch's
    #: queries decoded on another batch's features (CROSS_IMAGE.MODE "cross_scene").
    decodes_across_scenes: bool = False
    #: whether ``pixel_logits`` is the dot product ``queries @ pixels.T``: the objectives'
    #: closed-form paths (pixel gradients, top-k negatives, the own-instance reference)
    #: rely on it.
    linear_response: bool = True
    #: values ``pixel_logits`` holds per (query, pixel) pair under autograd (1 for the dot
    #: product); Eq. 5's automatic chunk is sized by it.
    response_width: int = 1

    def __init__(self, model: nn.Module):
        self.model = model

    @property
    def mask_threshold(self) -> float:
        """Probability above which the base inference puts a pixel in a query's mask."""
        return 0.5

    def pixel_logits(self, queries: torch.Tensor, pixels: torch.Tensor) -> torch.Tensor:
        """Mask logits (R, N) of queries (R, D) on a set of pixel embeddings (N, C), each
        pixel wherever it comes from (this image, another one, the memory)."""
        return queries @ pixels.t()

    def mask_logits(self, query_embeds: torch.Tensor, pixel_embeds: torch.Tensor) -> torch.Tensor:
        """Mask logits (B, Q, H_f, W_f) of query embeddings (B, Q, D) on pixel embeddings
        (B, C, H_f, W_f), at the pixel-embedding grid."""
        return torch.einsum("bqc,bchw->bqhw", query_embeds, pixel_embeds)

    def output_probabilities(
        self, mask_logits: torch.Tensor, padded_size: Tuple[int, int],
        image_size: Tuple[int, int], output_size: Tuple[int, int],
    ) -> torch.Tensor:
        """Mask probabilities (n, height, width) at the output resolution, from mask logits
        (n, H_f, W_f) at the pixel-embedding grid of a padded input, upsampled the way the
        base inference does (here: to the padded input, crop to ``image_size``, resize)."""
        h, w = image_size
        m = F.interpolate(mask_logits[None].float(), size=padded_size, mode="bilinear",
                          align_corners=False)[:, :, :h, :w]
        m = F.interpolate(m, size=output_size, mode="bilinear", align_corners=False)[0]
        return m.sigmoid()

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
        class logits are (B, Q, K+1) and whose masks are the mask logits of the given query
        embeddings (B, Q, D) on the pixel embeddings (B, C, H_f, W_f)."""

    def batch_slice(self, raw: Dict, start: int, stop: int) -> Dict:
        """The raw output structure of images ``start:stop`` of the batch (e.g. to give the
        base loss only the views x). The default slices every tensor of the (nested dict /
        list / tuple) structure along dim 0: override it if a segmenter's raw output holds
        tensors that are not batch-first."""
        return _slice_batch(raw, start, stop)

    def query_predictions(self, class_logits: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """(B, Q) confidence of each query and (B, Q) its class: the best class of the
        softmax over the K + 1 logits, the last being "no object" (Mask2Former's
        convention). A segmenter with other class logits (sigmoid scores, no "no object"
        class) overrides it."""
        return class_logits.float().softmax(-1)[..., :-1].max(-1)

    def query_scores(self, class_logits: torch.Tensor) -> torch.Tensor:
        """(B, Q) confidence of each query (see ``query_predictions``)."""
        return self.query_predictions(class_logits)[0]

    def watch_inference(
        self, callback: Callable[[SegmenterOutputs], None]
    ) -> Optional[torch.utils.hooks.RemovableHandle]:
        """Have ``callback`` receive the SegmenterOutputs of every inference (eval-mode)
        forward of the model, so an evaluator reads them without a second forward.
        Returns the hook's handle (``.remove()`` it when done), or None where the adapter
        cannot watch (the default): the caller then runs ``forward_train`` itself."""
        return None


class MetaArchAdapter(SegmenterAdapter):
    """An adapter for a meta-architecture of ours that exposes the training steps one by
    one: ``preprocess_image(batched_inputs) -> ImageList``, ``prepare_targets(batched_inputs,
    images)``, ``predict(images) -> raw`` and ``losses(raw, targets, pixel_valid, matching,
    terms) -> (losses, matching)``. A subclass says which module's output is ``raw``
    (``output_module``) and how ``raw`` maps to SegmenterOutputs (``outputs``)."""

    def output_module(self) -> Optional[nn.Module]:
        """The submodule whose forward returns ``predict``'s raw structure; None where no
        single module does (then ``watch_inference`` cannot watch)."""
        return None

    @abstractmethod
    def outputs(self, raw: Dict) -> SegmenterOutputs:
        """The SegmenterOutputs of a raw output structure."""

    def preprocess(self, batched_inputs):
        return self.model.preprocess_image(batched_inputs)

    def targets(self, batched_inputs, images):
        return self.model.prepare_targets(batched_inputs, images)

    def forward_train(self, images):
        return self.outputs(self.model.predict(images))

    def watch_inference(self, callback):
        module = self.output_module()
        if module is None:
            return None

        def hook(module, inputs, raw):
            if not module.training:
                callback(self.outputs(raw))

        return module.register_forward_hook(hook)

    def base_losses(self, raw, targets, pixel_valid=None, matching=None, mask_only=False):
        return self.model.losses(
            raw, targets, pixel_valid, matching, ("masks",) if mask_only else None
        )


def check_targets(batch_size: int, targets: List[Dict], pixel_valid=None) -> None:
    """Raise a ValueError unless ``targets`` are ``batch_size`` dicts of (N,) labels and
    (N, H, W) masks, and ``pixel_valid`` (if any) is (batch_size, H, W)."""
    if len(targets) != batch_size:
        raise ValueError(f"got {len(targets)} targets for a batch of {batch_size} images")
    for b, t in enumerate(targets):
        labels, masks = t["labels"], t["masks"]
        if masks.dim() != 3 or masks.shape[0] != labels.shape[0]:
            raise ValueError(
                f"targets[{b}]: masks of shape {tuple(masks.shape)} do not match labels "
                f"of shape {tuple(labels.shape)}; expected (N, H, W) and (N,)"
            )
    if pixel_valid is not None and (pixel_valid.dim() != 3 or len(pixel_valid) != batch_size):
        raise ValueError(
            f"pixel_valid has shape {tuple(pixel_valid.shape)}; expected ({batch_size}, H, W)"
        )


def _slice_batch(raw, start: int, stop: int):
    if isinstance(raw, torch.Tensor):
        return raw[start:stop]
    if isinstance(raw, dict):
        return {k: _slice_batch(v, start, stop) for k, v in raw.items()}
    if isinstance(raw, (list, tuple)):
        return type(raw)(_slice_batch(v, start, stop) for v in raw)
    return raw


def build_adapter(model: nn.Module) -> SegmenterAdapter:
    name = type(model).__name__ + "Adapter"
    if name not in ADAPTER_REGISTRY:
        raise KeyError(
            f"No InstUnique adapter for base meta-architecture {type(model).__name__!r} "
            f"(MODEL.INST_UNIQUE.BASE_META_ARCHITECTURE); adapters: "
            f"{sorted(k for k, _ in ADAPTER_REGISTRY)}"
        )
    return ADAPTER_REGISTRY.get(name)(model)
