"""CondInst's dynamic mask head: per-instance 1x1 convs whose filters the controller
predicts (CondInst paper Sec. 3.2).

An instance's parameter vector (P_gen values, 169 with the defaults) holds, in this
order, the weights of every layer and then their biases: w_0, ..., w_{n-1}, b_0, ...,
b_{n-1}. Layer l maps c_l to c_{l+1} channels with c_0 = C_mask (+ 2 with relative
coordinates), hidden widths ``channels`` and one output; w_l is (c_{l+1}, c_l) row-major
(AdelaiDet's layout, so its checkpoints give the same masks). ReLU between the layers.

The input of the first layer at a pixel is [rel_x, rel_y, mask features], with
rel = (instance location - pixel location) / soi in input pixels, soi the size of interest
of the instance's FPN level. ``dynamic_mask_logits`` evaluates this on any set of pixels
given their features and input-pixel coordinates; ``mask_logits_on_grid`` is the grid case
(the mask-feature map), upsampled to the mask out-stride, which the loss and inference use.
"""
from typing import List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from .mask_branch import aligned_bilinear
from .targets import compute_locations


def dynamic_param_counts(in_channels: int, channels: int, num_layers: int,
                         rel_coords: bool) -> Tuple[List[int], List[int]]:
    """Per layer, the number of weights and of biases: ([80, 64, 8], [8, 8, 1]) for
    C_mask 8, 8 channels, 3 layers, relative coordinates on."""
    if num_layers < 2:
        raise ValueError(f"MODEL.CONDINST.MASK_HEAD.NUM_LAYERS = {num_layers} must be >= 2")
    widths = [in_channels + (2 if rel_coords else 0)] + [channels] * (num_layers - 1) + [1]
    weights = [c_in * c_out for c_in, c_out in zip(widths[:-1], widths[1:])]
    return weights, widths[1:]


def split_dynamic_params(params: Tensor, in_channels: int, channels: int, num_layers: int,
                         rel_coords: bool) -> Tuple[List[Tensor], List[Tensor]]:
    """(R, P_gen) parameter vectors -> per layer weights (R, c_out, c_in) and biases
    (R, c_out)."""
    weight_nums, bias_nums = dynamic_param_counts(in_channels, channels, num_layers, rel_coords)
    total = sum(weight_nums) + sum(bias_nums)
    if params.dim() != 2 or params.shape[1] != total:
        raise ValueError(
            f"dynamic mask head: parameters of shape {tuple(params.shape)}; expected (R, {total})"
            f" for {in_channels} mask channels, MASK_HEAD.CHANNELS {channels}, NUM_LAYERS "
            f"{num_layers}, relative coordinates {rel_coords}"
        )
    pieces = torch.split(params, weight_nums + bias_nums, dim=1)
    r = params.shape[0]
    weights = [w.reshape(r, b, n // b) for w, n, b in zip(pieces[:num_layers], weight_nums,
                                                          bias_nums)]
    return weights, list(pieces[num_layers:])


def relative_coords(instance_locations: Tensor, soi: Tensor, pixel_locations: Tensor) -> Tensor:
    """(instance location - pixel location) / soi: (R, 2, N), channel 0 x and 1 y.

    Args:
        instance_locations: (R, 2) input-pixel (x, y) of each instance's FCOS location.
        soi: (R,) size of interest of each instance's level.
        pixel_locations: (N, 2) input-pixel (x, y) of each pixel.
    """
    rel = instance_locations[:, :, None] - pixel_locations.t()[None]
    return rel / soi.to(rel.dtype)[:, None, None]


def dynamic_mask_logits(
    params: Tensor, instance_locations: Tensor, soi: Tensor, pixel_feats: Tensor,
    pixel_locations: Tensor, channels: int, num_layers: int, rel_coords: bool = True,
) -> Tensor:
    """Mask logits of R instances' dynamic filters on N pixels: (R, N).

    Args:
        params: (R, P_gen) controller outputs.
        instance_locations: (R, 2) input-pixel (x, y) of the instances' locations.
        soi: (R,) float, the size of interest of each instance's FPN level.
        pixel_feats: (R, C_mask, N) one feature set per instance, or (1, C_mask, N) shared
            by all (cheaper: no per-instance copy). Pixels given as (N, C_mask) rows go in
            as ``feats.t()[None]``.
        pixel_locations: (N, 2) input-pixel (x, y) of the pixels (any set: a grid, a sample,
            another image's pixels); not read without ``rel_coords``.
        channels, num_layers: MASK_HEAD.CHANNELS and NUM_LAYERS.
        rel_coords: the two relative-coordinate input channels (not DISABLE_REL_COORDS).

    The first layer is applied as w[:, :, 2:] @ feats + w[:, :, :2] @ rel + b: the same
    sum as the conv over the concatenated input, without materialising R copies of
    shared features or the (R, 2, N) relative coordinates. Computed in the dtype of
    ``pixel_feats``.
    """
    if pixel_feats.dim() != 3 or pixel_feats.shape[0] not in (1, params.shape[0]):
        raise ValueError(
            f"pixel_feats of shape {tuple(pixel_feats.shape)}; expected (R or 1, C, N) with "
            f"R = {params.shape[0]}"
        )
    r, (_, c, n) = params.shape[0], pixel_feats.shape
    weights, biases = split_dynamic_params(params.to(pixel_feats.dtype), c, channels,
                                           num_layers, rel_coords)
    w0, bias0 = weights[0], biases[0][:, :, None]  # (R, c1, C (+ 2)), (R, c1, 1)
    w_feat, feats = (w0[:, :, 2:] if rel_coords else w0), pixel_feats
    if rel_coords:
        # w_rel (loc - p) / soi = w_rel loc / soi + (-w_rel / soi) p: the pixel part joins
        # the features' product as two more input rows, the instance part the bias, so no
        # (R, 2, N) tensor of relative coordinates exists.
        w_rel = w0[:, :, :2] / soi.to(w0.dtype)[:, None, None]  # (R, c1, 2)
        bias0 = bias0 + torch.bmm(w_rel, instance_locations.to(w0.dtype)[:, :, None])
        w_feat = torch.cat([-w_rel, w_feat], 2)
        coords = pixel_locations.to(w0.dtype).t()[None].expand(len(feats), -1, -1)
        feats = torch.cat([coords, feats], 1)  # (R or 1, 2 + C, N)
    if feats.shape[0] == 1:
        # One GEMM for every instance: (R * c1, C') @ (C', N).
        x = torch.addmm(bias0.reshape(-1, 1), w_feat.reshape(r * w0.shape[1], -1), feats[0])
        x = x.reshape(r, -1, n)
    else:
        x = torch.baddbmm(bias0, w_feat, feats)
    for w, b in zip(weights[1:], biases[1:]):
        x = torch.baddbmm(b[:, :, None], w, x.relu())
    return x[:, 0]


def mask_logits_on_grid(
    params: Tensor, instance_locations: Tensor, soi: Tensor, mask_feats: Tensor,
    image_index: Optional[Tensor], feat_stride: int, out_stride: int, channels: int,
    num_layers: int, rel_coords: bool = True,
) -> Tensor:
    """Mask logits of n instances on the mask-feature grid, upsampled to ``out_stride``:
    (n, h * f, w * f) with f = feat_stride / out_stride (aligned bilinear, as CondInst).

    Args:
        params, instance_locations, soi: (n, P_gen), (n, 2), (n,) as for
            ``dynamic_mask_logits``.
        mask_feats: (B, C, h, w) mask features with ``image_index`` (n,) long naming each
            instance's image, or (n, C, h, w) one map per instance with ``image_index``
            None.
        feat_stride: stride of ``mask_feats`` (the grid's locations are
            feat_stride * index + feat_stride // 2).
    The grid's logits are ``dynamic_mask_logits`` on its pixels, one call per image.
    """
    if feat_stride % out_stride:
        raise ValueError(
            f"MODEL.CONDINST.MASK_OUT_STRIDE = {out_stride} must divide the mask-feature "
            f"stride {feat_stride}"
        )
    h, w = mask_feats.shape[-2:]
    factor = feat_stride // out_stride
    if params.shape[0] == 0:
        return mask_feats.new_zeros((0, h * factor, w * factor))
    grid = compute_locations(h, w, feat_stride, mask_feats.device).to(mask_feats.dtype)
    flat = mask_feats.flatten(2)
    n = params.shape[0]
    if image_index is None:
        if len(mask_feats) != n:
            raise ValueError(f"{n} instances but {len(mask_feats)} mask-feature maps")
        logits = dynamic_mask_logits(params, instance_locations, soi, flat, grid, channels,
                                     num_layers, rel_coords)
    else:
        # Per image with shared features: no (n, C, h * w) copy of the maps.
        logits = flat.new_zeros((n, h * w))
        parts, order = [], []
        for b in torch.unique(image_index).tolist():
            sel = torch.nonzero(image_index == b).squeeze(1)
            parts.append(dynamic_mask_logits(params[sel], instance_locations[sel], soi[sel],
                                             flat[b : b + 1], grid, channels, num_layers,
                                             rel_coords))
            order.append(sel)
        if parts:
            logits = logits.index_copy(0, torch.cat(order), torch.cat(parts))
    logits = aligned_bilinear(logits.reshape(n, 1, h, w), factor)
    return logits[:, 0]


class DynamicMaskHead(nn.Module):
    """The dynamic head's settings and AdelaiDet's two buffers (no parameters).

    Buffers: ``sizes_of_interest`` (num_levels,) int64, MODEL.FCOS.SIZES_OF_INTEREST plus
    twice its last value (the normaliser of the last level's relative coordinates), and
    ``_iter`` (1,) float32, AdelaiDet's count of training calls (read only by BoxInst's
    warm-up; kept so checkpoints round-trip).
    """

    def __init__(self, in_channels: int, channels: int, num_layers: int, rel_coords: bool,
                 sizes_of_interest: Sequence[int], mask_out_stride: int):
        super().__init__()
        self.in_channels = in_channels
        self.channels = channels
        self.num_layers = num_layers
        self.rel_coords = rel_coords
        self.mask_out_stride = mask_out_stride
        weight_nums, bias_nums = dynamic_param_counts(in_channels, channels, num_layers,
                                                      rel_coords)
        self.num_gen_params = sum(weight_nums) + sum(bias_nums)
        soi = [int(s) for s in sizes_of_interest]
        self.register_buffer("sizes_of_interest", torch.tensor(soi + [soi[-1] * 2]))
        self.register_buffer("_iter", torch.zeros(1))

    def soi(self, levels: Tensor) -> Tensor:
        """(n,) float size of interest of each FPN level index."""
        return self.sizes_of_interest.float()[levels]

    def forward(self, params: Tensor, locations: Tensor, levels: Tensor, mask_feats: Tensor,
                image_index: Optional[Tensor], feat_stride: int) -> Tensor:
        """Out-stride mask logits (n, h * f, w * f) of n instances (see
        ``mask_logits_on_grid``; ``levels`` (n,) long FPN level indices)."""
        return mask_logits_on_grid(params, locations, self.soi(levels), mask_feats, image_index,
                                   feat_stride, self.mask_out_stride, self.channels,
                                   self.num_layers, self.rel_coords)
