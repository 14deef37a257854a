"""The SparseInst meta-architecture (Cheng et al., "Sparse Instance Activation for
Real-Time Instance Segmentation", CVPR 2022)."""
from typing import Dict, List, Optional, Sequence

import torch
from detectron2.config import configurable
from detectron2.modeling import BACKBONE_REGISTRY, META_ARCH_REGISTRY, build_backbone
from detectron2.structures import ImageList
from torch import nn

from ..query_segmenter import QuerySegmenter
from ..registry import lookup
from .criterion import build_sparseinst_criterion
from .decoder import build_sparseinst_decoder
from .encoder import build_sparseinst_encoder
from .inference import sparseinst_inference

# The encoder's top-down path doubles stride-32 maps to stride 16 and 8: inputs padded to
# a multiple of 32 keep the levels aligned (the official code pads to 32 too).
_MIN_SIZE_DIVISIBILITY = 32


@META_ARCH_REGISTRY.register()
class SparseInst(QuerySegmenter):
    """Backbone -> instance context encoder -> IAM decoder -> criterion (training) or
    thresholded, NMS-free inference.

    Submodule names are the official ones (``backbone``, ``encoder``, ``decoder``,
    ``criterion``), so the official model-zoo checkpoints load with no missing or
    unexpected keys. The device is that of the parameters, never read from the config.
    """

    @configurable
    def __init__(
        self,
        *,
        backbone: nn.Module,
        encoder: nn.Module,
        decoder: nn.Module,
        criterion: nn.Module,
        num_classes: int,
        pixel_mean: Sequence[float],
        pixel_std: Sequence[float],
        cls_threshold: float,
        mask_threshold: float,
        max_detections: int,
    ):
        super().__init__()
        self.backbone = backbone
        self.encoder = encoder
        self.decoder = decoder
        self.criterion = criterion
        self.num_classes = num_classes
        self.size_divisibility = max(_MIN_SIZE_DIVISIBILITY, backbone.size_divisibility)
        self.cls_threshold = cls_threshold
        self.mask_threshold = mask_threshold
        self.max_detections = max_detections
        # Not saved: the official checkpoints do not hold them.
        self.register_buffer("pixel_mean", torch.tensor(pixel_mean).view(-1, 1, 1), False)
        self.register_buffer("pixel_std", torch.tensor(pixel_std).view(-1, 1, 1), False)

    @classmethod
    def from_config(cls, cfg):
        lookup(BACKBONE_REGISTRY, cfg.MODEL.BACKBONE.NAME, "MODEL.BACKBONE.NAME")
        backbone = build_backbone(cfg)
        si = cfg.MODEL.SPARSE_INST
        return {
            "backbone": backbone,
            "encoder": build_sparseinst_encoder(cfg, backbone.output_shape()),
            "decoder": build_sparseinst_decoder(cfg),
            "criterion": build_sparseinst_criterion(cfg),
            "num_classes": si.DECODER.NUM_CLASSES,
            "pixel_mean": cfg.MODEL.PIXEL_MEAN,
            "pixel_std": cfg.MODEL.PIXEL_STD,
            "cls_threshold": si.CLS_THRESHOLD,
            "mask_threshold": si.MASK_THRESHOLD,
            "max_detections": si.MAX_DETECTIONS,
        }

    @property
    def device(self) -> torch.device:
        return self.pixel_mean.device

    def prepare_targets(self, batched_inputs: List[Dict], images: ImageList) -> List[Dict]:
        """Per image: ``labels`` (M,) and ``masks`` (M, H_pad, W_pad) bool, padded like the
        image. ``gt_masks`` may be BitMasks, PolygonMasks or an (M, H, W) bool tensor."""
        return self.mask_targets(batched_inputs, images, "MODEL.SPARSE_INST.DECODER.NUM_CLASSES")

    def predict(self, images: ImageList) -> Dict[str, torch.Tensor]:
        """Raw decoder outputs of a padded batch (see ``GroupIAMDecoder.forward``)."""
        return self.decoder(self.encoder(self.backbone(images.tensor)))

    def losses(self, outputs: Dict, targets: List[Dict], pixel_valid=None, matching=None,
               terms: Optional[Sequence[str]] = None):
        """Weighted losses and the matching (``matching``, when given, is used instead of
        the matcher's; ``terms`` restricts the criterion's terms, e.g. to ``("masks",)``)."""
        return self.criterion(outputs, targets, pixel_valid, matching, terms)

    def inference(self, outputs: Dict, batched_inputs: List[Dict], images: ImageList):
        padded = tuple(images.tensor.shape[-2:])
        results = []
        for b, (x, size) in enumerate(zip(batched_inputs, images.image_sizes)):
            output_size = (x.get("height", size[0]), x.get("width", size[1]))
            results.append({"instances": sparseinst_inference(
                outputs["pred_logits"][b], outputs["pred_scores"][b], outputs["pred_masks"][b],
                size, padded, output_size, self.cls_threshold, self.mask_threshold,
                self.max_detections,
            )})
        return results
