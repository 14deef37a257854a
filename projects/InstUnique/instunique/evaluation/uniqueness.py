"""Query uniqueness: do a model's queries fire on other images, and does each instance get
exactly one query? The quantities Eq. 5 trains down, measured on validation images.

Definitions (a *confident* query has class score > ``score_thresh``, the adapter's
``query_scores``; its *own mask* is its mask on its image as the base inference makes it:
the adapter's mask logits on F, upsampled to the output resolution as the base inference
does, its probability above the base inference's mask threshold t, the adapter's
``mask_threshold``: 0.5 for Mask2Former, MASK_THRESHOLD 0.45 for SparseInst):

- external firing share: for each confident query of image A and each *other* image B of
  A's group, the fraction of B's valid (unpadded) pixel embeddings f whose mask
  probability (the adapter's ``pixel_logits``; e . f for Mask2Former) is above t; averaged
  over all such (query, other image) pairs, in percent.
  Groups are consecutive runs of ``group_size`` images in loader order (per process).
- mean max external probability: the same pairs, the maximum mask probability over B's
  pixels, averaged.
- duplicate rate: confident queries whose own mask has IoU > 0.5 with the own mask of a
  more confident query of the same image, in percent of confident queries.
- merged rate: confident queries whose own mask covers more than half (``cover``) of each
  of at least two ground-truth instances, in percent of confident queries.
- split rate: ground-truth instances that no confident own mask matches (IoU > 0.5) but
  that at least two *pieces* cover together by more than half, in percent of the
  ground-truth instances; a piece is a confident own mask lying mostly (more than half of
  its area) on the instance. Duplicates of a whole instance are not splits: one of them
  matches it.

External pixels are a fixed random sample of each image's valid pixel embeddings
(``pixels_per_image``; 0 keeps all), so memory is bounded by a group's queries and
samples; the max over a sample can only underestimate the max over all pixels.
"""
import json
import logging
import math
import os
from collections import OrderedDict
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
from detectron2.config import configurable
from detectron2.data import DatasetCatalog
from detectron2.data.detection_utils import annotations_to_instances
from detectron2.evaluation import DatasetEvaluator
from detectron2.utils import comm
from detectron2.utils.logger import create_small_table
from torch import nn

from ..adapter import SegmenterAdapter, SegmenterOutputs, build_adapter
from ..data.panoptic import panoptic_annotations

__all__ = [
    "QueryUniquenessEvaluator",
    "count_duplicates",
    "count_merges_and_splits",
    "external_firing",
]

logger = logging.getLogger(__name__)

_COUNTS = ("images", "groups", "pairs", "fire", "max_prob", "confident", "duplicates",
           "merged", "gt_images", "gt_instances", "split")


def external_firing(queries: Sequence[torch.Tensor], pixels: Sequence[torch.Tensor],
                    response: Optional[Callable] = None,
                    threshold: float = 0.5) -> Tuple[float, float, int]:
    """Scores every image's queries against the pixels of the other images of a group.

    Args:
        queries: per image, (n_i, D) confident query embeddings.
        pixels: per image, (P_i, C) valid pixel embeddings.
        response: mask logits (n, P) of queries (n, D) on pixels (P, C), called as
            ``response(queries, pixels)``; None: queries @ pixels.T.
        threshold: the mask probability above which a pixel is fired on.
    Returns:
        (sum over (query, other image) pairs of the fraction of that image's pixels with
        p > threshold, sum over the same pairs of the max p, number of pairs).
    """
    response = response or _dot
    cut = math.log(threshold / (1 - threshold))
    fire = peak = 0.0
    pairs = 0
    for a, qa in enumerate(queries):
        if len(qa) == 0:
            continue
        for b, fb in enumerate(pixels):
            if b == a or len(fb) == 0:
                continue
            z = response(qa, fb)  # (n_a, P_b); p > threshold <=> z > logit(threshold)
            fire += z.gt(cut).float().mean(1).sum().item()
            peak += z.max(1).values.sigmoid().sum().item()
            pairs += len(qa)
    return fire, peak, pairs


def _dot(queries: torch.Tensor, pixels: torch.Tensor) -> torch.Tensor:
    return queries @ pixels.t()


def _iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(n, m) IoU of flattened bool masks a (n, P) and b (m, P)."""
    a, b = a.float(), b.float()
    inter = a @ b.t()
    return inter / (a.sum(1)[:, None] + b.sum(1)[None] - inter).clamp(min=1)


def count_duplicates(masks: torch.Tensor, iou: float = 0.5) -> int:
    """Masks (n, H, W) bool, most confident first: how many have IoU > ``iou`` with a more
    confident one."""
    if len(masks) < 2:
        return 0
    flat = masks.flatten(1)
    return int(_iou(flat, flat).tril(-1).gt(iou).any(1).sum())


def count_merges_and_splits(pred: torch.Tensor, gt: torch.Tensor, cover: float = 0.5,
                            iou: float = 0.5) -> Tuple[int, int]:
    """Merged predictions and split ground-truth instances (see the module docstring).

    Args:
        pred: (n, H, W) bool confident own masks.
        gt: (m, H, W) bool ground-truth instance masks.
    Returns:
        (merged, split): predictions covering more than ``cover`` of each of >= 2 instances;
        instances matched by no prediction (IoU > ``iou``) but covered by more than
        ``cover`` by the union of >= 2 pieces (predictions with more than ``cover`` of their
        area on the instance).
    """
    if len(pred) == 0 or len(gt) == 0:
        return 0, 0
    p, g = pred.flatten(1).float(), gt.flatten(1).float()
    inter = p @ g.t()  # (n, m)
    p_area, g_area = p.sum(1), g.sum(1)
    covers = inter > cover * g_area[None]  # prediction covers most of the instance
    merged = int((covers & (g_area[None] > 0)).sum(1).ge(2).sum())
    matched = _iou(p, g).gt(iou).any(0)
    pieces = inter > cover * p_area[:, None]  # (n, m): prediction lies mostly on instance
    split = 0
    for j in range(g.shape[0]):
        on = pieces[:, j]
        if matched[j] or on.sum() < 2:
            continue
        union = (p[on].amax(0) * g[j]).sum()
        split += int(union > cover * g_area[j])
    return merged, split


def _base_model(model: nn.Module) -> nn.Module:
    if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
        model = model.module
    # An InstUnique model wraps its base segmenter; inference is the base's own.
    return getattr(model, "segmenter", model)


class QueryUniquenessEvaluator(DatasetEvaluator):
    """A detectron2 DatasetEvaluator of query uniqueness (definitions: module docstring).

    It reads the model through its SegmenterAdapter, so it serves every base segmenter
    with an adapter, plain or trained with InstUnique. Where the adapter can watch the
    inference forward (``watch_inference``: a forward hook, registered in ``reset`` and
    removed in ``evaluate``), the embeddings come from the very forward that made
    ``outputs``, at no extra cost; otherwise ``process`` runs the adapter's
    ``forward_train`` on the inputs under no_grad (the model is in eval mode then).

    Results: ``{"uniqueness": {...}}``, which detectron2 flattens into metrics.json and
    the event files as ``uniqueness/<name>``; percentages are in [0, 100].
    """

    @configurable
    def __init__(self, dataset_name: Optional[str], model: nn.Module, *, group_size: int = 8,
                 score_thresh: float = 0.5, pixels_per_image: int = 4096,
                 output_dir: Optional[str] = None, distributed: bool = True):
        """
        Args:
            dataset_name: registered dataset whose dicts give the ground truth (by
                "image_id") for merges and splits; None: those are not measured.
            model: the evaluated model (InstUnique, its base segmenter, or either wrapped
                in DistributedDataParallel).
            group_size: images per group of the external firing measure (>= 2).
            score_thresh: class score above which a query is confident, in [0, 1).
            pixels_per_image: external pixels sampled per image; 0: all valid pixels.
            output_dir: where ``uniqueness.json`` is written; None: not written.
        """
        if group_size < 2:
            raise ValueError(f"TEST.UNIQUENESS.GROUP_SIZE must be >= 2, got {group_size}")
        if not 0.0 <= score_thresh < 1.0:
            raise ValueError(f"TEST.UNIQUENESS.SCORE_THRESH must be in [0, 1), got {score_thresh}")
        if pixels_per_image < 0:
            raise ValueError(
                f"TEST.UNIQUENESS.PIXELS_PER_IMAGE must be >= 0, got {pixels_per_image}"
            )
        self.dataset_name = dataset_name
        self.model = model
        self.adapter: SegmenterAdapter = build_adapter(_base_model(model))
        self.group_size = group_size
        self.score_thresh = score_thresh
        self.pixels_per_image = pixels_per_image
        self.output_dir = output_dir
        self.distributed = distributed
        self._dicts: Optional[Dict] = None
        self._handle = None
        self.reset()

    @classmethod
    def from_config(cls, cfg, dataset_name, model, output_dir=None):
        u = cfg.TEST.UNIQUENESS
        return {"dataset_name": dataset_name, "model": model, "group_size": u.GROUP_SIZE,
                "score_thresh": u.SCORE_THRESH, "pixels_per_image": u.PIXELS_PER_IMAGE,
                "output_dir": output_dir}

    # --------------------------------------------------------------- DatasetEvaluator API
    def reset(self):
        self._stats = dict.fromkeys(_COUNTS, 0.0)
        self._group: List[Tuple[torch.Tensor, torch.Tensor]] = []
        self._captured: List[SegmenterOutputs] = []
        self._remove_hook()
        self._handle = self.adapter.watch_inference(self._captured.append)

    def process(self, inputs: List[Dict], outputs: List[Dict]):
        """inputs: the model's input dicts ("image" (3, h, w) as resized for the model,
        "height"/"width" of the output, "image_id"); outputs are not read."""
        if self._captured:
            out = self._captured[-1]
            self._captured.clear()
        else:
            with torch.no_grad():
                out = self.adapter.forward_train(self.adapter.preprocess(inputs))
        stride = self.adapter.pixel_stride
        scores = self.adapter.query_scores(out.class_logits)
        f_all = out.pixel_embeds.float()
        padded = (f_all.shape[-2] * stride, f_all.shape[-1] * stride)
        for i, x in enumerate(inputs):
            h, w = x["image"].shape[-2:]
            height, width = x.get("height", h), x.get("width", w)
            order = scores[i].argsort(descending=True)
            keep = order[scores[i][order] > self.score_thresh]
            queries = out.query_embeds[i][keep].float()
            f = f_all[i]
            if len(queries):
                logits = self.adapter.mask_logits(queries[None], f[None])[0]
                probs = self.adapter.output_probabilities(logits, padded, (h, w),
                                                          (height, width))
                masks = probs > self.adapter.mask_threshold
            else:
                masks = torch.zeros((0, height, width), dtype=torch.bool, device=f.device)
            valid = f[:, : -(-h // stride), : -(-w // stride)]
            self.add_image(queries, valid, masks, self._gt_masks(x, (height, width)))

    def evaluate(self):
        self._flush_group()
        self._remove_hook()
        stats = self._stats
        if self.distributed and comm.get_world_size() > 1:
            gathered = comm.gather(stats, dst=0)
            if not comm.is_main_process():
                return {}
            stats = {k: sum(s[k] for s in gathered) for k in _COUNTS}
        results = self.summarize(stats)
        logger.info(
            f"Query uniqueness on {int(stats['images'])} images ({int(stats['groups'])} groups "
            f"of up to {self.group_size}, queries with score > {self.score_thresh}):\n"
            + create_small_table(results)
        )
        if self.output_dir:
            os.makedirs(self.output_dir, exist_ok=True)
            with open(os.path.join(self.output_dir, "uniqueness.json"), "w") as f:
                json.dump({"results": results, "counts": stats}, f, indent=1)
        return OrderedDict(uniqueness=results)

    # ------------------------------------------------------------------------- the work
    def add_image(self, queries: torch.Tensor, pixels: torch.Tensor,
                  masks: torch.Tensor, gt_masks: Optional[torch.Tensor] = None):
        """Accounts one image (the model-free core of ``process``).

        Args:
            queries: (n, D) confident query embeddings, most confident first.
            pixels: (C, h, w) its valid (unpadded) pixel embeddings.
            masks: (n, H, W) bool, the queries' own masks at the output resolution.
            gt_masks: (m, H, W) bool ground-truth instance masks; None: unknown.
        """
        s = self._stats
        s["images"] += 1
        s["confident"] += len(queries)
        s["duplicates"] += count_duplicates(masks)
        if gt_masks is not None:
            merged, split = count_merges_and_splits(masks, gt_masks.to(masks.device))
            s["merged"] += merged
            s["split"] += split
            s["gt_images"] += 1
            s["gt_instances"] += len(gt_masks)
        flat = pixels.flatten(1).t()
        if 0 < self.pixels_per_image < len(flat):
            # A fixed sample per image (seeded by its position), so reruns agree.
            g = torch.Generator().manual_seed(int(s["images"]))
            flat = flat[torch.randperm(len(flat), generator=g)[: self.pixels_per_image]]
        self._group.append((queries.detach(), flat.detach().clone()))
        if len(self._group) == self.group_size:
            self._flush_group()

    @staticmethod
    def summarize(stats: Dict[str, float]) -> Dict[str, float]:
        """Rates from summed counts (NaN where a denominator is 0)."""
        def ratio(num, den, scale=1.0):
            return scale * stats[num] / stats[den] if stats[den] > 0 else math.nan

        return {
            "external_fire": ratio("fire", "pairs", 100.0),
            "external_max_prob": ratio("max_prob", "pairs"),
            "duplicate_rate": ratio("duplicates", "confident", 100.0),
            "merged_rate": ratio("merged", "confident", 100.0),
            "split_rate": ratio("split", "gt_instances", 100.0),
            "confident_per_image": ratio("confident", "images"),
            "duplicates": stats["duplicates"],
            "merged": stats["merged"],
            "split": stats["split"],
        }

    def _flush_group(self):
        if len(self._group) >= 2:
            queries, pixels = zip(*self._group)
            fire, peak, pairs = external_firing(queries, pixels, self.adapter.pixel_logits,
                                                self.adapter.mask_threshold)
            self._stats["fire"] += fire
            self._stats["max_prob"] += peak
            self._stats["pairs"] += pairs
            self._stats["groups"] += 1
        self._group = []

    def _remove_hook(self):
        if self._handle is not None:
            self._handle.remove()
            self._handle = None

    def _gt_masks(self, x: Dict, size: Tuple[int, int]) -> Optional[torch.Tensor]:
        """(m, H, W) bool non-crowd instance masks of input x from the dataset dicts."""
        if self.dataset_name is None or "image_id" not in x:
            return None
        if self._dicts is None:
            self._dicts = {d["image_id"]: d for d in DatasetCatalog.get(self.dataset_name)}
        d = self._dicts.get(x["image_id"])
        if d is None:
            return None
        if "annotations" not in d and "pan_seg_file_name" in d:
            # A panoptic dataset: its thing segments are the instances.
            annos = [a for a in panoptic_annotations(d) if a["isthing"]]
        else:
            annos = d.get("annotations", [])
        annos = [a for a in annos if not a.get("iscrowd", 0)]
        if not annos:
            return torch.zeros((0, *size), dtype=torch.bool)
        if any("segmentation" not in a for a in annos):
            return None
        masks = annotations_to_instances(annos, size, mask_format="bitmask").gt_masks.tensor
        return masks.bool()
