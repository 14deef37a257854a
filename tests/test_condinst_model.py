"""CondInst: official state-dict layout and config values, the dynamic head against an
explicit conv stack, relative coordinates, FCOS assignment, aligned bilinear, losses,
matching, pixel weights, a few SGD steps, inference and the two config files."""
import math
import os

import pytest
import torch
import torch.nn.functional as F
from detectron2.config import get_cfg
from detectron2.modeling import build_model
from detectron2.structures import BitMasks, Boxes, Instances, PolygonMasks

from instunique.segmenters.condinst import (
    CondInst,
    DynamicMaskHead,
    add_condinst_config,
    aligned_bilinear,
    dynamic_mask_logits,
    mask_logits_on_grid,
    relative_coords,
)
from instunique.segmenters.condinst.inference import detections_to_instances, fcos_detections
from instunique.segmenters.condinst.losses import dice_loss
from instunique.segmenters.condinst.targets import (
    assign_fcos_targets,
    compute_locations,
    level_size_ranges,
    mask_centers,
    masks_to_boxes,
)

from utils import DATA, fake_view, get_config, train_step

R50 = "coco/instance-segmentation/condinst_R50_1x.yaml"
SHAPES = "shapes/condinst_effl0_shapes.yaml"
# A narrower, randomly initialised shapes model: fast, same structure.
SMALL = ["MODEL.EFFICIENTNET.WEIGHTS", "", "MODEL.FPN.OUT_CHANNELS", 32,
         "MODEL.CONDINST.MASK_BRANCH.CHANNELS", 32, "MODEL.CONDINST.MASK_BRANCH.NUM_CONVS", 2,
         "MODEL.FCOS.NUM_CLS_CONVS", 2, "MODEL.FCOS.NUM_BOX_CONVS", 2]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """These models are tiny: a second intra-op thread only adds synchronisation, which on a
    busy 2-core machine costs 50x (8 SGD steps: 0.6 s on 1 thread, 33 s on 2)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def small_model(*opts, seed: int = 0):
    torch.manual_seed(seed)
    return build_model(get_config(SHAPES, *SMALL, *opts))


def batch_of_two():
    return [fake_view(64, 96, 3, 0, image_id=1), fake_view(64, 96, 2, 1, image_id=2)]


def raw_and_targets(model, batch):
    images = model.preprocess_image(batch)
    return model.predict(images), model.prepare_targets(batch, images), images


# ------------------------------------------------------------------ official layout


def test_state_dict_names_shapes_dtypes_and_order_match_the_official_model():
    with open(os.path.join(DATA, "condinst_MS_R_50_1x.tsv")) as f:
        reference = [tuple(line.rstrip("\n").split("\t")) for line in f if line.strip()]
    model = build_model(get_config(R50, "MODEL.WEIGHTS", ""))
    ours = [(k, str(tuple(v.shape)), str(v.dtype).replace("torch.", ""))
            for k, v in model.state_dict().items()]
    assert len(reference) == 372
    assert ours == reference
    assert sum(p.numel() for p in model.parameters()) == 34_111_179
    frozen = [n for n, p in model.named_parameters() if not p.requires_grad]
    assert len(frozen) == 11 and all(n.startswith(("backbone.bottom_up.stem.",
                                                   "backbone.bottom_up.res2.")) for n in frozen)
    assert model.mask_head.sizes_of_interest.tolist() == [64, 128, 256, 512, 1024]
    assert model.controller.out_channels == model.mask_head.num_gen_params == 169


# The official MS_R_50_1x resolved config (AdelaiDet cfg.dump()) for the keys we add.
OFFICIAL_FCOS = {
    "BOX_QUALITY": "ctrness", "CENTER_SAMPLE": True, "FPN_STRIDES": [8, 16, 32, 64, 128],
    "INFERENCE_TH_TEST": 0.05, "INFERENCE_TH_TRAIN": 0.05,
    "IN_FEATURES": ["p3", "p4", "p5", "p6", "p7"], "LOC_LOSS_TYPE": "giou", "LOSS_ALPHA": 0.25,
    "LOSS_GAMMA": 2.0, "LOSS_NORMALIZER_CLS": "fg", "LOSS_WEIGHT_CLS": 1.0, "NMS_TH": 0.6,
    "NORM": "GN", "NUM_BOX_CONVS": 4, "NUM_CLASSES": 80, "NUM_CLS_CONVS": 4,
    "NUM_SHARE_CONVS": 0, "POST_NMS_TOPK_TEST": 100, "POST_NMS_TOPK_TRAIN": 100,
    "POS_RADIUS": 1.5, "PRE_NMS_TOPK_TEST": 1000, "PRE_NMS_TOPK_TRAIN": 1000,
    "PRIOR_PROB": 0.01, "SIZES_OF_INTEREST": [64, 128, 256, 512], "THRESH_WITH_CTR": True,
    "TOP_LEVELS": 2, "USE_DEFORMABLE": False, "USE_RELU": True, "USE_SCALE": True,
    "YIELD_BOX_FEATURES": False, "YIELD_PROPOSAL": False,
}
OFFICIAL_CONDINST = {
    "BOTTOM_PIXELS_REMOVED": -1,
    "MASK_BRANCH": {"CHANNELS": 128, "IN_FEATURES": ["p3", "p4", "p5"], "NORM": "BN",
                    "NUM_CONVS": 4, "OUT_CHANNELS": 8, "SEMANTIC_LOSS_ON": False},
    "MASK_HEAD": {"CHANNELS": 8, "DISABLE_REL_COORDS": False, "NUM_LAYERS": 3,
                  "USE_FP16": False},
    "MASK_OUT_STRIDE": 4, "MAX_PROPOSALS": 500, "TOPK_PROPOSALS_PER_IM": -1,
}


def _plain(node):
    if isinstance(node, dict):
        return {k: _plain(v) for k, v in node.items()}
    return list(node) if isinstance(node, (list, tuple)) else node


def test_defaults_and_the_coco_recipe_carry_the_official_values():
    fresh = get_cfg()
    fresh.MODEL.DEVICE = "cpu"
    add_condinst_config(fresh)
    assert fresh.MODEL.DEVICE == "cpu"  # adding the keys leaves the device alone
    assert _plain(fresh.MODEL.FCOS) == OFFICIAL_FCOS
    assert _plain(fresh.MODEL.CONDINST) == OFFICIAL_CONDINST
    cfg = get_config(R50)
    assert _plain(cfg.MODEL.FCOS) == OFFICIAL_FCOS
    assert _plain(cfg.MODEL.CONDINST) == OFFICIAL_CONDINST
    assert cfg.MODEL.WEIGHTS == "detectron2://ImageNetPretrained/MSRA/R-50.pkl"
    assert cfg.MODEL.BACKBONE.NAME == "build_fcos_resnet_fpn_backbone"
    assert cfg.MODEL.BACKBONE.FREEZE_AT == 2 and cfg.MODEL.RESNETS.NORM == "FrozenBN"
    s = cfg.SOLVER
    assert (s.OPTIMIZER, s.IMS_PER_BATCH, s.BASE_LR, tuple(s.STEPS), s.MAX_ITER) == (
        "SGD", 16, 0.01, (60000, 80000), 90000)
    assert (s.MOMENTUM, s.WEIGHT_DECAY, s.WARMUP_ITERS, s.WARMUP_FACTOR) == (
        0.9, 0.0001, 1000, 0.001)
    assert tuple(cfg.INPUT.MIN_SIZE_TRAIN) == (640, 672, 704, 736, 768, 800)
    assert (cfg.INPUT.MAX_SIZE_TRAIN, cfg.INPUT.MIN_SIZE_TEST, cfg.INPUT.FORMAT) == (
        1333, 800, "BGR")


# ------------------------------------------------------------------ build-time checks


@pytest.mark.parametrize("layers, channels, out_channels, no_rel", [
    (3, 8, 8, False), (2, 4, 8, False), (4, 16, 6, True), (3, 8, 3, False),
])
def test_controller_predicts_the_dynamic_heads_parameter_count(layers, channels, out_channels,
                                                               no_rel):
    model = small_model("MODEL.CONDINST.MASK_HEAD.NUM_LAYERS", layers,
                        "MODEL.CONDINST.MASK_HEAD.CHANNELS", channels,
                        "MODEL.CONDINST.MASK_BRANCH.OUT_CHANNELS", out_channels,
                        "MODEL.CONDINST.MASK_HEAD.DISABLE_REL_COORDS", no_rel)
    c0 = out_channels + (0 if no_rel else 2)
    weights = c0 * channels + channels * channels * (layers - 2) + channels
    biases = channels * (layers - 1) + 1
    assert model.mask_head.num_gen_params == weights + biases
    assert model.controller.out_channels == weights + biases
    with torch.no_grad():
        raw, targets, _ = raw_and_targets(model, batch_of_two())
    assert raw["params"].shape[-1] == weights + biases
    assert raw["mask_feats"].shape[1] == out_channels
    losses, _ = model.losses(raw, targets)
    assert all(torch.isfinite(v) for v in losses.values())


def test_parts_that_do_not_fit_fail_at_build_naming_the_key():
    cfg = get_config(SHAPES, *SMALL)
    args = CondInst.from_config(cfg)
    other = get_config(SHAPES, *SMALL, "MODEL.CONDINST.MASK_BRANCH.OUT_CHANNELS", 6)
    args_other = CondInst.from_config(other)
    with pytest.raises(ValueError, match="MASK_BRANCH.OUT_CHANNELS"):
        CondInst(**{**args, "mask_head": args_other["mask_head"]})
    with pytest.raises(ValueError, match="MASK_HEAD.CHANNELS"):
        CondInst(**{**args, "controller": args_other["controller"]})


@pytest.mark.parametrize("opts, error, key", [
    (["MODEL.BACKBONE.NAME", "NoSuchBackbone"], KeyError, "MODEL.BACKBONE.NAME"),
    (["MODEL.PROPOSAL_GENERATOR.NAME", "RPN"], KeyError, "MODEL.PROPOSAL_GENERATOR.NAME"),
    (["MODEL.CONDINST.MASK_HEAD.NUM_LAYERS", 1], ValueError, "MASK_HEAD.NUM_LAYERS"),
    (["MODEL.FCOS.SIZES_OF_INTEREST", [16, 32, 64]], ValueError, "SIZES_OF_INTEREST"),
    (["MODEL.FCOS.FPN_STRIDES", [8, 16, 32, 64, 64]], ValueError, "FPN_STRIDES"),
    (["MODEL.FPN.OUT_CHANNELS", 48], ValueError, "MODEL.FPN.OUT_CHANNELS"),
    (["MODEL.CONDINST.MASK_OUT_STRIDE", 3], ValueError, "MASK_OUT_STRIDE"),
    (["MODEL.CONDINST.TOPK_PROPOSALS_PER_IM", 64], ValueError, "TOPK_PROPOSALS_PER_IM"),
    (["MODEL.CONDINST.MASK_BRANCH.IN_FEATURES", ["p2", "p3"]], ValueError,
     "MASK_BRANCH.IN_FEATURES"),
    (["MODEL.FCOS.LOC_LOSS_TYPE", "l1"], ValueError, "LOC_LOSS_TYPE"),
    (["MODEL.FCOS.USE_DEFORMABLE", True], ValueError, "USE_DEFORMABLE"),
    (["MODEL.CONDINST.MASK_BRANCH.SEMANTIC_LOSS_ON", True], ValueError, "SEMANTIC_LOSS_ON"),
])
def test_bad_configs_fail_at_build_naming_the_key(opts, error, key):
    with pytest.raises(error, match=key):
        build_model(get_config(SHAPES, *SMALL, *opts))


# ------------------------------------------------------------------ dynamic head


def _explicit_conv_stack(params, loc, soi, feats, channels, layers):
    """One instance, by hand: relative coordinates pixel by pixel, then F.conv2d per layer
    with the filters cut from ``params`` in the order w0, w1, ..., b0, b1, ...."""
    c, h, w = feats.shape
    rel = torch.zeros(2, h, w)
    for i in range(h):
        for j in range(w):
            px, py = 8 * j + 4, 8 * i + 4  # stride-8 grid: stride * index + stride // 2
            rel[0, i, j] = (loc[0] - px) / soi
            rel[1, i, j] = (loc[1] - py) / soi
    x = torch.cat([rel, feats])[None]
    widths = [c + 2] + [channels] * (layers - 1) + [1]
    shapes = list(zip(widths[1:], widths[:-1]))
    offset, weights, biases = 0, [], []
    for c_out, c_in in shapes:
        weights.append(params[offset : offset + c_out * c_in].reshape(c_out, c_in, 1, 1))
        offset += c_out * c_in
    for c_out, _ in shapes:
        biases.append(params[offset : offset + c_out])
        offset += c_out
    assert offset == len(params)
    for k, (wk, bk) in enumerate(zip(weights, biases)):
        x = F.conv2d(x, wk, bk)
        if k < layers - 1:
            x = F.relu(x)
    return x[0, 0]


@pytest.mark.parametrize("channels, layers", [(8, 3), (4, 2), (5, 4)])
def test_dynamic_head_equals_a_hand_computed_conv_stack(channels, layers):
    torch.manual_seed(0)
    c, h, w = 6, 5, 7
    head = DynamicMaskHead(c, channels, layers, True, [64, 128, 256, 512], mask_out_stride=8)
    feats = torch.randn(2, c, h, w)
    params = torch.randn(3, head.num_gen_params)
    locations = torch.tensor([[20.0, 12.0], [4.0, 36.0], [52.0, 28.0]])
    levels = torch.tensor([0, 2, 4])
    image = torch.tensor([1, 0, 1])
    logits = head(params, locations, levels, feats, image, feat_stride=8)
    assert logits.shape == (3, h, w)
    for r in range(3):
        soi = [64, 128, 256, 512, 1024][levels[r]]
        expected = _explicit_conv_stack(params[r], locations[r], soi, feats[image[r]],
                                        channels, layers)
        torch.testing.assert_close(logits[r], expected, rtol=1e-5, atol=1e-5)


def test_relative_coordinates_at_a_known_location():
    grid = compute_locations(2, 3, 8, "cpu")
    assert grid.tolist() == [[4, 4], [12, 4], [20, 4], [4, 12], [12, 12], [20, 12]]
    rel = relative_coords(torch.tensor([[100.0, 60.0]]), torch.tensor([64.0]), grid)
    assert rel.shape == (1, 2, 6)
    assert rel[0, :, 0].tolist() == [(100 - 4) / 64, (60 - 4) / 64]  # (x, y) order
    assert rel[0, :, 5].tolist() == [(100 - 20) / 64, (60 - 12) / 64]


def test_dynamic_mask_logits_on_a_set_of_pixels_equals_the_grid():
    torch.manual_seed(1)
    c, h, w = 8, 6, 9
    feats = torch.randn(1, c, h, w)
    params = torch.randn(4, 169)
    locations = torch.rand(4, 2) * 70
    soi = torch.tensor([64.0, 128.0, 64.0, 1024.0])
    grid_logits = mask_logits_on_grid(params, locations, soi, feats, torch.zeros(4).long(),
                                      feat_stride=8, out_stride=8, channels=8, num_layers=3)
    pick = torch.tensor([0, 5, 17, 53, 30, 31])
    pixels = compute_locations(h, w, 8, "cpu")[pick]
    shared = feats.flatten(2)[:, :, pick]  # (1, C, N)
    on_set = dynamic_mask_logits(params, locations, soi, shared, pixels, 8, 3)
    torch.testing.assert_close(on_set, grid_logits.flatten(1)[:, pick], rtol=1e-6, atol=1e-6)
    # Per-instance features (R, C, N) give the same.
    per_instance = dynamic_mask_logits(params, locations, soi, shared.expand(4, -1, -1),
                                       pixels, 8, 3)
    torch.testing.assert_close(per_instance, on_set, rtol=1e-6, atol=1e-6)
    # Pixels may come from anywhere: another "image" with its own coordinates.
    other = torch.randn(1, c, 3)
    other_xy = torch.tensor([[1000.0, 5.0], [3.0, 400.0], [77.0, 77.0]])
    out = dynamic_mask_logits(params, locations, soi, other, other_xy, 8, 3)
    assert out.shape == (4, 3) and torch.isfinite(out).all()


# ------------------------------------------------------------------ FCOS assignment


def _assign(boxes, masks, strides=(8, 16), soi=(32,), center=True, size=64):
    locs = torch.cat([compute_locations(size // s, size // s, s, "cpu") for s in strides])
    per_level = [(size // s) ** 2 for s in strides]
    stride_of = torch.cat([torch.full((n,), float(s)) for n, s in zip(per_level, strides)])
    ranges = torch.tensor(level_size_ranges(soi))
    level_of = torch.cat([torch.full((n,), i) for i, n in enumerate(per_level)])
    labels = torch.arange(len(boxes)) + 1
    centers = mask_centers(masks) if center else None
    return locs, level_of, assign_fcos_targets(locs, stride_of, ranges[level_of],
                                               boxes, labels, 5, centers, 1.5)


def _box_masks(boxes, size=64):
    masks = torch.zeros(len(boxes), size, size, dtype=torch.bool)
    for m, (x0, y0, x1, y1) in zip(masks, boxes.long().tolist()):
        m[y0:y1, x0:x1] = True
    return masks


def test_fcos_assignment_on_a_hand_made_box():
    box = torch.tensor([[8.0, 8.0, 40.0, 40.0]])
    masks = _box_masks(box)
    assert mask_centers(masks).tolist() == [[23.5, 23.5]]
    locs, level, t = _assign(box, masks)
    pos = t.positive
    # Centre region 23.5 +- 1.5 * 8 = (11.5, 35.5): P3 locations at 12, 20, 28; their
    # max(l, t, r, b) <= 28 is in P3's range [-1, 32]. On P4 the one location inside
    # (24, 24) has max distance 16, below P4's range [32, 1e8]: no P4 positive.
    assert sorted(map(tuple, locs[pos].tolist())) == [
        (x, y) for x in (12.0, 20.0, 28.0) for y in (12.0, 20.0, 28.0)]
    assert (level[pos] == 0).all()
    assert (t.labels[pos] == 1).all() and (t.labels[~pos] == 5).all()
    assert (t.gt_inds[pos] == 0).all() and (t.gt_inds[~pos] == -1).all()
    k = int(torch.nonzero((locs == torch.tensor([12.0, 20.0])).all(1))[0])
    # (l, t, r, b) = (12 - 8, 20 - 8, 40 - 12, 40 - 20) / stride 8.
    assert t.reg_targets[k].tolist() == [0.5, 1.5, 3.5, 2.5]
    assert t.ctrness[k].item() == pytest.approx(math.sqrt(0.5 / 3.5 * 1.5 / 2.5))
    assert (t.reg_targets[~pos] == 0).all() and (t.ctrness[~pos] == 0).all()

    # A 64 px box: every centre location of P3 is too far from some side (> 32): P4 takes
    # it, at 8, 24, 40 (centre region 31.5 +- 24 = (7.5, 55.5)).
    big = torch.tensor([[0.0, 0.0, 64.0, 64.0]])
    locs, level, t = _assign(big, _box_masks(big))
    assert (level[t.positive] == 1).all() and t.positive.sum() == 9
    assert sorted({x for x, _ in locs[t.positive].tolist()}) == [8.0, 24.0, 40.0]

    # Without centre sampling: every P3 location strictly inside the box and in range.
    locs, level, t = _assign(box, masks, center=False)
    inside = ((locs > 8) & (locs < 40)).all(1) & (level == 0)
    assert torch.equal(t.positive, inside)


def test_fcos_assignment_ties_go_to_the_smallest_box_and_centres_follow_the_mask():
    boxes = torch.tensor([[4.0, 4.0, 44.0, 44.0], [8.0, 8.0, 40.0, 40.0]])
    locs, _, t = _assign(boxes, _box_masks(boxes))
    k = int(torch.nonzero((locs == torch.tensor([20.0, 20.0])).all(1))[0])
    assert t.gt_inds[k] == 1 and t.labels[k] == 2  # the smaller box (area 1024 < 1600)
    # An L-shaped mask pulls the centre region away from the box centre.
    box = torch.tensor([[0.0, 0.0, 48.0, 48.0]])
    mask = torch.zeros(1, 64, 64, dtype=torch.bool)
    mask[0, :48, :8] = True
    mask[0, 40:48, :48] = True
    cx, cy = mask_centers(mask)[0].tolist()
    assert cx < 16 and cy > 32
    locs, _, t = _assign(box, mask)
    assert (locs[t.positive, 0] < cx + 12).all() and (locs[t.positive, 1] > cy - 12).all()


def test_masks_to_boxes_equals_detectron2s_bounding_boxes():
    masks = torch.zeros(3, 20, 30, dtype=torch.bool)
    masks[0, 3:7, 5:11] = True
    masks[1, 0, 29] = True
    expected = BitMasks(masks).get_bounding_boxes().tensor
    assert torch.equal(masks_to_boxes(masks), expected)


# ------------------------------------------------------------------ aligned bilinear


def test_aligned_bilinear_on_a_known_input():
    x = torch.tensor([[[[0.0, 1.0], [2.0, 3.0]]]])
    out = aligned_bilinear(x, 2)
    # Output pixel j reads input coordinate max(j - 1, 0) / 2: 0, 0, 0.5, 1.
    assert out[0, 0].tolist() == [[0.0, 0.0, 0.5, 1.0], [0.0, 0.0, 0.5, 1.0],
                                  [1.0, 1.0, 1.5, 2.0], [2.0, 2.0, 2.5, 3.0]]
    assert aligned_bilinear(x, 1) is x
    # Any factor f: j -> clamp((j - f // 2) / f, 0, size - 1), bilinear.
    torch.manual_seed(0)
    y = torch.randn(1, 2, 3, 4)
    for f in (3, 4):
        coords_r = ((torch.arange(3 * f) - f // 2) / f).clamp(0, 2)
        coords_c = ((torch.arange(4 * f) - f // 2) / f).clamp(0, 3)
        r0, c0 = coords_r.floor().long(), coords_c.floor().long()
        r1, c1 = (r0 + 1).clamp(max=2), (c0 + 1).clamp(max=3)
        fr, fc = (coords_r - r0)[:, None], (coords_c - c0)[None]
        expected = ((1 - fr) * (1 - fc) * y[..., r0[:, None], c0[None]]
                    + (1 - fr) * fc * y[..., r0[:, None], c1[None]]
                    + fr * (1 - fc) * y[..., r1[:, None], c0[None]]
                    + fr * fc * y[..., r1[:, None], c1[None]])
        torch.testing.assert_close(aligned_bilinear(y, f), expected, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------ raw outputs, losses


@pytest.fixture(scope="module")
def trained_ish():
    """A small model, its batch, raw outputs and targets (train mode)."""
    model = small_model()
    model.train()
    batch = batch_of_two()
    raw, targets, images = raw_and_targets(model, batch)
    return model, batch, raw, targets, images


def test_raw_structure(trained_ish):
    model, _, raw, _, images = trained_ish
    b, (h, w) = 2, images.tensor.shape[-2:]
    assert (h, w) == (64, 96)
    sizes = [(math.ceil(h / s), math.ceil(w / s)) for s in (8, 16, 32, 64, 128)]
    total = sum(a * c for a, c in sizes)
    assert raw["cls_logits"].shape == (b, total, 4)
    assert raw["bbox_reg"].shape == (b, total, 4) and (raw["bbox_reg"] >= 0).all()
    assert raw["ctrness"].shape == (b, total, 1)
    assert raw["params"].shape == (b, total, 169)
    assert raw["mask_feats"].shape == (b, 8, h // 8, w // 8)
    assert raw["levels"].dtype == torch.long and raw["levels"].shape == (b, total)
    expected_levels = torch.cat([torch.full((a * c,), i) for i, (a, c) in enumerate(sizes)])
    assert torch.equal(raw["levels"][1], expected_levels)
    expected_locs = torch.cat([compute_locations(a, c, s, "cpu")
                               for (a, c), s in zip(sizes, (8, 16, 32, 64, 128))])
    assert torch.equal(raw["locations"][0], expected_locs)
    assert torch.equal(raw["locations"][1], expected_locs)
    assert raw["locations"][1:2].shape == (1, total, 2)  # batch slicing works
    # The mask loss's logits are dynamic_mask_logits on the stride-8 grid, bit for bit.
    src = torch.tensor([3, 40, 100])
    ours = model.mask_logits(raw, 1, src)
    grid = compute_locations(h // 8, w // 8, 8, "cpu")
    direct = dynamic_mask_logits(raw["params"][1, src], raw["locations"][1, src],
                                 model.mask_head.soi(raw["levels"][1, src]),
                                 raw["mask_feats"][1:2].flatten(2), grid, 8, 3)
    assert torch.equal(ours, aligned_bilinear(direct.reshape(3, 1, h // 8, w // 8), 2)[:, 0])


def _manual_loss_mask(model, raw, targets, matching):
    losses = []
    for b, (src, tgt) in enumerate(matching):
        probs = model.mask_logits(raw, b, src).sigmoid().flatten(1)
        gt = targets[b]["masks"][tgt][:, 2::4, 2::4].flatten(1).float()
        losses.append(1 - 2 * (probs * gt).sum(1) / ((probs ** 2).sum(1) + gt.sum(1) + 1e-5))
    return torch.cat(losses).mean()


def test_losses_terms_and_matching(trained_ish):
    model, _, raw, targets, _ = trained_ish
    losses, matching = model.losses(raw, targets)
    assert set(losses) == {"loss_fcos_cls", "loss_fcos_loc", "loss_fcos_ctr", "loss_mask"}
    assert all(torch.isfinite(v) and v > 0 for v in losses.values())
    # The matching: each image's positive locations (all of them: fewer than 500) and their
    # assigned instances.
    for b, (src, tgt) in enumerate(matching):
        assigned = model.assign(raw, b, targets[b])
        assert torch.equal(src, torch.nonzero(assigned.positive).squeeze(1))
        assert torch.equal(tgt, assigned.gt_inds[src]) and len(src) > 0
    torch.testing.assert_close(losses["loss_mask"], _manual_loss_mask(model, raw, targets,
                                                                      matching))

    only, same = model.losses(raw, targets, terms=("masks",))
    assert set(only) == {"loss_mask"}
    torch.testing.assert_close(only["loss_mask"], losses["loss_mask"])
    assert all(torch.equal(a[0], b[0]) for a, b in zip(same, matching))

    # A given matching: every positive of image 0 now supervised by instance 2, image 1's
    # by one location only. loss_mask follows it; the FCOS terms keep their assignment.
    given = [(matching[0][0], torch.full_like(matching[0][1], 2)),
             (matching[1][0][:1], matching[1][1][:1])]
    swapped, returned = model.losses(raw, targets, matching=given)
    assert returned is given
    torch.testing.assert_close(swapped["loss_mask"], _manual_loss_mask(model, raw, targets,
                                                                       given))
    assert not torch.isclose(swapped["loss_mask"], losses["loss_mask"])
    for key in ("loss_fcos_cls", "loss_fcos_loc", "loss_fcos_ctr"):
        torch.testing.assert_close(swapped[key], losses[key])
    with pytest.raises(ValueError, match="unknown loss terms"):
        model.losses(raw, targets, terms=("boxes", "dice"))


def test_pixel_valid_weights_the_mask_loss(trained_ish):
    model, _, raw, targets, _ = trained_ish
    _, matching = model.losses(raw, targets, terms=("masks",))
    ones = torch.ones(2, 8, 12)
    full = model.losses(raw, targets, None, matching, ("masks",))[0]["loss_mask"]
    torch.testing.assert_close(model.losses(raw, targets, ones, matching, ("masks",))[0][
        "loss_mask"], full)
    # Zero everywhere: dice 1 - 0 / eps = 1 for every instance, whatever the masks.
    flipped = [dict(t, masks=~t["masks"]) for t in targets]
    zero = [model.losses(raw, t, torch.zeros(2, 8, 12), matching, ("masks",))[0]["loss_mask"]
            for t in (targets, flipped)]
    assert zero[0].item() == pytest.approx(1.0) and zero[1].item() == pytest.approx(1.0)
    # Left half valid: what the masks say on the right half does not matter.
    half = torch.zeros(2, 8, 12)
    half[:, :, :6] = 1.0
    changed = []
    for t in targets:
        m = t["masks"].clone()
        m[:, :, 48:] = ~m[:, :, 48:]
        changed.append(dict(t, masks=m))
    a = model.losses(raw, targets, half, matching, ("masks",))[0]["loss_mask"]
    b = model.losses(raw, changed, half, matching, ("masks",))[0]["loss_mask"]
    torch.testing.assert_close(a, b)
    assert not torch.isclose(a, full)
    # The dice itself: weights 0 drop a pixel from both sums.
    p, g = torch.tensor([[0.9, 0.2, 0.7]]), torch.tensor([[1.0, 0.0, 0.0]])
    w = torch.tensor([[1.0, 1.0, 0.0]])
    expected = 1 - 2 * 0.9 / (0.81 + 0.04 + 1 + 1e-5)
    assert dice_loss(p, g, w).item() == pytest.approx(expected, rel=1e-5)


def test_max_proposals_subsamples_and_empty_targets_train(trained_ish):
    model, _, raw, targets, _ = trained_ish
    saved = model.max_proposals
    try:
        model.max_proposals = 5
        _, matching = model.losses(raw, targets, terms=("masks",))
        assert sum(len(s) for s, _ in matching) == 5
        for b, (src, tgt) in enumerate(matching):
            assigned = model.assign(raw, b, targets[b])
            assert assigned.positive[src].all() and torch.equal(tgt, assigned.gt_inds[src])
        # Instead, per image and instance the best max(k // instances, 1) locations by
        # max_k sigmoid(class k) * sigmoid(centerness).
        model.max_proposals, model.topk_proposals_per_im = -1, 4
        _, matching = model.losses(raw, targets, terms=("masks",))
        for b, (src, tgt) in enumerate(matching):
            assigned = model.assign(raw, b, targets[b])
            score = (raw["cls_logits"][b].sigmoid().max(1).values
                     * raw["ctrness"][b, :, 0].sigmoid())
            per = max(4 // len(assigned.gt_inds[assigned.positive].unique()), 1)
            for g in tgt.unique():
                mine = torch.nonzero(assigned.gt_inds == g).squeeze(1)
                best = mine[score[mine].topk(min(per, len(mine))).indices]
                assert sorted(src[tgt == g].tolist()) == sorted(best.tolist())
    finally:
        model.max_proposals, model.topk_proposals_per_im = saved, -1
    empty = [{"labels": t["labels"][:0], "masks": t["masks"][:0]} for t in targets]
    losses, matching = model.losses(raw, empty)
    assert all(len(s) == 0 for s, _ in matching)
    assert losses["loss_mask"].item() == 0.0 and losses["loss_fcos_loc"].item() == 0.0
    assert losses["loss_fcos_cls"] > 0 and losses["loss_mask"].requires_grad


def test_targets_from_polygons_bitmasks_tensors_and_boxes():
    model = small_model()
    h, w = 50, 70
    polygons = [[[5.0, 5.0, 30.0, 5.0, 30.0, 40.0, 5.0, 40.0]]]
    reference = BitMasks.from_polygon_masks(polygons, h, w).tensor
    image = torch.zeros(3, h, w, dtype=torch.uint8)
    outs = []
    for masks in (PolygonMasks(polygons), BitMasks(reference), reference.clone()):
        x = {"image": image, "instances": Instances((h, w), gt_classes=torch.tensor([3]),
                                                    gt_masks=masks)}
        outs.append(model.prepare_targets([x], model.preprocess_image([x]))[0])
    for t in outs:
        assert t["masks"].shape == (1, 64, 96) and t["masks"].dtype == torch.bool
        assert torch.equal(t["masks"], outs[0]["masks"]) and t["labels"].tolist() == [3]
        assert torch.equal(t["boxes"], masks_to_boxes(reference))  # no gt_boxes: the masks'
    x = {"image": image, "instances": Instances(
        (h, w), gt_classes=torch.tensor([3]), gt_masks=BitMasks(reference),
        gt_boxes=Boxes(torch.tensor([[1.0, 2.0, 33.0, 44.0]])))}
    t = model.prepare_targets([x], model.preprocess_image([x]))[0]
    assert t["boxes"].tolist() == [[1.0, 2.0, 33.0, 44.0]]  # gt_boxes when present
    x["instances"].gt_classes = torch.tensor([4])
    x["image_id"] = 17
    with pytest.raises(ValueError, match="image_id 17.*NUM_CLASSES"):
        model.prepare_targets([x], model.preprocess_image([x]))


def test_a_few_sgd_steps_lower_the_loss():
    model = small_model(seed=3)
    batch = batch_of_two()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=0.01, momentum=0.9)
    totals = []
    for _ in range(8):
        opt.zero_grad()
        losses = train_step(model, batch)
        totals.append(sum(v.item() for v in losses.values()))
        opt.step()
    assert totals[-1] < totals[0] - 0.1, totals
    assert model.mask_head._iter.item() == 8.0


# ------------------------------------------------------------------ inference


def test_fcos_detections_threshold_nms_and_topk():
    # Five P3 locations (stride 8) of K = 2 classes.
    locations = torch.tensor([[4.0, 4.0], [8.0, 4.0], [44.0, 44.0], [60.0, 60.0],
                              [20.0, 20.0]])
    levels = torch.zeros(5, dtype=torch.long)
    reg = torch.full((5, 4), 1.0)  # 8 px each side
    cls = torch.full((5, 2), -10.0)
    cls[0, 0], cls[1, 0] = 3.0, 2.0  # overlapping boxes (IoU 0.6 > 0.5), same class
    cls[1, 1] = 1.0                   # same box as 1, other class: survives NMS
    cls[2, 0] = 0.5
    cls[3, 1] = -1.0
    ctr = torch.zeros(5, 1)
    kw = dict(score_thresh=0.05, pre_nms_topk=1000, post_nms_topk=100, nms_thresh=0.5,
              thresh_with_ctr=True)
    det = fcos_detections(cls, reg, ctr, locations, levels, [8], **kw)
    score = (cls.sigmoid() * 0.5).sqrt()
    assert det["location_inds"].tolist() == [0, 1, 2, 3]
    assert det["classes"].tolist() == [0, 1, 0, 1]
    torch.testing.assert_close(det["scores"], score[[0, 1, 2, 3], [0, 1, 0, 1]])
    assert det["boxes"][0].tolist() == [-4.0, -4.0, 12.0, 12.0]
    top = fcos_detections(cls, reg, ctr, locations, levels, [8], **{**kw, "post_nms_topk": 2})
    assert top["location_inds"].tolist() == [0, 1]
    pre = fcos_detections(cls, reg, ctr, locations, levels, [8], **{**kw, "pre_nms_topk": 1})
    assert pre["location_inds"].tolist() == [0]
    # sigmoid(-1) * 0.5 = 0.134 passes 0.1 only without multiplying by centerness first.
    strict = fcos_detections(cls, reg, ctr, locations, levels, [8],
                             **{**kw, "score_thresh": 0.15})
    assert 3 not in strict["location_inds"].tolist()
    loose = fcos_detections(cls, reg, ctr, locations, levels, [8],
                            **{**kw, "score_thresh": 0.15, "thresh_with_ctr": False})
    assert 3 in loose["location_inds"].tolist()


def test_detections_to_instances_pastes_masks_at_the_output_size():
    det = {"location_inds": torch.tensor([0, 1]), "classes": torch.tensor([1, 0]),
           "scores": torch.tensor([0.9, 0.4]),
           "boxes": torch.tensor([[0.0, 0.0, 8.0, 8.0], [40.0, 0.0, 40.0, 10.0]])}
    probs = torch.zeros(2, 4, 4)  # stride 4 of a 16 x 16 padded input
    probs[0, :2, :2] = 1.0
    inst = detections_to_instances(det, probs, torch.zeros(2, 2), torch.zeros(2).long(),
                                   image_size=(8, 12), padded_size=(16, 16),
                                   output_size=(16, 24))
    assert len(inst) == 1  # the empty box is dropped
    assert inst.image_size == (16, 24) and inst.pred_masks.shape == (1, 16, 24)
    assert inst.pred_masks.dtype == torch.bool
    assert inst.pred_boxes.tensor.tolist() == [[0.0, 0.0, 16.0, 16.0]]
    assert inst.pred_masks[0, :12, :12].all() and not inst.pred_masks[0, :, 18:].any()


def test_eval_forward_returns_instances_at_the_output_size(trained_ish):
    model = trained_ish[0]
    batch = batch_of_two()
    batch[1] = dict(batch[1], height=128, width=192)
    model.eval()
    saved = model.score_thresh
    try:
        model.score_thresh = 0.0  # a random model scores ~0.01: keep everything
        with torch.no_grad():
            out = model(batch)
    finally:
        model.score_thresh = saved
        model.train()
    assert len(out) == 2
    for res, size in zip(out, [(64, 96), (128, 192)]):
        inst = res["instances"]
        assert inst.image_size == size and 0 < len(inst) <= 20
        assert inst.pred_masks.shape == (len(inst), *size)
        assert inst.pred_masks.dtype == torch.bool
        assert inst.pred_classes.dtype == torch.long and inst.pred_classes.max() < 4
        assert (inst.scores[:-1] >= inst.scores[1:]).all()
        boxes = inst.pred_boxes.tensor
        assert (boxes[:, 0] >= 0).all() and (boxes[:, 2] <= size[1]).all()
        assert (boxes[:, 1] >= 0).all() and (boxes[:, 3] <= size[0]).all()


# ------------------------------------------------------------------ config files


@pytest.mark.parametrize("path, opts", [
    (R50, ["MODEL.WEIGHTS", ""]),
    (SHAPES, []),
])
def test_config_files_build_and_take_a_training_step(path, opts):
    torch.manual_seed(0)
    model = build_model(get_config(path, *opts))
    assert isinstance(model, CondInst)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.01)
    losses = train_step(model, [fake_view(64, 64, 2, 0), fake_view(64, 64, 1, 1)])
    opt.step()
    assert set(losses) == {"loss_fcos_cls", "loss_fcos_loc", "loss_fcos_ctr", "loss_mask"}
    moved = [n for n, p in model.named_parameters() if p.requires_grad
             and not torch.equal(p.detach(), before[n])]
    assert any(n.startswith("controller") for n in moved)
    assert any(n.startswith("mask_branch") for n in moved)
