"""What the query-based base segmenters share: one forward over their four steps, and the
ground-truth masks of an image whatever their container."""
from typing import Dict, List

import torch
from detectron2.structures import BitMasks, ImageList, PolygonMasks
from torch import nn


class QuerySegmenter(nn.Module):
    """A meta-architecture made of ``preprocess_image``, ``predict``, ``prepare_targets``,
    ``losses`` and ``inference``; the InstUnique adapters call the same steps one by one.
    A subclass holds ``pixel_mean`` / ``pixel_std`` buffers (C, 1, 1) and an int
    ``size_divisibility``."""

    def mask_targets(self, batched_inputs: List[Dict], images: ImageList,
                     num_classes_key: str) -> List[Dict]:
        """Per image ``{"labels": (M,) long, "masks": (M, H_pad, W_pad) bool}``, the masks
        padded like the image; gt_classes outside [0, ``self.num_classes``) fail naming
        the image and ``num_classes_key``."""
        h_pad, w_pad = images.tensor.shape[-2:]
        device = self.pixel_mean.device
        targets = []
        for x, (h, w) in zip(batched_inputs, images.image_sizes):
            inst = x["instances"]
            where = f"image_id {x.get('image_id', '?')!r}"
            labels = inst.gt_classes
            if len(labels) and not 0 <= int(labels.min()) <= int(labels.max()) < self.num_classes:
                raise ValueError(
                    f"{where}: gt_classes {labels.tolist()} outside [0, {self.num_classes}) "
                    f"({num_classes_key})"
                )
            masks = gt_mask_tensor(inst, (h, w), where)
            padded = torch.zeros((len(masks), h_pad, w_pad), dtype=torch.bool, device=device)
            padded[:, :h, :w] = masks.to(device)
            targets.append({"labels": labels.to(device), "masks": padded})
        return targets

    def preprocess_image(self, batched_inputs: List[Dict]) -> ImageList:
        """Normalized images, padded to a common size divisible by ``size_divisibility``."""
        images = [(x["image"].to(self.pixel_mean.device) - self.pixel_mean) / self.pixel_std
                  for x in batched_inputs]
        return ImageList.from_tensors(images, self.size_divisibility)

    def forward(self, batched_inputs: List[Dict]):
        """
        Args:
            batched_inputs: detectron2 dicts with "image" (3, H, W) and, in training,
                "instances"; "height"/"width" give the output resolution at inference.
        Returns:
            training: a dict of losses; inference: a list of per-image result dicts.
        """
        images = self.preprocess_image(batched_inputs)
        outputs = self.predict(images)
        if self.training:
            return self.losses(outputs, self.prepare_targets(batched_inputs, images))[0]
        return self.inference(outputs, batched_inputs, images)


def gt_mask_tensor(inst, size, where: str) -> torch.Tensor:
    """(M, h, w) bool masks of an image's Instances, whatever their container."""
    h, w = size
    if not inst.has("gt_masks"):
        if len(inst):
            raise ValueError(f"{where}: {len(inst)} instances without gt_masks")
        return torch.zeros((0, h, w), dtype=torch.bool)
    gt = inst.gt_masks
    if isinstance(gt, PolygonMasks):
        masks = BitMasks.from_polygon_masks(gt, h, w).tensor if len(gt) else torch.zeros(
            (0, h, w), dtype=torch.bool)
    elif isinstance(gt, BitMasks):
        masks = gt.tensor
    elif isinstance(gt, torch.Tensor) and gt.dim() == 3:
        masks = gt.bool()
    else:
        raise ValueError(
            f"{where}: gt_masks must be BitMasks, PolygonMasks or an (M, H, W) tensor, got "
            f"{type(gt).__name__}"
        )
    if tuple(masks.shape[-2:]) != (h, w) or len(masks) != len(inst):
        raise ValueError(
            f"{where}: gt_masks of shape {tuple(masks.shape)} do not fit {len(inst)} "
            f"instances of an image of size {(h, w)}"
        )
    return masks
