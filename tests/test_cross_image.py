"""Cross-image querying (paper Eq. 5): the chunked focal loss and the batch-level module."""
import math

import pytest
import torch
from torchvision.ops import sigmoid_focal_loss

from instunique.adapter import SegmenterOutputs
from instunique.objectives import CrossImageLoss, PixelMemory, external_focal_loss


def dense_focal(queries, pixels, query_ids, pixel_ids, query_cls, pixel_cls, alpha=0.25,
                gamma=2.0):
    """The whole (R, N) logit matrix at once, mean over the pairs of different images."""
    z = queries @ pixels.detach().t()
    target = (query_cls[:, None] == pixel_cls[None]) & (query_cls[:, None] >= 0)
    keep = query_ids[:, None] != pixel_ids[None]
    loss = sigmoid_focal_loss(z, target.to(z.dtype), alpha, gamma, reduction="none")
    return loss[keep].mean()


def make_problem(seed=0, r=12, n=23, c=8, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    queries = torch.randn(r, c, generator=g, dtype=dtype)
    pixels = torch.randn(n, c, generator=g, dtype=dtype)
    query_ids = torch.arange(r) // 4  # images 0, 1, 2
    pixel_ids = torch.randint(0, 4, (n,), generator=g)  # image 3: only in the memory
    # Queries 1, 5, 9 are matched to stuff class 2, query 6 to stuff class 1.
    query_cls = torch.full((r,), -1)
    query_cls[[1, 5, 9]] = 2
    query_cls[6] = 1
    pixel_cls = torch.randint(-1, 3, (n,), generator=g)
    return queries, pixels, query_ids, pixel_ids, query_cls, pixel_cls


@pytest.mark.parametrize("chunk", [0, 1, 7, 23, 100])
@pytest.mark.parametrize("alpha,gamma", [(0.25, 2.0), (0.0, 0.0), (0.4, 1.5)])
@pytest.mark.parametrize("stuff", [True, False])
def test_chunked_loss_equals_dense(chunk, alpha, gamma, stuff):
    queries, pixels, qid, pid, qcls, pcls = make_problem()
    if stuff:  # positive (stuff) and negative targets on kept pairs
        kept = ((qcls[:, None] == pcls[None]) & (qcls[:, None] >= 0))[qid[:, None] != pid]
        assert kept.any() and not kept.all()
    else:  # thing queries only: the all-zero target path
        qcls = torch.full_like(qcls, -1)

    q1 = queries.clone().requires_grad_()
    loss = external_focal_loss(q1, pixels, qid, pid, qcls, pcls, alpha, gamma, chunk=chunk)
    loss.backward()
    q2 = queries.clone().requires_grad_()
    ref = dense_focal(q2, pixels, qid, pid, qcls, pcls, alpha, gamma)
    ref.backward()

    assert loss.dtype == torch.float64
    torch.testing.assert_close(loss, ref, rtol=1e-12, atol=0)
    torch.testing.assert_close(q1.grad, q2.grad, rtol=1e-10, atol=1e-14)


def test_gradient_scales_with_upstream_gradient():
    queries, pixels, qid, pid, qcls, pcls = make_problem(seed=1)
    q1 = queries.clone().requires_grad_()
    (3.5 * external_focal_loss(q1, pixels, qid, pid, qcls, pcls, chunk=5)).backward()
    q2 = queries.clone().requires_grad_()
    (3.5 * dense_focal(q2, pixels, qid, pid, qcls, pcls)).backward()
    torch.testing.assert_close(q1.grad, q2.grad, rtol=1e-10, atol=1e-14)


def test_no_gradient_into_external_features():
    queries, pixels, qid, pid, qcls, pcls = make_problem(dtype=torch.float32)
    queries.requires_grad_()
    pixels.requires_grad_()
    external_focal_loss(queries, pixels, qid, pid, qcls, pcls, chunk=4).backward()
    assert pixels.grad is None
    assert queries.grad is not None and queries.grad.abs().sum() > 0


def test_loss_is_float32_under_autocast_and_for_half_queries():
    queries, pixels, qid, pid, qcls, pcls = make_problem(dtype=torch.float32)
    ref_q = queries.double().requires_grad_()
    ref = dense_focal(ref_q, pixels.double(), qid, pid, qcls, pcls)
    ref.backward()

    q = queries.clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = external_focal_loss(q, pixels, qid, pid, qcls, pcls, chunk=6)
    loss.backward()
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss.double(), ref, rtol=1e-5, atol=0)
    torch.testing.assert_close(q.grad.double(), ref_q.grad, rtol=1e-4, atol=1e-7)

    half = queries.half().requires_grad_()
    loss = external_focal_loss(half, pixels.half(), qid, pid, qcls, pcls, chunk=6)
    loss.backward()
    assert loss.dtype == torch.float32 and half.grad.dtype == torch.float16
    ref_half = dense_focal(half.detach().double(), pixels.half().double(), qid, pid, qcls, pcls)
    torch.testing.assert_close(loss.double(), ref_half, rtol=1e-5, atol=0)


def test_orthogonal_queries_have_lower_loss():
    c, n = 8, 40
    g = torch.Generator().manual_seed(2)
    # External features live in the first half of the channels, positively.
    pixels = torch.zeros(n, c)
    pixels[:, : c // 2] = torch.rand(n, c // 2, generator=g) + 0.5
    ids_q, ids_p = torch.zeros(6, dtype=torch.long), torch.ones(n, dtype=torch.long)
    cls_q, cls_p = torch.full((6,), -1), torch.full((n,), -1)

    aligned = 2.0 * pixels[:6].clone()
    orthogonal = torch.zeros(6, c)
    orthogonal[:, c // 2 :] = 2.0 * torch.rand(6, c // 2, generator=g) + 0.5
    loss_aligned = external_focal_loss(aligned, pixels, ids_q, ids_p, cls_q, cls_p)
    loss_orth = external_focal_loss(orthogonal, pixels, ids_q, ids_p, cls_q, cls_p)
    loss_opposed = external_focal_loss(-aligned, pixels, ids_q, ids_p, cls_q, cls_p)
    # Logit 0 everywhere: (1 - alpha) * 0.5**2 * log 2.
    assert loss_orth.item() == pytest.approx(0.75 * 0.25 * torch.log(torch.tensor(2.0)).item())
    assert loss_aligned > 10 * loss_orth
    assert loss_opposed < 0.1 * loss_orth


def test_sgd_on_queries_lowers_the_loss():
    queries, pixels, qid, pid, qcls, pcls = make_problem(seed=3, dtype=torch.float32)
    pixels_before = pixels.clone()
    queries.requires_grad_()
    opt = torch.optim.SGD([queries], lr=2.0)
    history = []
    for _ in range(30):
        opt.zero_grad()
        loss = external_focal_loss(queries, pixels, qid, pid, qcls, pcls, chunk=8)
        loss.backward()
        opt.step()
        history.append(loss.item())
    assert history[-1] < 0.5 * history[0]
    assert all(b <= a + 1e-7 for a, b in zip(history, history[1:]))
    assert torch.equal(pixels, pixels_before)


def test_same_image_pairs_are_excluded():
    queries, pixels, _, _, qcls, pcls = make_problem(seed=4)
    qid = torch.zeros(len(queries), dtype=torch.long)  # all queries from image 0
    pid = torch.tensor([0, 1] * 11 + [0])
    loss = external_focal_loss(queries, pixels, qid, pid, qcls, pcls, chunk=5)

    own = pixels.clone()
    own[pid == 0] = 100 * torch.randn_like(own[pid == 0])
    same = external_focal_loss(queries, own, qid, pid, qcls, pcls, chunk=5)
    assert same.item() == loss.item()

    other = pixels.clone()
    other[pid == 1] = 100 * torch.randn_like(other[pid == 1])
    assert external_focal_loss(queries, other, qid, pid, qcls, pcls, chunk=5) != loss

    # Only same-image pixels: nothing is external.
    only_own = external_focal_loss(queries, pixels, qid, torch.zeros_like(pid), qcls, pcls)
    assert only_own.item() == 0.0


def test_empty_externals_give_zero_with_a_grad_path():
    queries, pixels, qid, pid, qcls, pcls = make_problem()
    queries.requires_grad_()
    loss = external_focal_loss(queries, pixels[:0], qid, pid[:0], qcls, pcls[:0])
    assert loss.item() == 0.0 and loss.requires_grad
    loss.backward()
    assert torch.equal(queries.grad, torch.zeros_like(queries))

    no_queries = queries[:0]
    loss = external_focal_loss(no_queries, pixels, qid[:0], pid, qcls[:0], pcls)
    assert loss.item() == 0.0 and loss.requires_grad


def test_bad_shapes_raise():
    queries, pixels, qid, pid, qcls, pcls = make_problem()
    with pytest.raises(ValueError, match="same C"):
        external_focal_loss(queries, pixels[:, :3], qid, pid, qcls, pcls)
    with pytest.raises(ValueError, match="pixel_ids"):
        external_focal_loss(queries, pixels, qid, pid[:-1], qcls, pcls)
    with pytest.raises(ValueError, match="query_cls"):
        external_focal_loss(queries, pixels, qid, pid, qcls[:, None], pcls)


# ---------------------------------------------------------------------------- CrossImageLoss
STRIDE = 4


def make_batch(seed=0, dtype=torch.float64):
    """4 images (2 pairs of views: ids 10, 11, 10, 11), 3 queries, 6 channels.

    Padded grid 5 x 7 (image 20 x 28); the valid grids differ per image.
    """
    g = torch.Generator().manual_seed(seed)
    b, q, c, h, w = 4, 3, 6, 5, 7
    outputs = SegmenterOutputs(
        pixel_embeds=torch.randn(b, c, h, w, generator=g, dtype=dtype).requires_grad_(),
        query_embeds=torch.randn(b, q, c, generator=g, dtype=dtype).requires_grad_(),
        class_logits=torch.randn(b, q, 4, generator=g, dtype=dtype),
        raw={},
    )
    valid_hw = [(5, 7), (4, 6), (5, 5), (3, 7)]
    targets = []
    for k in range(b):
        cells = torch.randint(0, 3, (h, w), generator=g)  # segment index per cell
        masks = torch.stack([cells == s for s in range(3)])
        masks = masks.repeat_interleave(STRIDE, 1).repeat_interleave(STRIDE, 2)
        labels = torch.tensor([0, 2, 1]) if k % 2 == 0 else torch.tensor([2, 0, 1])
        targets.append({"labels": labels, "masks": masks})
    # Query j of image k matched to target j (image 3 has only 2 matches).
    matching = [(torch.tensor([0, 1, 2]), torch.tensor([0, 1, 2]))] * 3
    matching.append((torch.tensor([2, 0]), torch.tensor([0, 1])))
    image_ids = torch.tensor([10, 11, 10, 11])
    return outputs, targets, matching, valid_hw, image_ids


def make_memory(dim=6):
    memory = PixelMemory(capacity=9, dim=dim)
    g = torch.Generator().manual_seed(5)
    memory.enqueue(
        torch.randn(7, dim, generator=g), torch.tensor([2, 1, -1, 0, 2, 2, 1]),
        torch.tensor([12, 10, 12, 13, 11, 12, 13]),
    )
    return memory


def make_loss(**kwargs):
    args = dict(weight=2.5, pixels_per_image=5, alpha=0.25, gamma=2.0, chunk_pixels=7,
                stride=STRIDE, stuff_classes=(2,))
    args.update(kwargs)
    return CrossImageLoss(**args)


def score(module, outputs, targets, matching, valid_hw, image_ids, memory=None):
    """``module``'s loss and sampled pixels with ``memory`` as its pixel memory."""
    module.memory = memory
    return module(outputs, targets, matching, valid_hw, image_ids)


@pytest.mark.parametrize("chunk", [1, 7, 20, 27, 1000])
def test_module_equals_dense_reference_with_memory_and_stuff(chunk):
    outputs, targets, matching, valid_hw, image_ids = make_batch()
    memory = make_memory()
    mem_feats, mem_cls, mem_ids = memory.contents()  # what the loss reads
    torch.manual_seed(0)
    loss, (feats, cls, ids) = score(make_loss(chunk_pixels=chunk), outputs, targets,
                                    matching, valid_hw, image_ids, memory)
    loss.backward()

    # The sampled pixels are cells of the valid area of their image, with their GT class.
    assert feats.shape == (20, 6) and cls.shape == ids.shape == (20,)
    assert ids.tolist() == [10] * 5 + [11] * 5 + [10] * 5 + [11] * 5
    f = outputs.pixel_embeds.detach()
    for row in range(20):
        k = row // 5
        hits = (f[k].permute(1, 2, 0) == feats[row]).all(-1).nonzero()
        assert len(hits) == 1
        i, j = hits[0].tolist()
        assert i < valid_hw[k][0] and j < valid_hw[k][1]
        owner = targets[k]["masks"][:, i * STRIDE + 2, j * STRIDE + 2].nonzero()[0, 0]
        assert cls[row] == targets[k]["labels"][owner]
    assert not feats.requires_grad

    # Dense reference over the batch samples followed by the memory.
    query_cls = torch.full((4, 3), -1)
    for k, (src, tgt) in enumerate(matching):
        labels = targets[k]["labels"][tgt]
        query_cls[k, src[labels == 2]] = 2
    assert (query_cls >= 0).sum() == 4
    queries = outputs.query_embeds.detach().clone().requires_grad_()
    ref = 2.5 * dense_focal(
        queries.reshape(12, 6), torch.cat([feats, mem_feats.double()]),
        image_ids.repeat_interleave(3), torch.cat([ids, mem_ids]), query_cls.reshape(-1),
        torch.cat([cls, mem_cls]),
    )
    ref.backward()
    torch.testing.assert_close(loss, ref, rtol=1e-12, atol=0)
    torch.testing.assert_close(outputs.query_embeds.grad, queries.grad, rtol=1e-10, atol=1e-14)


def test_module_fills_its_memory_after_the_loss_and_leaves_pixels_alone():
    outputs, targets, matching, valid_hw, image_ids = make_batch(seed=1)
    memory = make_memory()
    before = memory.contents()
    module = make_loss()
    loss, sampled = score(module, outputs, targets, matching, valid_hw, image_ids, memory)
    loss.backward()
    # The loss read the memory as it was; then the 20 sampled pixels joined it (capacity
    # 9: the newest 9 stay).
    module.memory = None
    loss_without, _ = module(outputs, targets, matching, valid_hw, image_ids)
    assert loss.item() != loss_without.item()
    for now, new, old in zip(memory.contents(), sampled, before):
        assert torch.equal(now, new[-9:].to(now.dtype)) and not torch.equal(now, old)
    module.eval()  # outside training nothing joins
    module.memory = memory
    kept = memory.contents()
    module(outputs, targets, matching, valid_hw, image_ids)
    assert all(torch.equal(a, b) for a, b in zip(kept, memory.contents()))
    assert memory.feats.grad is None
    assert outputs.pixel_embeds.grad is None
    assert outputs.query_embeds.grad.abs().sum() > 0


def test_module_thing_only_targets_zero_everywhere():
    outputs, targets, matching, valid_hw, image_ids = make_batch(seed=2)
    torch.manual_seed(1)
    loss, (feats, cls, ids) = score(make_loss(stuff_classes=()),
                                    outputs, targets, matching, valid_hw, image_ids, None)
    ref = 2.5 * dense_focal(
        outputs.query_embeds.detach().reshape(12, 6), feats, image_ids.repeat_interleave(3),
        ids, torch.full((12,), -1), cls,
    )
    torch.testing.assert_close(loss, ref, rtol=1e-12, atol=0)


def test_module_two_views_of_one_image_are_not_external():
    outputs, targets, matching, valid_hw, _ = make_batch(seed=3)
    same_image = torch.tensor([7, 7, 7, 7])
    loss, _ = score(make_loss(), outputs, targets, matching, valid_hw, same_image, None)
    assert loss.item() == 0.0 and loss.requires_grad
    loss.backward()
    assert torch.equal(outputs.query_embeds.grad, torch.zeros_like(outputs.query_embeds))

    memory = make_memory()  # entries of images 10 to 13 are external to image 7
    loss, _ = score(make_loss(), outputs, targets, matching, valid_hw, same_image, memory)
    assert loss.item() > 0.0


# ------------------------------------------------------------------ Eq. 5 variants
def dense_variant(queries, pixels, query_ids, pixel_ids, query_cls, pixel_cls, *, alpha=0.25,
                  gamma=2.0, loss="focal", temperature=1.0, hard_negatives="none",
                  hard_threshold=0.8, topk=1, normalization="mean", num_masks=1.0,
                  pixel_grad=False, offset=None, response=None):
    """Every variant on the whole (R, N) matrix with autograd: the reference (gradients
    into ``pixels`` too with ``pixel_grad``; ``offset`` (R,) subtracted from every logit;
    ``response(queries, pixels)`` in place of the dot product)."""
    f = pixels if pixel_grad else pixels.detach()
    z = queries @ f.t() if response is None else response(queries, f)
    if offset is not None:
        z = z - offset[:, None]
    target = (query_cls[:, None] == pixel_cls[None]) & (query_cls[:, None] >= 0)
    keep = query_ids[:, None] != pixel_ids[None]
    scored = keep.sum()
    hard = torch.where(target, -z, z).detach() / temperature  # wrong-answer logit
    if hard_negatives == "threshold":
        keep = keep & (hard.sigmoid() >= hard_threshold)
    elif hard_negatives == "topk":
        ranked = hard.masked_fill(~keep, float("-inf"))
        top = torch.zeros_like(keep)
        top.scatter_(1, ranked.topk(min(topk, z.shape[1]), dim=1).indices, True)
        keep = keep & top
    x = z / temperature
    if loss == "focal":
        pair = sigmoid_focal_loss(x, target.to(z.dtype), alpha, gamma, reduction="none")
    else:
        pair = torch.where(target, -x, x).sigmoid()
    pair = pair * keep
    if normalization == "mean":
        return pair.sum() / keep.sum().clamp(min=1)
    if normalization == "mean_all":
        return pair.sum() / scored.clamp(min=1)
    return (pair.sum(1) / keep.sum(1).clamp(min=1)).sum() / num_masks


VARIANTS = [
    dict(),
    dict(normalization="per_query", num_masks=3.0),
    dict(loss="probability", temperature=3.0, hard_negatives="threshold", hard_threshold=0.6),
    dict(loss="probability", temperature=3.0, hard_negatives="threshold", hard_threshold=0.6,
         normalization="mean_all"),
    dict(hard_negatives="threshold", hard_threshold=0.3, temperature=0.7,
         normalization="per_query", num_masks=2.0),
    dict(hard_negatives="topk", topk=1),
    dict(hard_negatives="topk", topk=4, loss="probability", temperature=2.0),
    dict(hard_negatives="topk", topk=9, normalization="per_query", num_masks=5.0, gamma=1.5),
    dict(hard_negatives="topk", topk=100),  # more than the external pixels of any query
]


@pytest.mark.parametrize("variant", range(len(VARIANTS)))
@pytest.mark.parametrize("chunk", [1, 5, 23])
@pytest.mark.parametrize("stuff", [True, False])
def test_variants_chunked_equal_dense(variant, chunk, stuff):
    """Chunk 23 scores all 23 external pixels at once: chunked == unchunked == dense."""
    opts = VARIANTS[variant]
    queries, pixels, qid, pid, qcls, pcls = make_problem(seed=6)
    if not stuff:
        qcls = torch.full_like(qcls, -1)
    kernel = {k: v for k, v in opts.items() if k not in ("alpha", "gamma")}
    q1 = queries.clone().requires_grad_()
    loss = external_focal_loss(q1, pixels, qid, pid, qcls, pcls, opts.get("alpha", 0.25),
                               opts.get("gamma", 2.0), chunk=chunk, **kernel)
    loss.backward()
    q2 = queries.clone().requires_grad_()
    ref = dense_variant(q2, pixels, qid, pid, qcls, pcls, **opts)
    ref.backward()
    assert ref.item() > 0
    torch.testing.assert_close(loss, ref, rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(q1.grad, q2.grad, rtol=1e-10, atol=1e-14)


def gated_response(queries, pixels):
    """A logit that is not a dot product: queries (R, 2C) hold a scale and a shift per
    channel, z = sum_c relu(scale_c f_c + shift_c) - 1, (R, N)."""
    c = pixels.shape[1]
    hidden = queries[:, None, :c] * pixels[None] + queries[:, None, c:]
    return hidden.relu().sum(-1) - 1.0


@pytest.mark.parametrize("variant", [0, 1, 2, 3, 4])  # VARIANTS without "topk"
@pytest.mark.parametrize("chunk", [1, 5, 23])
@pytest.mark.parametrize("stuff", [True, False])
def test_a_nonlinear_response_streams_like_its_dense_reference(variant, chunk, stuff):
    """CondInst's logit is a small per-query network on the pixel, not e . f: the kernel
    takes the response as a function and gets its gradient chunk by chunk."""
    opts = VARIANTS[variant]
    queries, pixels, qid, pid, qcls, pcls = make_problem(seed=8, c=4)
    queries = torch.cat([queries, torch.randn_like(queries)], 1)  # (R, 2C)
    if not stuff:
        qcls = torch.full_like(qcls, -1)
    kernel = {k: v for k, v in opts.items() if k not in ("alpha", "gamma")}
    q1 = queries.clone().requires_grad_()
    loss = external_focal_loss(q1, pixels, qid, pid, qcls, pcls, 0.25, 2.0, chunk=chunk,
                               response=gated_response, **kernel)
    loss.backward()
    q2 = queries.clone().requires_grad_()
    ref = dense_variant(q2, pixels, qid, pid, qcls, pcls, response=gated_response, **opts)
    ref.backward()
    assert ref.item() > 0 and q2.grad.abs().sum() > 0
    torch.testing.assert_close(loss, ref, rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(q1.grad, q2.grad, rtol=1e-10, atol=1e-14)


def test_the_dot_product_given_as_a_response_equals_the_closed_form():
    queries, pixels, qid, pid, qcls, pcls = make_problem(seed=9)
    grads = []
    for response in (None, lambda q, f: q @ f.t()):
        q = queries.clone().requires_grad_()
        loss = external_focal_loss(q, pixels, qid, pid, qcls, pcls, chunk=5, response=response)
        loss.backward()
        grads.append((loss.detach(), q.grad))
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("key,value", [("PIXEL_GRADIENT", "batch"), ("HARD_NEGATIVES", "topk"),
                                       ("REFERENCE", "own_instance")])
def test_options_written_for_the_dot_product_refuse_another_response(key, value):
    options = {"PIXEL_GRADIENT": dict(pixel_gradient="batch"),
               "HARD_NEGATIVES": dict(hard_negatives="topk"),
               "REFERENCE": dict(reference="own_instance", queries="matched")}[key]
    with pytest.raises(ValueError, match=f"CROSS_IMAGE.{key} '{value}' needs .* dot product"):
        make_loss(response=gated_response, **options)
    with pytest.raises(ValueError, match="neither a pixel gradient"):
        queries, pixels, qid, pid, qcls, pcls = make_problem()
        external_focal_loss(queries, pixels, qid, pid, qcls, pcls, hard_negatives="topk",
                            response=gated_response)


def _focal0(z, alpha=0.25):
    """Hand formula of the focal loss towards 0 with gamma 2: (1 - a) p^2 log(1 + e^z)."""
    p = 1 / (1 + math.exp(-z))
    return (1 - alpha) * p * p * math.log1p(math.exp(z))


def test_normalisations_equal_hand_computed_values():
    # Two queries (C = 1) of images 0 and 1; external pixels of images 0, 1, 2 with values
    # 1, -1, 2. Query 0 (e = 1) sees pixels 1, 2 (logits -1, 2); query 1 (e = 0.5) sees
    # pixels 0, 2 (logits 0.5, 1).
    queries = torch.tensor([[1.0], [0.5]], dtype=torch.float64)
    pixels = torch.tensor([[1.0], [-1.0], [2.0]], dtype=torch.float64)
    qid, pid = torch.tensor([0, 1]), torch.tensor([0, 1, 2])
    qcls, pcls = torch.full((2,), -1), torch.full((3,), -1)
    row0 = [_focal0(-1.0), _focal0(2.0)]
    row1 = [_focal0(0.5), _focal0(1.0)]
    mean = external_focal_loss(queries, pixels, qid, pid, qcls, pcls, chunk=2)
    assert mean.item() == pytest.approx(sum(row0 + row1) / 4, rel=1e-12)
    per_query = external_focal_loss(queries, pixels, qid, pid, qcls, pcls, chunk=2,
                                    normalization="per_query", num_masks=3.0)
    assert per_query.item() == pytest.approx((sum(row0) / 2 + sum(row1) / 2) / 3, rel=1e-12)
    # Official CondInst reading: s = sigmoid(z / 3), mean of s over pairs with s >= 0.55;
    # sigmoid(2/3) = 0.661 and sigmoid(1/3) = 0.583 pass, sigmoid(-1/3), sigmoid(1/6) do not.
    sig = lambda v: 1 / (1 + math.exp(-v))  # noqa: E731
    official = external_focal_loss(queries, pixels, qid, pid, qcls, pcls, loss="probability",
                                   temperature=3.0, hard_negatives="threshold",
                                   hard_threshold=0.55)
    assert official.item() == pytest.approx((sig(2 / 3) + sig(1 / 3)) / 2, rel=1e-12)
    # As released: the pairs below the threshold count as zeros in the mean (4 pairs).
    released = external_focal_loss(queries, pixels, qid, pid, qcls, pcls, loss="probability",
                                   temperature=3.0, hard_negatives="threshold",
                                   hard_threshold=0.55, normalization="mean_all")
    assert released.item() == pytest.approx((sig(2 / 3) + sig(1 / 3)) / 4, rel=1e-12)
    # Top-1 per query: pixel 2 for both (logits 2 and 1).
    top1 = external_focal_loss(queries, pixels, qid, pid, qcls, pcls, hard_negatives="topk",
                               topk=1, normalization="per_query", num_masks=2.0)
    assert top1.item() == pytest.approx((_focal0(2.0) + _focal0(1.0)) / 2, rel=1e-12)


def test_pairs_below_the_threshold_contribute_nothing():
    queries, pixels, qid, pid, qcls, pcls = make_problem(seed=7)
    qcls = torch.full_like(qcls, -1)
    # Pixels 0-5 are easy for every query: channel 0 of each query is > 0.5 and theirs is
    # -3, the rest 0, so every logit is below -1.5 (p < 0.19).
    queries[:, 0] = queries[:, 0].abs() + 0.5
    easy = torch.arange(6)
    pixels[easy] = 0.0
    pixels[easy, 0] = -3.0
    opts = dict(hard_negatives="threshold", hard_threshold=0.7, chunk=4)
    q1 = queries.clone().requires_grad_()
    loss = external_focal_loss(q1, pixels, qid, pid, qcls, pcls, **opts)
    loss.backward()
    hard = ((queries @ pixels.t()).sigmoid() >= 0.7) & (qid[:, None] != pid[None])
    assert hard.any() and not hard[:, easy].any()
    # Moving the easy pixels anywhere below the threshold changes neither the loss nor the
    # gradient: their pairs carry no loss. Dropping them does not either.
    moved = pixels.clone()
    moved[easy, 0] = -8.0
    q2 = queries.clone().requires_grad_()
    again = external_focal_loss(q2, moved, qid, pid, qcls, pcls, **opts)
    again.backward()
    torch.testing.assert_close(again, loss, rtol=1e-12, atol=0)
    torch.testing.assert_close(q2.grad, q1.grad, rtol=1e-10, atol=1e-14)
    dropped = external_focal_loss(queries, pixels[6:], qid, pid[6:], qcls, pcls[6:], **opts)
    torch.testing.assert_close(dropped, loss, rtol=1e-12, atol=0)
    # Without the threshold the easy pairs count (and dilute the mean).
    assert external_focal_loss(queries, pixels, qid, pid, qcls, pcls, chunk=4) < loss
    # With no pair above the threshold, the loss is 0.
    none = external_focal_loss(queries, pixels, qid, pid, qcls, pcls,
                               hard_negatives="threshold", hard_threshold=1 - 1e-12)
    assert none.item() == 0.0


def test_matched_queries_alone_get_gradient():
    outputs, targets, matching, valid_hw, image_ids = make_batch(seed=4)
    # Image 0: queries 0 and 2 matched; image 1: none; images 2, 3: query 1.
    matching = [(torch.tensor([2, 0]), torch.tensor([0, 1])),
                (torch.tensor([], dtype=torch.long), torch.tensor([], dtype=torch.long)),
                (torch.tensor([1]), torch.tensor([0])), (torch.tensor([1]), torch.tensor([2]))]
    torch.manual_seed(2)
    loss, (feats, cls, ids) = score(make_loss(queries="matched", stuff_classes=()),
                                    outputs, targets, matching, valid_hw, image_ids, None)
    loss.backward()
    grad = outputs.query_embeds.grad.abs().sum(-1)
    matched = torch.tensor([[1, 0, 1], [0, 0, 0], [0, 1, 0], [0, 1, 0]], dtype=torch.bool)
    assert (grad[matched] > 0).all() and (grad[~matched] == 0).all()
    rows = matched.reshape(-1)
    ref = 2.5 * dense_focal(outputs.query_embeds.detach().reshape(12, 6)[rows], feats,
                            image_ids.repeat_interleave(3)[rows], ids,
                            torch.full((int(rows.sum()),), -1), cls)
    torch.testing.assert_close(loss, ref, rtol=1e-12, atol=0)

    # "all" scores every query.
    outputs.query_embeds.grad = None
    loss, _ = score(make_loss(stuff_classes=()),
                    outputs, targets, matching, valid_hw, image_ids, None)
    loss.backward()
    assert (outputs.query_embeds.grad.abs().sum(-1) > 0).all()


def test_per_query_divides_by_the_number_of_target_masks():
    outputs, targets, matching, valid_hw, image_ids = make_batch(seed=5)
    torch.manual_seed(3)
    loss, (feats, cls, ids) = score(make_loss(normalization="per_query", stuff_classes=()),
                                    outputs, targets, matching, valid_hw, image_ids, None)
    num_masks = sum(len(t["labels"]) for t in targets)
    assert num_masks == 12
    ref = 2.5 * dense_variant(outputs.query_embeds.detach().reshape(12, 6), feats,
                              image_ids.repeat_interleave(3), ids, torch.full((12,), -1), cls,
                              normalization="per_query", num_masks=num_masks)
    torch.testing.assert_close(loss, ref, rtol=1e-12, atol=0)


@pytest.mark.parametrize("key, value", [
    ("QUERIES", "positive"),
    ("LOSS", "bce"),
    ("HARD_NEGATIVES", "hardest"),
    ("NORMALIZATION", "sum"),
    ("HARD_THRESHOLD", 0.0),
    ("HARD_THRESHOLD", 1.0),
    ("TOPK", 0),
    ("FOCAL_ALPHA", -0.25),
    ("FOCAL_ALPHA", 1.5),
    ("FOCAL_GAMMA", -1.0),
    ("TEMPERATURE", 0.0),
    ("REFERENCE", "previous"),
])
def test_bad_variants_fail_at_model_build_naming_the_key(key, value):
    _assert_build_fails(key, value, f"MODEL.INST_UNIQUE.CROSS_IMAGE.{key} must be")


def _assert_build_fails(key, value, match, *opts):
    from detectron2.modeling import build_model

    from utils import get_config, tiny_opts

    cfg = get_config("shapes/instunique_mask2former_shapes.yaml", *tiny_opts(),
                     f"MODEL.INST_UNIQUE.CROSS_IMAGE.{key}", value, *opts)
    with pytest.raises(ValueError, match=match):
        build_model(cfg)


def test_variants_are_set_by_yaml_keys():
    from detectron2.modeling import build_model

    from utils import get_config, tiny_opts

    cfg = get_config("shapes/instunique_mask2former_shapes.yaml", *tiny_opts())
    cross = build_model(cfg).cross_image
    # Defaults: Alg. 1 read literally, as before the variants existed.
    assert cross.queries == "all" and cross.alpha == 0.25 and cross.gamma == 2.0
    assert cross.options == dict(loss="focal", temperature=1.0, hard_negatives="none",
                                 hard_threshold=0.8, topk=64, normalization="mean")
    prefix = "MODEL.INST_UNIQUE.CROSS_IMAGE."
    cfg = get_config("shapes/instunique_mask2former_shapes.yaml", *tiny_opts(),
                     prefix + "QUERIES", "matched", prefix + "LOSS", "probability",
                     prefix + "TEMPERATURE", 3.0, prefix + "HARD_NEGATIVES", "threshold",
                     prefix + "NORMALIZATION", "per_query", prefix + "WEIGHT", 10.0)
    cross = build_model(cfg).cross_image
    assert cross.queries == "matched" and cross.weight == 10.0
    assert cross.options["loss"] == "probability" and cross.options["temperature"] == 3.0
    assert cross.options["hard_negatives"] == "threshold"
    assert cross.options["normalization"] == "per_query"


PIXEL_GRADIENT_VARIANTS = [
    dict(),
    dict(loss="probability", temperature=3.0, hard_negatives="threshold", hard_threshold=0.6),
    dict(loss="probability", temperature=3.0, hard_negatives="threshold", hard_threshold=0.6,
         normalization="mean_all"),
]


@pytest.mark.parametrize("variant", range(len(PIXEL_GRADIENT_VARIANTS)))
@pytest.mark.parametrize("chunk", [1, 5, 23])
@pytest.mark.parametrize("rows", [10, 23])
@pytest.mark.parametrize("stuff", [True, False])
def test_pixel_gradient_equals_dense_autograd(variant, chunk, rows, stuff):
    """grad_rows: the first ``rows`` pixels (the batch's) get the dense reference's gradient,
    the others (the memory's) none; the queries' gradient is unchanged."""
    opts = PIXEL_GRADIENT_VARIANTS[variant]
    queries, pixels, qid, pid, qcls, pcls = make_problem(seed=7)
    if not stuff:
        qcls = torch.full_like(qcls, -1)
    q1, p1 = queries.clone().requires_grad_(), pixels.clone().requires_grad_()
    loss = external_focal_loss(q1, p1, qid, pid, qcls, pcls, chunk=chunk, grad_rows=rows,
                               **opts)
    (2.0 * loss).backward()
    q2, p2 = queries.clone().requires_grad_(), pixels.clone().requires_grad_()
    both = torch.cat([p2[:rows], p2[rows:].detach()])
    ref = dense_variant(q2, both, qid, pid, qcls, pcls, pixel_grad=True, **opts)
    (2.0 * ref).backward()
    torch.testing.assert_close(loss, ref, rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(q1.grad, q2.grad, rtol=1e-10, atol=1e-14)
    torch.testing.assert_close(p1.grad, p2.grad, rtol=1e-10, atol=1e-14)
    assert p1.grad[:rows].abs().sum() > 0 and not p1.grad[rows:].any()


def test_pixel_gradient_reaches_the_batch_pixels_not_the_memory():
    outputs, targets, matching, valid_hw, image_ids = make_batch(seed=4)
    memory = make_memory()
    loss, (feats, _, _) = score(make_loss(pixel_gradient="batch"), outputs, targets,
                                matching, valid_hw, image_ids, memory)
    loss.backward()
    grad = outputs.pixel_embeds.grad
    assert grad is not None and grad.abs().sum() > 0
    # Only sampled cells of the valid area receive it; the memory gets nothing to enqueue
    # with a graph, and its own tensor no gradient.
    for k, (h, w) in enumerate(valid_hw):
        assert not grad[k, :, h:].any() and not grad[k, :, :, w:].any()
    assert not feats.requires_grad and memory.feats.grad is None
    outputs_again = make_batch(seed=4)[0]
    torch.manual_seed(0)
    loss_detached, _ = score(make_loss(), outputs_again, targets, matching, valid_hw,
                             image_ids, make_memory())
    torch.manual_seed(0)
    same, _ = score(make_loss(pixel_gradient="batch"), make_batch(seed=4)[0], targets,
                    matching, valid_hw, image_ids, make_memory())
    torch.testing.assert_close(same, loss_detached, rtol=1e-12, atol=0)  # same value


@pytest.mark.parametrize("opts", [
    ("MODEL.INST_UNIQUE.CROSS_IMAGE.NORMALIZATION", "per_query"),
    ("MODEL.INST_UNIQUE.CROSS_IMAGE.HARD_NEGATIVES", "topk"),
])
def test_pixel_gradient_refuses_what_it_cannot_normalise(opts):
    _assert_build_fails("PIXEL_GRADIENT", "batch",
                        'MODEL.INST_UNIQUE.CROSS_IMAGE.PIXEL_GRADIENT "batch" needs', *opts)
    _assert_build_fails("PIXEL_GRADIENT", "all",
                        "MODEL.INST_UNIQUE.CROSS_IMAGE.PIXEL_GRADIENT must be one of")


# ----------------------------------------------------------- own-instance reference (ours)
def own_means(pixel_embeds, targets, matching):
    """(B, Q, C) by hand: make_batch's masks are constant over each STRIDE x STRIDE cell, so
    the matched instance's mean embedding is the plain mean over its cells."""
    f = pixel_embeds.detach()
    out = torch.zeros(f.shape[0], 3, f.shape[1], dtype=f.dtype)
    for k, (src, tgt) in enumerate(matching):
        for s, t in zip(src.tolist(), tgt.tolist()):
            cells = targets[k]["masks"][t, ::STRIDE, ::STRIDE]
            out[k, s] = f[k][:, cells].mean(1)
    return out


@pytest.mark.parametrize("opts", [dict(), dict(loss="probability", temperature=3.0,
                                               hard_negatives="threshold", hard_threshold=0.5)])
def test_own_instance_reference_equals_dense_reference(opts):
    outputs, targets, matching, valid_hw, image_ids = make_batch(seed=7)
    memory = make_memory()
    mem_feats, mem_cls, mem_ids = memory.contents()  # what the loss reads
    torch.manual_seed(4)
    loss, (feats, cls, ids) = score(
        make_loss(queries="matched", reference="own_instance", **opts), outputs, targets,
        matching, valid_hw, image_ids, memory)
    loss.backward()
    rows = torch.tensor([1] * 9 + [1, 0, 1], dtype=torch.bool)  # image 3: queries 2 and 0
    queries = outputs.query_embeds.detach().clone().requires_grad_()
    e = queries.reshape(12, 6)[rows]
    own = own_means(outputs.pixel_embeds, targets, matching).reshape(12, 6)[rows]
    query_cls = torch.tensor([-1, 2, -1, 2, -1, -1, -1, 2, -1, -1, 2])  # stuff class 2
    ref = 2.5 * dense_variant(e, torch.cat([feats, mem_feats.double()]),
                              image_ids.repeat_interleave(3)[rows], torch.cat([ids, mem_ids]),
                              query_cls, torch.cat([cls, mem_cls]), offset=(e * own).sum(1),
                              **opts)
    ref.backward()
    assert ref.item() > 0
    torch.testing.assert_close(loss, ref, rtol=1e-12, atol=0)
    torch.testing.assert_close(outputs.query_embeds.grad, queries.grad, rtol=1e-10, atol=1e-14)


def test_own_instance_reference_leaves_a_look_alike_of_the_own_instance_alone():
    """An external pixel equal to the query's own instance cannot be told apart from it:
    no gradient with the reference, where Eq. 5 at target 0 lowers the query."""
    outputs, targets, _, valid_hw, _ = make_batch(seed=8)
    matching = [(torch.tensor([1]), torch.tensor([2]))] + [
        (torch.tensor([], dtype=torch.long), torch.tensor([], dtype=torch.long))] * 3
    own = own_means(outputs.pixel_embeds, targets, matching)[0, 1]
    same_image = torch.tensor([7, 7, 7, 7])  # the batch's own pixels are not external
    grads = {}
    for reference in ("none", "own_instance"):
        memory = PixelMemory(capacity=4, dim=6)
        memory.enqueue(own.float().expand(4, 6), torch.full((4,), -1), torch.full((4,), 12))
        outputs.query_embeds.grad = None
        loss, _ = score(make_loss(queries="matched", reference=reference, stuff_classes=()),
                        outputs, targets, matching, valid_hw, same_image, memory)
        loss.backward()
        grads[reference] = outputs.query_embeds.grad[0, 1]
    assert grads["none"].norm() > 1e-3
    assert grads["own_instance"].norm() < 1e-6  # the memory holds float32 copies


def test_own_instance_reference_needs_matched_queries():
    _assert_build_fails("REFERENCE", "own_instance",
                        'MODEL.INST_UNIQUE.CROSS_IMAGE.REFERENCE "own_instance" needs')
