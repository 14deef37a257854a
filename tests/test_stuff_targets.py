"""Stuff-aware cross-image targets (supp. S1): where they come from and where they are 1."""
import torch
from detectron2.modeling import build_model
from detectron2.structures import BitMasks, Instances

from instunique.adapter import SegmenterOutputs
from instunique.data.metadata import training_stuff_classes
from instunique.objectives import CrossImageLoss, PixelMemory

from utils import fake_pair, get_config, tiny_opts, train_step

STRIDE, SIZE = 4, 16
GRID = SIZE // STRIDE  # 4 x 4 cells per image
STUFF = (4, 5, 6)
IMAGE_IDS = (10, 11)
Q = 3


def _mask(rows, cols):
    m = torch.zeros(SIZE, SIZE, dtype=torch.bool)
    m[rows, cols] = True
    return m


def _targets():
    """Image 10: thing 0 top-left, stuff 4 elsewhere. Image 11: stuff 5 on top, thing 1
    bottom-left, stuff 4 bottom-right."""
    thing = _mask(slice(0, 8), slice(0, 8))
    top, bottom = slice(0, 8), slice(8, None)
    return [
        {"labels": torch.tensor([0, 4]), "masks": torch.stack([thing, ~thing])},
        {"labels": torch.tensor([5, 1, 4]),
         "masks": torch.stack([_mask(top, slice(None)), _mask(bottom, slice(0, 8)),
                               _mask(bottom, slice(8, None))])},
    ]


# Image 10: query 0 -> thing, query 1 -> stuff 4, query 2 unmatched.
# Image 11: query 0 -> stuff 5, query 1 -> thing, query 2 -> stuff 4.
MATCHING = [(torch.tensor([0, 1]), torch.tensor([0, 1])),
            (torch.tensor([0, 1, 2]), torch.tensor([0, 1, 2]))]
QUERY_STUFF = [[-1, 4, -1], [5, -1, 4]]
# Memory entries: (stuff label or -1, image id); the one of image 10 is its own past.
MEMORY = [(4, 20), (5, 21), (0, 22), (6, 23), (4, 10), (-1, 24)]
BATCH_CELLS = len(IMAGE_IDS) * GRID * GRID
DIM = BATCH_CELLS + len(MEMORY)


def _outputs():
    """One-hot pixel embeddings (a dimension per cell and memory entry) and zero queries:
    the gradient of query q on dimension j is then the gradient of the single logit
    z(q, j), whose sign tells the target (+: target 0, -: target 1, 0: no pair)."""
    pixel_embeds = torch.eye(DIM)[:BATCH_CELLS].t().reshape(DIM, 2, GRID, GRID).transpose(0, 1)
    queries = torch.zeros(len(IMAGE_IDS), Q, DIM, requires_grad=True)
    outputs = SegmenterOutputs(pixel_embeds=pixel_embeds.contiguous(), query_embeds=queries,
                               class_logits=torch.zeros(2, Q, 8), raw={})
    return outputs, queries


def _memory():
    memory = PixelMemory(capacity=16, dim=DIM)
    feats = torch.eye(DIM)[BATCH_CELLS:]
    labels, ids = (torch.tensor(v) for v in zip(*MEMORY))
    memory.enqueue(feats, labels, ids)
    return memory


def _cell_labels():
    """(2 * 16,) class at the centre of every cell, in the one-hot order."""
    labels = torch.full((2, GRID, GRID), -1)
    for b, t in enumerate(_targets()):
        centres = t["masks"][:, STRIDE // 2 :: STRIDE, STRIDE // 2 :: STRIDE]
        for k, m in enumerate(centres):
            labels[b][m] = t["labels"][k]
    return labels.flatten()


def _expected_signs(sampled_cells):
    labels = _cell_labels()
    cell_image = torch.arange(BATCH_CELLS) // (GRID * GRID)
    expected = torch.zeros(len(IMAGE_IDS), Q, DIM)
    for b in range(len(IMAGE_IDS)):
        for q in range(Q):
            stuff = QUERY_STUFF[b][q]
            for j in sampled_cells:
                if cell_image[j] != b:
                    expected[b, q, j] = -1 if stuff >= 0 and labels[j] == stuff else 1
            for m, (label, image_id) in enumerate(MEMORY):
                if image_id != IMAGE_IDS[b]:
                    expected[b, q, BATCH_CELLS + m] = -1 if stuff >= 0 and label == stuff else 1
    return expected


def test_stuff_targets_are_one_exactly_on_external_pixels_of_the_class():
    torch.manual_seed(0)
    outputs, queries = _outputs()
    memory = _memory()
    loss_fn = CrossImageLoss(weight=1.0, pixels_per_image=64, alpha=0.25, gamma=2.0,
                             chunk_pixels=7, stride=STRIDE, stuff_classes=STUFF)
    loss_fn.memory = memory
    loss, (feats, labels, ids) = loss_fn(outputs, _targets(), MATCHING,
                                         [(GRID, GRID)] * 2, torch.tensor(IMAGE_IDS))
    loss.backward()
    cells = feats.argmax(1)
    # The sampled pixels carry their cell's ground-truth class and image id.
    assert torch.equal(labels, _cell_labels()[cells])
    assert torch.equal(ids, torch.tensor(IMAGE_IDS)[cells // (GRID * GRID)])
    expected = _expected_signs(cells.unique().tolist())
    assert (expected == -1).sum() > 10 and (expected == 1).sum() > 100
    assert torch.equal(torch.sign(queries.grad), expected)


def test_memory_keeps_the_labels_that_give_later_stuff_targets():
    torch.manual_seed(1)
    outputs, _ = _outputs()
    loss_fn = CrossImageLoss(weight=1.0, pixels_per_image=32, alpha=0.25, gamma=2.0,
                             chunk_pixels=0, stride=STRIDE, stuff_classes=STUFF,
                             memory_pixels=256, embed_dim=DIM)
    _, sampled = loss_fn(outputs, _targets(), MATCHING, [(GRID, GRID)] * 2,
                         torch.tensor(IMAGE_IDS))
    _, labels, ids = loss_fn.memory.contents()
    assert torch.equal(labels, sampled[1]) and torch.equal(ids, sampled[2])
    assert {4, 5} <= set(labels.tolist())


def test_without_stuff_classes_every_target_is_zero():
    torch.manual_seed(0)
    outputs, queries = _outputs()
    loss_fn = CrossImageLoss(weight=1.0, pixels_per_image=64, alpha=0.25, gamma=2.0,
                             chunk_pixels=0, stride=STRIDE)
    loss_fn.memory = _memory()
    loss, _ = loss_fn(outputs, _targets(), MATCHING, [(GRID, GRID)] * 2,
                      torch.tensor(IMAGE_IDS))
    loss.backward()
    assert (queries.grad >= 0).all() and (queries.grad > 0).any()


def test_stuff_classes_come_from_the_training_metadata():
    assert training_stuff_classes(["coco_2017_train_panoptic"]) == tuple(range(80, 133))
    assert training_stuff_classes(["shapes_panoptic_train"]) == STUFF
    assert training_stuff_classes(["shapes_train", "coco_2017_train"]) == ()
    panoptic = get_config("shapes/instunique_mask2former_panoptic_shapes.yaml", *tiny_opts())
    assert build_model(panoptic).cross_image.stuff_classes == STUFF
    off = panoptic.clone()
    off.MODEL.INST_UNIQUE.CROSS_IMAGE.STUFF_TARGETS = False
    assert build_model(off).cross_image.stuff_classes == ()
    instance = get_config("shapes/instunique_mask2former_shapes.yaml", *tiny_opts())
    assert build_model(instance).cross_image.stuff_classes == ()


def _with_stuff(pair):
    """A fake pair whose last instance becomes a stuff segment of class 5 (both views)."""
    for view in (pair, pair["paired_view"]):
        inst = view["instances"]
        classes = inst.gt_classes.clone()
        classes[-1] = 5
        out = Instances(inst.image_size, gt_masks=BitMasks(inst.gt_masks.tensor),
                        gt_boxes=inst.gt_boxes, gt_classes=classes)
        view["instances"] = out
    return pair


def test_training_step_stores_stuff_labels_in_the_memory():
    cfg = get_config("shapes/instunique_mask2former_panoptic_shapes.yaml", *tiny_opts(),
                     "MODEL.INST_UNIQUE.CROSS_IMAGE.PIXELS_PER_IMAGE", 512)
    torch.manual_seed(0)
    model = build_model(cfg)
    batch = [_with_stuff(fake_pair(64, 64, 3, 0, 1)), _with_stuff(fake_pair(64, 64, 2, 1, 2))]
    losses = train_step(model, batch)
    assert "loss_cross_image" in losses
    _, labels, _ = model.memory.contents()
    assert 5 in labels.tolist()
