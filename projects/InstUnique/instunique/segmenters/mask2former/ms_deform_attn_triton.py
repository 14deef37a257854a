"""Multi-scale deformable attention sampling as Triton kernels (forward and backward).

The same function as :func:`.ms_deform_attn.ms_deform_attn_sample`, without its per-level
``grid_sample`` intermediates: one program per (image, query, head) reads its L x P points
(4 bilinear corners each) straight from the flattened values and sums them with their
weights. The backward program recomputes the corners and returns the gradients of the
values (atomic adds), the sampling locations and the attention weights. Arithmetic is
float32 (float64 for float64 values, so that gradcheck applies); outputs take the values'
dtype.

Triton compiles for CUDA; with ``TRITON_INTERPRET=1`` set before this module is imported,
the same kernels run on the CPU through Triton's interpreter (the tests do so).
"""
from typing import List, Tuple

import torch
import triton
import triton.language as tl

__all__ = ["ms_deform_attn_sample_triton"]


@triton.jit
def _corner(value_ptr, row, col, h, w, start, stride_s, d, d_mask, ACC: tl.constexpr):
    """The (BLOCK_D,) values of level pixel (row, col), zeros outside the map; and its
    offset in the flattened positions and whether it is inside."""
    inside = (row >= 0) & (row < h) & (col >= 0) & (col < w)
    pos = start + tl.where(inside, row * w + col, 0)
    v = tl.load(value_ptr + pos * stride_s + d, mask=d_mask & inside, other=0.0)
    return v.to(ACC), pos, inside


@triton.jit
def _point(base, loc_ptr, attn_ptr, k, h, w, start, stride_s, d, d_mask, ACC: tl.constexpr):
    """Point k: its weight, its bilinear fractions (fx, fy) and its four corners (values,
    flattened offsets, inside flags), corners ordered (y0, x0), (y0, x0 + 1), (y0 + 1, x0),
    (y0 + 1, x0 + 1). x = loc_x * W - 0.5 puts pixel centres at integers (grid_sample's
    align_corners=False)."""
    x = tl.load(loc_ptr + 2 * k).to(ACC) * w - 0.5
    y = tl.load(loc_ptr + 2 * k + 1).to(ACC) * h - 0.5
    a = tl.load(attn_ptr + k).to(ACC)
    x0f = tl.floor(x)
    y0f = tl.floor(y)
    x0 = x0f.to(tl.int32)
    y0 = y0f.to(tl.int32)
    v00, p00, in00 = _corner(base, y0, x0, h, w, start, stride_s, d, d_mask, ACC)
    v01, p01, in01 = _corner(base, y0, x0 + 1, h, w, start, stride_s, d, d_mask, ACC)
    v10, p10, in10 = _corner(base, y0 + 1, x0, h, w, start, stride_s, d, d_mask, ACC)
    v11, p11, in11 = _corner(base, y0 + 1, x0 + 1, h, w, start, stride_s, d, d_mask, ACC)
    return (a, x - x0f, y - y0f, v00, v01, v10, v11, p00, p01, p10, p11,
            in00, in01, in10, in11)


@triton.jit
def _forward_kernel(value_ptr, shapes_ptr, starts_ptr, loc_ptr, attn_ptr, out_ptr,
                    Q, S, NH, DH, L: tl.constexpr, P: tl.constexpr, BLOCK_D: tl.constexpr,
                    ACC: tl.constexpr):
    pid = tl.program_id(0)  # (b * Q + q) * NH + head
    head = pid % NH
    b = pid // (NH * Q)
    d = tl.arange(0, BLOCK_D)
    d_mask = d < DH
    stride_s = NH * DH
    base = value_ptr + b * S * stride_s + head * DH
    acc = tl.zeros((BLOCK_D,), dtype=ACC)
    for lvl in tl.static_range(L):
        h = tl.load(shapes_ptr + 2 * lvl)
        w = tl.load(shapes_ptr + 2 * lvl + 1)
        start = tl.load(starts_ptr + lvl)
        for pt in tl.static_range(P):
            k = (pid * L + lvl) * P + pt
            a, fx, fy, v00, v01, v10, v11, _p00, _p01, _p10, _p11, _i00, _i01, _i10, _i11 = _point(
                base, loc_ptr, attn_ptr, k, h, w, start, stride_s, d, d_mask, ACC)
            sampled = ((1 - fy) * ((1 - fx) * v00 + fx * v01)
                       + fy * ((1 - fx) * v10 + fx * v11))
            acc += a * sampled
    tl.store(out_ptr + pid * DH + d, acc.to(out_ptr.dtype.element_ty), mask=d_mask)


@triton.jit
def _backward_kernel(value_ptr, shapes_ptr, starts_ptr, loc_ptr, attn_ptr, grad_out_ptr,
                     grad_value_ptr, grad_loc_ptr, grad_attn_ptr,
                     Q, S, NH, DH, L: tl.constexpr, P: tl.constexpr, BLOCK_D: tl.constexpr,
                    ACC: tl.constexpr):
    pid = tl.program_id(0)
    head = pid % NH
    b = pid // (NH * Q)
    d = tl.arange(0, BLOCK_D)
    d_mask = d < DH
    stride_s = NH * DH
    offset = b * S * stride_s + head * DH
    base = value_ptr + offset
    grad_base = grad_value_ptr + offset
    g = tl.load(grad_out_ptr + pid * DH + d, mask=d_mask, other=0.0).to(ACC)
    for lvl in tl.static_range(L):
        h = tl.load(shapes_ptr + 2 * lvl)
        w = tl.load(shapes_ptr + 2 * lvl + 1)
        start = tl.load(starts_ptr + lvl)
        for pt in tl.static_range(P):
            k = (pid * L + lvl) * P + pt
            a, fx, fy, v00, v01, v10, v11, p00, p01, p10, p11, in00, in01, in10, in11 = _point(
                base, loc_ptr, attn_ptr, k, h, w, start, stride_s, d, d_mask, ACC)
            sampled = ((1 - fy) * ((1 - fx) * v00 + fx * v01)
                       + fy * ((1 - fx) * v10 + fx * v11))
            tl.store(grad_attn_ptr + k, tl.sum(g * sampled, axis=0))
            ga = g * a
            # d sampled / d fx and / d fy, then through x = loc_x * W - 0.5 (and y).
            dfx = tl.sum(ga * ((1 - fy) * (v01 - v00) + fy * (v11 - v10)), axis=0)
            dfy = tl.sum(ga * ((1 - fx) * (v10 - v00) + fx * (v11 - v01)), axis=0)
            tl.store(grad_loc_ptr + 2 * k, dfx * w)
            tl.store(grad_loc_ptr + 2 * k + 1, dfy * h)
            tl.atomic_add(grad_base + p00 * stride_s + d, ga * (1 - fy) * (1 - fx),
                          mask=d_mask & in00)
            tl.atomic_add(grad_base + p01 * stride_s + d, ga * (1 - fy) * fx,
                          mask=d_mask & in01)
            tl.atomic_add(grad_base + p10 * stride_s + d, ga * fy * (1 - fx),
                          mask=d_mask & in10)
            tl.atomic_add(grad_base + p11 * stride_s + d, ga * fy * fx, mask=d_mask & in11)


def _level_tensors(shapes: List[Tuple[int, int]], device) -> Tuple[torch.Tensor, torch.Tensor]:
    flat = torch.tensor([v for hw in shapes for v in hw], dtype=torch.int32, device=device)
    starts, total = [], 0
    for h, w in shapes:
        starts.append(total)
        total += h * w
    return flat, torch.tensor(starts, dtype=torch.int32, device=device)


def _accumulator(value: torch.Tensor):
    return tl.float64 if value.dtype == torch.float64 else tl.float32


class _SampleFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, value, shapes, locations, weights):
        b, s, n_heads, d_head = value.shape
        q, n_levels, n_points = locations.shape[1], locations.shape[3], locations.shape[4]
        value, locations, weights = (t.contiguous() for t in (value, locations, weights))
        flat, starts = _level_tensors(shapes, value.device)
        out = value.new_empty(b, q, n_heads, d_head)
        block = triton.next_power_of_2(d_head)
        _forward_kernel[(b * q * n_heads,)](
            value, flat, starts, locations, weights, out, q, s, n_heads, d_head,
            L=n_levels, P=n_points, BLOCK_D=block, ACC=_accumulator(value))
        ctx.save_for_backward(value, flat, starts, locations, weights)
        return out.view(b, q, n_heads * d_head)

    @staticmethod
    def backward(ctx, grad_out):
        value, flat, starts, locations, weights = ctx.saved_tensors
        b, s, n_heads, d_head = value.shape
        q, n_levels, n_points = locations.shape[1], locations.shape[3], locations.shape[4]
        dtype = torch.float64 if value.dtype == torch.float64 else torch.float32
        grad_value = torch.zeros(value.shape, dtype=dtype, device=value.device)
        grad_loc = torch.empty(locations.shape, dtype=dtype, device=value.device)
        grad_attn = torch.empty(weights.shape, dtype=dtype, device=value.device)
        _backward_kernel[(b * q * n_heads,)](
            value, flat, starts, locations, weights, grad_out.contiguous(), grad_value,
            grad_loc, grad_attn, q, s, n_heads, d_head,
            L=n_levels, P=n_points, BLOCK_D=triton.next_power_of_2(d_head),
            ACC=_accumulator(value))
        return (grad_value.to(value.dtype), None, grad_loc.to(locations.dtype),
                grad_attn.to(weights.dtype))


def ms_deform_attn_sample_triton(value: torch.Tensor, shapes: List[Tuple[int, int]],
                                 sampling_locations: torch.Tensor,
                                 attention_weights: torch.Tensor) -> torch.Tensor:
    """:func:`.ms_deform_attn.ms_deform_attn_sample` (same arguments, shapes checked
    there) with the Triton kernels; ``shapes`` as Python (H_l, W_l) pairs."""
    return _SampleFunction.apply(value, shapes, sampling_locations, attention_weights)
