"""Turning SparseInst's predictions into detectron2 ``Instances`` (no NMS)."""
from typing import Tuple

import torch
import torch.nn.functional as F
from detectron2.structures import BitMasks, Boxes, Instances


def sparseinst_inference(
    class_logits: torch.Tensor, objectness_logits: torch.Tensor, mask_logits: torch.Tensor,
    image_size: Tuple[int, int], padded_size: Tuple[int, int], output_size: Tuple[int, int],
    cls_threshold: float, mask_threshold: float, max_detections: int,
) -> Instances:
    """The official SparseInst inference for one image.

    A prediction's score is sqrt(sigmoid(class) * sigmoid(objectness)) of its best class;
    predictions scoring at most ``cls_threshold`` are dropped; each score is multiplied by
    the mean probability inside its mask (pixels above ``mask_threshold``); the
    ``max_detections`` best are kept. Masks are upsampled to the padded input, cropped to
    the image, resized to the output and thresholded at ``mask_threshold``.

    Args:
        class_logits: (N, K); objectness_logits: (N, 1); mask_logits: (N, h, w) at the
            model's mask stride of the padded input.
        image_size: (H, W) of the input image before padding.
        padded_size: (H_pad, W_pad) of the padded batch.
        output_size: (height, width) of the output.
    Returns:
        Instances with pred_masks (n, height, width) bool, pred_boxes, scores,
        pred_classes (n <= max_detections), in prediction order.
    """
    scores = (class_logits.sigmoid() * objectness_logits.sigmoid()).sqrt()
    scores, labels = scores.max(dim=-1)
    keep = scores > cls_threshold
    scores, labels, probs = scores[keep], labels[keep], mask_logits[keep].sigmoid()

    binary = (probs > mask_threshold).float()
    # Mask score: mean foreground probability inside the predicted mask.
    scores = scores * (probs * binary).sum((1, 2)) / (binary.sum((1, 2)) + 1e-6)
    if len(scores) > max_detections:
        top = scores.topk(max_detections).indices.sort().values
        scores, labels, probs = scores[top], labels[top], probs[top]

    height, width = output_size
    if len(scores):
        h, w = image_size
        probs = F.interpolate(probs[:, None], size=padded_size, mode="bilinear",
                              align_corners=False)[:, :, :h, :w]
        probs = F.interpolate(probs, size=(height, width), mode="bilinear",
                              align_corners=False)[:, 0]
        masks = probs > mask_threshold
    else:
        masks = probs.new_zeros((0, height, width), dtype=torch.bool)

    result = Instances((height, width))
    result.pred_masks = masks
    result.pred_boxes = BitMasks(masks).get_bounding_boxes() if len(masks) else Boxes(
        masks.new_zeros((0, 4), dtype=torch.float32))
    result.scores = scores
    result.pred_classes = labels
    return result
