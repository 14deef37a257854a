"""The streaming kernel of Eq. 5: every (query, external pixel) pair scored in pixel chunks,
its loss and gradient in closed form, so the (queries x pixels) logit matrix never exists.

What the options mean is in :mod:`.cross_image` (the module that builds them from the
config); this module only computes.
"""
import math
from dataclasses import dataclass
from typing import Callable, Optional, Tuple

import torch
import torch.nn.functional as F

__all__ = ["HARD_NEGATIVES", "KernelOptions", "LOSSES", "NORMALIZATIONS", "external_focal_loss"]

LOSSES = ("focal", "probability")
HARD_NEGATIVES = ("none", "threshold", "topk")
NORMALIZATIONS = ("mean", "mean_all", "per_query")


@dataclass(frozen=True)
class KernelOptions:
    """How ``external_focal_loss`` scores and averages the (query, external pixel) pairs."""

    alpha: float  # focal alpha in [0, 1]: weight of target 1, 1 - alpha of target 0
    gamma: float
    loss: str  # one of LOSSES
    temperature: float
    hard_negatives: str  # one of HARD_NEGATIVES
    hard_threshold: float
    topk: int
    normalization: str  # one of NORMALIZATIONS
    num_masks: float
    chunk: int
    grad_rows: int  # pixels [0, grad_rows) get a gradient (PIXEL_GRADIENT "batch")
    # The logits of R queries on n pixels, (R, D), (n, C) -> (R, n); None: the dot product.
    response: Optional[Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = None


def _pair_terms(h: torch.Tensor, target: Optional[torch.Tensor], keep: Optional[torch.Tensor],
                opts: KernelOptions) -> Tuple[torch.Tensor, torch.Tensor]:
    """Per-query summed loss of hardness logits h (R, n) over the pairs ``keep`` (bool,
    None: all) and its derivative dL/dz (R, n) with respect to the raw logits z. h may be
    overwritten.

    Closed form, so no autograd graph is kept per chunk. With x = h / T and p = sigmoid(x):
    focal: L = a p^gamma softplus(x), dL/dx = a p^gamma (gamma (1 - p) softplus(x) + p),
    with a = 1 - alpha for target 0 and alpha for target 1; probability: L = p,
    dL/dx = p (1 - p). dL/dz = dL/dx / T, negated where the target is 1 (h = -z there).
    The common case (target 0, T = 1) runs in place: this elementwise work, not the matmul,
    is most of Eq. 5's cost on the CPU.
    """
    x = h if opts.temperature == 1 else h.div_(opts.temperature)
    if opts.loss == "focal":
        ce = F.softplus(x)
        p = x.sigmoid_()
        gamma = opts.gamma
        weight = p.square() if gamma == 2 else p.pow(gamma)  # p^gamma
        dx = torch.addcmul(p, torch.rsub(p, 1), ce, value=gamma).mul_(weight)
        loss = weight.mul_(ce)
        if target is None:
            loss.mul_(1 - opts.alpha)
            dx.mul_(1 - opts.alpha)
        else:
            a_t = torch.full_like(loss, 1 - opts.alpha).masked_fill_(target, opts.alpha)
            loss.mul_(a_t)
            dx.mul_(a_t)
    else:
        loss = x.sigmoid_()
        dx = loss * torch.rsub(loss, 1)
    if keep is not None:
        loss.mul_(keep)
        dx.mul_(keep)
    if opts.temperature != 1:
        dx.div_(opts.temperature)
    if target is not None:
        dx = torch.where(target, -dx, dx)
    return loss.sum(1), dx


class _ExternalLoss(torch.autograd.Function):
    """Eq. 5 over every (query, external pixel) pair, computed in pixel chunks.

    The (R, N) logit matrix never exists whole: each chunk's gradient w.r.t. the queries
    is accumulated during the forward pass, so memory is O(R * chunk) whatever N is.
    Per query, the summed loss and the number of kept pairs are accumulated, so both
    normalisations are exact after the last chunk.

    With ``opts.grad_rows`` > 0 the first ``grad_rows`` pixels get their gradient the same
    way (only with the "mean" and "mean_all" normalisations, whose divisor is one scalar).

    With ``opts.response`` (a logit that is not q . f, e.g. CondInst's dynamic mask head)
    each chunk's logits are computed under autograd and their vector-Jacobian product with
    dL/dz is taken at once, so the graph of one chunk lives at a time.

    Top-k hard negatives stream too: a running top-k of hardness logits (R, k) and their
    pixel indices is merged with each chunk (topk of the concatenation), so memory is
    O(R * (k + chunk)); the loss and its gradient are computed on the survivors at the
    end, gathering their pixel embeddings in blocks of queries.
    """

    @staticmethod
    def forward(ctx, queries, pixels, query_ids, pixel_ids, query_cls, pixel_cls, opts):
        # At least float32, whatever the inputs or an enclosing autocast: the focal loss of
        # a well-trained query is tiny on most pairs and its gradient underflows in half
        # precision (bfloat16 logits alone shift the loss by ~1e-3 relative).
        dtype = torch.promote_types(queries.dtype, torch.float32)
        q = queries.detach().to(dtype)
        r = q.shape[0]
        row_loss = q.new_zeros(r)
        row_count = q.new_zeros(r)
        row_scored = q.new_zeros(r)  # external pairs scored, kept or not ("mean_all")
        grad = torch.zeros_like(q)
        need_grad = ctx.needs_input_grad[0]
        rows = opts.grad_rows if ctx.needs_input_grad[1] else 0
        grad_pixels = q.new_zeros(rows, q.shape[1])
        own_ids = query_ids.unique()
        stuff = query_cls >= 0
        any_stuff = bool(stuff.any())
        # sigmoid(h / T) >= thr  <=>  h >= T * logit(thr): one comparison on the logits.
        cut = None
        if opts.hard_negatives == "threshold":
            cut = opts.temperature * math.log(opts.hard_threshold / (1 - opts.hard_threshold))
        top = None  # running (hardness (R, k'), pixel index (R, k')) of "topk"
        with torch.autocast(device_type=q.device.type, enabled=False):
            for start in range(0, pixels.shape[0], opts.chunk):
                f = pixels[start : start + opts.chunk].to(dtype)
                ids = pixel_ids[start : start + opts.chunk]
                if opts.response is None:
                    h = q @ f.t()
                else:
                    with torch.enable_grad():
                        q_leaf = q.detach().requires_grad_(need_grad)
                        z = opts.response(q_leaf, f).to(dtype)
                    h = z.detach().clone()
                target = None
                if any_stuff:
                    cls = pixel_cls[start : start + opts.chunk]
                    target = (query_cls[:, None] == cls[None]) & stuff[:, None]
                    h = torch.where(target, -h, h)
                # An image's own pixels (its other view, its past entries) are not external;
                # most chunks (the memory) hold none, and skip the mask.
                keep = None
                if torch.isin(ids, own_ids).any():
                    keep = query_ids[:, None] != ids[None]
                row_scored += f.shape[0] if keep is None else keep.sum(1)
                if opts.hard_negatives == "topk":
                    if keep is not None:
                        h.masked_fill_(~keep, -math.inf)
                    index = torch.arange(start, start + f.shape[0], device=h.device)
                    index = index.expand(r, -1)
                    if top is not None:
                        h, index = torch.cat([top[0], h], 1), torch.cat([top[1], index], 1)
                    values, pos = h.topk(min(opts.topk, h.shape[1]), dim=1)
                    top = (values, index.gather(1, pos))
                    continue
                if cut is not None:
                    keep = h >= cut if keep is None else keep & (h >= cut)
                loss, dz = _pair_terms(h, target, keep, opts)
                row_loss += loss
                row_count += f.shape[0] if keep is None else keep.sum(1)
                if need_grad and opts.response is None:
                    grad.addmm_(dz, f)
                elif need_grad:
                    grad += torch.autograd.grad(z, q_leaf, dz)[0]
                if start < rows:
                    end = min(start + f.shape[0], rows)
                    grad_pixels[start:end].addmm_(dz[:, : end - start].t(), q)
            if top is not None:
                _topk_terms(top, q, pixels, query_cls, pixel_cls, stuff, any_stuff, opts,
                            row_loss, row_count, grad if need_grad else None)
        if opts.normalization in ("mean", "mean_all"):
            count = (row_count if opts.normalization == "mean" else row_scored).sum()
            count = count.clamp(min=1.0)
            total = row_loss.sum() / count
            grad /= count
            grad_pixels /= count
        else:
            per_query = row_count.clamp(min=1.0)
            total = (row_loss / per_query).sum() / opts.num_masks
            grad /= per_query[:, None] * opts.num_masks
        ctx.save_for_backward(grad, grad_pixels)
        ctx.dtypes = (queries.dtype, pixels.dtype)
        ctx.num_pixels = pixels.shape[0]
        return total

    @staticmethod
    def backward(ctx, grad_out):
        grad, grad_pixels = ctx.saved_tensors
        pixels = None
        if ctx.needs_input_grad[1]:
            pixels = grad_pixels.new_zeros(ctx.num_pixels, grad_pixels.shape[1])
            pixels[: grad_pixels.shape[0]] = grad_pixels * grad_out
            pixels = pixels.to(ctx.dtypes[1])
        return (grad * grad_out).to(ctx.dtypes[0]), pixels, *([None] * 5)


def _topk_terms(top, q, pixels, query_cls, pixel_cls, stuff, any_stuff, opts, row_loss,
                row_count, grad):
    """Loss, kept-pair counts and gradient of the running top-k (see _ExternalLoss)."""
    values, index = top  # (R, k'): -inf marks a pixel of the query's own image
    keep = torch.isfinite(values)
    target = None
    if any_stuff:
        target = (query_cls[:, None] == pixel_cls[index]) & stuff[:, None]
    loss, dz = _pair_terms(values.masked_fill(~keep, 0.0), target, keep, opts)
    row_loss += loss
    row_count += keep.sum(1)
    if grad is None:
        return
    # sum_k dz[r, k] f[index[r, k]] in blocks of queries: the gathered (rows, k', C)
    # embeddings stay about as large as one chunk of logits.
    k, c = index.shape[1], pixels.shape[1]
    rows = max(1, (q.shape[0] * opts.chunk) // max(k * c, 1))
    for s in range(0, q.shape[0], rows):
        f = pixels[index[s : s + rows]].to(q.dtype)  # (rows, k', C)
        grad[s : s + rows] += torch.einsum("rk,rkc->rc", dz[s : s + rows], f)


def external_focal_loss(
    queries: torch.Tensor, pixels: torch.Tensor, query_ids: torch.Tensor,
    pixel_ids: torch.Tensor, query_cls: torch.Tensor, pixel_cls: torch.Tensor,
    alpha: float = 0.25, gamma: float = 2.0, chunk: int = 0, *, loss: str = "focal",
    temperature: float = 1.0, hard_negatives: str = "none", hard_threshold: float = 0.8,
    topk: int = 1, normalization: str = "mean", num_masks: float = 1.0, grad_rows: int = 0,
    response: Optional[Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = None,
    response_width: int = 1,
) -> torch.Tensor:
    """
    Args:
        queries: (R, C) query mask embeddings; gradients flow into them.
        pixels: (N, C) external pixel embeddings; a gradient reaches the first
            ``grad_rows`` of them (0: none; needs "mean" and no "topk").
        query_ids, pixel_ids: (R,), (N,) image ids; pairs from the same image are skipped.
        query_cls: (R,) stuff class a query is matched to, -1 for none (target 0 everywhere).
        pixel_cls: (N,) ground-truth class of each pixel (-1: none).
        alpha, gamma: focal loss parameters (alpha in [0, 1]).
        chunk: external pixels scored at once; 0 picks it from the device (_auto_chunk).
        loss, temperature, hard_negatives, hard_threshold, topk, normalization: see
            :mod:`.cross_image`; ``hard_threshold`` is read with "threshold", ``topk`` with
            "topk".
        num_masks: divisor of the "per_query" normalisation (number of target masks).
        response: the logits of queries (R', D) on pixels (n, C) as (R', n), differentiable
            in the queries; None: queries @ pixels.T (D == C). Another response leaves out
            the pixel gradient and "topk", which are written for the dot product.
        response_width: values the response holds per (query, pixel) pair under autograd
            (CondInst: its dynamic head's hidden channels); the automatic chunk divides its
            budget by it, so one chunk's activations, not only its logits, fit the cache.
    Returns:
        scalar: the normalised loss over the kept (query, pixel) pairs.
    """
    _check_shapes(queries, pixels, query_ids, pixel_ids, query_cls, pixel_cls, response is None)
    if response is not None and (grad_rows or hard_negatives == "topk"):
        raise ValueError("external_focal_loss: a response other than the dot product "
                         "supports neither a pixel gradient (grad_rows > 0) nor hard "
                         "negatives 'topk'")
    _check_choice("loss", loss, LOSSES)
    _check_choice("hard_negatives", hard_negatives, HARD_NEGATIVES)
    _check_choice("normalization", normalization, NORMALIZATIONS)
    if grad_rows and (normalization == "per_query" or hard_negatives == "topk"):
        raise ValueError("external_focal_loss: a pixel gradient (grad_rows > 0) needs "
                         "normalization 'mean' or 'mean_all' and hard negatives other than "
                         "'topk'")
    if pixels.shape[0] == 0 or queries.shape[0] == 0:
        return queries.sum() * 0.0 + pixels.sum() * 0.0
    opts = KernelOptions(
        float(alpha), float(gamma), loss, float(temperature), hard_negatives,
        float(hard_threshold), int(topk), normalization, float(max(num_masks, 1.0)),
        int(chunk) if chunk > 0
        else _auto_chunk(queries.shape[0] * max(int(response_width), 1), queries.device),
        min(int(grad_rows), pixels.shape[0]), response,
    )
    return _ExternalLoss.apply(queries, pixels if grad_rows else pixels.detach(), query_ids,
                               pixel_ids, query_cls, pixel_cls, opts)


def _check_choice(name, value, choices):
    if value not in choices:
        raise ValueError(f"external_focal_loss: {name} must be one of {choices}, got {value!r}")


def _auto_chunk(values_per_pixel: int, device: torch.device) -> int:
    """Pixels per chunk, for ``values_per_pixel`` (queries x response width) values per
    pixel: on the CPU a chunk's buffers stay in L2 cache (1 MiB of fp32: 2x faster than
    16k-pixel chunks for 160 dot-product queries; CondInst's head at width 8: 1.7x for
    48 queries, the shapes config's, 1.2-1.4x for 150-300);
    on a GPU, chunks large enough that kernel launches do not matter (64 MiB)."""
    elements = 2**24 if device.type == "cuda" else 2**18
    return max(elements // max(values_per_pixel, 1), 1)


def _check_shapes(queries, pixels, query_ids, pixel_ids, query_cls, pixel_cls, dot: bool):
    if queries.dim() != 2 or pixels.dim() != 2 or (dot and queries.shape[1] != pixels.shape[1]):
        same = " with the same C" if dot else ""
        raise ValueError(
            f"external_focal_loss: queries must be (R, C) and pixels (N, C){same}, "
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
