"""The CondInst meta-architecture (Tian et al., "Conditional Convolutions for Instance
Segmentation", ECCV 2020), written after AdelaiDet's model so its checkpoints load.

Raw structure of ``predict`` (batch-first; L locations over P3..P7 in that order, each
level row-major):

- "cls_logits" (B, L, K), "bbox_reg" (B, L, 4) (l, t, r, b) in strides after Scale and
  ReLU, "ctrness" (B, L, 1), "params" (B, L, P_gen) controller outputs;
- "locations" (B, L, 2) input-pixel (x, y), "levels" (B, L) long FPN level index;
- "mask_feats" (B, C_mask, H / 8, W / 8), the mask branch's output.

Matching (``losses``): per image (src, tgt), src (n,) long indices into L of the locations
whose dynamic filters get the mask loss, tgt (n,) long indices of their instances.
"""
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from detectron2.config import configurable
from detectron2.modeling import BACKBONE_REGISTRY, META_ARCH_REGISTRY, build_backbone
from detectron2.structures import ImageList
from detectron2.utils.registry import Registry
from torch import Tensor, nn

from ...adapter import check_targets
from ..query_segmenter import QuerySegmenter
from ..registry import lookup
from .dynamic_head import DynamicMaskHead
from .fcos_head import FCOS
from .inference import detections_to_instances, fcos_detections
from .losses import check_loss_options, dice_loss, fcos_losses
from .mask_branch import MaskBranch
from .targets import (
    FCOSTargets,
    assign_fcos_targets,
    level_size_ranges,
    mask_centers,
    masks_to_boxes,
)

CONDINST_PROPOSAL_GENERATOR_REGISTRY = Registry("CONDINST_PROPOSAL_GENERATOR")
CONDINST_PROPOSAL_GENERATOR_REGISTRY.__doc__ = """
CondInst's proposal generators, built as ``Generator(cfg, backbone_output_shape)``; named by
MODEL.PROPOSAL_GENERATOR.NAME.
"""
CONDINST_PROPOSAL_GENERATOR_REGISTRY.register(FCOS)

# Padding to a multiple of 32 keeps P3..P5 exactly H/8..H/32, so the mask branch's
# upsampling and the stride-4 ground-truth sampling line up (AdelaiDet pads to 32 too).
_MIN_SIZE_DIVISIBILITY = 32
# Loss terms ``losses(terms=...)`` accepts, and the loss each one gives.
TERMS = {"labels": "loss_fcos_cls", "boxes": "loss_fcos_loc", "ctrness": "loss_fcos_ctr",
         "masks": "loss_mask"}
_FCOS_TERMS = ("labels", "boxes", "ctrness")
# Mask probability above which a pixel is in the mask (AdelaiDet's postprocess default).
MASK_THRESHOLD = 0.5


@META_ARCH_REGISTRY.register()
class CondInst(QuerySegmenter):
    """Backbone (FPN P3-P7) -> FCOS head + controller, mask branch -> dynamic mask head.

    Submodules ``backbone``, ``proposal_generator`` (``fcos_head``), ``mask_head``,
    ``mask_branch`` and ``controller`` are AdelaiDet's, in its order, so ``state_dict()``
    names, shapes and order are the official checkpoint's. ``raw_output`` (an identity,
    no state) returns ``predict``'s raw structure: a place for forward hooks. The device is
    that of the parameters.
    """

    @configurable
    def __init__(
        self, *, backbone: nn.Module, proposal_generator: nn.Module,
        mask_head: DynamicMaskHead, mask_branch: MaskBranch, controller: nn.Conv2d,
        num_classes: int, pixel_mean: Sequence[float], pixel_std: Sequence[float],
        sizes_of_interest: Sequence[float], center_sample: bool, pos_radius: float,
        focal_alpha: float, focal_gamma: float, loc_loss_type: str, cls_normalizer: str,
        cls_weight: float, max_proposals: int, topk_proposals_per_im: int,
        score_thresh: float, pre_nms_topk: int, post_nms_topk: int, nms_thresh: float,
        thresh_with_ctr: bool,
    ):
        super().__init__()
        self.backbone = backbone
        self.proposal_generator = proposal_generator
        self.mask_head = mask_head
        self.mask_branch = mask_branch
        self.controller = controller
        self.raw_output = nn.Identity()
        _check_parts(proposal_generator, mask_head, mask_branch, controller, sizes_of_interest)
        check_loss_options(loc_loss_type, cls_normalizer)
        if max_proposals != -1 and topk_proposals_per_im != -1:
            raise ValueError(
                "MODEL.CONDINST.MAX_PROPOSALS and MODEL.CONDINST.TOPK_PROPOSALS_PER_IM cannot "
                f"both be on (got {max_proposals} and {topk_proposals_per_im}; -1 is off)"
            )
        self.num_classes = num_classes
        self.size_ranges = level_size_ranges(sizes_of_interest)
        self.center_sample, self.pos_radius = center_sample, pos_radius
        self.focal_alpha, self.focal_gamma = focal_alpha, focal_gamma
        self.loc_loss_type, self.cls_normalizer = loc_loss_type, cls_normalizer
        self.cls_weight = cls_weight
        self.max_proposals, self.topk_proposals_per_im = max_proposals, topk_proposals_per_im
        self.score_thresh, self.nms_thresh = score_thresh, nms_thresh
        self.pre_nms_topk, self.post_nms_topk = pre_nms_topk, post_nms_topk
        self.thresh_with_ctr = thresh_with_ctr
        self.size_divisibility = max(_MIN_SIZE_DIVISIBILITY, backbone.size_divisibility)
        # Not saved: AdelaiDet's checkpoints do not hold them.
        self.register_buffer("pixel_mean", torch.tensor(pixel_mean).view(-1, 1, 1), False)
        self.register_buffer("pixel_std", torch.tensor(pixel_std).view(-1, 1, 1), False)

    @classmethod
    def from_config(cls, cfg):
        fcos, ci = cfg.MODEL.FCOS, cfg.MODEL.CONDINST
        if ci.MASK_BRANCH.SEMANTIC_LOSS_ON:
            raise ValueError(
                "MODEL.CONDINST.MASK_BRANCH.SEMANTIC_LOSS_ON = True is not implemented"
            )
        lookup(BACKBONE_REGISTRY, cfg.MODEL.BACKBONE.NAME, "MODEL.BACKBONE.NAME")
        backbone = build_backbone(cfg)
        shape = backbone.output_shape()
        generator = lookup(CONDINST_PROPOSAL_GENERATOR_REGISTRY, cfg.MODEL.PROPOSAL_GENERATOR.NAME,
                           "MODEL.PROPOSAL_GENERATOR.NAME")(cfg, shape)
        mask_head = DynamicMaskHead(
            in_channels=ci.MASK_BRANCH.OUT_CHANNELS, channels=ci.MASK_HEAD.CHANNELS,
            num_layers=ci.MASK_HEAD.NUM_LAYERS, rel_coords=not ci.MASK_HEAD.DISABLE_REL_COORDS,
            sizes_of_interest=fcos.SIZES_OF_INTEREST, mask_out_stride=ci.MASK_OUT_STRIDE,
        )
        mask_branch = MaskBranch(
            shape, ci.MASK_BRANCH.IN_FEATURES, channels=ci.MASK_BRANCH.CHANNELS,
            out_channels=ci.MASK_BRANCH.OUT_CHANNELS, num_convs=ci.MASK_BRANCH.NUM_CONVS,
            norm=ci.MASK_BRANCH.NORM,
        )
        return {
            "backbone": backbone,
            "proposal_generator": generator,
            "mask_head": mask_head,
            "mask_branch": mask_branch,
            "controller": build_controller(generator.in_channels, mask_head.num_gen_params),
            "num_classes": fcos.NUM_CLASSES,
            "pixel_mean": cfg.MODEL.PIXEL_MEAN,
            "pixel_std": cfg.MODEL.PIXEL_STD,
            "sizes_of_interest": list(fcos.SIZES_OF_INTEREST),
            "center_sample": fcos.CENTER_SAMPLE,
            "pos_radius": fcos.POS_RADIUS,
            "focal_alpha": fcos.LOSS_ALPHA,
            "focal_gamma": fcos.LOSS_GAMMA,
            "loc_loss_type": fcos.LOC_LOSS_TYPE,
            "cls_normalizer": fcos.LOSS_NORMALIZER_CLS,
            "cls_weight": fcos.LOSS_WEIGHT_CLS,
            "max_proposals": ci.MAX_PROPOSALS,
            "topk_proposals_per_im": ci.TOPK_PROPOSALS_PER_IM,
            "score_thresh": fcos.INFERENCE_TH_TEST,
            "pre_nms_topk": fcos.PRE_NMS_TOPK_TEST,
            "post_nms_topk": fcos.POST_NMS_TOPK_TEST,
            "nms_thresh": fcos.NMS_TH,
            "thresh_with_ctr": fcos.THRESH_WITH_CTR,
        }

    @property
    def device(self) -> torch.device:
        return self.pixel_mean.device

    @property
    def strides(self) -> List[int]:
        return self.proposal_generator.strides

    # ------------------------------------------------------------------ the four steps

    def prepare_targets(self, batched_inputs: List[Dict], images: ImageList) -> List[Dict]:
        """Per image: ``labels`` (M,) long, ``masks`` (M, H_pad, W_pad) bool padded like
        the image, and ``boxes`` (M, 4) XYXY: the instances' ``gt_boxes`` where they have
        them (as AdelaiDet's FCOS), else the masks' bounding boxes. ``gt_masks`` may be
        BitMasks, PolygonMasks or an (M, H, W) tensor. ``losses`` takes targets without
        ``boxes`` too (then from the masks): drop ``boxes`` when transforming masks."""
        targets = self.mask_targets(batched_inputs, images, "MODEL.FCOS.NUM_CLASSES")
        for x, t in zip(batched_inputs, targets):
            inst = x["instances"]
            t["boxes"] = (inst.gt_boxes.tensor.to(self.device, torch.float32)
                          if inst.has("gt_boxes") else masks_to_boxes(t["masks"]))
        return targets

    def predict(self, images: ImageList) -> Dict[str, Tensor]:
        """The raw structure (module docstring) of a padded batch."""
        features = self.backbone(images.tensor)
        raw = self.proposal_generator(features, self.controller)
        raw["mask_feats"] = self.mask_branch(features)
        return self.raw_output(raw)

    def losses(self, raw: Dict[str, Tensor], targets: List[Dict],
               pixel_valid: Optional[Tensor] = None, matching=None,
               terms: Optional[Sequence[str]] = None):
        """CondInst's losses and the matching its mask loss used.

        Args:
            raw: ``predict``'s structure.
            targets: per image "labels" (M,), "masks" (M, H_pad, W_pad) and optionally
                "boxes" (M, 4) (else the masks' boxes).
            pixel_valid: optional (B, H/8, W/8) pixel weights at the mask-feature stride,
                upsampled (nearest) to the mask out-stride grid; weight-0 pixels carry no
                mask loss (the dice sums run over the weighted pixels). The FCOS terms
                ignore it.
            matching: per image (src, tgt) pairs for the mask loss instead of the FCOS
                assignment's positives (the FCOS terms keep their own assignment); used
                as given, without MAX_PROPOSALS subsampling.
            terms: None (all) or a subset of "labels" (loss_fcos_cls), "boxes"
                (loss_fcos_loc), "ctrness" (loss_fcos_ctr), "masks" (loss_mask).
        Returns:
            (losses, matching): the weighted losses of ``terms``; the matching given or,
            without one, the assignment's positive locations kept for the mask head
            (after MAX_PROPOSALS / TOPK_PROPOSALS_PER_IM), each image's src sorted.
        """
        batch = raw["cls_logits"].shape[0]
        check_targets(batch, targets, pixel_valid)
        terms = _check_terms(terms)
        fcos_terms = [t for t in _FCOS_TERMS if t in terms]
        assigned = None
        if fcos_terms or matching is None:
            assigned = [self.assign(raw, b, t) for b, t in enumerate(targets)]
        losses = {}
        if fcos_terms:
            losses.update(fcos_losses(
                raw["cls_logits"].flatten(0, 1), raw["bbox_reg"].flatten(0, 1),
                raw["ctrness"].flatten(0, 1)[:, 0],
                torch.cat([a.labels for a in assigned]),
                torch.cat([a.reg_targets for a in assigned]),
                torch.cat([a.ctrness for a in assigned]),
                num_classes=self.num_classes, focal_alpha=self.focal_alpha,
                focal_gamma=self.focal_gamma, loc_loss_type=self.loc_loss_type,
                cls_normalizer=self.cls_normalizer, cls_weight=self.cls_weight,
                terms=fcos_terms,
            ))
        if matching is None:
            matching = self.select_proposals(raw, assigned)
        elif len(matching) != batch:
            raise ValueError(f"got a matching of {len(matching)} images for a batch of {batch}")
        if "masks" in terms:
            losses["loss_mask"] = self.mask_loss(raw, targets, matching, pixel_valid)
        return losses, matching

    def inference(self, raw: Dict[str, Tensor], batched_inputs: List[Dict], images: ImageList):
        """Per image {"instances": Instances} at its "height"/"width" (else its input
        size): see ``inference.fcos_detections`` and ``detections_to_instances``."""
        padded = tuple(images.tensor.shape[-2:])
        results = []
        for b, (x, size) in enumerate(zip(batched_inputs, images.image_sizes)):
            det = fcos_detections(
                raw["cls_logits"][b], raw["bbox_reg"][b], raw["ctrness"][b],
                raw["locations"][b], raw["levels"][b], self.strides,
                score_thresh=self.score_thresh, pre_nms_topk=self.pre_nms_topk,
                post_nms_topk=self.post_nms_topk, nms_thresh=self.nms_thresh,
                thresh_with_ctr=self.thresh_with_ctr,
            )
            probs = self.mask_logits(raw, b, det["location_inds"]).sigmoid()
            output_size = (x.get("height", size[0]), x.get("width", size[1]))
            results.append({"instances": detections_to_instances(
                det, probs, raw["locations"][b], raw["levels"][b], tuple(size), padded,
                output_size, MASK_THRESHOLD,
            )})
        return results

    # ------------------------------------------------------------------ pieces

    def assign(self, raw: Dict[str, Tensor], b: int, target: Dict) -> FCOSTargets:
        """FCOS targets of image ``b`` (targets.assign_fcos_targets with this config)."""
        locations, levels = raw["locations"][b], raw["levels"][b]
        strides = torch.tensor(self.strides, dtype=locations.dtype, device=locations.device)
        ranges = torch.tensor(self.size_ranges, dtype=locations.dtype, device=locations.device)
        masks = target["masks"].to(locations.device)
        boxes = target.get("boxes")
        boxes = masks_to_boxes(masks) if boxes is None else boxes.to(locations.device)
        return assign_fcos_targets(
            locations, strides[levels], ranges[levels], boxes, target["labels"],
            self.num_classes, mask_centers(masks) if self.center_sample else None,
            self.pos_radius,
        )

    def select_proposals(self, raw: Dict[str, Tensor], assigned: List[FCOSTargets]):
        """Per image (src, tgt) of the positive locations that go to the mask head: all,
        a random MAX_PROPOSALS of the batch's, or per instance the best by
        max_k sigmoid(class k) * sigmoid(centerness) (TOPK_PROPOSALS_PER_IM)."""
        pos = [torch.nonzero(a.positive).squeeze(1) for a in assigned]
        total = sum(len(p) for p in pos)
        if self.max_proposals != -1 and total > self.max_proposals:
            image = torch.cat([torch.full_like(p, b) for b, p in enumerate(pos)])
            loc = torch.cat(pos)
            pick = torch.randperm(total, device=loc.device)[: self.max_proposals]
            pos = [loc[pick][image[pick] == b].sort().values for b in range(len(pos))]
        elif self.topk_proposals_per_im != -1:
            pos = [self._topk_per_instance(raw, b, p, a.gt_inds[p])
                   for b, (p, a) in enumerate(zip(pos, assigned))]
        return [(p, a.gt_inds[p]) for p, a in zip(pos, assigned)]

    def _topk_per_instance(self, raw, b: int, pos: Tensor, gt: Tensor) -> Tensor:
        if len(pos) == 0:
            return pos
        instances = gt.unique()
        k = max(self.topk_proposals_per_im // len(instances), 1)
        with torch.no_grad():
            score = raw["cls_logits"][b, pos].sigmoid().max(1).values
            score = score * raw["ctrness"][b, pos, 0].sigmoid()
        kept = []
        for g in instances:
            mine = torch.nonzero(gt == g).squeeze(1)
            if len(mine) > k:
                mine = mine[score[mine].topk(k).indices]
            kept.append(pos[mine])
        return torch.cat(kept).sort().values

    def mask_logits(self, raw: Dict[str, Tensor], b: int, location_inds: Tensor) -> Tensor:
        """Mask logits (n, H/4, W/4) at the mask out-stride of image ``b``'s locations
        ``location_inds`` (n,) (the dynamic head on its mask features)."""
        return self.mask_head(
            raw["params"][b, location_inds], raw["locations"][b, location_inds],
            raw["levels"][b, location_inds], raw["mask_feats"][b : b + 1],
            torch.zeros_like(location_inds), self.mask_branch.out_stride,
        )

    def mask_loss(self, raw: Dict[str, Tensor], targets: List[Dict], matching,
                  pixel_valid: Optional[Tensor] = None) -> Tensor:
        """Mean dice loss of the matched (location, instance) pairs at the mask out-stride;
        ground truth sampled from the padded masks at [s // 2 :: s] (s = MASK_OUT_STRIDE,
        the pixel centres of the stride-s grid)."""
        feats, params = raw["mask_feats"], raw["params"]
        src = [s.to(feats.device) for s, _ in matching]
        image = torch.cat([torch.full_like(s, b) for b, s in enumerate(src)])
        loc = torch.cat(src)
        if self.training:
            self.mask_head._iter += 1
        if len(loc) == 0:
            # Keeps the graph connected, so DDP sees the mask branch and controller used.
            return feats.sum() * 0.0 + params.sum() * 0.0
        logits = self.mask_head(params[image, loc], raw["locations"][image, loc],
                                raw["levels"][image, loc], feats, image,
                                self.mask_branch.out_stride)
        s = self.mask_head.mask_out_stride
        gt = torch.cat([t["masks"][j.to(t["masks"].device)][:, s // 2 :: s, s // 2 :: s]
                        for t, (_, j) in zip(targets, matching)]).to(logits.device)
        if gt.shape[-2:] != logits.shape[-2:]:
            raise ValueError(
                f"target masks sampled at stride {s} are {tuple(gt.shape[-2:])}, the mask "
                f"logits {tuple(logits.shape[-2:])}: masks must be padded like the input"
            )
        weights = None
        if pixel_valid is not None:
            valid = F.interpolate(pixel_valid[:, None].to(logits.device, torch.float32),
                                  size=tuple(logits.shape[-2:]), mode="nearest")[:, 0]
            weights = valid[image].flatten(1)
        probs = logits.float().sigmoid().flatten(1)
        return dice_loss(probs, gt.flatten(1).float(), weights).mean()


def build_controller(in_channels: int, num_gen_params: int) -> nn.Conv2d:
    """CondInst's controller: a 3x3 conv from the FCOS box tower to each location's
    dynamic-head parameters, N(0, 0.01) weights and zero bias (AdelaiDet's init)."""
    controller = nn.Conv2d(in_channels, num_gen_params, 3, padding=1)
    nn.init.normal_(controller.weight, std=0.01)
    nn.init.zeros_(controller.bias)
    return controller


def _check_parts(generator, mask_head: DynamicMaskHead, mask_branch: MaskBranch,
                 controller: nn.Conv2d, sizes_of_interest: Sequence[float]) -> None:
    """ValueErrors, naming the config keys, where the parts do not fit together."""
    if mask_head.in_channels != mask_branch.out_channels:
        raise ValueError(
            f"the dynamic mask head reads {mask_head.in_channels} mask channels but the mask "
            f"branch gives {mask_branch.out_channels} (MODEL.CONDINST.MASK_BRANCH.OUT_CHANNELS)"
        )
    if controller.out_channels != mask_head.num_gen_params:
        raise ValueError(
            f"the controller predicts {controller.out_channels} parameters but the dynamic "
            f"mask head takes {mask_head.num_gen_params} (MODEL.CONDINST.MASK_HEAD.CHANNELS, "
            f"NUM_LAYERS, DISABLE_REL_COORDS and MODEL.CONDINST.MASK_BRANCH.OUT_CHANNELS)"
        )
    if controller.in_channels != generator.in_channels:
        raise ValueError(
            f"the controller reads {controller.in_channels} channels but the FCOS box tower "
            f"gives {generator.in_channels} (MODEL.FPN.OUT_CHANNELS)"
        )
    num_levels = len(generator.strides)
    if len(sizes_of_interest) != num_levels - 1 or len(mask_head.sizes_of_interest) != num_levels:
        raise ValueError(
            f"MODEL.FCOS.SIZES_OF_INTEREST = {list(sizes_of_interest)} needs one entry fewer "
            f"than the {num_levels} FCOS levels (MODEL.FCOS.IN_FEATURES / FPN_STRIDES)"
        )
    if mask_branch.out_stride % mask_head.mask_out_stride:
        raise ValueError(
            f"MODEL.CONDINST.MASK_OUT_STRIDE = {mask_head.mask_out_stride} must divide the "
            f"mask-branch stride {mask_branch.out_stride}"
        )


def _check_terms(terms: Optional[Sequence[str]]) -> Tuple[str, ...]:
    if terms is None:
        return tuple(TERMS)
    unknown = [t for t in terms if t not in TERMS]
    if unknown:
        raise ValueError(f"unknown loss terms {unknown}; CondInst has {sorted(TERMS)}")
    return tuple(terms)
