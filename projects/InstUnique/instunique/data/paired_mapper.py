"""The paired-view mapper of InstUnique: view x and view x' = T(x) with its transform."""
import copy
from typing import Callable, Dict

import numpy as np
from detectron2.config import configurable

from ..transforms import AffineWarp, TransformFamily
from ..transforms.build import build_transform_family
from .instance_mapper import InstanceViewMapper

__all__ = ["PairedViewMapper"]


class PairedViewMapper:
    """Dataset dict -> view x with ``paired_view`` (view x') and ``warp`` (T: x -> x').

    x is the base training view (resize or large-scale jitter, flip). T is drawn from the
    transform family; x' is x warped by T (bilinear image, nearest masks), its ground truth
    Y' = T(Y); instances that leave the frame are dropped (an empty x' is legal). The
    region of x' that T maps from outside x is filled with the pixel mean. The draws
    (here and in the base view's augmentations) come from numpy's global generator; in
    training, :class:`~instunique.data.sampler.KeyedMapDataset` seeds it per sample from
    the run's seed and the sample's place in the data stream, so a resumed run, or one
    with another number of loader workers, draws the same views.
    """

    @configurable
    def __init__(self, *, base: InstanceViewMapper, family: TransformFamily, fill):
        self.base = base
        self.family = family
        self.fill = fill

    @classmethod
    def from_config(cls, cfg, is_train: bool = True):
        return {
            "base": InstanceViewMapper(cfg, is_train),
            "family": build_transform_family(cfg),
            "fill": tuple(float(v) for v in cfg.MODEL.PIXEL_MEAN),
        }

    def __call__(self, dataset_dict: Dict) -> Dict:
        rng = np.random.default_rng(np.random.randint(2**31))
        return self.pair(dataset_dict, lambda h, w: self.family.sample(h, w, rng))

    def pair(self, dataset_dict: Dict, make_warp: Callable[[int, int], AffineWarp]) -> Dict:
        """The pair of ``dataset_dict`` for the warp ``make_warp(h, w)`` of its view x."""
        dataset_dict = copy.deepcopy(dataset_dict)
        image, masks, classes = self.base.read(dataset_dict)
        warp = make_warp(*image.shape[:2])

        warped_image = np.stack(
            [warp.apply_image(image[..., c], fill=v) for c, v in enumerate(self.fill)], -1
        )
        warped_masks = np.zeros((len(masks), *warp.dst_size), dtype=bool)
        for i, mask in enumerate(masks):
            warped_masks[i] = warp.apply_segmentation(mask)
        view = self.base.to_view(dataset_dict, image, masks, classes)
        view["paired_view"] = self.base.to_view(dataset_dict, warped_image, warped_masks, classes)
        view["warp"] = warp
        return view
