"""The base training view: read an image, augment it, and build its ``Instances``."""
import copy
from typing import Dict, List

import numpy as np
import torch
from detectron2.config import configurable
from detectron2.data import detection_utils as utils
from detectron2.data import transforms as T
from detectron2.structures import BitMasks, Boxes, Instances

__all__ = ["InstanceViewMapper", "build_base_augmentation", "instances_from_masks"]


def build_base_augmentation(cfg) -> List[T.Augmentation]:
    """INPUT.DATASET_MAPPER_NAME: "coco_instance_lsj" (large-scale jitter) or "instance"."""
    name = cfg.INPUT.DATASET_MAPPER_NAME
    flip = [T.RandomFlip(horizontal=True)] if cfg.INPUT.RANDOM_FLIP == "horizontal" else []
    if name == "coco_instance_lsj":
        size = cfg.INPUT.IMAGE_SIZE
        # No padding here: the model pads, and the unpadded size stays known downstream.
        return flip + [
            T.ResizeScale(cfg.INPUT.MIN_SCALE, cfg.INPUT.MAX_SCALE, size, size),
            T.FixedSizeCrop((size, size), pad=False),
        ]
    if name == "instance":
        return flip + [
            T.ResizeShortestEdge(
                cfg.INPUT.MIN_SIZE_TRAIN, cfg.INPUT.MAX_SIZE_TRAIN,
                cfg.INPUT.MIN_SIZE_TRAIN_SAMPLING,
            )
        ]
    raise ValueError(
        f"INPUT.DATASET_MAPPER_NAME={name!r} is unknown; use 'instance' or 'coco_instance_lsj'"
    )


def instances_from_masks(masks: np.ndarray, classes: np.ndarray) -> Instances:
    """Instances with gt_masks (BitMasks), gt_boxes and gt_classes from (N, H, W) masks,
    dropping the empty ones."""
    keep = masks.reshape(masks.shape[0], -1).any(1) if len(masks) else np.zeros(0, bool)
    masks, classes = masks[keep], classes[keep]
    inst = Instances(masks.shape[1:])
    inst.gt_masks = BitMasks(torch.from_numpy(np.ascontiguousarray(masks)).bool())
    inst.gt_boxes = inst.gt_masks.get_bounding_boxes() if len(masks) else Boxes(torch.zeros(0, 4))
    inst.gt_classes = torch.as_tensor(classes, dtype=torch.long)
    return inst


class InstanceViewMapper:
    """Dataset dict -> {"image": (3, H, W) uint8 tensor, "instances", "image_id", ...}.

    Masks are bitmasks (polygons and RLE both accepted); boxes are recomputed from the
    masks after augmentation, and instances left empty by a crop are dropped.
    """

    @configurable
    def __init__(self, *, augmentations: List[T.Augmentation], image_format: str):
        self.augmentations = T.AugmentationList(augmentations)
        self.image_format = image_format

    @classmethod
    def from_config(cls, cfg, is_train: bool = True):
        return {"augmentations": build_base_augmentation(cfg), "image_format": cfg.INPUT.FORMAT}

    def read(self, dataset_dict: Dict):
        """The augmented view as numpy: image (H, W, 3), masks (N, H, W) bool, classes (N,)."""
        image = utils.read_image(dataset_dict["file_name"], format=self.image_format)
        utils.check_image_size(dataset_dict, image)
        aug_input = T.AugInput(image)
        transforms = self.augmentations(aug_input)
        image = aug_input.image
        annos = [
            utils.transform_instance_annotations(a, transforms, image.shape[:2])
            for a in dataset_dict.get("annotations", [])
            if a.get("iscrowd", 0) == 0
        ]
        inst = utils.annotations_to_instances(annos, image.shape[:2], mask_format="bitmask")
        if len(inst) and inst.has("gt_masks"):
            masks = inst.gt_masks.tensor.numpy()
        else:
            masks = np.zeros((0, *image.shape[:2]), dtype=bool)
        return image, masks, inst.gt_classes.numpy()

    @staticmethod
    def to_view(dataset_dict: Dict, image: np.ndarray, masks: np.ndarray, classes) -> Dict:
        view = {k: v for k, v in dataset_dict.items() if k not in ("annotations", "file_name")}
        view["image"] = torch.as_tensor(np.ascontiguousarray(image.transpose(2, 0, 1)))
        view["instances"] = instances_from_masks(masks, classes)
        return view

    def __call__(self, dataset_dict: Dict) -> Dict:
        dataset_dict = copy.deepcopy(dataset_dict)
        return self.to_view(dataset_dict, *self.read(dataset_dict))
