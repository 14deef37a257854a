"""Cross-image (inter-image) querying, paper Eq. 5.

A query of image b must fire on its own instance and on nothing in other images: its mask
embedding e_bq is scored against external pixel embeddings f (other images of the batch
and the memory) with logit z = e_bq . f and a sigmoid focal loss towards 0. Only the query
side learns: f is detached. Panoptic stuff (supp. S1): a query matched to a stuff segment
of class c has target 1 on external pixels labelled c.
"""
from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from ..adapter import Matching, SegmenterOutputs
from .memory import PixelMemory
from .sampling import sample_pixels, semantic_label_maps


def _focal_sum_and_grad(z: torch.Tensor, target: Optional[torch.Tensor],
                        keep: Optional[torch.Tensor], alpha: float,
                        gamma: float) -> Tuple[torch.Tensor, torch.Tensor]:
    """Summed sigmoid focal loss of logits z (R, n) over the pairs ``keep`` (0/1, None: all)
    and its derivative dL/dz (R, n). z may be overwritten.

    Closed form, so no autograd graph is kept per chunk. With p = sigmoid(z), ce the
    binary cross-entropy, m = 1 - p_t the modulating base and a_t the alpha weight:
    L = a_t m^gamma ce and dL/dz = a_t (gamma m^(gamma-1) dm/dz ce + m^gamma (p - t)),
    where dm/dz = p (1 - p) (1 - 2t). ``target=None`` means all zeros (thing queries), the
    common case, where L = (1 - alpha) p^gamma softplus(z) and
    dL/dz = (1 - alpha) p^gamma (gamma (1 - p) softplus(z) + p): it runs in place, because
    this elementwise work, not the matmul, is most of Eq. 5's cost on the CPU. alpha < 0
    disables the alpha weight (a_t = 1), as in torchvision's sigmoid_focal_loss.
    """
    ce = F.softplus(z)
    if target is None:
        p = z.sigmoid_()
        a_t = (1 - alpha) if alpha >= 0 else 1.0
        weight = (p.square() if gamma == 2 else p.pow(gamma)).mul_(a_t)  # a_t p^gamma
        if keep is not None:
            ce.mul_(keep)
        total = torch.dot(weight.view(-1), ce.view(-1))
        dz = torch.addcmul(p, torch.rsub(p, 1), ce, value=gamma).mul_(weight)
        if keep is not None:
            dz.mul_(keep)
        return total, dz
    p = torch.sigmoid(z)
    ce.sub_(target * z)
    m = p + target * (1 - 2 * p)
    a_t = (1 - alpha) + target * (2 * alpha - 1) if alpha >= 0 else 1.0
    m_gamma = m.pow(gamma)
    # gamma * m^(gamma - 1) * dm/dz, written so that m = 0 gives 0 for any gamma > 0.
    dm_term = gamma * m_gamma * (1 - 2 * target) * torch.where(m > 0, p * (1 - p) / m, 0.0)
    loss, dz = a_t * m_gamma * ce, a_t * (dm_term * ce + m_gamma * (p - target))
    if keep is not None:
        loss, dz = loss * keep, dz * keep
    return loss.sum(), dz


class _ExternalFocal(torch.autograd.Function):
    """Mean focal loss of every (query, external pixel) pair, computed in pixel chunks.

    The (R, N) logit matrix never exists whole: each chunk's gradient w.r.t. the queries
    is accumulated during the forward pass, so memory is O(R * chunk) whatever N is.
    """

    @staticmethod
    def forward(ctx, queries, pixels, query_ids, pixel_ids, query_cls, pixel_cls, alpha, gamma,
                chunk):
        # At least float32, whatever the inputs or an enclosing autocast: the focal loss of
        # a well-trained query is tiny on most pairs and its gradient underflows in half
        # precision (bfloat16 logits alone shift the loss by ~1e-3 relative).
        dtype = torch.promote_types(queries.dtype, torch.float32)
        q = queries.detach().to(dtype)
        total = q.new_zeros(())
        grad = torch.zeros_like(q)
        count = q.new_zeros(())
        own_ids = query_ids.unique()
        stuff = query_cls >= 0
        with torch.autocast(device_type=q.device.type, enabled=False):
            for start in range(0, pixels.shape[0], chunk):
                f = pixels[start : start + chunk].to(dtype)
                ids = pixel_ids[start : start + chunk]
                target = None
                if stuff.any():
                    cls = pixel_cls[start : start + chunk]
                    target = ((query_cls[:, None] == cls[None]) & stuff[:, None]).to(dtype)
                # An image's own pixels (its other view, its past entries) are not external;
                # most chunks (the memory) hold none, and skip the mask.
                keep = None
                if torch.isin(ids, own_ids).any():
                    keep = (query_ids[:, None] != ids[None]).to(dtype)
                loss, dz = _focal_sum_and_grad(q @ f.t(), target, keep, alpha, gamma)
                total += loss
                if ctx.needs_input_grad[0]:
                    grad.addmm_(dz, f)
                count += q.shape[0] * f.shape[0] if keep is None else keep.sum()
        count = count.clamp(min=1.0)
        ctx.save_for_backward(grad / count)
        ctx.query_dtype = queries.dtype
        return total / count

    @staticmethod
    def backward(ctx, grad_out):
        (grad,) = ctx.saved_tensors
        return (grad * grad_out).to(ctx.query_dtype), *([None] * 8)


def external_focal_loss(
    queries: torch.Tensor, pixels: torch.Tensor, query_ids: torch.Tensor,
    pixel_ids: torch.Tensor, query_cls: torch.Tensor, pixel_cls: torch.Tensor,
    alpha: float = 0.25, gamma: float = 2.0, chunk: int = 0,
) -> torch.Tensor:
    """
    Args:
        queries: (R, C) query mask embeddings; gradients flow into them.
        pixels: (N, C) external pixel embeddings; no gradient reaches them.
        query_ids, pixel_ids: (R,), (N,) image ids; pairs from the same image are skipped.
        query_cls: (R,) stuff class a query is matched to, -1 for none (target 0 everywhere).
        pixel_cls: (N,) ground-truth class of each pixel (-1: none).
        chunk: external pixels scored at once; 0 picks it from the device (_auto_chunk).
    Returns:
        scalar: mean sigmoid focal loss over the kept (query, pixel) pairs.
    """
    _check_shapes(queries, pixels, query_ids, pixel_ids, query_cls, pixel_cls)
    if pixels.shape[0] == 0 or queries.shape[0] == 0:
        return queries.sum() * 0.0
    return _ExternalFocal.apply(
        queries, pixels.detach(), query_ids, pixel_ids, query_cls, pixel_cls, alpha, gamma,
        int(chunk) if chunk > 0 else _auto_chunk(queries.shape[0], queries.device),
    )


def _auto_chunk(num_queries: int, device: torch.device) -> int:
    """Pixels per chunk: on the CPU the (queries x chunk) buffers of the focal kernel stay
    in L2 cache (1 MiB of fp32 logits: 2x faster than 16k-pixel chunks for 160 queries);
    on a GPU, chunks large enough that kernel launches do not matter (64 MiB of logits)."""
    elements = 2**24 if device.type == "cuda" else 2**18
    return max(elements // max(num_queries, 1), 1)


def _check_shapes(queries, pixels, query_ids, pixel_ids, query_cls, pixel_cls):
    if queries.dim() != 2 or pixels.dim() != 2 or queries.shape[1] != pixels.shape[1]:
        raise ValueError(
            f"external_focal_loss: queries must be (R, C) and pixels (N, C) with the same C, "
            f"got queries {tuple(queries.shape)} and pixels {tuple(pixels.shape)}"
        )
    for name, t, n in (
        ("query_ids", query_ids, queries.shape[0]),
        ("query_cls", query_cls, queries.shape[0]),
        ("pixel_ids", pixel_ids, pixels.shape[0]),
        ("pixel_cls", pixel_cls, pixels.shape[0]),
    ):
        if tuple(t.shape) != (n,):
            raise ValueError(
                f"external_focal_loss: {name} must have shape ({n},), got {tuple(t.shape)}"
            )


class CrossImageLoss(nn.Module):
    """Eq. 5 over a batch: every query against the other images' sampled pixels + memory."""

    def __init__(
        self, *, weight: float, pixels_per_image: int, alpha: float, gamma: float,
        chunk_pixels: int, stride: int, stuff_classes: Sequence[int] = (),
    ):
        super().__init__()
        self.weight = weight
        self.pixels_per_image = pixels_per_image
        self.alpha = alpha
        self.gamma = gamma
        self.chunk_pixels = chunk_pixels
        self.stride = stride
        self.stuff_classes = tuple(stuff_classes)

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

    def forward(
        self, outputs: SegmenterOutputs, targets: List[dict], matching: Matching,
        valid_hw: List[Tuple[int, int]], image_ids: torch.Tensor,
        memory: Optional[PixelMemory],
    ):
        """
        Args:
            valid_hw: per image, the unpadded size of its pixel-embedding grid.
            image_ids: (B,) dataset image id of every image (both views share one).
        Returns:
            the weighted loss and the sampled (feats (B*S, C), labels, image_ids) to enqueue.
        """
        f = outputs.pixel_embeds
        b, q, c = outputs.query_embeds.shape
        labels = semantic_label_maps(targets, self.stride, f.shape[-2:])
        feats, pix_cls = sample_pixels(f.detach(), labels, valid_hw, self.pixels_per_image)
        feats, pix_cls = feats.reshape(-1, c), pix_cls.reshape(-1)
        pix_ids = image_ids.repeat_interleave(self.pixels_per_image)
        external = (feats, pix_cls, pix_ids)
        if memory is not None and len(memory) > 0:
            mem_feats, mem_cls, mem_ids = memory.contents()
            external = tuple(torch.cat(p) for p in zip(external, (mem_feats, mem_cls, mem_ids)))
        loss = external_focal_loss(
            outputs.query_embeds.reshape(b * q, c),
            external[0],
            image_ids.repeat_interleave(q),
            external[2],
            self.query_stuff_classes(targets, matching, (b, q)).reshape(-1),
            external[1],
            self.alpha,
            self.gamma,
            self.chunk_pixels,
        )
        return loss * self.weight, (feats, pix_cls, pix_ids)
