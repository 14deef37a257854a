"""
COCO panoptic with semantic PNGs: ``coco_2017_{train,val}_panoptic_with_sem_seg``.

detectron2 registers COCO panoptic without per-pixel class maps of all 133 classes (its
``panoptic_stuff_*`` folders hold Panoptic FPN's 54 "stuff + things" labels), so
SemSegEvaluator has nothing to score the semantic output of Mask2Former against. The
official Mask2Former evaluates on ``coco_2017_val_panoptic_with_sem_seg``, whose semantic
PNGs (``coco/panoptic_semseg_{split}2017/``) a preparation script derives from the
panoptic PNGs. Here :func:`write_semantic_pngs` (run by
``tools/prepare_coco_semantic_from_panoptic.py``) writes them, and this module registers
the two names under detectron2's dataset root with the metadata of Mask2Former's
registration (every category in ``stuff_dataset_id_to_contiguous_id``, see :mod:`.panoptic`).

A semantic PNG holds, per pixel, the contiguous class of its segment: the rank of the
segment's category id among the JSON's sorted category ids (detectron2's convention, the
order of ``COCO_CATEGORIES``); void pixels and crowd segments are 255.
"""
import json
import os
from concurrent.futures import ProcessPoolExecutor
from typing import Dict, List, Optional

import numpy as np
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.datasets.builtin_meta import COCO_CATEGORIES

from .atomic_io import write_png
from .metadata import class_metadata
from .panoptic import IGNORE_LABEL, load_panoptic_json, read_segment_ids

__all__ = [
    "COCO_SEMSEG_SPLITS",
    "register_coco_panoptic_with_sem_seg",
    "semantic_from_panoptic",
    "write_semantic_pngs",
]

# How to make the semantic PNGs; quoted when they are missing.
PREPARE_HINT = ("python3 tools/prepare_coco_semantic_from_panoptic.py "
                "--root $DETECTRON2_DATASETS/coco")

# name -> (images, panoptic PNGs, panoptic JSON, semantic PNGs, instances JSON), under
# the dataset root; the layout of detectron2's builtin COCO and Mask2Former's semantic PNGs.
COCO_SEMSEG_SPLITS = {
    f"coco_2017_{split}_panoptic_with_sem_seg": (
        f"coco/{split}2017",
        f"coco/panoptic_{split}2017",
        f"coco/annotations/panoptic_{split}2017.json",
        f"coco/panoptic_semseg_{split}2017",
        f"coco/annotations/instances_{split}2017.json",
    )
    for split in ("train", "val")
}


def semantic_from_panoptic(
    ids: np.ndarray, segments_info: List[Dict], contiguous: Dict[int, int]
) -> np.ndarray:
    """(H, W) uint8 class map of a panoptic segment-id map.

    Args:
        ids: (H, W) int64 segment ids (0: void), as :func:`.panoptic.read_segment_ids`.
        segments_info: the image's segments: ``id``, dataset ``category_id``, ``iscrowd``.
        contiguous: dataset category id -> contiguous class (< 255).
    """
    semantic = np.full(ids.shape, IGNORE_LABEL, np.uint8)
    for seg in segments_info:
        if not seg.get("iscrowd", 0):
            semantic[ids == seg["id"]] = contiguous[seg["category_id"]]
    return semantic


def _convert(job) -> None:
    source, target, segments_info, contiguous, image_id = job
    ids = read_segment_ids(source, image_id)
    write_png(target, semantic_from_panoptic(ids, segments_info, contiguous))


def write_semantic_pngs(
    panoptic_json: str, panoptic_root: str, out_root: str, workers: Optional[int] = None
) -> int:
    """Write one semantic PNG per annotation of ``panoptic_json`` into ``out_root`` (same
    file names); PNGs already there are kept, so an interrupted run resumes. Each PNG is
    written whole (temporary name, then rename). Returns how many were written."""
    with open(panoptic_json) as f:
        data = json.load(f)
    category_ids = sorted(c["id"] for c in data["categories"])
    if len(category_ids) >= IGNORE_LABEL:
        raise ValueError(f"{panoptic_json}: {len(category_ids)} categories do not fit a "
                         f"uint8 class map with {IGNORE_LABEL} as void")
    contiguous = {cid: i for i, cid in enumerate(category_ids)}
    unknown = {s["category_id"] for a in data["annotations"] for s in a["segments_info"]}
    unknown -= set(contiguous)
    if unknown:
        raise ValueError(f"{panoptic_json}: segments of category ids {sorted(unknown)}, "
                         "which are not in its categories")
    os.makedirs(out_root, exist_ok=True)
    jobs = [
        (os.path.join(panoptic_root, a["file_name"]), os.path.join(out_root, a["file_name"]),
         a["segments_info"], contiguous, a["image_id"])
        for a in data["annotations"]
        if not os.path.exists(os.path.join(out_root, a["file_name"]))
    ]
    if workers == 1 or len(jobs) < 2:
        for job in jobs:
            _convert(job)
    else:
        with ProcessPoolExecutor(workers) as pool:
            list(pool.map(_convert, jobs, chunksize=64))
    return len(jobs)


def register_coco_panoptic_with_sem_seg(root: str) -> None:
    """Register the names of :data:`COCO_SEMSEG_SPLITS` under ``root`` (nothing is read
    until a dataset is loaded); names already registered are left alone."""
    metadata = class_metadata(COCO_CATEGORIES)
    for name, parts in COCO_SEMSEG_SPLITS.items():
        if name in DatasetCatalog.list():
            continue
        image_root, panoptic_root, panoptic_json, sem_seg_root, instances_json = (
            os.path.join(root, p) for p in parts)
        DatasetCatalog.register(name, lambda j=panoptic_json, i=image_root, p=panoptic_root,
                                s=sem_seg_root: load_panoptic_json(j, i, p, metadata, s))
        MetadataCatalog.get(name).set(
            image_root=image_root, panoptic_root=panoptic_root, panoptic_json=panoptic_json,
            sem_seg_root=sem_seg_root, json_file=instances_json,
            evaluator_type="coco_panoptic_seg", ignore_label=IGNORE_LABEL, label_divisor=1000,
            prepare_hint=PREPARE_HINT, **metadata,
        )
