"""MODEL.MASK_FORMER.TEST.LARGEST_COMPONENT: instance masks cut to their largest piece."""
import torch
from detectron2.modeling import build_model

from instunique.segmenters.mask2former.inference import instance_inference, largest_components

from utils import get_config, tiny_opts


def _masks(*pieces_per_mask, size=10):
    """(N, size, size) float masks, each the union of its (rows, cols) slices."""
    out = torch.zeros(len(pieces_per_mask), size, size)
    for m, pieces in zip(out, pieces_per_mask):
        for rows, cols in pieces:
            m[rows, cols] = 1
    return out


def test_each_mask_keeps_its_largest_piece_only():
    big, small = (slice(0, 3), slice(0, 3)), (slice(7, 9), slice(7, 8))
    masks = _masks([big, small], [small], [])
    out = largest_components(masks)
    assert out.dtype == masks.dtype and out.shape == masks.shape
    assert torch.equal(out[0], _masks([big])[0])
    assert torch.equal(out[1], masks[1])  # one piece: unchanged
    assert not out[2].any()  # empty stays empty


def test_pieces_touching_at_a_corner_are_one_piece():
    masks = _masks([(slice(0, 2), slice(0, 2)), (slice(2, 3), slice(2, 3))])
    assert torch.equal(largest_components(masks), masks)


def test_score_and_box_come_from_the_kept_piece():
    logits = torch.tensor([[4.0, -4.0]])  # one class + no object
    # Probability 0.95 on a 3x3 piece, 0.6 on a separate 1x2 piece.
    mask_logits = torch.full((1, 10, 10), -9.0)
    mask_logits[0, 0:3, 0:3] = torch.logit(torch.tensor(0.95))
    mask_logits[0, 8, 6:8] = torch.logit(torch.tensor(0.6))
    whole = instance_inference(logits, mask_logits, (10, 10), topk=1)
    cut = instance_inference(logits, mask_logits, (10, 10), topk=1, largest_component=True)
    class_prob = logits.softmax(-1)[0, 0]
    assert whole.pred_boxes.tensor.tolist() == [[0.0, 0.0, 8.0, 9.0]]
    assert cut.pred_boxes.tensor.tolist() == [[0.0, 0.0, 3.0, 3.0]]
    assert torch.allclose(cut.scores, class_prob * 0.95)
    assert torch.allclose(whole.scores, class_prob * (9 * 0.95 + 2 * 0.6) / 11)
    assert cut.pred_masks.sum() == 9


def test_the_config_key_reaches_the_model_inference():
    model = build_model(get_config("shapes/mask2former_shapes.yaml", *tiny_opts(),
                                   "MODEL.MASK_FORMER.TEST.LARGEST_COMPONENT", "True")).eval()
    logits = torch.full((3, 5), -9.0)
    logits[:, 0] = 5.0
    masks = torch.full((3, 12, 12), -9.0)
    masks[:, 0:4, 0:4] = 9.0
    masks[:, 8:10, 8:12] = 9.0
    out = model.inference_single(logits, masks, (12, 12), (12, 12))["instances"]
    assert (out.pred_masks.flatten(1).sum(1) == 16).all()
