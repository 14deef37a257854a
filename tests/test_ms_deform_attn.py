"""Plain-PyTorch multi-scale deformable attention against a loop-by-hand reference."""
import math

import pytest
import torch

from instunique.segmenters.mask2former.ms_deform_attn import MSDeformAttn, ms_deform_attn_sample

SHAPES = [(3, 5), (2, 3)]  # odd, non-square levels


def _bilinear_zero_padded(vmap, x, y):
    """Sample vmap (H, W, D) at pixel coordinates (x, y), pixel (i, j) centred at (j, i);
    neighbours outside the map read zero."""
    h, w, _ = vmap.shape
    x0, y0 = torch.floor(x), torch.floor(y)
    fx, fy = x - x0, y - y0
    out = vmap.new_zeros(vmap.shape[-1])
    for dy, wy in ((0, 1 - fy), (1, fy)):
        for dx, wx in ((0, 1 - fx), (1, fx)):
            xi, yi = int(x0) + dx, int(y0) + dy
            if 0 <= xi < w and 0 <= yi < h:
                out = out + wy * wx * vmap[yi, xi]
    return out


def _loop_reference(value, shapes, locations, weights):
    b, _, n_heads, d_head = value.shape
    _, q, _, _, n_points, _ = locations.shape
    rows = []
    for bi in range(b):
        for qi in range(q):
            heads = []
            for hi in range(n_heads):
                acc = value.new_zeros(d_head)
                start = 0
                for li, (h, w) in enumerate(shapes):
                    vmap = value[bi, start : start + h * w, hi].reshape(h, w, d_head)
                    start += h * w
                    for pi in range(n_points):
                        # Normalized 0..1 spans the map's outer edges: pixel j is [j, j+1] / W.
                        x = locations[bi, qi, hi, li, pi, 0] * w - 0.5
                        y = locations[bi, qi, hi, li, pi, 1] * h - 0.5
                        acc = acc + weights[bi, qi, hi, li, pi] * _bilinear_zero_padded(vmap, x, y)
                heads.append(acc)
            rows.append(torch.cat(heads))
    return torch.stack(rows).view(b, q, n_heads * d_head)


def _random_inputs(seed=0, b=2, q=3, n_heads=2, d_head=3, n_points=2):
    g = torch.Generator().manual_seed(seed)
    s = sum(h * w for h, w in SHAPES)
    value = torch.randn(b, s, n_heads, d_head, generator=g, dtype=torch.float64)
    # Reach beyond the maps: some points straddle the border, some miss it entirely.
    locations = torch.rand(b, q, n_heads, len(SHAPES), n_points, 2, generator=g).double()
    locations = locations * 1.8 - 0.4
    weights = torch.rand(b, q, n_heads, len(SHAPES), n_points, generator=g, dtype=torch.float64)
    return value, locations, weights


def test_sample_matches_loop_reference_including_outside_points():
    value, locations, weights = _random_inputs()
    assert (locations < -0.2).any() and (locations > 1.2).any()
    shapes = torch.tensor(SHAPES, dtype=torch.long)
    out = ms_deform_attn_sample(value, shapes, locations, weights)
    ref = _loop_reference(value, SHAPES, locations, weights)
    assert out.shape == (2, 3, 6)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    # Shapes given as Python pairs behave the same.
    torch.testing.assert_close(ms_deform_attn_sample(value, SHAPES, locations, weights), out)


def test_sample_gradients_match_loop_reference():
    inputs = _random_inputs(seed=1)
    grads = []
    for fn in (
        lambda v, loc, w: ms_deform_attn_sample(v, torch.tensor(SHAPES), loc, w),
        lambda v, loc, w: _loop_reference(v, SHAPES, loc, w),
    ):
        leaves = [t.clone().requires_grad_(True) for t in inputs]
        out = fn(*leaves)
        # A non-uniform upstream gradient, so every output element matters.
        upstream = torch.linspace(-1.0, 2.0, out.numel(), dtype=out.dtype).view_as(out)
        (out * upstream).sum().backward()
        grads.append([t.grad for t in leaves])
    for mine, ref, name in zip(grads[0], grads[1], ("value", "locations", "weights")):
        assert ref.abs().sum() > 0, name
        torch.testing.assert_close(mine, ref, rtol=1e-10, atol=1e-10, msg=name)


def test_sample_rejects_inconsistent_shapes():
    value, locations, weights = _random_inputs()
    with pytest.raises(ValueError, match="spatial_shapes"):
        ms_deform_attn_sample(value, torch.tensor([(3, 5), (2, 2)]), locations, weights)
    with pytest.raises(ValueError, match="attention_weights"):
        ms_deform_attn_sample(value, torch.tensor(SHAPES), locations, weights[..., :1])
    with pytest.raises(ValueError, match="sampling_locations"):
        ms_deform_attn_sample(value, torch.tensor(SHAPES), locations[:, :, :1], weights)


def _pixel_centres(h, w, dtype=torch.float64):
    ys, xs = torch.meshgrid(
        torch.arange(h, dtype=dtype), torch.arange(w, dtype=dtype), indexing="ij"
    )
    return torch.stack(((xs.reshape(-1) + 0.5) / w, (ys.reshape(-1) + 0.5) / h), -1)


def test_init_follows_deformable_detr():
    attn = MSDeformAttn(d_model=16, n_levels=2, n_heads=4, n_points=3)
    assert attn.sampling_offsets.weight.shape == (4 * 2 * 3 * 2, 16)
    assert attn.attention_weights.weight.shape == (4 * 2 * 3, 16)
    assert torch.count_nonzero(attn.sampling_offsets.weight) == 0
    assert torch.count_nonzero(attn.attention_weights.weight) == 0
    assert torch.count_nonzero(attn.attention_weights.bias) == 0
    assert torch.count_nonzero(attn.value_proj.bias) == 0
    # Head k looks along angle k * 90 degrees; point p sits p + 1 pixels away.
    grid = attn.sampling_offsets.bias.detach().view(4, 2, 3, 2)
    directions = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [0.0, -1.0]])
    expected = directions[:, None, None, :] * torch.tensor([1.0, 2.0, 3.0])[None, None, :, None]
    torch.testing.assert_close(grid, expected.expand(4, 2, 3, 2), atol=1e-6, rtol=0)


def test_rejects_d_model_not_divisible_by_heads():
    with pytest.raises(ValueError, match="divisible"):
        MSDeformAttn(d_model=30, n_heads=8)


def _level_inputs():
    shapes = torch.tensor(SHAPES, dtype=torch.long)
    start = torch.tensor([0, SHAPES[0][0] * SHAPES[0][1]])
    s = sum(h * w for h, w in SHAPES)
    return shapes, start, s


def test_constant_map_gives_projected_constant_for_any_attention_weights():
    torch.manual_seed(0)
    attn = MSDeformAttn(d_model=8, n_levels=2, n_heads=2, n_points=3).double()
    with torch.no_grad():
        attn.sampling_offsets.bias.zero_()
        # Arbitrary attention logits: the per-head softmax still sums to one.
        attn.attention_weights.weight.normal_()
        attn.attention_weights.bias.normal_()
    shapes, start, s = _level_inputs()
    b, q = 2, 4
    const = torch.randn(8, dtype=torch.float64)
    input_flatten = const.expand(b, s, 8).clone()
    # Every reference point is some pixel centre of its level: exact samples of the map.
    refs = []
    for h, w in SHAPES:
        centres = _pixel_centres(h, w)
        refs.append(centres[torch.randint(len(centres), (b, q))])
    reference_points = torch.stack(refs, dim=2)  # (B, Q, L, 2)
    query = torch.randn(b, q, 8, dtype=torch.float64)
    out = attn(query, reference_points, input_flatten, shapes, start)
    expected = attn.output_proj(attn.value_proj(const)).expand(b, q, 8)
    assert out.shape == (b, q, 8)
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("level", [0, 1])
def test_offsets_are_in_pixels_of_their_level(level):
    """A learned offset of (dx, dy) = (2, 1) pixels reads the pixel 1 row down, 2 columns
    right in whichever level is attended (zero beyond the border)."""
    attn = MSDeformAttn(d_model=2, n_levels=2, n_heads=1, n_points=1).double()
    with torch.no_grad():
        for proj in (attn.value_proj, attn.output_proj):
            proj.weight.copy_(torch.eye(2))
            proj.bias.zero_()
        attn.sampling_offsets.bias.copy_(torch.tensor([2.0, 1.0, 2.0, 1.0]))
        # Attend (numerically) only to `level`.
        attn.attention_weights.bias.copy_(torch.tensor([40.0, -40.0] if level == 0 else [-40, 40]))
    shapes, start, s = _level_inputs()
    h, w = SHAPES[level]
    input_flatten = torch.randn(1, s, 2, dtype=torch.float64)
    maps = torch.split(input_flatten[0], [hh * ww for hh, ww in SHAPES])
    vmap = maps[level].view(h, w, 2)
    reference_points = torch.full((1, h * w, 2, 2), 0.5, dtype=torch.float64)
    reference_points[0, :, level] = _pixel_centres(h, w)
    query = torch.randn(1, h * w, 2, dtype=torch.float64)
    out = attn(query, reference_points, input_flatten, shapes, start).view(h, w, 2)
    expected = torch.zeros_like(vmap)
    expected[: h - 1, : w - 2] = vmap[1:, 2:]
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-12)


def test_padding_mask_removes_values():
    torch.manual_seed(0)
    attn = MSDeformAttn(d_model=8, n_levels=2, n_heads=2, n_points=2)
    shapes, start, s = _level_inputs()
    query = torch.randn(2, 5, 8)
    input_flatten = torch.randn(2, s, 8)
    reference_points = torch.rand(2, 5, 2, 2)
    args = (query, reference_points, input_flatten, shapes, start)
    no_mask = attn(*args)
    torch.testing.assert_close(attn(*args, torch.zeros(2, s, dtype=torch.bool)), no_mask)
    all_masked = attn(*args, torch.ones(2, s, dtype=torch.bool))
    torch.testing.assert_close(all_masked, attn.output_proj.bias.detach().expand(2, 5, 8))
    # Python shapes give the same result as the tensor.
    torch.testing.assert_close(attn(*args, spatial_shapes_list=SHAPES), no_mask)


def test_backward_reaches_every_parameter():
    torch.manual_seed(0)
    attn = MSDeformAttn(d_model=8, n_levels=2, n_heads=2, n_points=2)
    shapes, start, s = _level_inputs()
    input_flatten = torch.randn(2, s, 8)
    out = attn(torch.randn(2, 5, 8), torch.rand(2, 5, 2, 2), input_flatten, shapes, start)
    (out * torch.randn_like(out)).sum().backward()
    for name, p in attn.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name


def test_rejects_wrong_reference_points():
    attn = MSDeformAttn(d_model=8, n_levels=2, n_heads=2, n_points=2)
    shapes, start, s = _level_inputs()
    with pytest.raises(ValueError, match="reference_points"):
        attn(torch.randn(1, 5, 8), torch.rand(1, 5, 3, 2), torch.randn(1, s, 8), shapes, start)


def test_init_directions_cover_the_circle():
    attn = MSDeformAttn(d_model=16, n_levels=1, n_heads=8, n_points=1)
    first = attn.sampling_offsets.bias.detach().view(8, 2)
    angles = torch.atan2(first[:, 1], first[:, 0])
    expected = torch.tensor([k * 2 * math.pi / 8 for k in range(8)])
    expected = torch.atan2(expected.sin(), expected.cos())
    torch.testing.assert_close(angles, expected, atol=1e-6, rtol=0)
    # Each offset lies on the border of the unit square (max |component| == 1).
    torch.testing.assert_close(first.abs().max(dim=1).values, torch.ones(8))
