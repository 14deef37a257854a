"""
COCO-panoptic data as the project reads it: dataset dicts and per-segment annotations.

The class-id convention is that of :mod:`.metadata`.

A panoptic PNG stores segment ids as RGB (panopticapi: id = R + 256 G + 256^2 B), 0 is
void (no segment). ``segments_info`` of a dataset dict lists, per segment, its ``id``,
contiguous ``category_id``, ``isthing`` and ``iscrowd``.
"""
import json
import os
from typing import Dict, List, Optional

import numpy as np
import pycocotools.mask as mask_util
from detectron2.structures import BoxMode
from PIL import Image

__all__ = [
    "IGNORE_LABEL",
    "PanopticDataError",
    "load_panoptic_json",
    "panoptic_annotations",
    "read_segment_ids",
]


IGNORE_LABEL = 255  # semantic PNG value of void pixels, detectron2's ignore_label


class PanopticDataError(ValueError):
    """A panoptic annotation that contradicts its PNG or its JSON."""


def load_panoptic_json(
    json_file: str, image_root: str, panoptic_root: str, metadata: Dict,
    sem_seg_root: Optional[str] = None,
) -> List[Dict]:
    """Dataset dicts of a COCO-panoptic JSON, as detectron2's ``load_coco_panoptic_json``
    builds them, but with each image's file name taken from the JSON's ``images`` (not
    assumed to be ``.jpg``) and, with ``sem_seg_root``, a ``sem_seg_file_name`` per image
    (same stem, ``.png``).

    Raises:
        PanopticDataError: an annotation of an unknown image or of an unknown category,
            naming the JSON and the image id.
    """
    with open(json_file) as f:
        data = json.load(f)
    images = {image["id"]: image for image in data["images"]}
    things = metadata["thing_dataset_id_to_contiguous_id"]
    stuff = metadata["stuff_dataset_id_to_contiguous_id"]
    dicts = []
    for ann in data["annotations"]:
        image_id = ann["image_id"]
        image = images.get(image_id)
        if image is None:
            raise PanopticDataError(
                f"{json_file}: annotation {ann['file_name']!r} is of image id {image_id}, "
                f"which is not in the JSON's images"
            )
        segments = []
        for seg in ann["segments_info"]:
            category = seg["category_id"]
            if category not in things and category not in stuff:
                raise PanopticDataError(
                    f"{json_file}: image id {image_id}, segment {seg['id']} has category_id "
                    f"{category}, which is in neither thing_ nor stuff_dataset_id_to_contiguous_id"
                )
            isthing = category in things
            segments.append({
                **seg,
                "category_id": things[category] if isthing else stuff[category],
                "isthing": isthing,
            })
        record = {
            "file_name": os.path.join(image_root, image["file_name"]),
            "image_id": image_id,
            "height": image["height"],
            "width": image["width"],
            "pan_seg_file_name": os.path.join(panoptic_root, ann["file_name"]),
            "segments_info": segments,
        }
        if sem_seg_root is not None:
            stem = os.path.splitext(ann["file_name"])[0]
            record["sem_seg_file_name"] = os.path.join(sem_seg_root, stem + ".png")
        dicts.append(record)
    return dicts


def read_segment_ids(path: str, image_id=None) -> np.ndarray:
    """(H, W) int64 segment ids of the panoptic PNG at ``path`` (0: void).

    Raises:
        FileNotFoundError / PanopticDataError: missing or not an RGB PNG; the message
            names the file and the image id.
    """
    try:
        with Image.open(path) as png:
            rgb = np.asarray(png.convert("RGB"), dtype=np.int64)
    except FileNotFoundError as e:
        raise FileNotFoundError(
            f"panoptic PNG {path!r} of image id {image_id} does not exist"
        ) from e
    except (OSError, SyntaxError, ValueError) as e:
        raise PanopticDataError(
            f"panoptic PNG {path!r} of image id {image_id} cannot be read: {e}"
        ) from e
    return rgb[..., 0] + 256 * rgb[..., 1] + 65536 * rgb[..., 2]


def _check_segments(ids: np.ndarray, segments: List[Dict], dataset_dict: Dict) -> None:
    path, image_id = dataset_dict["pan_seg_file_name"], dataset_dict.get("image_id")
    where = f"panoptic PNG {path!r} of image id {image_id}"
    expected = (dataset_dict.get("height"), dataset_dict.get("width"))
    if None not in expected and tuple(ids.shape) != expected:
        raise PanopticDataError(
            f"{where} is {ids.shape[0]}x{ids.shape[1]} (HxW); the dataset says "
            f"{expected[0]}x{expected[1]}"
        )
    listed = [s["id"] for s in segments]
    if len(set(listed)) != len(listed):
        raise PanopticDataError(f"{where}: segments_info lists a segment id twice: {listed}")
    in_png = set(np.unique(ids).tolist()) - {0}
    only_png, only_json = sorted(in_png - set(listed)), sorted(set(listed) - in_png)
    if only_png or only_json:
        raise PanopticDataError(
            f"{where}: segment ids do not match segments_info: in the PNG only {only_png}, "
            f"in segments_info only {only_json}"
        )


def panoptic_annotations(dataset_dict: Dict) -> List[Dict]:
    """Per-segment annotations of a panoptic dataset dict, in the form detectron2's
    ``transform_instance_annotations`` / ``annotations_to_instances`` take.

    Args:
        dataset_dict: with ``pan_seg_file_name`` and ``segments_info`` (contiguous
            ``category_id``; see :func:`load_panoptic_json`), optionally ``height``/``width``.
    Returns:
        one dict per segment, things and stuff alike: ``category_id`` (contiguous),
        ``segmentation`` (COCO RLE of the (H, W) mask), ``bbox`` (XYWH_ABS, tight),
        ``bbox_mode``, ``iscrowd``, ``isthing`` and the segment ``id``.
    Raises:
        FileNotFoundError: the PNG is missing. PanopticDataError: the PNG's segment ids
            or size disagree with the dict. Both name the PNG and the image id.
    """
    ids = read_segment_ids(dataset_dict["pan_seg_file_name"], dataset_dict.get("image_id"))
    segments = dataset_dict["segments_info"]
    _check_segments(ids, segments, dataset_dict)
    annotations = []
    for seg in segments:
        rle = mask_util.encode(np.asfortranarray((ids == seg["id"]).astype(np.uint8)))
        annotations.append({
            "id": seg["id"],
            "category_id": seg["category_id"],
            "segmentation": rle,
            # toBbox spans whole pixels: columns x0..x1 give width x1 - x0 + 1.
            "bbox": [float(v) for v in mask_util.toBbox(rle)],
            "bbox_mode": BoxMode.XYWH_ABS,
            "iscrowd": int(seg.get("iscrowd", 0)),
            "isthing": bool(seg["isthing"]),
        })
    return annotations
