"""
Files and metadata of a synthetic dataset in COCO-panoptic format (a
:class:`~.spec.SyntheticSpec` with ``stuff_classes``, e.g. ``shapes_panoptic``).

Layout under ``{root}/{folder}``::

    {split}/000000.png                      image (BGR noise, Huffman-only PNG)
    panoptic_{split}/000000.png             segment ids as RGB (panopticapi id2rgb)
    panoptic_semseg_{split}/000000.png      contiguous class per pixel, 255 = void
    annotations/panoptic_{split}.json       images, annotations (segments_info), categories

Categories: the spec's thing classes get dataset ids 1..T (``isthing`` 1), its stuff
classes T+1..T+S; contiguous id = dataset id - 1 (detectron2's standard panoptic
convention, see :mod:`..panoptic`). A stuff class has at most one segment per image (its
pieces merged), as in COCO. Segment id = 1000 * category id + k (k = 1, 2, ...), so that
ids use more than one PNG channel. The JSON is written last: its presence marks a
complete split.
"""
import json
import os
from typing import Dict, Iterable, List, NamedTuple, Tuple

import numpy as np

from ..atomic_io import NOISE_PNG_PARAMS, atomic_write, write_png
from ..metadata import class_metadata
from ..panoptic import IGNORE_LABEL, load_panoptic_json

__all__ = [
    "IGNORE_LABEL",
    "PanopticPaths",
    "load_panoptic_split",
    "panoptic_metadata",
    "panoptic_paths",
    "write_panoptic_split",
]

_SEGMENT_ID_STRIDE = 1000


class PanopticPaths(NamedTuple):
    panoptic_json: str
    image_root: str
    panoptic_root: str
    sem_seg_root: str


def panoptic_paths(base: str, split: str) -> PanopticPaths:
    """Paths of one split under ``base`` = ``{root}/{folder}``; nothing is touched."""
    return PanopticPaths(
        os.path.join(base, "annotations", f"panoptic_{split}.json"),
        os.path.join(base, split),
        os.path.join(base, f"panoptic_{split}"),
        os.path.join(base, f"panoptic_semseg_{split}"),
    )


def _categories(spec) -> List[Dict]:
    names = [*spec.classes, *spec.stuff_classes]
    return [
        {"id": i + 1, "name": name, "supercategory": spec.folder,
         "isthing": int(i < len(spec.classes)), "color": [int(c) for c in spec.colors[i]]}
        for i, name in enumerate(names)
    ]


def panoptic_metadata(spec, paths: PanopticPaths) -> Dict:
    """MetadataCatalog fields of a split: those detectron2's ``register_coco_panoptic``
    sets (the convention of :mod:`..panoptic`), plus ``sem_seg_root`` for the semantic
    PNGs. No ``json_file``: there is no instances JSON, so no COCO mask AP."""
    return {
        "panoptic_root": paths.panoptic_root,
        "image_root": paths.image_root,
        "panoptic_json": paths.panoptic_json,
        "sem_seg_root": paths.sem_seg_root,
        "evaluator_type": "coco_panoptic_seg",
        "ignore_label": IGNORE_LABEL,
        "label_divisor": _SEGMENT_ID_STRIDE,
        **class_metadata(_categories(spec)),
    }


def load_panoptic_split(paths: PanopticPaths, metadata: Dict) -> List[Dict]:
    """Dataset dicts of a written split (see :func:`.panoptic.load_panoptic_json`)."""
    return load_panoptic_json(paths.panoptic_json, paths.image_root, paths.panoptic_root,
                              metadata, sem_seg_root=paths.sem_seg_root)


def _bbox(mask: np.ndarray) -> List[int]:
    rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
    return [int(cols[0]), int(rows[0]), int(cols[-1] - cols[0] + 1), int(rows[-1] - rows[0] + 1)]


def _label_maps(
    segments: List[Tuple[int, np.ndarray]], num_things: int, size: Tuple[int, int]
) -> Tuple[np.ndarray, np.ndarray, List[Dict]]:
    """Segment-id map (H, W) int64, semantic map (H, W) uint8 and segments_info of one
    image's (contiguous category, mask) pairs (stuff pieces of one class merged)."""
    merged: Dict[int, np.ndarray] = {}
    things = []
    for category, mask in segments:
        if category < num_things:
            things.append((category, mask))
        elif category in merged:
            merged[category] = merged[category] | mask
        else:
            merged[category] = mask.copy()
    ids = np.zeros(size, np.int64)
    semantic = np.full(size, IGNORE_LABEL, np.uint8)
    info, count = [], {}
    for category, mask in things + sorted(merged.items()):
        if not mask.any():
            continue
        if (ids[mask] != 0).any():
            raise ValueError("synthetic panoptic segments must not overlap")
        count[category] = count.get(category, 0) + 1
        seg_id = _SEGMENT_ID_STRIDE * (category + 1) + count[category]
        ids[mask] = seg_id
        semantic[mask] = category
        info.append({"id": seg_id, "category_id": category + 1, "iscrowd": 0,
                     "area": int(np.count_nonzero(mask)), "bbox": _bbox(mask)})
    return ids, semantic, info


def _ids_to_bgr(ids: np.ndarray) -> np.ndarray:
    """(H, W, 3) uint8 BGR image whose RGB reading is panopticapi's id2rgb of ``ids``."""
    rgb = np.stack([ids % 256, ids // 256 % 256, ids // 65536 % 256], -1).astype(np.uint8)
    return np.ascontiguousarray(rgb[..., ::-1])


def write_panoptic_split(
    spec, paths: PanopticPaths, rendered: Iterable[Tuple[np.ndarray, List]], info: Dict
) -> str:
    """Write the images of ``rendered`` ((image (S, S, 3) BGR, [(contiguous category,
    (S, S) bool mask)]) per image), their panoptic and semantic PNGs and, last, the
    panoptic JSON; return the JSON path."""
    for folder in (*paths[1:], os.path.dirname(paths.panoptic_json)):
        os.makedirs(folder, exist_ok=True)
    images, annotations = [], []
    for index, (image, segments) in enumerate(rendered):
        file_name = f"{index:06d}.png"
        height, width = image.shape[:2]
        ids, semantic, segments_info = _label_maps(segments, len(spec.classes), (height, width))
        write_png(os.path.join(paths.image_root, file_name), image, NOISE_PNG_PARAMS)
        write_png(os.path.join(paths.panoptic_root, file_name), _ids_to_bgr(ids))
        write_png(os.path.join(paths.sem_seg_root, file_name), semantic)
        # 1-based image ids, as the instance datasets (pycocotools reads 0 as unmatched).
        image_id = index + 1
        images.append({"id": image_id, "file_name": file_name, "height": height,
                       "width": width})
        annotations.append({"image_id": image_id, "file_name": file_name,
                            "segments_info": segments_info})
    data = {"info": info, "images": images, "annotations": annotations,
            "categories": _categories(spec)}
    atomic_write(paths.panoptic_json, json.dumps(data, separators=(",", ":")).encode())
    return paths.panoptic_json
