"""Cross-image (inter-image) querying, paper Eq. 5.

A query of image b must fire on its own instance and on nothing in other images: its mask
embedding e_bq is scored against external pixel embeddings f (other images of the batch
and the memory) with logit z = e_bq . f (or the base segmenter's own logit of a query on
a pixel, the adapter's ``pixel_logits``, e.g. CondInst's dynamic mask head) and a loss
towards 0. Only the query side learns:
f is detached (Alg. 1; PIXEL_GRADIENT "batch" lets the batch's f learn too). Panoptic
stuff (supp. S1): a query matched to a stuff segment of class c has target 1 on external
pixels labelled c.

The paper's text leaves several choices open; each is an option here (and a config key
under MODEL.INST_UNIQUE.CROSS_IMAGE, see config.py):

- which queries are scored: "all" (Alg. 1 read literally) or "matched" (the official
  SOLOv2 / CondInst code: only queries assigned to an instance);
- the loss of a pair: "focal" (Alg. 1's sigmoid focal loss) or "probability" (the official
  CondInst code: the probability s = sigmoid(z / T) itself);
- a temperature T dividing every logit (official CondInst: 3; Alg. 1: 1);
- hard negatives: "none" (every pair, Alg. 1), "threshold" (only pairs whose wrong-answer
  probability sigmoid(h / T) reaches a threshold: official CondInst, 0.8) or "topk" (the k
  hardest external pixels of each query);
- normalisation: "mean" over the kept (query, pixel) pairs (Alg. 1), "mean_all" over every
  scored pair, the ones a hard-negative rule leaves out counting as zeros (the official
  CondInst code: its thresholded s is zeroed, then averaged), or "per_query": each query's
  mean over its kept pixels, summed over queries and divided by the number of ground-truth
  masks (the base criterion's way);
- the reference of a logit (ours, not the paper's): "none" (z itself, target 0: an
  external response is wrong however weak the query's own one) or "own_instance" (z - z_own,
  with z_own = e . r and r the mean pixel embedding of the query's matched instance in its
  own image: an external pixel is scored by how it answers against the query's own
  instance, and its gradient, along f - r, moves e towards what tells the two apart rather
  than only lowering both; matched queries only).

"Hardness" of a pair is h = z for target 0 and h = -z for target 1 (a stuff query on a
pixel of its class): the logit of the wrong answer. With it, every target reads as target
0 on h, with the focal alpha weight of the original target.
"""
from typing import Callable, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from ..adapter import Matching, SegmenterOutputs
from ..distributed import average_num_masks
from .external_kernel import HARD_NEGATIVES, LOSSES, NORMALIZATIONS, external_focal_loss
from .memory import PixelMemory
from .sampling import sample_pixels, semantic_label_maps

QUERIES = ("all", "matched")
PIXEL_GRADIENTS = ("none", "batch")
REFERENCES = ("none", "own_instance")


_KEY = "MODEL.INST_UNIQUE.CROSS_IMAGE."


def _check_options(*, alpha, gamma, queries, loss, temperature, hard_negatives,
                   hard_threshold, topk, normalization, pixel_gradient, reference):
    """ValueError naming the config key of the first bad option."""
    for key, value, choices in (
        ("QUERIES", queries, QUERIES),
        ("PIXEL_GRADIENT", pixel_gradient, PIXEL_GRADIENTS),
        ("LOSS", loss, LOSSES),
        ("HARD_NEGATIVES", hard_negatives, HARD_NEGATIVES),
        ("NORMALIZATION", normalization, NORMALIZATIONS),
        ("REFERENCE", reference, REFERENCES),
    ):
        if value not in choices:
            raise ValueError(f"{_KEY}{key} must be one of {choices}, got {value!r}")
    for key, ok, rule, value in (
        ("FOCAL_ALPHA", 0.0 <= alpha <= 1.0, "in [0, 1]", alpha),
        ("FOCAL_GAMMA", gamma >= 0.0, ">= 0", gamma),
        ("TEMPERATURE", temperature > 0.0, "> 0", temperature),
        ("HARD_THRESHOLD", 0.0 < hard_threshold < 1.0, "in (0, 1)", hard_threshold),
        ("TOPK", topk >= 1, ">= 1", topk),
    ):
        if not ok:
            raise ValueError(f"{_KEY}{key} must be {rule}, got {value}")
    if pixel_gradient == "batch" and (normalization == "per_query" or hard_negatives == "topk"):
        raise ValueError(f'{_KEY}PIXEL_GRADIENT "batch" needs {_KEY}NORMALIZATION "mean" or '
                         f'"mean_all" and {_KEY}HARD_NEGATIVES other than "topk", got '
                         f"{normalization!r} and {hard_negatives!r}")
    if reference == "own_instance" and queries != "matched":
        raise ValueError(f'{_KEY}REFERENCE "own_instance" needs {_KEY}QUERIES "matched" (an '
                         f"unmatched query has no instance of its own), got {queries!r}")


def _check_dot_product_options(pixel_gradient, hard_negatives, reference):
    """ValueError naming the first option that needs the logit to be e . f."""
    for key, value, linear_only in (
        ("PIXEL_GRADIENT", pixel_gradient, "batch"),
        ("HARD_NEGATIVES", hard_negatives, "topk"),
        ("REFERENCE", reference, "own_instance"),
    ):
        if value == linear_only:
            raise ValueError(f"{_KEY}{key} {value!r} needs a base segmenter whose mask logit "
                             f"is the dot product e . f; this one's is not (its adapter's "
                             f"linear_response is False)")


class CrossImageLoss(nn.Module):
    """Eq. 5 over a batch: the queries against the other images' sampled pixels + memory."""

    def __init__(
        self, *, weight: float, pixels_per_image: int, alpha: float, gamma: float,
        chunk_pixels: int, stride: int, stuff_classes: Sequence[int] = (),
        queries: str = "all", loss: str = "focal", temperature: float = 1.0,
        hard_negatives: str = "none", hard_threshold: float = 0.8, topk: int = 1,
        normalization: str = "mean", pixel_gradient: str = "none", reference: str = "none",
        response: Optional[Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = None,
        response_width: int = 1, memory_pixels: int = 0, embed_dim: int = 0,
    ):
        """See the module docstring for the options; a bad one raises ValueError naming
        its MODEL.INST_UNIQUE.CROSS_IMAGE key. ``response``: the logits (R, N) of queries
        (R, D) on pixel embeddings (N, C); None: the dot product (D == C);
        ``response_width``: its values per (query, pixel) pair (sizes the automatic chunk).
        ``memory_pixels``: capacity of the pixel memory of C = ``embed_dim`` channels that
        this module owns, reads and fills (0: none)."""
        super().__init__()
        _check_options(alpha=alpha, gamma=gamma, queries=queries, loss=loss,
                       temperature=temperature, hard_negatives=hard_negatives,
                       hard_threshold=hard_threshold, topk=topk, normalization=normalization,
                       pixel_gradient=pixel_gradient, reference=reference)
        if response is not None:
            _check_dot_product_options(pixel_gradient, hard_negatives, reference)
        self.response = response
        self.response_width = response_width
        if memory_pixels < 0:
            raise ValueError(f"{_KEY}MEMORY_PIXELS must be >= 0, got {memory_pixels}")
        self.memory = PixelMemory(memory_pixels, embed_dim) if memory_pixels > 0 else None
        self.pixel_gradient = pixel_gradient
        self.reference = reference
        self.weight = weight
        self.pixels_per_image = pixels_per_image
        self.alpha = alpha
        self.gamma = gamma
        self.chunk_pixels = chunk_pixels
        self.stride = stride
        self.stuff_classes = tuple(stuff_classes)
        self.queries = queries
        self.options = dict(loss=loss, temperature=temperature, hard_negatives=hard_negatives,
                            hard_threshold=hard_threshold, topk=topk,
                            normalization=normalization)

    def query_stuff_classes(self, targets: List[dict], matching: Matching, shape) -> torch.Tensor:
        """(B, Q): the stuff class each query is matched to, -1 for thing/unmatched queries."""
        out = torch.full(shape, -1, dtype=torch.long, device=targets[0]["labels"].device)
        if not self.stuff_classes:
            return out
        stuff = torch.tensor(self.stuff_classes, device=out.device)
        for b, (src, tgt) in enumerate(matching):
            cls = targets[b]["labels"][tgt]
            is_stuff = torch.isin(cls, stuff)
            out[b, src[is_stuff]] = cls[is_stuff]
        return out

    @staticmethod
    def matched_queries(matching: Matching, shape, device) -> torch.Tensor:
        """(B, Q) bool: the queries the base matcher assigned to a target."""
        out = torch.zeros(shape, dtype=torch.bool, device=device)
        for b, (src, _) in enumerate(matching):
            out[b, src.to(device)] = True
        return out

    def own_instance_embeddings(self, pixel_embeds: torch.Tensor, targets: List[dict],
                                matching: Matching, num_queries: int) -> torch.Tensor:
        """(B, Q, C): per matched query, the mean of its image's (detached) pixel embeddings
        over its target mask, each cell weighted by the share of it the mask covers (so an
        instance smaller than a cell still has one); zeros for unmatched queries."""
        f = pixel_embeds.detach()
        b, c, h, w = f.shape
        out = f.new_zeros(b, num_queries, c)
        for k, (src, tgt) in enumerate(matching):
            if len(tgt) == 0:
                continue
            masks = targets[k]["masks"][tgt.to(targets[k]["masks"].device)].to(f.dtype)
            cover = F.avg_pool2d(masks[:, None], self.stride)[:, 0, :h, :w].flatten(1)
            weights = cover / cover.sum(1, keepdim=True).clamp(min=1e-12)
            out[k, src.to(f.device)] = weights @ f[k].flatten(1).t()
        return out

    def forward(
        self, outputs: SegmenterOutputs, targets: List[dict], matching: Matching,
        valid_hw: List[Tuple[int, int]], image_ids: torch.Tensor,
    ):
        """The weighted loss, and the pixels sampled from the batch, which then join the
        memory (in training).

        Args:
            outputs: (B images) pixel_embeds (B, C, H_f, W_f), query_embeds (B, Q, D).
            targets, matching: the B images' targets and final-layer matching.
            valid_hw: per image, the unpadded size of its pixel-embedding grid.
            image_ids: (B,) dataset image id of every image (both views share one).
        Returns:
            the loss and the sampled (feats (B*S, C), labels (B*S,), image_ids (B*S,)).
        """
        memory = self.memory
        f = outputs.pixel_embeds
        b, q, d = outputs.query_embeds.shape
        c = f.shape[1]
        labels = semantic_label_maps(targets, self.stride, f.shape[-2:])
        batch_grad = self.pixel_gradient == "batch"
        feats, pix_cls = sample_pixels(f if batch_grad else f.detach(), labels, valid_hw,
                                       self.pixels_per_image)
        feats, pix_cls = feats.reshape(-1, c), pix_cls.reshape(-1)
        pix_ids = image_ids.repeat_interleave(self.pixels_per_image)
        external = (feats, pix_cls, pix_ids)
        if memory is not None and len(memory) > 0:
            mem_feats, mem_cls, mem_ids = memory.contents()
            external = tuple(torch.cat(p) for p in zip(external, (mem_feats, mem_cls, mem_ids)))
        query_embeds = outputs.query_embeds.reshape(b * q, d)
        query_ids = image_ids.repeat_interleave(q)
        query_cls = self.query_stuff_classes(targets, matching, (b, q)).reshape(-1)
        if self.reference == "own_instance":
            # z - z_own = [e, -e . r] . [f, 1]: one more channel, the same kernel.
            own = self.own_instance_embeddings(f, targets, matching, q).reshape(b * q, c)
            query_embeds = torch.cat([query_embeds, -(query_embeds * own).sum(1, True)], 1)
            external = (torch.cat([external[0], external[0].new_ones(len(external[0]), 1)], 1),
                        *external[1:])
        if self.queries == "matched":
            # Indexing keeps the graph: unmatched queries get exactly zero gradient.
            rows = self.matched_queries(matching, (b, q), query_embeds.device).reshape(-1)
            query_embeds, query_ids, query_cls = (
                query_embeds[rows], query_ids[rows], query_cls[rows]
            )
        num_masks = 1.0
        if self.options["normalization"] == "per_query":
            num_masks = average_num_masks(targets, f.device)
        loss = external_focal_loss(
            query_embeds, external[0], query_ids, external[2], query_cls, external[1],
            self.alpha, self.gamma, self.chunk_pixels, num_masks=num_masks,
            grad_rows=feats.shape[0] if batch_grad else 0, response=self.response,
            response_width=self.response_width,
            **self.options,
        )
        sampled = (feats.detach(), pix_cls, pix_ids)
        if memory is not None and self.training:
            memory.enqueue(*sampled)
        return loss * self.weight, sampled
