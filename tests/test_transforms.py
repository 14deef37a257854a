"""Tests of the geometric transform record (AffineWarp) and its random family."""

import math

import cv2
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from matplotlib.path import Path

from instunique.transforms import AffineWarp, TransformFamily, warp_feature_batch

H, W = 64, 96

KINDS = {
    "identity": lambda h, w: AffineWarp.identity(h, w),
    "flip": lambda h, w: AffineWarp.hflip(h, w),
    "crop": lambda h, w: AffineWarp.crop(h, w, 5, 9, h - 13, w - 22),
    "rotation": lambda h, w: AffineWarp.rotation(h, w, 25.0),
    "rotation_neg": lambda h, w: AffineWarp.rotation(h, w, -50.0),
    "scale_down": lambda h, w: AffineWarp.scale(h, w, 0.7),
    "scale_up": lambda h, w: AffineWarp.scale(h, w, 1.6),
    "composite": lambda h, w: (
        AffineWarp.crop(h, w, 3, 4, h - 7, w - 10)
        .compose(AffineWarp.scale(h - 7, w - 10, 1.3))
        .compose(AffineWarp.rotation(round((h - 7) * 1.3), round((w - 10) * 1.3), 15.0))
        .compose(AffineWarp.hflip(round((h - 7) * 1.3), round((w - 10) * 1.3)))
    ),
}
AXIS_ALIGNED = ("identity", "flip", "crop", "scale_down", "scale_up")


def family_samples(h, w, n=4, seed=0):
    fam = TransformFamily(names=("flip", "crop", "rotation", "scaling"))
    rng = np.random.default_rng(seed)
    return [fam.sample(h, w, rng) for _ in range(n)]


def all_warps(h, w):
    return [(k, f(h, w)) for k, f in KINDS.items()] + [
        (f"family{i}", t) for i, t in enumerate(family_samples(h, w))
    ]


def centres(h, w):
    """(h, w, 2) continuous (x, y) of pixel centres."""
    ys, xs = np.meshgrid(np.arange(h) + 0.5, np.arange(w) + 0.5, indexing="ij")
    return np.stack([xs, ys], axis=-1)


def smooth(xy):
    """A smooth 3-channel field evaluated at (..., 2) continuous coordinates."""
    x, y = xy[..., 0], xy[..., 1]
    return np.stack(
        [
            0.5 + 0.25 * np.sin(2 * np.pi * x / 110 + 0.3) * np.cos(2 * np.pi * y / 90),
            0.5 + 0.3 * np.cos(2 * np.pi * (x + y) / 130),
            0.4 + 0.2 * np.sin(2 * np.pi * (x - 0.5 * y) / 100 + 1.0),
        ],
        axis=-1,
    )


def smooth_image(h, w):
    return smooth(centres(h, w)).astype(np.float32)


def erode(mask, r):
    k = np.ones((2 * r + 1, 2 * r + 1), np.uint8)
    padded = np.pad(mask.astype(np.uint8), r, constant_values=0)
    return cv2.erode(padded, k)[r:-r, r:-r].astype(bool)


def rasterize(poly, h, w):
    """Pixels whose centre lies inside the polygon (same convention as the warps)."""
    inside = Path(np.asarray(poly).reshape(-1, 2)).contains_points(centres(h, w).reshape(-1, 2))
    return inside.reshape(h, w)


def tight_box(mask):
    ys, xs = np.nonzero(mask)
    return np.array([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], dtype=np.float64)


def iou(a, b):
    return (a & b).sum() / max((a | b).sum(), 1)


# --------------------------------------------------------------------------- algebra


def test_flip_twice_is_identity_exactly():
    f = AffineWarp.hflip(H, W + 1)
    ff = f.compose(f)
    assert np.array_equal(ff.matrix, np.eye(2, 3))
    assert ff.src_size == ff.dst_size == (H, W + 1)
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, size=(H, W + 1, 3), dtype=np.uint8)
    assert np.array_equal(f.apply_image(f.apply_image(img)), img)
    assert np.array_equal(ff.apply_image(img), img)
    assert np.array_equal(f.apply_image(img), img[:, ::-1])
    labels = rng.integers(0, 1000, size=(H, W + 1)).astype(np.int32)
    assert np.array_equal(f.apply_segmentation(f.apply_segmentation(labels)), labels)


def test_known_coordinates():
    # Pixel centres of column j land on column w-1-j under the flip.
    xy = np.array([[0.5, 3.5], [W - 0.5, 0.5]])
    assert np.allclose(AffineWarp.hflip(H, W).apply_coords(xy), [[W - 0.5, 3.5], [0.5, 0.5]])
    # Crop shifts by the window offset.
    assert np.allclose(AffineWarp.crop(H, W, 5, 9, 20, 30).apply_coords([[9.5, 5.5]]), [[0.5, 0.5]])
    # Scaling maps the frame onto the frame (exact ratios, not the nominal factor).
    s = AffineWarp.scale(H, W, 0.7)
    assert s.dst_size == (round(H * 0.7), round(W * 0.7))
    assert np.allclose(s.apply_coords([[0, 0], [W, H]]), [[0, 0], [s.dst_size[1], s.dst_size[0]]])
    # Positive rotation turns content counter-clockwise on screen: right of centre -> up.
    r = AffineWarp.rotation(H, W, 90.0)
    assert np.allclose(r.apply_coords([[W / 2 + 10, H / 2]]), [[W / 2, H / 2 - 10]])


@pytest.mark.parametrize("kind,warp", all_warps(H, W), ids=[k for k, _ in all_warps(H, W)])
def test_coords_inverse_round_trip(kind, warp):
    xy = np.random.default_rng(1).uniform(-20, 120, size=(50, 2))
    inv = warp.inverse()
    assert inv.src_size == warp.dst_size and inv.dst_size == warp.src_size
    assert np.allclose(inv.apply_coords(warp.apply_coords(xy)), xy, atol=1e-9)
    assert np.allclose(warp.compose(inv).matrix, np.eye(2, 3), atol=1e-12)
    polys = warp.apply_polygons([xy.reshape(-1)])
    assert np.allclose(inv.apply_polygons(polys)[0], xy.reshape(-1), atol=1e-9)


def test_compose_checks_sizes_and_bad_input():
    with pytest.raises(ValueError, match="src_size"):
        AffineWarp.hflip(H, W).compose(AffineWarp.hflip(H + 1, W))
    with pytest.raises(ValueError, match=r"\(2, 3\)"):
        AffineWarp(np.eye(3), (H, W), (H, W))
    with pytest.raises(ValueError, match="singular"):
        AffineWarp(np.zeros((2, 3)), (H, W), (H, W))
    with pytest.raises(ValueError, match="crop window"):
        AffineWarp.crop(H, W, 10, 0, H, W)
    with pytest.raises(ValueError, match="src_size"):
        AffineWarp.hflip(H, W).apply_image(np.zeros((H + 1, W, 3), np.uint8))
    with pytest.raises(ValueError, match="apply_box"):
        AffineWarp.hflip(H, W).apply_box(np.zeros((2, 3)))


# --------------------------------------------------------------------------- images


@pytest.mark.parametrize("kind,warp", all_warps(H, W), ids=[k for k, _ in all_warps(H, W)])
def test_apply_image_samples_at_preimage_of_pixel_centres(kind, warp):
    # Bilinear interpolation reproduces a linear ramp exactly, so any half-pixel slip in
    # the convention shows as an error of 0.5 * slope.
    ramp = lambda xy: 0.02 * xy[..., 0] - 0.03 * xy[..., 1] + 2.0  # noqa: E731
    img = ramp(centres(H, W)).astype(np.float64)
    out = warp.apply_image(img, fill=-7.0)
    h2, w2 = warp.dst_size
    assert out.shape == (h2, w2) and out.dtype == np.float64
    pre = warp.inverse().apply_coords(centres(h2, w2).reshape(-1, 2)).reshape(h2, w2, 2)
    inner = erode(warp.valid_mask(), 2)
    assert inner.sum() > 0.3 * h2 * w2
    assert np.abs(out - ramp(pre))[inner].max() < 2e-3
    # Pixels whose pre-image is over a pixel outside x are pure fill.
    far = (pre[..., 0] < -1) | (pre[..., 0] > W + 1) | (pre[..., 1] < -1) | (pre[..., 1] > H + 1)
    assert np.all(out[far] == -7.0)
    assert far.any() or not kind.startswith(("rotation", "composite"))


@pytest.mark.parametrize("kind,warp", all_warps(H, W), ids=[k for k, _ in all_warps(H, W)])
def test_image_warp_then_inverse_restores_valid_region(kind, warp):
    img = smooth_image(H, W)
    fwd = warp.apply_image(img)
    back = warp.inverse().apply_image(fwd)
    assert fwd.shape == (*warp.dst_size, 3) and back.shape == img.shape
    # Pixels of x whose centre maps into x' (valid backward), away from x''s border.
    both = warp.inverse().valid_mask() & erode(
        warp.inverse().apply_segmentation(erode(warp.valid_mask(), 2).astype(np.uint8)) > 0, 1
    )
    assert both.sum() > 0.2 * H * W
    assert np.abs(back - img)[both].max() < 0.03


def test_apply_image_dtypes_and_channels():
    warp = AffineWarp.rotation(H, W, 10.0)
    img8 = (smooth_image(H, W) * 255).astype(np.uint8)
    assert warp.apply_image(img8).dtype == np.uint8
    assert warp.apply_image(img8[..., :1]).shape == (H, W, 1)
    many = np.concatenate([smooth_image(H, W)] * 3, axis=-1)  # 9 channels
    out = warp.apply_image(many)
    assert out.shape == (H, W, 9)
    assert np.allclose(out[..., :3], out[..., 6:])
    assert warp.apply_image(smooth_image(H, W).astype(np.float16)).dtype == np.float16
    with pytest.raises(ValueError, match="bool"):
        warp.apply_image(np.zeros((H, W), bool))


# --------------------------------------------------------------------------- masks etc.

POLY = np.array([12, 10, 60, 8, 75, 30, 50, 52, 20, 45], dtype=np.float64)


@pytest.mark.parametrize("kind,warp", all_warps(H, W), ids=[k for k, _ in all_warps(H, W)])
def test_masks_polygons_boxes_consistent(kind, warp):
    h2, w2 = warp.dst_size
    mask = rasterize(POLY, H, W)
    warped_mask = warp.apply_segmentation(mask)
    assert warped_mask.shape == (h2, w2) and warped_mask.dtype == bool
    warped_poly = warp.apply_polygons([POLY])[0]
    assert iou(warped_mask, rasterize(warped_poly, h2, w2)) > 0.9
    # The bilinear image warp of the mask agrees with the nearest-neighbour one.
    soft = warp.apply_image(mask.astype(np.float32)) > 0.5
    assert iou(soft, warped_mask) > 0.9

    box = warp.apply_box(tight_box(mask)[None])[0]
    target = tight_box(warped_mask)
    assert np.all(box[:2] <= target[:2] + 1.0) and np.all(box[2:] >= target[2:] - 1.0)
    assert box[0] >= 0 and box[1] >= 0 and box[2] <= w2 and box[3] <= h2
    if kind in AXIS_ALIGNED:
        assert np.abs(box - target).max() <= 1.0


def test_apply_box_clips_to_destination_and_handles_empty():
    crop = AffineWarp.crop(H, W, 10, 20, 30, 40)
    assert np.allclose(crop.apply_box([[0, 0, 30, 25]]), [[0, 0, 10, 15]])
    assert np.allclose(crop.apply_box([[25, 15, 90, 60]]), [[5, 5, 40, 30]])
    assert crop.apply_box(np.zeros((0, 4))).shape == (0, 4)


def test_segmentation_fill_and_valid_mask():
    rot = AffineWarp.rotation(H, W, 30.0)
    valid = rot.valid_mask()
    assert valid.shape == (H, W)
    assert not valid[0, 0] and not valid[0, -1] and not valid[-1, 0] and not valid[-1, -1]
    assert valid[H // 2, W // 2] and 0.05 * H * W < (~valid).sum() < 0.5 * H * W
    labels = np.ones((H, W), np.uint8)
    assert np.array_equal(rot.apply_segmentation(labels, fill=255) == 255, ~valid)
    for kind in ("identity", "flip", "crop", "scale_down", "scale_up"):
        assert KINDS[kind](H, W).valid_mask().all(), kind
    # A quarter turn of a square frame maps the pixel grid onto itself.
    assert AffineWarp.rotation(40, 40, 90.0).valid_mask().all()
    # The inverse of a crop only covers the cropped window of x.
    inv = AffineWarp.crop(H, W, 5, 9, 20, 30).inverse().valid_mask()
    assert inv[5:25, 9:39].all() and inv.sum() == 20 * 30


# --------------------------------------------------------------------------- features


def pool(img, s):
    """(h, w, C) numpy image -> (C, h//s, w//s) tensor of stride-s cell means."""
    t = torch.from_numpy(np.ascontiguousarray(img)).permute(2, 0, 1).double()
    return F.avg_pool2d(t[None], s)[0]


def padded_features(img, s, pad_cells, seed=0):
    """Stride-s features of img inside a tensor padded with garbage cells."""
    feat = pool(img, s)
    c, hf, wf = feat.shape
    garbage = np.random.default_rng(seed).normal(size=(c, hf + pad_cells[0], wf + pad_cells[1]))
    out = torch.from_numpy(garbage)
    out[:, :hf, :wf] = feat
    return out


FEATURE_CASES = [(k, s) for k in KINDS for s in (4, 8)] + [("family0", 4), ("family1", 8)]


@pytest.mark.parametrize("kind,s", FEATURE_CASES)
def test_warp_features_matches_pooled_warped_image(kind, s):
    h, w = 96, 128  # multiples of both strides: the last source cell is fully inside
    warp = KINDS[kind](h, w) if kind in KINDS else family_samples(h, w)[int(kind[-1])]
    img = smooth_image(h, w).astype(np.float64)
    feat = padded_features(img, s, (2, 3))
    h2, w2 = warp.dst_size
    grid = (math.ceil(h2 / s) + 2, math.ceil(w2 / s) + 1)  # padded destination grid
    out, valid = warp.warp_features(feat, s, (h, w), grid)
    assert out.shape == (3, *grid) and valid.shape == grid and out.dtype == feat.dtype

    # Reference: pool the warped image; compare on cells whose whole neighbourhood is valid.
    ref = pool(warp.apply_image(img), s)
    hr, wr = ref.shape[1:]
    inner = erode(warp.valid_mask(), 2 * s)[: hr * s, : wr * s]
    inner = inner.reshape(hr, s, wr, s).all(axis=(1, 3))
    assert inner.sum() >= 4
    assert valid[:hr, :wr][torch.from_numpy(inner)].all()
    err = (out[:, :hr, :wr] - ref).abs()[:, torch.from_numpy(inner)]
    assert err.max() < 0.02

    # Cells whose centre lies outside x' (padding of the x' grid) are invalid and zero.
    ys = (torch.arange(grid[0]) + 0.5) * s
    xs = (torch.arange(grid[1]) + 0.5) * s
    outside = (ys[:, None] >= h2) | (xs[None, :] >= w2)
    assert not valid[outside].any()
    assert (out[:, ~valid] == 0).all()


@pytest.mark.parametrize("kind", list(KINDS))
def test_warp_features_valid_at_stride_one_is_valid_mask(kind):
    warp = KINDS[kind](H, W)
    _, valid = warp.warp_features(torch.zeros(1, H, W), 1)
    assert np.array_equal(valid.numpy(), warp.valid_mask())


def test_warp_features_linear_ramp_is_exact():
    # Cell means of a linear ramp equal the ramp at cell centres, and bilinear sampling
    # reproduces it: the warped features equal the ramp at each output cell's pre-image.
    s, h, w = 8, 96, 128
    warp = AffineWarp.rotation(h, w, 20.0).compose(AffineWarp.scale(h, w, 1.5))
    ramp = lambda xy: 0.01 * xy[..., 0] + 0.02 * xy[..., 1]  # noqa: E731
    feat = torch.from_numpy(ramp(centres(h // s, w // s) * s))[None]
    out, valid = warp.warp_features(feat, s)
    hg, wg = out.shape[1:]
    pre = warp.inverse().apply_coords(centres(hg, wg).reshape(-1, 2) * s).reshape(hg, wg, 2)
    # Away from the border of x, where samples are clamped to the last valid centres.
    away = (pre[..., 0] > s) & (pre[..., 0] < w - s) & (pre[..., 1] > s) & (pre[..., 1] < h - s)
    inner = torch.from_numpy(away) & valid
    assert inner.sum() > 20
    assert torch.allclose(out[0][inner], torch.from_numpy(ramp(pre))[inner], atol=1e-9)


def test_warp_features_flip_and_aligned_crop_are_exact():
    s = 4
    feat = torch.randn(5, 12, 20, dtype=torch.float64)
    out, valid = AffineWarp.hflip(48, 80).warp_features(feat, s)
    assert valid.all() and torch.allclose(out, feat.flip(-1), atol=1e-12)
    out, valid = AffineWarp.crop(48, 80, 8, 12, 24, 40).warp_features(feat, s)
    assert valid.all() and torch.allclose(out, feat[:, 2:8, 3:13], atol=1e-12)


def test_padding_is_never_read_and_gets_no_gradient():
    s, h, w = 4, 40, 52
    warp = AffineWarp.rotation(h, w, 35.0).compose(AffineWarp.scale(h, w, 0.8))
    img = smooth_image(h, w).astype(np.float64)
    a = padded_features(img, s, (3, 4), seed=1).requires_grad_(True)
    b = padded_features(img, s, (3, 4), seed=2)
    out_a, valid = warp.warp_features(a, s, (h, w))
    out_b, _ = warp.warp_features(b, s, (h, w))
    assert torch.equal(out_a, out_b)

    weights = torch.randn_like(out_a)
    (out_a * weights).sum().backward()
    g = a.grad
    assert g[:, h // s :, :].abs().sum() == 0 and g[:, :, w // s :].abs().sum() == 0
    assert (g[:, : h // s, : w // s].abs().sum(0) > 0).float().mean() > 0.5
    # Through the valid cells only: invalid outputs are constant zeros.
    a.grad = None
    out_a, _ = warp.warp_features(a, s, (h, w))
    out_a[:, ~valid].sum().backward()
    assert a.grad.abs().sum() == 0


def test_warp_feature_batch_equals_per_image(monkeypatch):
    s = 4
    sizes = [(40, 52), (33, 47), (48, 64)]
    rng = np.random.default_rng(3)
    fam = TransformFamily(names=("flip", "crop", "rotation", "scaling"))
    warps = [fam.sample(hh, ww, rng) for hh, ww in sizes]
    feats = torch.randn(3, 6, 12, 16, dtype=torch.float32)
    grid = (
        max(math.ceil(t.dst_size[0] / s) for t in warps) + 1,
        max(math.ceil(t.dst_size[1] / s) for t in warps),
    )

    calls = []
    real = F.grid_sample
    monkeypatch.setattr(F, "grid_sample", lambda *a, **k: calls.append(1) or real(*a, **k))
    out, valid = warp_feature_batch(feats, warps, s, sizes, grid)
    assert len(calls) == 1
    assert out.shape == (3, 6, *grid) and valid.shape == (3, *grid)
    for i, t in enumerate(warps):
        o, v = t.warp_features(feats[i], s, sizes[i], grid)
        assert torch.equal(v, valid[i])
        assert torch.allclose(o, out[i], atol=1e-6)
    # Default grid covers every x'.
    out_d, _ = warp_feature_batch(feats, warps, s)
    assert out_d.shape[-2:] == (grid[0] - 1, grid[1])


def test_warp_feature_batch_bad_input():
    warps = [AffineWarp.hflip(40, 52)]
    feats = torch.zeros(1, 2, 10, 13)
    with pytest.raises(ValueError, match="2 warps"):
        warp_feature_batch(feats, warps * 2, 4)
    with pytest.raises(ValueError, match="src_sizes"):
        warp_feature_batch(feats, warps, 4, [(41, 52)])
    with pytest.raises(ValueError, match="feature map of at least"):
        warp_feature_batch(feats, warps, 2)
    with pytest.raises(ValueError, match=r"\(B, C, H, W\)"):
        warp_feature_batch(feats[0], warps, 4)


# --------------------------------------------------------------------------- family


@pytest.mark.parametrize(
    "kwargs,param",
    [
        ({"names": ("flip", "shear")}, "shear"),
        ({"crop_range": (0.0, 1.0)}, "crop_range"),
        ({"crop_range": (0.5, 1.2)}, "crop_range"),
        ({"crop_range": (0.9, 0.6)}, "crop_range"),
        ({"rotation_range": (40.0, 10.0)}, "rotation_range"),
        ({"scale_range": (0.0, 2.0)}, "scale_range"),
        ({"scale_range": (2.0, 0.5)}, "scale_range"),
        ({"scale_range": (1.0,)}, "scale_range"),
        ({"flip_prob": 1.5}, "flip_prob"),
    ],
)
def test_family_rejects_bad_config(kwargs, param):
    with pytest.raises(ValueError, match=param):
        TransformFamily(**kwargs)


def test_family_unknown_name_lists_allowed():
    with pytest.raises(ValueError) as e:
        TransformFamily(names=("scale",))
    for name in ("'scale'", "flip", "crop", "rotation", "scaling"):
        assert name in str(e.value)


def test_family_is_reproducible():
    fam = TransformFamily(names=("flip", "crop", "rotation", "scaling"))
    r1, r2, r3 = (np.random.default_rng(s) for s in (7, 7, 8))
    a = [fam.sample(70, 90, r1) for _ in range(10)]
    b = [fam.sample(70, 90, r2) for _ in range(10)]
    c = [fam.sample(70, 90, r3) for _ in range(10)]
    assert all(np.array_equal(x.matrix, y.matrix) for x, y in zip(a, b))
    assert [x.dst_size for x in a] == [y.dst_size for y in b]
    assert not all(np.array_equal(x.matrix, y.matrix) for x, y in zip(a, c))
    assert all(t.src_size == (70, 90) for t in a)


def test_family_crop_keeps_side_fractions_in_range():
    h, w = 97, 131
    fam = TransformFamily(names=("crop",), crop_range=(0.6, 0.9))
    rng = np.random.default_rng(0)
    fy, fx = [], []
    for _ in range(200):
        t = fam.sample(h, w, rng)
        assert np.array_equal(t.matrix[:, :2], np.eye(2))  # a pure, pixel-aligned shift
        x0, y0 = -t.matrix[:, 2]
        ch, cw = t.dst_size
        assert x0 == int(x0) and y0 == int(y0) and 0 <= y0 <= h - ch and 0 <= x0 <= w - cw
        fy.append(ch / h)
        fx.append(cw / w)
    fy, fx = np.array(fy), np.array(fx)
    for f in (fy, fx):
        assert f.min() >= 0.6 and f.max() <= 0.9 and f.max() - f.min() > 0.2
    assert np.abs(fy - fx).max() > 0.1  # sides are drawn independently


def test_family_members_follow_their_ranges():
    rng = np.random.default_rng(1)
    rot = TransformFamily(names=("rotation",), rotation_range=(10.0, 20.0))
    angles = []
    for _ in range(100):
        m = rot.sample(50, 60, rng).matrix
        angles.append(math.degrees(math.atan2(m[0, 1], m[0, 0])))
    angles = np.array(angles)
    assert np.all((np.abs(angles) >= 10 - 1e-9) & (np.abs(angles) <= 20 + 1e-9))
    assert (angles > 0).any() and (angles < 0).any()

    sc = TransformFamily(names=("scaling",), scale_range=(0.5, 2.0))
    factors = np.array([sc.sample(100, 120, rng).dst_size[1] / 120 for _ in range(100)])
    assert factors.min() >= 0.5 - 1e-2 and factors.max() <= 2.0 + 1e-2
    assert (factors < 0.9).any() and (factors > 1.1).any()

    flips = TransformFamily(names=("flip",))
    flipped = [flips.sample(10, 12, rng).matrix[0, 0] < 0 for _ in range(400)]
    assert 0.4 < np.mean(flipped) < 0.6
    never = TransformFamily(names=("flip",), flip_prob=0.0)
    assert all(np.array_equal(never.sample(10, 12, rng).matrix, np.eye(2, 3)) for _ in range(20))


def test_family_guards_degenerate_views():
    fam = TransformFamily(
        names=("flip", "crop", "rotation", "scaling"), crop_range=(0.1, 0.2), scale_range=(0.1, 0.2)
    )
    rng = np.random.default_rng(0)
    for _ in range(50):
        t = fam.sample(40, 50, rng)
        assert min(t.dst_size) >= 8 and t.src_size == (40, 50)
        assert t.valid_mask().any()
    # An image already smaller than the guard is not shrunk further.
    t = fam.sample(6, 30, rng)
    assert t.dst_size[0] >= 6
