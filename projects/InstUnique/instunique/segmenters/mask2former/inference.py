"""Turning Mask2Former's set predictions into detectron2 ``Instances``."""
import torch
from detectron2.structures import BitMasks, Instances


def instance_inference(
    class_logits: torch.Tensor, mask_logits: torch.Tensor, image_size, topk: int
) -> Instances:
    """Top-k (query, class) pairs of one image, rescored by mask confidence.

    Args:
        class_logits: (Q, K+1), the last class being "no object".
        mask_logits: (Q, H, W) at the output resolution.
        image_size: (H, W).
        topk: number of detections kept.
    Returns:
        Instances with pred_masks (topk, H, W) float {0,1}, pred_boxes, scores, pred_classes.
    """
    num_classes = class_logits.shape[1] - 1
    scores = class_logits.softmax(-1)[:, :-1]
    # Every query may be reported under several classes, as in the official inference.
    top_scores, top_idx = scores.flatten().topk(min(topk, scores.numel()), sorted=False)
    labels = top_idx % num_classes
    query_idx = top_idx // num_classes
    mask_logits = mask_logits[query_idx]

    masks = (mask_logits > 0).float()
    # Mean foreground probability inside the predicted mask: down-weights blurry masks.
    mask_scores = (mask_logits.sigmoid().flatten(1) * masks.flatten(1)).sum(1) / (
        masks.flatten(1).sum(1) + 1e-6
    )
    result = Instances(image_size)
    result.pred_masks = masks
    result.pred_boxes = BitMasks(masks > 0).get_bounding_boxes()
    result.scores = top_scores * mask_scores
    result.pred_classes = labels
    return result
