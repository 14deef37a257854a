"""Transformation equivariance (paper Eq. 8): m~ = e' . T(F_x) supervised by T(Y).

The scene: two pairs of views, stride 4, padded grid 10 x 12 (images up to 40 x 48).
    pair 0: x is 32 x 48, x' = horizontal flip of x (32 x 48);
    pair 1: x is 40 x 32, x' = crop rows [8, 32), cols [4, 32) of x (24 x 28).
Flip and stride-aligned crop map feature cells of x' onto cell centres of x exactly, so a
model whose x' pixel embeddings are T(F_x) is equivariant by construction.
"""
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from detectron2.config import get_cfg
from scipy.optimize import linear_sum_assignment

from instunique import add_instunique_config
from instunique.adapter import SegmenterAdapter, SegmenterOutputs
from instunique.objectives import EquivarianceLoss
from instunique.segmenters.mask2former.adapter import Mask2FormerAdapter
from instunique.segmenters.mask2former.meta_arch import Mask2Former, build_criterion
from instunique.transforms import AffineWarp

S = 4  # pixel-embedding stride
GRID = (10, 12)  # padded feature grid of the batch
PAD = (GRID[0] * S, GRID[1] * S)
Q, C, K = 4, 4, 3  # queries, channels, classes
WEIGHT = 3.0

SIZES_X = [(32, 48), (40, 32)]
WARPS = [AffineWarp.hflip(32, 48), AffineWarp.crop(40, 32, y0=8, x0=4, ch=24, cw=28)]
SIZES_XP = [w.dst_size for w in WARPS]
# Instances of x as rectangles of cells (rows, cols) with their class; inside the crop.
INSTANCES = [
    [((1, 5), (2, 6), 0), ((4, 8), (7, 12), 2)],
    [((2, 5), (1, 4), 1), ((5, 8), (4, 8), 0), ((3, 7), (5, 7), 2)],
]


def cell_masks(pair):
    """(N, 10, 12) bool instance masks of x on the feature grid."""
    masks = torch.zeros(len(INSTANCES[pair]), *GRID, dtype=torch.bool)
    for k, ((r0, r1), (c0, c1), _) in enumerate(INSTANCES[pair]):
        masks[k, r0:r1, c0:c1] = True
    return masks


def pad(masks):
    out = torch.zeros(masks.shape[0], *PAD, dtype=torch.bool)
    out[:, : masks.shape[1], : masks.shape[2]] = masks
    return out


def targets_of(empty_xp=False):
    """Targets of the 4 views (x0, x1, x'0, x'1), masks at image resolution, padded."""
    xs, xps = [], []
    for pair, (h, w) in enumerate(SIZES_X):
        labels = torch.tensor([c for *_, c in INSTANCES[pair]])
        img = cell_masks(pair).repeat_interleave(S, 1).repeat_interleave(S, 2)[:, :h, :w]
        xs.append({"labels": labels, "masks": pad(img)})
        warped = np.stack([WARPS[pair].apply_segmentation(m.numpy()) for m in img])
        xps.append({"labels": labels, "masks": pad(torch.from_numpy(warped))})
    if empty_xp:
        xps = [{"labels": torch.zeros(0, dtype=torch.long),
                "masks": torch.zeros(0, *PAD, dtype=torch.bool)} for _ in xps]
    return xs + xps


def warp_cells(f, pair):
    """The exact T(F) on the grid of x' for (C, 10, 12) features of x: (C, h', w')."""
    if pair == 0:
        return f[:, :8, :12].flip(-1)
    return f[:, 2:8, 1:8]


def make_outputs(seed=0, dtype=torch.float64, perfect=False):
    """Outputs of one forward over (x0, x1, x'0, x'1) of a model equivariant by construction.

    perfect: F_x is +-12 on/off the instance masks (channel k <-> instance k), the query
    embeddings of x' are one-hot and their class logits confident, so every prediction of
    x' -- and its equivariant counterpart e' . T(F_x) -- is right.
    """
    g = torch.Generator().manual_seed(seed)
    f = torch.randn(4, C, *GRID, generator=g, dtype=dtype)
    e = torch.randn(4, Q, C, generator=g, dtype=dtype)
    logits = torch.randn(4, Q, K + 1, generator=g, dtype=dtype)
    if perfect:
        for pair in range(2):
            masks = cell_masks(pair)
            f[pair, : len(masks)] = torch.where(masks, 12.0, -12.0).to(dtype)
            f[pair, len(masks) :] = -12.0
            e[2 + pair] = torch.eye(Q, C, dtype=dtype)
            logits[2 + pair] = 0.0
            for q in range(Q):
                cls = INSTANCES[pair][q][2] if q < len(masks) else K
                logits[2 + pair, q, cls] = 20.0
    # The x' views see exactly T(F_x) on their own area; their padding holds anything.
    for pair in range(2):
        warped = warp_cells(f[pair], pair)
        f[2 + pair, :, : warped.shape[1], : warped.shape[2]] = warped
    return SegmenterOutputs(
        pixel_embeds=f.requires_grad_(),
        query_embeds=e.requires_grad_(),
        class_logits=logits.requires_grad_(),
        raw={},
    )


def own_area_valid(dtype):
    """(2, 10, 12): the unpadded area of each x' on the feature grid."""
    valid = torch.zeros(2, *GRID, dtype=dtype)
    for k, (h, w) in enumerate(SIZES_XP):
        valid[k, : h // S, : w // S] = 1
    return valid


class FakeAdapter(SegmenterAdapter):
    """A small real set criterion: Hungarian matching on class + valid-weighted mask BCE,
    cross-entropy over all queries ("no object" for unmatched), BCE on matched masks."""

    pixel_stride = S
    embed_dim = C

    def __init__(self):
        super().__init__(model=None)

    def preprocess(self, batched_inputs):
        raise NotImplementedError

    def targets(self, batched_inputs, images):
        raise NotImplementedError

    def forward_train(self, images):
        raise NotImplementedError

    def final_layer_outputs(self, class_logits, query_embeds, pixel_embeds):
        return {"pred_logits": class_logits,
                "pred_masks": torch.einsum("bqc,bchw->bqhw", query_embeds, pixel_embeds)}

    def base_losses(self, raw, targets, pixel_valid=None, matching=None, mask_only=False):
        logits, masks = raw["pred_logits"], raw["pred_masks"]
        b, q, h, w = masks.shape
        if pixel_valid is None:
            pixel_valid = masks.new_ones(b, h, w)
        classes = torch.full((b, q), K, dtype=torch.long)
        given, matching = matching, []
        mask_losses = []
        for i, t in enumerate(targets):
            gt = t["masks"][:, S // 2 :: S, S // 2 :: S][:, :h, :w].flatten(1).to(masks.dtype)
            weight = pixel_valid[i].flatten().to(masks.dtype)
            m = masks[i].flatten(1)
            # (Q, N) weighted mean BCE of every query against every target.
            bce = ((F.softplus(-m) * weight) @ gt.T + (F.softplus(m) * weight) @ (1 - gt).T)
            bce = bce / weight.sum().clamp(min=1)
            prob = logits[i].softmax(-1)[:, t["labels"]]
            if given is None:
                rows, cols = linear_sum_assignment((bce - prob).detach().numpy())
                rows, cols = torch.as_tensor(rows), torch.as_tensor(cols)
            else:
                rows, cols = given[i]
            matching.append((rows, cols))
            classes[i, rows] = t["labels"][cols]
            mask_losses.append(bce[rows, cols])
        num_masks = max(sum(len(t["labels"]) for t in targets), 1)
        loss_ce = F.cross_entropy(logits.transpose(1, 2), classes)
        loss_mask = torch.cat(mask_losses).sum() / num_masks + 0.0 * masks.sum()
        losses = {"loss_ce": 2.0 * loss_ce, "loss_mask": 5.0 * loss_mask}
        if mask_only:
            del losses["loss_ce"]
        return losses, matching


def equi_loss(adapter, outputs, targets):
    return EquivarianceLoss(weight=WEIGHT, stride=S)(
        adapter, outputs, targets, WARPS, SIZES_X + SIZES_XP
    )


def test_scene_is_consistent():
    """The hand-made T(F) and T(Y) agree with the transform library's own warps."""
    from instunique.transforms import warp_feature_batch

    outputs = make_outputs()
    warped, valid = warp_feature_batch(outputs.pixel_embeds[:2].detach(), WARPS, S, SIZES_X,
                                       GRID)
    assert torch.equal(valid, own_area_valid(torch.bool))
    torch.testing.assert_close(warped * valid[:, None], outputs.pixel_embeds[2:].detach()
                               * valid[:, None], rtol=0, atol=1e-12)
    targets = targets_of()
    for pair in range(2):
        h, w = SIZES_XP[pair]
        cells = targets[2 + pair]["masks"][:, S // 2 :: S, S // 2 :: S]
        expected = warp_cells(cell_masks(pair)[None].flatten(0, 1), pair)
        assert torch.equal(cells[:, : h // S, : w // S], expected)
        assert not cells[:, h // S :].any() and not cells[:, :, w // S :].any()


def test_equivariant_model_equals_loss_of_its_own_prediction():
    adapter, outputs, targets = FakeAdapter(), make_outputs(seed=1), targets_of()
    losses = equi_loss(adapter, outputs, targets)
    assert set(losses) == {"loss_equi_ce", "loss_equi_mask"}

    # The x' views' own prediction e' . F_x' on their own area, against Y'.
    own = adapter.final_layer_outputs(
        outputs.class_logits[2:], outputs.query_embeds[2:], outputs.pixel_embeds[2:]
    )
    ref, _ = adapter.base_losses(own, targets[2:], pixel_valid=own_area_valid(torch.float64))
    for name, value in ref.items():
        torch.testing.assert_close(losses[name.replace("loss_", "loss_equi_")], WEIGHT * value,
                                   rtol=1e-10, atol=0)


def test_loss_reads_only_x_features_and_x_prime_queries():
    adapter, targets = FakeAdapter(), targets_of()
    base = equi_loss(adapter, make_outputs(seed=2), targets)

    changed = make_outputs(seed=2)
    with torch.no_grad():
        changed.pixel_embeds[2:] = torch.randn_like(changed.pixel_embeds[2:])  # F of x'
        changed.query_embeds[:2] = torch.randn_like(changed.query_embeds[:2])  # e of x
        changed.class_logits[:2] = torch.randn_like(changed.class_logits[:2])  # p of x
        changed.pixel_embeds[1, :, :, 8:] = 1e3  # padding of x1 (32 wide: 8 cells)
    same = equi_loss(adapter, changed, targets)
    for name in base:
        assert same[name].item() == base[name].item(), name

    for attr, view in (("pixel_embeds", 0), ("query_embeds", 3), ("class_logits", 2)):
        other = make_outputs(seed=2)
        with torch.no_grad():
            getattr(other, attr)[view] += torch.randn_like(getattr(other, attr)[view])
        moved = equi_loss(adapter, other, targets)
        assert any(moved[n].item() != base[n].item() for n in base), attr


def test_near_zero_for_a_perfect_equivariant_model_positive_for_noise():
    adapter, targets = FakeAdapter(), targets_of()
    perfect = equi_loss(adapter, make_outputs(perfect=True), targets)
    assert sum(perfect.values()).item() < 1e-3

    noisy = make_outputs(perfect=True)
    with torch.no_grad():
        noisy.pixel_embeds[:2] = 3.0 * torch.randn_like(noisy.pixel_embeds[:2])
    noise = equi_loss(adapter, noisy, targets)
    assert noise["loss_equi_mask"].item() > 1.0

    # Features that ignore T (F_x' = F_x rather than T(F_x)) also break the flipped pair.
    unflipped = make_outputs(perfect=True)
    with torch.no_grad():
        unflipped.pixel_embeds[0] = unflipped.pixel_embeds[0].flip(-1)
    assert equi_loss(adapter, unflipped, targets)["loss_equi_mask"].item() > 1.0


def test_gradients_reach_x_prime_queries_and_x_pixels():
    adapter, outputs = FakeAdapter(), make_outputs(seed=3)
    sum(equi_loss(adapter, outputs, targets_of()).values()).backward()
    f, e, p = outputs.pixel_embeds.grad, outputs.query_embeds.grad, outputs.class_logits.grad
    # Mask terms reach the matched queries of x': one per instance of x'.
    assert [int(e[v].abs().sum(-1).gt(0).sum()) for v in (2, 3)] == [2, 3]
    assert p[2:].abs().sum() > 0
    assert f[0, :, :8].abs().sum() > 0 and f[1, :, :, :8].abs().sum() > 0
    # x' pixels, x queries and class logits, and the padding of x get nothing.
    assert torch.equal(f[2:], torch.zeros_like(f[2:]))
    assert torch.equal(e[:2], torch.zeros_like(e[:2]))
    assert torch.equal(p[:2], torch.zeros_like(p[:2]))
    assert torch.equal(f[0, :, 8:], torch.zeros_like(f[0, :, 8:]))
    assert torch.equal(f[1, :, :, 8:], torch.zeros_like(f[1, :, :, 8:]))


def test_finite_when_x_prime_has_no_instances():
    adapter, outputs = FakeAdapter(), make_outputs(seed=4)
    losses = equi_loss(adapter, outputs, targets_of(empty_xp=True))
    total = sum(losses.values())
    assert torch.isfinite(total) and total.item() > 0  # every query must say "no object"
    total.backward()
    assert torch.isfinite(outputs.query_embeds.grad).all()
    assert outputs.class_logits.grad[2:].abs().sum() > 0


# --------------------------------------------------------------- the real Mask2Former criterion
class CriterionOnly(torch.nn.Module):
    """What Mask2FormerAdapter.base_losses needs of the model: its criterion and losses()."""

    losses = Mask2Former.losses

    def __init__(self):
        super().__init__()
        cfg = get_cfg()
        add_instunique_config(cfg)
        cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES = K
        cfg.MODEL.MASK_FORMER.TRAIN_NUM_POINTS = 256
        self.criterion = build_criterion(cfg)


def test_real_mask2former_criterion():
    adapter, targets = Mask2FormerAdapter(CriterionOnly()), targets_of()
    torch.manual_seed(0)
    perfect = equi_loss(adapter, make_outputs(perfect=True, dtype=torch.float32), targets)
    assert set(perfect) == {"loss_equi_ce", "loss_equi_mask", "loss_equi_dice"}

    noisy = make_outputs(perfect=True, dtype=torch.float32)
    with torch.no_grad():
        noisy.pixel_embeds[:2] = 3.0 * torch.randn_like(noisy.pixel_embeds[:2])
    noise = equi_loss(adapter, noisy, targets)
    # The point losses sample bilinearly across mask borders, so a perfect model is not at
    # exactly zero; random features are far worse on both mask terms.
    for name in ("loss_equi_mask", "loss_equi_dice"):
        assert noise[name].item() > 4 * perfect[name].item(), name
    assert perfect["loss_equi_ce"].item() < 1e-3

    outputs = make_outputs(seed=5, dtype=torch.float32)
    sum(equi_loss(adapter, outputs, targets).values()).backward()
    assert outputs.query_embeds.grad[2:].abs().sum() > 0
    assert outputs.pixel_embeds.grad[:2].abs().sum() > 0
    assert torch.equal(outputs.pixel_embeds.grad[2:], torch.zeros_like(outputs.pixel_embeds[2:]))

    empty = make_outputs(seed=6, dtype=torch.float32)
    total = sum(equi_loss(adapter, empty, targets_of(empty_xp=True)).values())
    assert torch.isfinite(total)
    total.backward()
    assert torch.isfinite(empty.query_embeds.grad).all()


@pytest.mark.parametrize("weight", [0.0, 1.0])
def test_weight_scales_every_term(weight):
    adapter, outputs, targets = FakeAdapter(), make_outputs(seed=7), targets_of()
    scaled = EquivarianceLoss(weight=weight, stride=S)(
        adapter, outputs, targets, WARPS, SIZES_X + SIZES_XP
    )
    base = equi_loss(adapter, outputs, targets)
    for name in base:
        torch.testing.assert_close(scaled[name], base[name] * weight / WEIGHT)


def _reversed(matching):
    """The same targets, handed to other queries (reversed query order)."""
    return [(rows.flip(0), cols) for rows, cols in matching]


@pytest.mark.parametrize("real", [False, True])
def test_view_matching_is_used_as_given(real):
    adapter = Mask2FormerAdapter(CriterionOnly()) if real else FakeAdapter()
    dtype = torch.float32 if real else torch.float64
    outputs, targets = make_outputs(perfect=True, dtype=dtype), targets_of()
    sizes = SIZES_X + SIZES_XP

    def loss(matching, view_matching):
        torch.manual_seed(0)  # the real criterion samples points
        return EquivarianceLoss(weight=WEIGHT, stride=S, matching=matching)(
            adapter, outputs, targets, WARPS, sizes, view_matching)

    recompute = loss("recompute", None)
    own = adapter.final_layer_outputs(
        outputs.class_logits[2:], outputs.query_embeds[2:], outputs.pixel_embeds[2:])
    _, view_matching = adapter.base_losses(own, targets[2:])
    # The real matcher draws random points, which moves the point samples of the mask terms.
    exact = ["loss_equi_ce"] if real else list(recompute)
    # Where the views' matching is the one m~ gets anyway, both readings agree ...
    same = loss("view", view_matching)
    for name in exact:
        torch.testing.assert_close(same[name], recompute[name], rtol=1e-6, atol=1e-9)
    # ... and the recompute reading ignores any matching it is handed.
    ignored = loss("recompute", _reversed(view_matching))
    for name in exact:
        torch.testing.assert_close(ignored[name], recompute[name], rtol=1e-6, atol=1e-9)
    # A matching that gives each instance to another query costs mask and class terms.
    wrong = loss("view", _reversed(view_matching))
    assert wrong["loss_equi_ce"].item() > recompute["loss_equi_ce"].item() + 0.1
    assert wrong["loss_equi_mask"].item() > recompute["loss_equi_mask"].item() + 0.1


@pytest.mark.parametrize("real", [False, True])
def test_without_class_term_only_the_mask_terms_remain(real):
    adapter = Mask2FormerAdapter(CriterionOnly()) if real else FakeAdapter()
    dtype = torch.float32 if real else torch.float64
    targets = targets_of()

    def loss(class_term):
        outputs = make_outputs(seed=9, dtype=dtype)
        torch.manual_seed(0)  # the real criterion samples points
        out = EquivarianceLoss(weight=WEIGHT, stride=S, class_term=class_term)(
            adapter, outputs, targets, WARPS, SIZES_X + SIZES_XP)
        sum(out.values()).backward()
        return out, outputs.class_logits.grad

    full, full_grad = loss(True)
    masks, masks_grad = loss(False)
    assert set(full) - set(masks) == {"loss_equi_ce"}
    for name in masks:
        torch.testing.assert_close(masks[name], full[name])
    assert full_grad[2:].abs().sum() > 0
    # Matchers read class scores without gradient: nothing reaches the class logits.
    assert masks_grad is None or masks_grad.abs().sum() == 0


def test_view_matching_needs_the_views_matching_and_a_known_name():
    adapter, outputs, targets = FakeAdapter(), make_outputs(seed=8), targets_of()
    with pytest.raises(ValueError, match="base matching"):
        EquivarianceLoss(weight=WEIGHT, stride=S, matching="view")(
            adapter, outputs, targets, WARPS, SIZES_X + SIZES_XP)
    with pytest.raises(ValueError, match="recompute"):
        EquivarianceLoss(weight=WEIGHT, stride=S, matching="nearest")
