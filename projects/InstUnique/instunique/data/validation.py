"""
The data of a run, checked once before its first iteration (train_net.py's ``setup``).

:func:`validate_datasets` reads every dataset the run uses and finds up front what would
otherwise surface hours later, in a loader worker or the final evaluation:

- a missing or undecodable image, panoptic PNG or semantic PNG: an error naming the
  dataset, image id and file; with ``DATALOADER.SKIP_BAD_IMAGES`` the image is left out
  instead, with a logged count. (Whether a panoptic PNG's segment ids match its
  ``segments_info`` needs a full decode, minutes on COCO: the mapper checks that when it
  reads the image, naming the PNG and the image id.);
- no masks: a dataset whose annotations have no ``segmentation`` (box-only) fails; a few
  annotations without one are dropped, logged with their ids (detectron2's
  ``annotations_to_instances`` fails on a batch mixing both);
- polygons with fewer than 3 points or an odd number of coordinates are dropped, and so
  are annotations left without a polygon, logged with their ids;
- more categories than the segmenter's class count (its key in
  :data:`~.user_datasets.NUM_CLASSES_KEYS`).

Why a COCO dataset is read from its JSON and not through DatasetCatalog: detectron2's
``load_coco_json`` already drops bad polygons, silently and without annotation ids, but
COCOEvaluator reads the JSON itself (``metadata.json_file``). There pycocotools takes a
2-point polygon for a box and fails (``Argument 'bb' has incorrect type``), a 1-point one
is "input type is not supported", and an annotation the loader dropped is still a ground
truth that no prediction can match. So a JSON that needs a change is written cleaned to
``OUTPUT_DIR/validated_data/NAME.json`` and the dataset re-registered under its name with
it: the loader and the evaluator then read the same, cleaned data. Other datasets are
read through DatasetCatalog and, when changed, re-registered with the kept dicts.
"""

import copy
import json
import logging
import os
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from functools import reduce
from typing import Dict, List, Optional, Tuple

from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.datasets import register_coco_instances
from PIL import Image

from .user_datasets import AUTO, num_classes_key

__all__ = ["CLEANED_DIR", "validate_dataset", "validate_datasets"]

logger = logging.getLogger(__name__)

CLEANED_DIR = "validated_data"  # under OUTPUT_DIR: cleaned copies of COCO JSONs
_SHOWN_IMAGES = 5  # bad images quoted in a message
_SHOWN_IDS = 20  # annotation ids quoted in a log line
_BAD_POLYGON = "fewer than 3 points or an odd number of coordinates"


def _image_problem(path: str) -> Optional[str]:
    """Why the image at ``path`` cannot be read, or None."""
    # A full decode of every image would take many minutes on COCO. A PNG's verify() checks
    # every chunk's checksum without inflating the data. JPEG has no verify(); its draft
    # mode decodes at 1/8 scale, which still reads all of the file, so truncation fails.
    # Other formats are rare enough to be decoded in full.
    try:
        with Image.open(path) as image:
            if image.format == "PNG":
                image.verify()
            else:
                if image.format == "JPEG":
                    image.draft("RGB", (max(1, image.width // 8), max(1, image.height // 8)))
                image.load()
    except FileNotFoundError:
        return "file not found"
    except (OSError, EOFError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        return f"cannot be decoded ({type(e).__name__}: {e})"
    return None


# The files a dataset dict points at besides its image, and what to call each in a message.
_LABEL_FILES = (("pan_seg_file_name", "panoptic PNG"), ("sem_seg_file_name", "semantic PNG"))


def _record_problem(record: Dict) -> Optional[str]:
    """Why the image of ``record`` or one of its label PNGs cannot be read, or None."""
    problem = _image_problem(record["file_name"])
    if problem:
        return f"file {record['file_name']!r}: {problem}"
    for key, what in _LABEL_FILES:
        if key in record:
            problem = _image_problem(record[key])
            if problem:
                return f"{what} {record[key]!r}: {problem}"
    return None


def _sorted_ids(ids: List) -> List:
    try:
        return sorted(ids)
    except TypeError:  # mixed kinds (ids beside "#k of image i"): keep them in data order
        return ids


def _quote(items: List, limit: int, sep: str = ", ") -> str:
    more = f" and {len(items) - limit} more" if len(items) > limit else ""
    return sep.join(str(i) for i in items[:limit]) + more


def _readable_records(name: str, records: List[Dict], skip: bool) -> List[Dict]:
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        problems = list(pool.map(_record_problem, records))
    bad = [(r, p) for r, p in zip(records, problems) if p]
    if not bad:
        return records
    shown = [f"image id {r.get('image_id')}, {p}" for r, p in bad]
    text = (f"dataset {name!r}: {len(bad)} of {len(records)} images cannot be read: "
            + _quote(shown, _SHOWN_IMAGES, "; "))
    if not skip or len(bad) == len(records):
        hint = ("" if skip else "; set DATALOADER.SKIP_BAD_IMAGES True to leave them out")
        raise ValueError(text + hint)
    logger.warning("%s. Left out (DATALOADER.SKIP_BAD_IMAGES).", text)
    bad_ids = {id(r) for r, _ in bad}
    return [r for r in records if id(r) not in bad_ids]


def _masked_records(name: str, records: List[Dict]) -> Tuple[List[Dict], bool]:
    """``records`` without bad polygons and annotations lacking a mask; True if changed."""
    no_mask, no_polygon, fewer_polygons = [], [], []
    total = kept_total = 0
    out = []
    for record in records:
        if "annotations" not in record:
            out.append(record)
            continue
        kept = []
        for k, anno in enumerate(record["annotations"]):
            total += 1
            label = anno.get("id", f"#{k} of image {record.get('image_id')}")
            segm = anno.get("segmentation")
            if not segm:
                no_mask.append(label)
                continue
            if isinstance(segm, list):
                valid = [p for p in segm if isinstance(p, list) and len(p) >= 6
                         and len(p) % 2 == 0]
                if not valid:
                    no_polygon.append(label)
                    continue
                if len(valid) < len(segm):
                    fewer_polygons.append(label)
                    anno = {**anno, "segmentation": valid}
            kept.append(anno)
        kept_total += len(kept)
        out.append({**record, "annotations": kept})
    if total and not kept_total:
        raise ValueError(
            f"dataset {name!r}: none of its {total} annotations has a usable mask "
            f"({len(no_mask)} without 'segmentation', {len(no_polygon)} with only polygons "
            f"of {_BAD_POLYGON}). Instance segmentation needs polygon or RLE masks; "
            "box-only data would train with mask losses of 0 and fail at evaluation"
        )
    for ids, what in (
        (no_mask, "annotations without 'segmentation' (no mask)"),
        (no_polygon, f"annotations whose every polygon has {_BAD_POLYGON}"),
    ):
        if ids:
            logger.warning("dataset %r: dropped %d of %d %s; annotation ids: %s",
                           name, len(ids), total, what, _quote(_sorted_ids(ids), _SHOWN_IDS))
    if fewer_polygons:
        logger.warning("dataset %r: dropped the polygons with %s of %d annotations, kept "
                       "their other polygons; annotation ids: %s", name, _BAD_POLYGON,
                       len(fewer_polygons), _quote(_sorted_ids(fewer_polygons), _SHOWN_IDS))
    return out, bool(no_mask or no_polygon or fewer_polygons)


def _check_class_count(cfg, name: str, count: Optional[int], exact: bool) -> None:
    """``count``: the dataset's category count (``exact``), or else its largest 0-based
    category id + 1, a lower bound."""
    key = num_classes_key(cfg)
    if key is None or count is None:
        return
    value = reduce(getattr, key.split("."), cfg)
    if value == AUTO or count == value or (count < value and not exact):
        return
    what = f"has {count} categories" if exact else f"uses category ids up to {count - 1}"
    raise ValueError(
        f"{key} is {value} but dataset {name!r} {what}; set {key} to {count}, or to {AUTO} "
        "to take it from the data"
    )


def _is_coco_json(meta) -> bool:
    return (getattr(meta, "evaluator_type", None) == "coco"
            and isinstance(getattr(meta, "json_file", None), str)
            and isinstance(getattr(meta, "image_root", None), str))


def _write_json(path: str, data: Dict) -> None:
    # Every process of a distributed run writes the same file: move it into place whole.
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        json.dump(data, f, separators=(",", ":"))
    os.replace(tmp, path)


def _reregister_coco(name: str, json_file: str) -> None:
    fields = MetadataCatalog.get(name).as_dict()
    image_root = fields["image_root"]
    # user_datasets.register_spec compares a re-used name with the original JSON.
    fields["source_json_file"] = fields.get("source_json_file", fields["json_file"])
    for key in ("name", "json_file", "image_root", "evaluator_type"):
        del fields[key]
    DatasetCatalog.remove(name)
    MetadataCatalog.remove(name)
    register_coco_instances(name, fields, json_file, image_root)


def _validate_coco_json(cfg, name: str, skip: bool) -> None:
    meta = MetadataCatalog.get(name)
    with open(meta.json_file) as f:
        coco = json.load(f)
    _check_class_count(cfg, name, len(coco.get("categories", [])), exact=True)
    by_image = defaultdict(list)
    for anno in coco.get("annotations", []):
        by_image[anno.get("image_id")].append(anno)
    records = [{"image_id": image["id"], "annotations": by_image[image["id"]], "image": image,
                "file_name": os.path.join(meta.image_root, image["file_name"])}
               for image in coco["images"]]
    records, changed = _masked_records(name, records)
    kept = _readable_records(name, records, skip)
    if changed or len(kept) < len(records):
        coco["images"] = [r["image"] for r in kept]
        coco["annotations"] = [a for r in kept for a in r["annotations"]]
        path = os.path.abspath(os.path.join(cfg.OUTPUT_DIR, CLEANED_DIR, f"{name}.json"))
        _write_json(path, coco)
        _reregister_coco(name, path)
        logger.warning(f"Dataset {name!r} is registered again, with its cleaned copy {path} "
                       f"({len(records) - len(kept)} images left out): training and "
                       f"evaluation read it from here on")


def _validate_dicts(cfg, name: str, skip: bool) -> None:
    records = DatasetCatalog.get(name)
    meta = MetadataCatalog.get(name)  # after loading: loaders may set thing_classes
    if hasattr(meta, "thing_classes"):
        _check_class_count(cfg, name, len(meta.thing_classes), exact=True)
    else:
        ids = [a["category_id"] for r in records for a in r.get("annotations", ())
               if "category_id" in a]
        _check_class_count(cfg, name, max(ids) + 1 if ids else None, exact=False)
    cleaned, changed = _masked_records(name, records)
    kept = _readable_records(name, cleaned, skip)
    if changed or len(kept) < len(records):
        DatasetCatalog.remove(name)
        DatasetCatalog.register(name, lambda: copy.deepcopy(kept))
        logger.warning(f"Dataset {name!r} is registered again with its cleaned dicts "
                       f"({len(records) - len(kept)} images left out) for this run")


def validate_dataset(cfg, name: str) -> None:
    """Check the registered dataset ``name`` (see the module docstring); what is dropped,
    the dataset is re-registered without. Raises ValueError for data that cannot be used."""
    skip = cfg.DATALOADER.SKIP_BAD_IMAGES
    if _is_coco_json(MetadataCatalog.get(name)):
        _validate_coco_json(cfg, name, skip)
    else:
        _validate_dicts(cfg, name, skip)


def validate_datasets(cfg, train: bool = True) -> None:
    """:func:`validate_dataset` on DATASETS.TEST and, if ``train``, DATASETS.TRAIN.

    Evaluation datasets need masks as much as training ones: COCOEvaluator scores the
    predicted masks against them.
    """
    names = [*cfg.DATASETS.TRAIN] if train else []
    for name in dict.fromkeys([*names, *cfg.DATASETS.TEST]):
        validate_dataset(cfg, name)
