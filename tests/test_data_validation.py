"""Data checked before the first iteration (instunique.data.validation): every bad-data case
stops with a message naming the dataset, image id and file, or is dropped with a logged
count and ids, and what is dropped reaches both the loader and COCOEvaluator."""
import json
import logging
import os
import re
import sys

import cv2
import numpy as np
import pytest
import torch
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.datasets import register_coco_instances
from detectron2.data.detection_utils import annotations_to_instances
from detectron2.engine import default_argument_parser
from detectron2.evaluation import COCOEvaluator
from detectron2.structures import Instances

from instunique.data import InstanceViewMapper
from instunique.data.user_datasets import setup_user_datasets
from instunique.data.validation import CLEANED_DIR, validate_datasets

from utils import CONFIGS, ROOT, get_config

sys.path.insert(0, ROOT)
import train_net  # noqa: E402

CONFIG = "shapes/mask2former_shapes.yaml"
SIZE = 32
SQUARE = [[4, 4, 14, 4, 14, 14, 4, 14]]
LOGGER = "instunique.data.validation"


def _write(root, annos=((1, SQUARE), (2, SQUARE)), num_images=2, num_categories=1):
    """A COCO dataset of ``num_images`` PNGs (ids from 1); ``annos``: (image id,
    segmentation or None for none), annotation ids from 1. Returns (json, image_root)."""
    image_root = os.path.join(root, "images")
    os.makedirs(image_root, exist_ok=True)
    images = []
    for i in range(1, num_images + 1):
        name = f"{i:03d}.png"
        cv2.imwrite(os.path.join(image_root, name), np.full((SIZE, SIZE, 3), 30 * i, np.uint8))
        images.append({"id": i, "file_name": name, "height": SIZE, "width": SIZE})
    annotations = []
    for k, (image_id, segm) in enumerate(annos, 1):
        anno = {"id": k, "image_id": image_id, "category_id": 1, "bbox": [4, 4, 10, 10],
                "area": 100, "iscrowd": 0}
        if segm is not None:
            anno["segmentation"] = segm
        annotations.append(anno)
    categories = [{"id": c, "name": f"c{c}"} for c in range(1, num_categories + 1)]
    json_file = os.path.join(root, "instances.json")
    with open(json_file, "w") as f:
        json.dump({"images": images, "annotations": annotations, "categories": categories}, f)
    return json_file, image_root


def _register(tmp_path, tag="d", **kwargs):
    """:func:`_write` under tmp_path, registered as a COCO dataset; returns its name."""
    name = f"{tag}_{tmp_path.name}"
    json_file, image_root = _write(str(tmp_path / tag), **kwargs)
    register_coco_instances(name, {}, json_file, image_root)
    return name


def _cfg(tmp_path, train=(), test=(), *opts):
    return get_config(CONFIG, "DATASETS.TRAIN", tuple(train), "DATASETS.TEST", tuple(test),
                      "MODEL.SEM_SEG_HEAD.NUM_CLASSES", 1, "OUTPUT_DIR", str(tmp_path / "out"),
                      *opts)


def _image(name, image_id):
    return os.path.join(MetadataCatalog.get(name).image_root, f"{image_id:03d}.png")


def _warnings(caplog):
    return "\n".join(r.getMessage() for r in caplog.records if r.name == LOGGER)


def test_box_only_dataset_fails_naming_it(tmp_path):
    name = _register(tmp_path, annos=((1, None), (2, None)))
    with pytest.raises(ValueError, match=re.escape(
            f"dataset {name!r}: none of its 2 annotations has a usable mask (2 without "
            "'segmentation'")) as e:
        validate_datasets(_cfg(tmp_path, train=[name]))
    assert "box-only" in str(e.value)


def test_annotations_without_a_mask_are_dropped_with_their_ids(tmp_path, caplog):
    name = _register(tmp_path, annos=((1, SQUARE), (2, None), (2, SQUARE), (1, [])))
    json_file = MetadataCatalog.get(name).json_file
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        validate_datasets(_cfg(tmp_path, train=[name]))
    assert (f"dataset {name!r}: dropped 2 of 4 annotations without 'segmentation' (no mask); "
            "annotation ids: 2, 4") in _warnings(caplog)
    cleaned = os.path.join(str(tmp_path), "out", CLEANED_DIR, f"{name}.json")
    assert (f"Dataset {name!r} is registered again, with its cleaned copy "
            f"{os.path.abspath(cleaned)}") in _warnings(caplog)
    # The loader gets the kept annotations only, from a cleaned copy of the JSON.
    records = DatasetCatalog.get(name)
    assert [len(r["annotations"]) for r in records] == [1, 1]
    assert all("segmentation" in a for r in records for a in r["annotations"])
    meta = MetadataCatalog.get(name)
    assert meta.json_file == str(tmp_path / "out" / CLEANED_DIR / f"{name}.json")
    assert meta.source_json_file == json_file


@pytest.mark.parametrize("case", ["missing", "garbage", "truncated"])
def test_unreadable_image_fails_naming_dataset_image_id_and_file(tmp_path, case):
    name = _register(tmp_path)
    path = _image(name, 2)
    if case == "missing":
        os.remove(path)
    else:
        with open(path, "rb") as f:
            data = f.read()
        with open(path, "wb") as f:
            f.write(b"no image here" if case == "garbage" else data[: len(data) // 2])
    with pytest.raises(ValueError) as e:
        validate_datasets(_cfg(tmp_path, train=[name]))
    message = str(e.value)
    assert message.startswith(f"dataset {name!r}: 1 of 2 images cannot be read: "
                              f"image id 2, file {path!r}: "), message
    assert ("file not found" if case == "missing" else "cannot be decoded") in message
    assert message.endswith("set DATALOADER.SKIP_BAD_IMAGES True to leave them out")


def test_skip_bad_images_leaves_them_out_with_a_count(tmp_path, caplog):
    name = _register(tmp_path, annos=((1, SQUARE), (2, SQUARE), (3, SQUARE)), num_images=3)
    os.remove(_image(name, 1))
    with open(_image(name, 3), "wb") as f:
        f.write(b"broken")
    cfg = _cfg(tmp_path, [name], (), "DATALOADER.SKIP_BAD_IMAGES", True)
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        validate_datasets(cfg)
    log = _warnings(caplog)
    assert f"dataset {name!r}: 2 of 3 images cannot be read: image id 1" in log
    assert "; image id 3, file" in log and "Left out (DATALOADER.SKIP_BAD_IMAGES)" in log
    records = DatasetCatalog.get(name)
    assert [(r["image_id"], len(r["annotations"])) for r in records] == [(2, 1)]
    with open(MetadataCatalog.get(name).json_file) as f:
        cleaned = json.load(f)  # what COCOEvaluator reads
    assert [i["id"] for i in cleaned["images"]] == [2]
    assert [a["image_id"] for a in cleaned["annotations"]] == [2]


def test_skipping_every_image_still_fails(tmp_path):
    name = _register(tmp_path, num_images=1, annos=((1, SQUARE),))
    os.remove(_image(name, 1))
    with pytest.raises(ValueError, match=f"dataset '{name}': 1 of 1 images cannot be read"):
        validate_datasets(_cfg(tmp_path, [name], (), "DATALOADER.SKIP_BAD_IMAGES", True))


def test_more_categories_than_classes_fails_naming_key_value_and_dataset(tmp_path):
    name = _register(tmp_path, num_categories=3)  # no thing_classes: unknown before loading
    with pytest.raises(ValueError, match=re.escape(
            f"MODEL.SEM_SEG_HEAD.NUM_CLASSES is 1 but dataset {name!r} has 3 categories; set "
            "MODEL.SEM_SEG_HEAD.NUM_CLASSES to 3")):
        validate_datasets(_cfg(tmp_path, test=[name]), train=False)


def _dict_dataset(tmp_path, annotations):
    """A dataset registered as plain dicts (no JSON, no thing_classes), image id 7."""
    json_file, image_root = _write(str(tmp_path / "raw"), num_images=1, annos=())
    name = f"dicts_{tmp_path.name}"
    record = {"file_name": os.path.join(image_root, "001.png"), "image_id": 7,
              "height": SIZE, "width": SIZE, "annotations": annotations}
    DatasetCatalog.register(name, lambda: [dict(record)])
    return name


def test_category_ids_of_plain_dicts_are_checked_against_the_class_key(tmp_path):
    name = _dict_dataset(tmp_path, [{"category_id": 4, "bbox": [4, 4, 10, 10],
                                     "bbox_mode": 1, "segmentation": SQUARE}])
    cfg = _cfg(tmp_path, [name], (), "MODEL.META_ARCHITECTURE", "SparseInst",
               "MODEL.SPARSE_INST.DECODER.NUM_CLASSES", 4)
    with pytest.raises(ValueError, match=re.escape(
            f"MODEL.SPARSE_INST.DECODER.NUM_CLASSES is 4 but dataset {name!r} uses category "
            "ids up to 4; set MODEL.SPARSE_INST.DECODER.NUM_CLASSES to 5")):
        validate_datasets(cfg)


def test_plain_dicts_lose_bad_polygons_and_are_re_registered(tmp_path, caplog):
    anno = {"category_id": 0, "bbox": [4, 4, 10, 10], "bbox_mode": 1}
    name = _dict_dataset(tmp_path, [{**anno, "segmentation": SQUARE},
                                    {**anno, "segmentation": [[1, 1, 2, 2]]}])
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        validate_datasets(_cfg(tmp_path, [name]))
    assert "annotation ids: #1 of image 7" in _warnings(caplog)
    assert [a["segmentation"] for a in DatasetCatalog.get(name)[0]["annotations"]] == [SQUARE]


def _evaluate(name):
    """COCO mask AP of the loaded ground truth used as predictions."""
    evaluator = COCOEvaluator(name, tasks=("segm",), distributed=False, output_dir=None,
                              use_fast_impl=False)
    evaluator.reset()
    for record in DatasetCatalog.get(name):
        gt = annotations_to_instances(record["annotations"], (SIZE, SIZE), mask_format="bitmask")
        outputs = Instances((SIZE, SIZE), pred_boxes=gt.gt_boxes, scores=torch.ones(len(gt)),
                            pred_classes=gt.gt_classes, pred_masks=gt.gt_masks.tensor)
        evaluator.process([{"image_id": record["image_id"]}], [{"instances": outputs}])
    return evaluator.evaluate()["segm"]["AP"]


@pytest.mark.parametrize("polygon", [[20, 20, 25, 25], [20, 20, 25, 20, 25]],
                         ids=["2 points", "odd count"])
def test_bad_polygon_in_an_eval_dataset_no_longer_breaks_coco_evaluation(tmp_path, caplog,
                                                                          polygon):
    name = _register(tmp_path, annos=((1, SQUARE), (2, SQUARE), (1, [polygon])))
    # detectron2's loader drops annotation 3, but COCOEvaluator reads the JSON itself:
    # pycocotools takes a 4-number polygon for a box and fails ("Argument 'bb' has
    # incorrect type"); the odd one stays a ground truth that no prediction can match.
    try:
        broken = _evaluate(name) < 100.0
    except TypeError:
        broken = True
    assert broken
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        validate_datasets(_cfg(tmp_path, test=[name]), train=False)
    assert (f"dataset {name!r}: dropped 1 of 3 annotations whose every polygon has fewer "
            "than 3 points or an odd number of coordinates; annotation ids: 3"
            ) in _warnings(caplog)
    assert _evaluate(name) == pytest.approx(100.0)


def test_bad_polygon_beside_good_ones_is_dropped_alone(tmp_path, caplog):
    name = _register(tmp_path, annos=((1, SQUARE), (2, [[1, 1, 2, 2], *SQUARE])))
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        validate_datasets(_cfg(tmp_path, test=[name]), train=False)
    assert "kept their other polygons; annotation ids: 2" in _warnings(caplog)
    assert [a["segmentation"] for r in DatasetCatalog.get(name) for a in r["annotations"]
            ] == [SQUARE, SQUARE]
    assert _evaluate(name) == pytest.approx(100.0)


def test_setup_checks_train_sets_unless_eval_only(tmp_path):
    box_only = _register(tmp_path, "boxes", annos=((1, None),), num_images=1)
    good = _register(tmp_path, "good")

    def setup(*flags):
        argv = ["--config-file", os.path.join(CONFIGS, CONFIG), *flags, "MODEL.DEVICE", "cpu",
                "DATASETS.TRAIN", f"('{box_only}',)", "DATASETS.TEST", f"('{good}',)",
                "MODEL.SEM_SEG_HEAD.NUM_CLASSES", "1", "OUTPUT_DIR", str(tmp_path / "out")]
        return train_net.setup(default_argument_parser().parse_args(argv))

    with pytest.raises(ValueError, match=f"dataset '{box_only}': none of its 1 annotations"):
        setup()
    assert setup("--eval-only").DATASETS.TEST == (good,)


def test_user_dataset_cleaned_once_is_still_the_same_entry(tmp_path):
    json_file, image_root = _write(str(tmp_path / "user"), annos=((1, SQUARE), (2, None)))
    name = f"user_{tmp_path.name}"
    for _ in range(2):  # train then evaluate in one process: the entry is registered again
        cfg = _cfg(tmp_path, [name], [name], "DATASETS.REGISTER",
                   f"('{name}={json_file}:{image_root}',)")
        setup_user_datasets(cfg)
        validate_datasets(cfg)
    assert MetadataCatalog.get(name).source_json_file == json_file
    assert sum(len(r["annotations"]) for r in DatasetCatalog.get(name)) == 1


def test_unreadable_image_mid_training_names_dataset_image_id_and_file(tmp_path):
    name = _register(tmp_path)
    record = DatasetCatalog.get(name)[1]
    with open(record["file_name"], "wb") as f:
        f.write(b"overwritten after the check")
    mapper = InstanceViewMapper(_cfg(tmp_path, [name]), is_train=True)
    with pytest.raises(OSError, match=re.escape(
            f"cannot read image {record['file_name']!r} (image id 2) of dataset {name!r}: ")):
        mapper(record)


@pytest.mark.parametrize("key, what", [("pan_seg_file_name", "panoptic PNG"),
                                       ("sem_seg_file_name", "semantic PNG")])
def test_missing_label_png_fails_before_training_naming_it_and_the_image_id(tmp_path, key,
                                                                              what):
    json_file, image_root = _write(str(tmp_path / "d"))
    records = [{"file_name": os.path.join(image_root, f"{i:03d}.png"), "image_id": i,
                "height": SIZE, "width": SIZE, "segments_info": [],
                key: os.path.join(image_root, f"{i:03d}.png")} for i in (1, 2)]
    missing = str(tmp_path / "labels" / "002.png")
    records[1][key] = missing
    name = f"labels_{key}_{tmp_path.name}"
    DatasetCatalog.register(name, lambda: records)
    with pytest.raises(ValueError) as e:
        validate_datasets(_cfg(tmp_path, train=[name]))
    assert f"dataset {name!r}: 1 of 2 images cannot be read: image id 2, {what} " \
           f"{missing!r}: file not found" in str(e.value)
