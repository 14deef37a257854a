"""Mask2Former's semantic, panoptic and instance inference on constructed outputs."""
import pytest
import torch
from detectron2.modeling import build_model

from instunique.segmenters.mask2former.inference import (
    instance_inference,
    panoptic_inference,
    semantic_inference,
)

from utils import get_config, tiny_opts

K = 5  # classes 0-2 things, 3-4 stuff
THINGS = (0, 1, 2)
H = W = 8
ON, OFF = 12.0, -12.0  # mask logits: probabilities ~1 and ~0


def class_logits(*rows):
    """(Q, K+1) logits whose softmax puts probability p on class c (c = K: no object) and
    spreads the rest evenly."""
    out = []
    for c, p in rows:
        probs = torch.full((K + 1,), (1 - p) / K)
        probs[c] = p
        out.append(probs.log())
    return torch.stack(out)


def mask(region, inside=ON, outside=OFF):
    """(H, W) mask logits: ``inside`` on the (rows, cols) slices of region."""
    m = torch.full((H, W), outside)
    m[region] = inside
    return m


def panoptic(logits, masks, object_mask_threshold=0.8, overlap_threshold=0.8):
    return panoptic_inference(logits, torch.stack(masks), THINGS, object_mask_threshold,
                              overlap_threshold)


def test_semantic_inference_sums_class_times_mask_probabilities():
    torch.manual_seed(0)
    logits, masks = torch.randn(6, K + 1), torch.randn(6, H, W)
    sem = semantic_inference(logits, masks)
    assert sem.shape == (K, H, W)
    probs = logits.softmax(-1)
    expected = sum(probs[q, :K, None, None] * masks[q].sigmoid() for q in range(6))
    assert torch.allclose(sem, expected, atol=1e-6)


def test_confident_queries_give_segments_in_detectron2_format():
    left, right = (slice(None), slice(0, 4)), (slice(None), slice(4, None))
    seg, info = panoptic(class_logits((1, 0.95), (3, 0.9)), [mask(left), mask(right)])
    assert seg.dtype == torch.int32 and seg.shape == (H, W)
    assert info == [{"id": 1, "isthing": True, "category_id": 1},
                    {"id": 2, "isthing": False, "category_id": 3}]
    assert (seg[left] == 1).all() and (seg[right] == 2).all()


@pytest.mark.parametrize("row", [(K, 0.99), (2, 0.79), (2, 0.5)], ids=["no-object", "0.79", "low"])
def test_no_object_and_unconfident_queries_are_dropped(row):
    everything = (slice(None), slice(None))
    seg, info = panoptic(class_logits(row, (0, 0.9)), [mask(everything), mask((0, 0))])
    # The dropped query takes no pixel: the kept one keeps its single pixel only.
    assert info == [{"id": 1, "isthing": True, "category_id": 0}]
    assert seg.sum() == 1 and seg[0, 0] == 1


def test_mostly_hidden_query_is_dropped_by_the_overlap_threshold():
    # A (score 0.95) covers columns 0-3; B (score 0.9) columns 0-5: B wins columns 4-5
    # only, 1/3 of its own mask, below 0.8: dropped, its pixels left void.
    a, b = (slice(None), slice(0, 4)), (slice(None), slice(0, 6))
    seg, info = panoptic(class_logits((0, 0.95), (1, 0.9)), [mask(a), mask(b)])
    assert [s["category_id"] for s in info] == [0]
    assert (seg[a] == 1).all() and (seg[:, 4:] == 0).all()
    # With a threshold of 1/3 B stays, on the pixels it won.
    seg, info = panoptic(class_logits((0, 0.95), (1, 0.9)), [mask(a), mask(b)],
                         overlap_threshold=0.3)
    assert [s["category_id"] for s in info] == [0, 1]
    assert (seg[:, 4:6] == 2).all() and (seg[:, 6:] == 0).all()


def test_pixels_below_half_probability_stay_void():
    # The only query owns every pixel by argmax but is confident on the top half only.
    top = (slice(0, 4), slice(None))
    seg, info = panoptic(class_logits((4, 0.9)), [mask(top, ON, -0.5)])
    assert len(info) == 1 and (seg[top] == 1).all() and (seg[4:] == 0).all()


def test_stuff_of_one_class_merges_and_things_do_not():
    quarters = [(slice(0, 4), slice(0, 4)), (slice(0, 4), slice(4, None)),
                (slice(4, None), slice(0, 4)), (slice(4, None), slice(4, None))]
    logits = class_logits((4, 0.9), (2, 0.9), (4, 0.95), (2, 0.85))
    seg, info = panoptic(logits, [mask(q) for q in quarters])
    assert info == [{"id": 1, "isthing": False, "category_id": 4},
                    {"id": 2, "isthing": True, "category_id": 2},
                    {"id": 3, "isthing": True, "category_id": 2}]
    assert (seg[quarters[0]] == 1).all() and (seg[quarters[2]] == 1).all()
    assert (seg[quarters[1]] == 2).all() and (seg[quarters[3]] == 3).all()


def test_no_confident_query_gives_an_empty_segmentation():
    seg, info = panoptic(class_logits((K, 0.9), (1, 0.3)), [mask((0, 0)), mask((1, 1))])
    assert info == [] and seg.eq(0).all()


def test_instances_of_a_panoptic_model_are_things_only():
    logits = class_logits((0, 0.9), (3, 0.9), (4, 0.8), (2, 0.7))
    masks = torch.stack([mask((slice(0, 2 * (q + 1)), slice(None))) for q in range(4)])
    all_pairs = instance_inference(logits, masks, (H, W), topk=8)
    assert set(all_pairs.pred_classes.tolist()) & {3, 4}
    things = instance_inference(logits, masks, (H, W), topk=8, thing_classes=THINGS)
    assert 0 < len(things) < len(all_pairs)
    assert set(things.pred_classes.tolist()) <= set(THINGS)
    kept = [i for i, c in enumerate(all_pairs.pred_classes.tolist()) if c in THINGS]
    assert torch.equal(things.scores, all_pairs.scores[kept])


def _panoptic_cfg(*opts, arch="mask2former"):
    return get_config(f"shapes/{arch}_mask2former_panoptic_shapes.yaml"
                      if arch == "instunique" else "shapes/mask2former_panoptic_shapes.yaml",
                      *tiny_opts(), *opts)


@pytest.mark.parametrize("arch", ["mask2former", "instunique"])
def test_model_outputs_follow_the_test_switches(arch):
    torch.manual_seed(0)
    model = build_model(_panoptic_cfg("MODEL.MASK_FORMER.TEST.INSTANCE_ON", "True", arch=arch))
    model.eval()
    image = torch.randint(0, 256, (3, 61, 83), dtype=torch.uint8)
    with torch.no_grad():
        out = model([{"image": image, "height": 122, "width": 166}])[0]
    assert set(out) == {"sem_seg", "panoptic_seg", "instances"}
    assert out["sem_seg"].shape == (7, 122, 166)
    seg, info = out["panoptic_seg"]
    assert seg.shape == (122, 166) and seg.dtype == torch.int32
    assert set(seg.unique().tolist()) - {0} == {s["id"] for s in info}
    assert set(out["instances"].pred_classes.tolist()) <= {0, 1, 2, 3}
    segmenter = getattr(model, "segmenter", model)
    assert segmenter.thing_classes == (0, 1, 2, 3)
    assert (segmenter.object_mask_threshold, segmenter.overlap_threshold) == (0.8, 0.8)


def test_model_panoptic_output_is_panoptic_inference_of_its_predictions():
    torch.manual_seed(0)
    model = build_model(_panoptic_cfg("MODEL.MASK_FORMER.TEST.OBJECT_MASK_THRESHOLD", "0.2",
                                      "MODEL.MASK_FORMER.TEST.OVERLAP_THRESHOLD", "0.5"))
    model.eval()
    logits = torch.full((3, 8), -9.0)  # 7 classes + no object
    logits[0, 0], logits[1, 4], logits[2, 7] = 5.0, 1.0, 5.0
    masks = torch.randn(3, H, W) * 4
    out = model.inference_single(logits, masks, (H, W), (H, W))
    assert set(out) == {"sem_seg", "panoptic_seg"}
    seg, info = panoptic_inference(logits, masks, (0, 1, 2, 3), 0.2, 0.5)
    assert torch.equal(out["panoptic_seg"][0], seg) and out["panoptic_seg"][1] == info
    assert torch.allclose(out["sem_seg"], semantic_inference(logits, masks))


def test_bad_test_switches_are_refused():
    with pytest.raises(ValueError, match="all False"):
        build_model(_panoptic_cfg("MODEL.MASK_FORMER.TEST.SEMANTIC_ON", "False",
                                  "MODEL.MASK_FORMER.TEST.PANOPTIC_ON", "False"))
    with pytest.raises(ValueError, match="DATASETS.TEST"):
        build_model(_panoptic_cfg("DATASETS.TEST", "('shapes_val_no_such',)"))
