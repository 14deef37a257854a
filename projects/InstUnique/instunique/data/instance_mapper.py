"""The base training view: read an image, augment it, and build its ``Instances``."""
import copy
from typing import Dict, List, Sequence

import numpy as np
import torch
from detectron2.config import configurable
from detectron2.data import detection_utils as utils
from detectron2.data import transforms as T
from detectron2.structures import BitMasks, Boxes, Instances

from .panoptic import panoptic_annotations

__all__ = ["InstanceViewMapper", "build_base_augmentation", "instances_from_masks"]


def build_base_augmentation(cfg) -> List[T.Augmentation]:
    """INPUT.DATASET_MAPPER_NAME: "coco_instance_lsj" or "coco_panoptic_lsj" (large-scale
    jitter, the official Mask2Former names) or "instance"."""
    name = cfg.INPUT.DATASET_MAPPER_NAME
    flip = [T.RandomFlip(horizontal=True)] if cfg.INPUT.RANDOM_FLIP == "horizontal" else []
    if name in ("coco_instance_lsj", "coco_panoptic_lsj"):
        size = cfg.INPUT.IMAGE_SIZE
        # No padding here: the model pads, and the unpadded size stays known downstream.
        return flip + [
            T.ResizeScale(cfg.INPUT.MIN_SCALE, cfg.INPUT.MAX_SCALE, size, size),
            T.FixedSizeCrop((size, size), pad=False),
        ]
    if name == "instance":
        resize = T.ResizeShortestEdge(
            cfg.INPUT.MIN_SIZE_TRAIN, cfg.INPUT.MAX_SIZE_TRAIN, cfg.INPUT.MIN_SIZE_TRAIN_SAMPLING
        )
        if not cfg.INPUT.CROP.ENABLED:
            return flip + [resize]
        # The official SparseInst `_aug` recipe (its dataset_mapper.py): half of the images
        # are first resized to a short side of 400/500/600 and cropped by INPUT.CROP, then
        # resized as the others.
        crop = T.AugmentationList([
            T.ResizeShortestEdge([400, 500, 600], sample_style="choice"),
            T.RandomCrop(cfg.INPUT.CROP.TYPE, cfg.INPUT.CROP.SIZE),
        ])
        return flip + [T.RandomApply(crop, prob=0.5), resize]
    raise ValueError(
        f"INPUT.DATASET_MAPPER_NAME={name!r} is unknown; use 'instance', "
        f"'coco_instance_lsj' or 'coco_panoptic_lsj'"
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

    Masks are bitmasks (polygons and RLE both accepted; for a panoptic dict, every segment
    of its PNG); boxes are recomputed from the masks after augmentation, and instances left
    empty by a crop are dropped.
    """

    @configurable
    def __init__(self, *, augmentations: List[T.Augmentation], image_format: str,
                 dataset_names: Sequence[str] = ()):
        """dataset_names: where the dicts come from, for the message of an unreadable image."""
        self.augmentations = T.AugmentationList(augmentations)
        self.image_format = image_format
        self.dataset_names = tuple(dataset_names)

    @classmethod
    def from_config(cls, cfg, is_train: bool = True):
        return {
            "augmentations": build_base_augmentation(cfg),
            "image_format": cfg.INPUT.FORMAT,
            "dataset_names": cfg.DATASETS.TRAIN if is_train else cfg.DATASETS.TEST,
        }

    def read_image(self, dataset_dict: Dict) -> np.ndarray:
        """The image of ``dataset_dict``; an unreadable one raises an OSError naming its
        file, image id and dataset (a loader worker would name the file alone)."""
        file_name = dataset_dict["file_name"]
        try:
            return utils.read_image(file_name, format=self.image_format)
        except (OSError, EOFError, SyntaxError, ValueError) as e:
            error = FileNotFoundError if isinstance(e, FileNotFoundError) else OSError
            raise error(f"cannot read image {file_name!r} (image id "
                        f"{dataset_dict.get('image_id')}) of {self._source()}: {e}") from e

    def _source(self) -> str:
        # A dataset dict does not say which of several datasets it comes from.
        names = self.dataset_names
        if len(names) == 1:
            return f"dataset {names[0]!r}"
        return f"one of the datasets {', '.join(map(repr, names))}" if names else "its dataset"

    def read(self, dataset_dict: Dict):
        """The augmented view as numpy: image (H, W, 3), masks (N, H, W) bool, classes (N,)."""
        image = self.read_image(dataset_dict)
        utils.check_image_size(dataset_dict, image)
        aug_input = T.AugInput(image)
        transforms = self.augmentations(aug_input)
        image = aug_input.image
        annos = dataset_dict.get("annotations")
        if annos is None and "pan_seg_file_name" in dataset_dict:
            # Panoptic data: every segment, thing or stuff, is a target of the set criterion.
            annos = panoptic_annotations(dataset_dict)
        annos = [
            utils.transform_instance_annotations(a, transforms, image.shape[:2])
            for a in annos or []
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
