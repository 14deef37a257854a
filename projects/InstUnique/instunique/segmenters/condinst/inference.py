"""CondInst inference: FCOS post-processing of one image's locations, then its masks pasted
at the output resolution as detectron2 ``Instances``."""
from typing import Dict, Sequence, Tuple

import torch
import torch.nn.functional as F
from detectron2.layers import batched_nms
from detectron2.structures import Boxes, Instances
from torch import Tensor

from .mask_branch import aligned_bilinear


def fcos_detections(
    cls_logits: Tensor, bbox_reg: Tensor, ctrness: Tensor, locations: Tensor, levels: Tensor,
    strides: Sequence[int], *, score_thresh: float, pre_nms_topk: int, post_nms_topk: int,
    nms_thresh: float, thresh_with_ctr: bool,
) -> Dict[str, Tensor]:
    """FCOS detections of one image (AdelaiDet's procedure).

    Per level: candidates are the (location, class) pairs whose sigmoid(class) (times
    sigmoid(centerness) with ``thresh_with_ctr``) exceeds ``score_thresh``; at most
    ``pre_nms_topk`` of them, the best by sigmoid(class) * sigmoid(centerness). Then over
    all levels a class-aware NMS at ``nms_thresh`` and the ``post_nms_topk`` best (ties at
    the cut kept). The score is sqrt(sigmoid(class) * sigmoid(centerness)).

    Args:
        cls_logits (L, K), bbox_reg (L, 4) in strides, ctrness (L, 1), locations (L, 2),
        levels (L,): one image's slice of the raw predictions.
    Returns:
        "location_inds" (n,) long indices into L, "classes" (n,) long, "scores" (n,) and
        "boxes" (n, 4) XYXY in padded-input pixels, in decreasing score.
    """
    inds, classes, scores, boxes = [], [], [], []
    for level, stride in enumerate(strides):
        idx = torch.nonzero(levels == level).squeeze(1)
        probs = cls_logits[idx].float().sigmoid()
        ctr = ctrness[idx, 0].float().sigmoid()
        if thresh_with_ctr:
            probs = probs * ctr[:, None]
        cand = torch.nonzero(probs > score_thresh)  # (m, 2) (location, class), row-major
        s = probs[cand[:, 0], cand[:, 1]]
        if not thresh_with_ctr:
            s = s * ctr[cand[:, 0]]
        if len(s) > pre_nms_topk:
            s, top = s.topk(pre_nms_topk, sorted=False)
            cand = cand[top]
        loc_inds = idx[cand[:, 0]]
        xy = locations[loc_inds].float()
        reg = bbox_reg[loc_inds].float() * stride
        boxes.append(torch.cat((xy - reg[:, :2], xy + reg[:, 2:]), dim=1))
        inds.append(loc_inds)
        classes.append(cand[:, 1])
        scores.append(s.sqrt())
    inds, classes = torch.cat(inds), torch.cat(classes)
    scores, boxes = torch.cat(scores), torch.cat(boxes)
    if nms_thresh > 0:
        keep = batched_nms(boxes, scores, classes, nms_thresh)
    else:
        keep = scores.argsort(descending=True)
    if post_nms_topk > 0 and len(keep) > post_nms_topk:
        kept_scores = scores[keep]
        cut = kept_scores.kthvalue(len(keep) - post_nms_topk + 1).values
        keep = keep[kept_scores >= cut]
    return {"location_inds": inds[keep], "classes": classes[keep], "scores": scores[keep],
            "boxes": boxes[keep]}


def detections_to_instances(
    detections: Dict[str, Tensor], mask_probs: Tensor, locations: Tensor, levels: Tensor,
    image_size: Tuple[int, int], padded_size: Tuple[int, int], output_size: Tuple[int, int],
    mask_threshold: float = 0.5,
) -> Instances:
    """One image's ``Instances`` at ``output_size`` = (height, width).

    Boxes are scaled from the input image to the output and clipped; detections with an
    empty box are dropped. ``mask_probs`` (n, h_m, w_m), at the mask out-stride of the
    padded input, are upsampled to the padded input with ``aligned_bilinear``, cropped to
    ``image_size``, resized bilinearly to the output and thresholded.

    Fields: pred_boxes, scores, pred_classes, pred_masks (n, height, width) bool, and
    ``locations`` (n, 2), ``fpn_levels`` (n,), ``location_inds`` (n,) of each detection's
    FCOS location (AdelaiDet reports the first two too).
    """
    height, width = output_size
    h, w = image_size
    boxes = Boxes(detections["boxes"].clone())
    boxes.scale(width / w, height / h)
    boxes.clip((height, width))
    keep = boxes.nonempty()
    result = Instances((height, width))
    result.pred_boxes = boxes[keep]
    result.scores = detections["scores"][keep]
    result.pred_classes = detections["classes"][keep]
    inds = detections["location_inds"][keep]
    result.location_inds = inds
    result.locations = locations[inds]
    result.fpn_levels = levels[inds]
    probs = mask_probs[keep]
    if len(probs):
        factor = padded_size[0] // probs.shape[-2]
        if factor * probs.shape[-2] != padded_size[0] or factor * probs.shape[-1] != padded_size[1]:
            raise ValueError(
                f"masks of size {tuple(probs.shape[-2:])} do not divide the padded input "
                f"{tuple(padded_size)}"
            )
        probs = aligned_bilinear(probs[:, None].float(), factor)[:, :, :h, :w]
        probs = F.interpolate(probs, size=(height, width), mode="bilinear",
                              align_corners=False)[:, 0]
        result.pred_masks = probs > mask_threshold
    else:
        result.pred_masks = torch.zeros((0, height, width), dtype=torch.bool,
                                        device=mask_probs.device)
    return result
