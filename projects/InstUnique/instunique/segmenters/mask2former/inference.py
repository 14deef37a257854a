"""Mask2Former's set predictions of one image turned into detectron2's outputs: semantic
scores, a panoptic segmentation, and ``Instances`` (the three inferences of the
Mask2Former paper, Sec. 4 and its released code's defaults)."""
from typing import Collection, Dict, List, Optional, Tuple

import cv2
import numpy as np
import torch
from detectron2.structures import BitMasks, Instances


def semantic_inference(class_logits: torch.Tensor, mask_logits: torch.Tensor) -> torch.Tensor:
    """Per-class scores: every query's class probabilities (without "no object") times its
    mask probabilities, summed over queries.

    Args:
        class_logits: (Q, K+1), the last class being "no object".
        mask_logits: (Q, H, W).
    Returns:
        (K, H, W) scores; their argmax over K is the semantic segmentation.
    """
    probs = class_logits.softmax(-1)[:, :-1]
    return torch.einsum("qk,qhw->khw", probs, mask_logits.sigmoid())


def panoptic_inference(
    class_logits: torch.Tensor, mask_logits: torch.Tensor, thing_classes: Collection[int],
    object_mask_threshold: float, overlap_threshold: float,
) -> Tuple[torch.Tensor, List[Dict]]:
    """Non-overlapping segments from the confident queries.

    A query is kept when its top class is not "no object" and its probability exceeds
    ``object_mask_threshold``. Each pixel goes to the kept query with the highest
    probability x mask probability, and counts only where that mask probability is >= 0.5.
    A query whose assigned pixels are fewer than ``overlap_threshold`` times its own mask
    (probability >= 0.5) is dropped: it is mostly hidden by better queries. Queries of one
    stuff class form one segment.

    Args:
        class_logits: (Q, K+1), the last class being "no object".
        mask_logits: (Q, H, W).
        thing_classes: the contiguous class ids that are things.
    Returns:
        panoptic_seg (H, W) int32 (0: no segment) and segments_info, one
        {"id", "isthing", "category_id"} per segment id 1, 2, ... (detectron2's format).
    """
    num_classes = class_logits.shape[1] - 1
    scores, labels = class_logits.softmax(-1).max(-1)
    keep = (labels != num_classes) & (scores > object_mask_threshold)
    scores, labels, masks = scores[keep], labels[keep], mask_logits[keep].sigmoid()
    panoptic_seg = torch.zeros(mask_logits.shape[-2:], dtype=torch.int32,
                               device=mask_logits.device)
    segments: List[Dict] = []
    if masks.shape[0] == 0:
        return panoptic_seg, segments
    owner = (scores[:, None, None] * masks).argmax(0)
    stuff_segment: Dict[int, int] = {}
    things = {int(c) for c in thing_classes}
    for k, label in enumerate(labels.tolist()):
        assigned = owner == k
        own = masks[k] >= 0.5
        assigned_area, own_area = int(assigned.sum()), int(own.sum())
        segment = assigned & own
        if assigned_area == 0 or own_area == 0 or not bool(segment.any()):
            continue
        if assigned_area / own_area < overlap_threshold:
            continue
        isthing = label in things
        if not isthing and label in stuff_segment:
            panoptic_seg[segment] = stuff_segment[label]
            continue
        segment_id = len(segments) + 1
        panoptic_seg[segment] = segment_id
        segments.append({"id": segment_id, "isthing": isthing, "category_id": label})
        if not isthing:
            stuff_segment[label] = segment_id
    return panoptic_seg, segments


def instance_inference(
    class_logits: torch.Tensor, mask_logits: torch.Tensor, image_size, topk: int,
    thing_classes: Optional[Collection[int]] = None, largest_component: bool = False,
) -> Instances:
    """Top-k (query, class) pairs of one image, rescored by mask confidence.

    Args:
        class_logits: (Q, K+1), the last class being "no object".
        mask_logits: (Q, H, W) at the output resolution.
        image_size: (H, W).
        topk: number of (query, class) pairs drawn.
        thing_classes: if given (panoptic models), the pairs of other classes (stuff) are
            dropped after the top-k, as the official inference does.
        largest_component: each mask cut to its largest connected piece (see
            :func:`largest_components`) before its score and box.
    Returns:
        Instances with pred_masks (N, H, W) float {0,1}, pred_boxes, scores, pred_classes;
        N = topk, or fewer with ``thing_classes``.
    """
    num_classes = class_logits.shape[1] - 1
    scores = class_logits.softmax(-1)[:, :-1]
    # Every query may be reported under several classes, as in the official inference.
    top_scores, top_idx = scores.flatten().topk(min(topk, scores.numel()), sorted=False)
    labels = top_idx % num_classes
    query_idx = top_idx // num_classes
    if thing_classes is not None:
        is_thing = torch.isin(labels, torch.tensor(sorted(thing_classes), dtype=labels.dtype,
                                                   device=labels.device))
        top_scores, labels, query_idx = top_scores[is_thing], labels[is_thing], query_idx[is_thing]
    mask_logits = mask_logits[query_idx]

    masks = (mask_logits > 0).float()
    if largest_component:
        masks = largest_components(masks)
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


def largest_components(masks: torch.Tensor) -> torch.Tensor:
    """(N, H, W) {0, 1} masks, each cut to its largest 8-connected piece (the first in
    scan order on a tie); empty masks stay empty. Labelled by OpenCV on the CPU; returned
    on the masks' device and dtype."""
    binary = masks.detach().to("cpu", torch.uint8).numpy()
    for m in binary:
        count, labels, stats, _ = cv2.connectedComponentsWithStats(m, connectivity=8)
        if count > 2:  # background and two or more pieces
            m[:] = labels == 1 + int(np.argmax(stats[1:, cv2.CC_STAT_AREA]))
    return torch.from_numpy(binary).to(masks.device, masks.dtype)
