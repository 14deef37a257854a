"""Multi-scale deformable attention (Deformable DETR) in plain PyTorch, or Triton on CUDA.

The official Mask2Former imports a compiled CUDA op here and fails without it. This module
needs none: sampling is one ``F.grid_sample`` per feature level, batched over images and heads,
so it runs on any device and under autograd (gradients for values, locations and weights).
On CUDA, our Triton kernels (``ms_deform_attn_triton``) do the same sampling without the
per-level intermediates (``MSDeformAttn.impl``).
"""
import functools
import math
import os
from typing import List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["IMPLS", "check_impl", "ms_deform_attn_sample", "MSDeformAttn"]

IMPLS = ("auto", "pytorch", "triton")
_KEY = "MODEL.SEM_SEG_HEAD.DEFORM_ATTN_IMPL"


@functools.cache
def _triton_error():
    """None when Triton imports, else why not (asked once: "auto" asks at every forward)."""
    try:
        import triton  # noqa: F401
    except ImportError as e:
        return str(e)
    return None


def check_impl(impl: str, device: str = "cuda") -> str:
    """``impl`` if it can run on ``device`` (a MODEL.DEVICE string), else a ValueError that
    names the key."""
    if impl not in IMPLS:
        raise ValueError(f"{_KEY} must be one of {IMPLS}, got {impl!r}")
    if impl == "triton":
        error = _triton_error()
        if error is not None:
            raise ValueError(f"{_KEY} 'triton': Triton does not import ({error})")
        interpreted = os.environ.get("TRITON_INTERPRET") == "1"
        if not str(device).startswith("cuda") and not interpreted:
            raise ValueError(f"{_KEY} 'triton' runs on CUDA (MODEL.DEVICE is {device!r}); on "
                             "the CPU only under TRITON_INTERPRET=1 (slow: for tests)")
    return impl


def _use_triton(impl: str, value: torch.Tensor) -> bool:
    if impl == "auto":
        return value.is_cuda and _triton_error() is None
    return impl == "triton"


ShapesLike = Union[torch.Tensor, Sequence[Sequence[int]]]


def _level_shapes(spatial_shapes: ShapesLike) -> List[Tuple[int, int]]:
    """(L, 2) tensor or pairs -> [(H_l, W_l)] as Python ints (a host copy if on a GPU)."""
    if isinstance(spatial_shapes, torch.Tensor):
        if spatial_shapes.dim() != 2 or spatial_shapes.shape[1] != 2:
            raise ValueError(
                f"spatial_shapes must be (L, 2) (H_l, W_l), got {tuple(spatial_shapes.shape)}"
            )
        spatial_shapes = spatial_shapes.tolist()
    return [(int(h), int(w)) for h, w in spatial_shapes]


def _check_sample_inputs(value, shapes, sampling_locations, attention_weights) -> None:
    """ValueError unless the arguments of ``ms_deform_attn_sample`` fit one another."""
    if value.dim() != 4:
        raise ValueError(f"value must be (B, S, nH, dH), got {tuple(value.shape)}")
    b, s, n_heads, d_head = value.shape
    if sampling_locations.dim() != 6 or sampling_locations.shape[-1] != 2:
        raise ValueError(
            f"sampling_locations must be (B, Q, nH, L, P, 2), got {tuple(sampling_locations.shape)}"
        )
    _, q, _, n_levels, n_points, _ = sampling_locations.shape
    expected = (b, q, n_heads, len(shapes), n_points)
    if tuple(sampling_locations.shape[:-1]) != expected:
        raise ValueError(
            f"sampling_locations {tuple(sampling_locations.shape)} does not match value "
            f"{tuple(value.shape)} and {len(shapes)} levels: expected {expected + (2,)}"
        )
    if tuple(attention_weights.shape) != expected:
        raise ValueError(
            f"attention_weights must be {expected} (B, Q, nH, L, P), "
            f"got {tuple(attention_weights.shape)}"
        )
    if sum(h * w for h, w in shapes) != s:
        raise ValueError(f"value has S={s} positions but spatial_shapes {shapes} sum to another")


def ms_deform_attn_sample(
    value: torch.Tensor,
    spatial_shapes: ShapesLike,
    sampling_locations: torch.Tensor,
    attention_weights: torch.Tensor,
) -> torch.Tensor:
    """Bilinearly sample every head's values at its points and sum them with their weights.

    Args:
        value: (B, S, nH, dH) values of all levels, flattened row-major and concatenated;
            S = sum_l H_l * W_l.
        spatial_shapes: (L, 2) integer (H_l, W_l) of each level, a tensor or Python pairs.
        sampling_locations: (B, Q, nH, L, P, 2) points as (x, y), normalized so that 0 and 1
            are the outer edges of the level's map (pixel i spans [i / W, (i + 1) / W]).
        attention_weights: (B, Q, nH, L, P) weight of every point.

    Returns:
        (B, Q, nH * dH), head-major channels. Points outside a map read zeros, exactly as
        ``grid_sample(align_corners=False, padding_mode="zeros")`` on ``2 * location - 1``.
    """
    shapes = _level_shapes(spatial_shapes)
    _check_sample_inputs(value, shapes, sampling_locations, attention_weights)
    b, s, n_heads, d_head = value.shape
    _, q, _, n_levels, n_points, _ = sampling_locations.shape

    # One layout change for all levels; per-level pieces below are views of these. Points go
    # before queries so the weighted sum runs over an outer axis (measured ~10% faster on the
    # CPU than reducing a trailing axis of P entries, forward + backward).
    # value: (B*nH, dH, S); grids: (B*nH, L, P, Q, 2) in grid_sample's [-1, 1] frame.
    value = value.permute(0, 2, 3, 1).reshape(b * n_heads, d_head, s)
    grids = (
        (2 * sampling_locations - 1)
        .permute(0, 2, 3, 4, 1, 5)
        .reshape(b * n_heads, n_levels, n_points, q, 2)
    )
    weights = attention_weights.permute(0, 2, 3, 4, 1).reshape(b * n_heads, n_levels, n_points, q)

    output = None
    start = 0
    for level, (h, w) in enumerate(shapes):
        value_l = value[:, :, start : start + h * w].unflatten(-1, (h, w))
        start += h * w
        # (B*nH, dH, P, Q)
        sampled = F.grid_sample(
            value_l, grids[:, level], mode="bilinear", padding_mode="zeros", align_corners=False
        )
        contribution = torch.einsum("ndpq,npq->ndq", sampled, weights[:, level])
        output = contribution if output is None else output + contribution
    # (B*nH, dH, Q) -> (B, Q, nH*dH)
    return output.reshape(b, n_heads * d_head, q).transpose(1, 2).contiguous()


class MSDeformAttn(nn.Module):
    """Multi-scale deformable attention with 2D reference points.

    Each query predicts, per head, level and point, an offset from its reference point
    (in pixels of that level) and a weight (softmax over the level x point samples of a head).
    Parameter names and shapes are the official ones.
    """

    def __init__(self, d_model: int = 256, n_levels: int = 4, n_heads: int = 8, n_points: int = 4):
        """
        Args:
            d_model: channels of queries and values; must be divisible by ``n_heads``.
            n_levels: number of feature levels attended.
            n_heads: attention heads.
            n_points: sampled points per head and level.
        """
        super().__init__()
        sizes = {"d_model": d_model, "n_levels": n_levels, "n_heads": n_heads, "n_points": n_points}
        for name, v in sizes.items():
            if v <= 0:
                raise ValueError(f"MSDeformAttn: {name} must be positive, got {v}")
        if d_model % n_heads != 0:
            raise ValueError(
                f"MSDeformAttn: d_model ({d_model}) must be divisible by n_heads ({n_heads})"
            )
        self.d_model = d_model
        self.n_levels = n_levels
        self.n_heads = n_heads
        self.n_points = n_points
        # How the points are sampled: one of IMPLS (not state: checkpoints are the same).
        self.impl = "auto"

        self.sampling_offsets = nn.Linear(d_model, n_heads * n_levels * n_points * 2)
        self.attention_weights = nn.Linear(d_model, n_heads * n_levels * n_points)
        self.value_proj = nn.Linear(d_model, d_model)
        self.output_proj = nn.Linear(d_model, d_model)
        self.reset_parameters()

    def reset_parameters(self):
        """Deformable-DETR init: every head starts looking along its own direction (evenly
        spread angles), point k of a head at k + 1 pixels away on the unit square's border;
        uniform attention; Xavier projections."""
        nn.init.zeros_(self.sampling_offsets.weight)
        angles = torch.arange(self.n_heads, dtype=torch.float32) * (2.0 * math.pi / self.n_heads)
        direction = torch.stack([angles.cos(), angles.sin()], dim=-1)
        # Scale so the larger |component| is 1: the point lies on the square's border.
        direction = direction / direction.abs().max(dim=-1, keepdim=True).values
        distance = torch.arange(1, self.n_points + 1, dtype=torch.float32)
        # (nH, L, P, 2)
        grid = direction[:, None, None, :] * distance[None, None, :, None]
        grid = grid.expand(self.n_heads, self.n_levels, self.n_points, 2)
        with torch.no_grad():
            self.sampling_offsets.bias.copy_(grid.reshape(-1))
        nn.init.zeros_(self.attention_weights.weight)
        nn.init.zeros_(self.attention_weights.bias)
        for proj in (self.value_proj, self.output_proj):
            nn.init.xavier_uniform_(proj.weight)
            nn.init.zeros_(proj.bias)

    def forward(
        self,
        query: torch.Tensor,
        reference_points: torch.Tensor,
        input_flatten: torch.Tensor,
        input_spatial_shapes: torch.Tensor,
        input_level_start_index: torch.Tensor,
        input_padding_mask: Optional[torch.Tensor] = None,
        spatial_shapes_list: Optional[Sequence[Tuple[int, int]]] = None,
    ) -> torch.Tensor:
        """
        Args:
            query: (B, Q, d_model).
            reference_points: (B, Q, L, 2) normalized (x, y) per level, 0/1 = map edges.
            input_flatten: (B, S, d_model) all levels flattened and concatenated.
            input_spatial_shapes: (L, 2) long (H_l, W_l).
            input_level_start_index: (L,) offset of each level in S (kept for the official
                signature; the shapes already determine it).
            input_padding_mask: optional (B, S) bool, True where the input is padding.
            spatial_shapes_list: optional ``input_spatial_shapes`` as Python ints; callers that
                have them save a device-to-host copy (a GPU sync) per call.

        Returns:
            (B, Q, d_model).
        """
        b, q, _ = query.shape
        _, s, _ = input_flatten.shape
        if query.shape[-1] != self.d_model or input_flatten.shape[-1] != self.d_model:
            raise ValueError(
                f"MSDeformAttn(d_model={self.d_model}): got query {tuple(query.shape)} and "
                f"input_flatten {tuple(input_flatten.shape)}"
            )
        if reference_points.shape != (b, q, self.n_levels, 2):
            raise ValueError(
                f"reference_points must be (B, Q, L, 2) = {(b, q, self.n_levels, 2)}, "
                f"got {tuple(reference_points.shape)}"
            )
        if tuple(input_spatial_shapes.shape) != (self.n_levels, 2):
            raise ValueError(
                f"input_spatial_shapes must be ({self.n_levels}, 2), "
                f"got {tuple(input_spatial_shapes.shape)}"
            )

        value = self.value_proj(input_flatten)
        if input_padding_mask is not None:
            if input_padding_mask.shape != (b, s):
                raise ValueError(
                    f"input_padding_mask must be (B, S) = {(b, s)}, "
                    f"got {tuple(input_padding_mask.shape)}"
                )
            value = value.masked_fill(input_padding_mask[..., None], 0.0)
        value = value.view(b, s, self.n_heads, self.d_model // self.n_heads)

        nh, nl, npt = self.n_heads, self.n_levels, self.n_points
        offsets = self.sampling_offsets(query).view(b, q, nh, nl, npt, 2)
        weights = self.attention_weights(query).view(b, q, nh, nl * npt).softmax(-1)
        weights = weights.view(b, q, nh, nl, npt)
        # Offsets are in pixels of their level: divide by (W_l, H_l) to the normalized frame.
        size_xy = input_spatial_shapes.flip(-1).to(offsets.dtype)
        locations = (
            reference_points[:, :, None, :, None, :] + offsets / size_xy[None, None, None, :, None]
        )
        shapes = input_spatial_shapes if spatial_shapes_list is None else spatial_shapes_list
        if _use_triton(self.impl, value):
            from .ms_deform_attn_triton import ms_deform_attn_sample_triton

            pairs = _level_shapes(shapes)
            _check_sample_inputs(value, pairs, locations, weights)
            output = ms_deform_attn_sample_triton(value, pairs, locations, weights)
        else:
            output = ms_deform_attn_sample(value, shapes, locations, weights)
        return self.output_proj(output)
