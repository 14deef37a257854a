"""The Mask2Former meta-architecture (instance, semantic and panoptic segmentation)."""
from typing import Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F
from detectron2.config import configurable
from detectron2.modeling import META_ARCH_REGISTRY, build_backbone
from detectron2.modeling.postprocessing import sem_seg_postprocess
from detectron2.structures import BitMasks, ImageList
from torch import nn

from ...data.metadata import dataset_metadata, thing_contiguous_ids
from ..query_segmenter import QuerySegmenter
from .criterion import SetCriterion
from .head import build_mask2former_head
from .inference import instance_inference, panoptic_inference, semantic_inference
from .matcher import HungarianMatcher


@META_ARCH_REGISTRY.register()
class Mask2Former(QuerySegmenter):
    """Backbone -> InstUniqueMaskFormerHead -> set criterion (training) or inference:
    semantic, panoptic and instance outputs per MODEL.MASK_FORMER.TEST's switches.

    Submodule names are the official ones (``backbone``, ``sem_seg_head``, ``criterion``),
    so the official model-zoo checkpoints load with no missing or unexpected keys.
    """

    @configurable
    def __init__(
        self,
        *,
        backbone: nn.Module,
        sem_seg_head: nn.Module,
        criterion: SetCriterion,
        num_queries: int,
        size_divisibility: int,
        pixel_mean,
        pixel_std,
        test_topk_per_image: int,
        semantic_on: bool = False,
        instance_on: bool = True,
        panoptic_on: bool = False,
        object_mask_threshold: float = 0.8,
        overlap_threshold: float = 0.8,
        sem_seg_postprocess_before_inference: bool = False,
        thing_classes: Optional[Sequence[int]] = None,
        largest_component: bool = False,
    ):
        """thing_classes: contiguous ids of the thing classes; needed by panoptic inference
        (which also restricts the instances to things); None: every class is a thing.
        largest_component: instance masks cut to their largest connected piece."""
        super().__init__()
        if not (semantic_on or instance_on or panoptic_on):
            raise ValueError(
                "MODEL.MASK_FORMER.TEST: SEMANTIC_ON, INSTANCE_ON and PANOPTIC_ON are all "
                "False; inference would return nothing"
            )
        if panoptic_on and thing_classes is None:
            raise ValueError("panoptic inference needs thing_classes (which classes are things)")
        self.backbone = backbone
        self.sem_seg_head = sem_seg_head
        self.criterion = criterion
        self.num_queries = num_queries
        self.size_divisibility = size_divisibility
        self.test_topk_per_image = test_topk_per_image
        self.semantic_on = semantic_on
        self.instance_on = instance_on
        self.panoptic_on = panoptic_on
        self.object_mask_threshold = object_mask_threshold
        self.overlap_threshold = overlap_threshold
        self.largest_component = largest_component
        # The official switch; instance and panoptic inference force it (they need masks
        # at the output resolution).
        self.resize_before_inference = (
            sem_seg_postprocess_before_inference or instance_on or panoptic_on
        )
        self.thing_classes = None if thing_classes is None else tuple(thing_classes)
        # Not saved: the official checkpoints do not hold them.
        self.register_buffer("pixel_mean", torch.tensor(pixel_mean).view(-1, 1, 1), False)
        self.register_buffer("pixel_std", torch.tensor(pixel_std).view(-1, 1, 1), False)

    @classmethod
    def from_config(cls, cfg):
        mf = cfg.MODEL.MASK_FORMER
        backbone = build_backbone(cfg)
        sem_seg_head = build_mask2former_head(cfg, backbone.output_shape())
        return {
            "backbone": backbone,
            "sem_seg_head": sem_seg_head,
            "criterion": build_criterion(cfg),
            "num_queries": mf.NUM_OBJECT_QUERIES,
            "size_divisibility": mf.SIZE_DIVISIBILITY,
            "pixel_mean": cfg.MODEL.PIXEL_MEAN,
            "pixel_std": cfg.MODEL.PIXEL_STD,
            "test_topk_per_image": cfg.TEST.DETECTIONS_PER_IMAGE,
            "semantic_on": mf.TEST.SEMANTIC_ON,
            "instance_on": mf.TEST.INSTANCE_ON,
            "panoptic_on": mf.TEST.PANOPTIC_ON,
            "object_mask_threshold": mf.TEST.OBJECT_MASK_THRESHOLD,
            "overlap_threshold": mf.TEST.OVERLAP_THRESHOLD,
            "sem_seg_postprocess_before_inference":
                mf.TEST.SEM_SEG_POSTPROCESSING_BEFORE_INFERENCE,
            "thing_classes": _test_thing_classes(cfg) if mf.TEST.PANOPTIC_ON else None,
            "largest_component": mf.TEST.LARGEST_COMPONENT,
        }

    @property
    def device(self):
        return self.pixel_mean.device

    def prepare_targets(self, batched_inputs: List[Dict], images: ImageList) -> List[Dict]:
        """Per image: ``labels`` (N,) and bool ``masks`` (N, H_pad, W_pad) padded like the image.

        ``gt_masks`` may be BitMasks (detectron2's mappers, ours) or a plain (N, H, W) tensor
        of any dtype, non-zero meaning foreground (the official Mask2Former mappers).
        """
        h_pad, w_pad = images.tensor.shape[-2:]
        targets = []
        for i, x in enumerate(batched_inputs):
            inst = x["instances"].to(self.device)
            masks = _mask_tensor(inst, i) if inst.has("gt_masks") else torch.zeros(
                (len(inst), *inst.image_size), dtype=torch.bool, device=self.device
            )
            padded = masks.new_zeros((masks.shape[0], h_pad, w_pad))
            padded[:, : masks.shape[1], : masks.shape[2]] = masks
            targets.append({"labels": inst.gt_classes, "masks": padded})
        return targets

    def predict(self, images: ImageList) -> Dict:
        """Raw head outputs for a padded batch (see ``InstUniqueMaskFormerHead.forward``)."""
        return self.sem_seg_head(self.backbone(images.tensor))

    def losses(self, outputs: Dict, targets: List[Dict], pixel_valid=None, matching=None,
               terms=None):
        """Weighted set-criterion losses and the final layer's matching (``matching``, when
        given, is used instead of the matcher's; ``terms`` restricts the criterion's losses,
        e.g. to ``("masks",)``)."""
        weights = self.criterion.weight_dict
        if "loss_ce_0" not in weights:  # no deep supervision: skip matching the aux layers
            outputs = {k: v for k, v in outputs.items() if k != "aux_outputs"}
        losses, indices = self.criterion(outputs, targets, pixel_valid, matching, terms)
        return {k: v * weights[k] for k, v in losses.items() if k in weights}, indices

    def inference(self, outputs: Dict, batched_inputs: List[Dict], images: ImageList):
        """Per image a dict with "sem_seg" (K, H, W), "panoptic_seg" ((H, W) int32,
        segments_info) and "instances", each when its MODEL.MASK_FORMER.TEST switch is on;
        H, W: the input's "height"/"width" (default: its unpadded size)."""
        mask_logits = F.interpolate(
            outputs["pred_masks"], size=images.tensor.shape[-2:], mode="bilinear",
            align_corners=False,
        )
        results = []
        for class_logits, masks, x, size in zip(
            outputs["pred_logits"], mask_logits, batched_inputs, images.image_sizes
        ):
            height, width = x.get("height", size[0]), x.get("width", size[1])
            if self.resize_before_inference:
                masks = sem_seg_postprocess(masks, size, height, width)
            results.append(self.inference_single(class_logits, masks, size, (height, width)))
        return results

    def inference_single(self, class_logits: torch.Tensor, masks: torch.Tensor, size,
                         output_size) -> Dict:
        """Outputs of one image from class_logits (Q, K+1) and mask logits (Q, h, w): at
        the output size, or padded (cropped to ``size`` afterwards) for semantic-only."""
        result = {}
        if self.semantic_on:
            sem_seg = semantic_inference(class_logits, masks)
            if not self.resize_before_inference:
                sem_seg = sem_seg_postprocess(sem_seg, size, *output_size)
            result["sem_seg"] = sem_seg
        if self.panoptic_on:
            result["panoptic_seg"] = panoptic_inference(
                class_logits, masks, self.thing_classes, self.object_mask_threshold,
                self.overlap_threshold,
            )
        if self.instance_on:
            result["instances"] = instance_inference(
                class_logits, masks, tuple(output_size), self.test_topk_per_image,
                self.thing_classes if self.panoptic_on else None, self.largest_component,
            )
        return result


def _test_thing_classes(cfg) -> List[int]:
    """The thing classes (contiguous ids) of DATASETS.TEST[0], as the official model reads
    them; a ValueError when its metadata does not tell them."""
    names = cfg.DATASETS.TEST
    meta = dataset_metadata(names[0]) if names else None
    if getattr(meta, "thing_dataset_id_to_contiguous_id", None) is None:
        raise ValueError(
            "MODEL.MASK_FORMER.TEST.PANOPTIC_ON needs to know which classes are things: "
            "DATASETS.TEST[0] must be a registered panoptic dataset whose metadata has "
            f"thing_dataset_id_to_contiguous_id (DATASETS.TEST is {tuple(names)})"
        )
    return list(thing_contiguous_ids(meta))


def _mask_tensor(inst, index: int) -> torch.Tensor:
    """(N, H, W) bool masks of ``inst.gt_masks``, or a ValueError naming batch item ``index``."""
    masks = inst.gt_masks
    if isinstance(masks, BitMasks):
        return masks.tensor
    if not isinstance(masks, torch.Tensor):
        raise ValueError(
            f"batched_inputs[{index}]['instances'].gt_masks must be BitMasks or an (N, H, W) "
            f"tensor, got {type(masks).__name__}"
        )
    if masks.dim() != 3 or masks.shape[0] != len(inst):
        raise ValueError(
            f"batched_inputs[{index}]['instances'].gt_masks has shape {tuple(masks.shape)}; "
            f"expected ({len(inst)}, H, W), one mask per instance"
        )
    return masks != 0


def build_criterion(cfg) -> SetCriterion:
    """The set criterion with Mask2Former's matcher and loss weights."""
    mf = cfg.MODEL.MASK_FORMER
    matcher = HungarianMatcher(
        cost_class=mf.CLASS_WEIGHT, cost_mask=mf.MASK_WEIGHT, cost_dice=mf.DICE_WEIGHT,
        num_points=mf.TRAIN_NUM_POINTS,
    )
    base = {"loss_ce": mf.CLASS_WEIGHT, "loss_mask": mf.MASK_WEIGHT, "loss_dice": mf.DICE_WEIGHT}
    weight_dict = dict(base)
    if mf.DEEP_SUPERVISION:
        for i in range(mf.DEC_LAYERS - 1):
            weight_dict.update({f"{k}_{i}": v for k, v in base.items()})
    return SetCriterion(
        cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES,
        matcher=matcher,
        weight_dict=weight_dict,
        eos_coef=mf.NO_OBJECT_WEIGHT,
        losses=["labels", "masks"],
        num_points=mf.TRAIN_NUM_POINTS,
        oversample_ratio=mf.OVERSAMPLE_RATIO,
        importance_sample_ratio=mf.IMPORTANCE_SAMPLE_RATIO,
    )
