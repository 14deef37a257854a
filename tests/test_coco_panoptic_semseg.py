"""COCO panoptic with semantic PNGs: the preparation tool's class maps, the registration of
``coco_2017_*_panoptic_with_sem_seg`` and the message when the PNGs were never made."""
import json
import os
import sys

import cv2
import numpy as np
import pytest
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.datasets.builtin_meta import COCO_CATEGORIES
from detectron2.evaluation import COCOEvaluator, COCOPanopticEvaluator, SemSegEvaluator

from instunique.data.coco_panoptic_semseg import (
    COCO_SEMSEG_SPLITS,
    register_coco_panoptic_with_sem_seg,
    semantic_from_panoptic,
)
from instunique.data.datasets import check_dataset
from instunique.evaluation import build_dataset_evaluators

from utils import ROOT, get_config

sys.path.insert(0, os.path.join(ROOT, "tools"))
import prepare_coco_semantic_from_panoptic as prepare  # noqa: E402

PERSON, CAR, SKY = 1, 3, 187  # COCO category ids: two things and a stuff class
RANK = {c["id"]: i for i, c in enumerate(COCO_CATEGORIES)}


def _write_coco(root):
    """A val2017 split of two 8x6 images: image 1 has a person (segment 1), a car
    (segment 513, id over two channels) and sky; image 2 a crowd of cars and void."""
    coco = os.path.join(root, "coco")
    for folder in ("annotations", "val2017", "panoptic_val2017"):
        os.makedirs(os.path.join(coco, folder), exist_ok=True)
    ids = [np.zeros((6, 8), np.int64), np.zeros((6, 8), np.int64)]
    ids[0][:, :2], ids[0][:, 2:5], ids[0][:, 5:] = 1, 513, 2000
    ids[1][:3] = 7
    segments = [
        [{"id": 1, "category_id": PERSON, "iscrowd": 0}, {"id": 513, "category_id": CAR,
                                                          "iscrowd": 0},
         {"id": 2000, "category_id": SKY, "iscrowd": 0}],
        [{"id": 7, "category_id": CAR, "iscrowd": 1}],
    ]
    images, annotations = [], []
    for k, (seg_ids, info) in enumerate(zip(ids, segments), 1):
        name = f"{k:012d}"
        cv2.imwrite(os.path.join(coco, "val2017", name + ".jpg"), np.full((6, 8, 3), 90, np.uint8))
        rgb = np.stack([seg_ids % 256, seg_ids // 256 % 256, seg_ids // 65536], -1)
        cv2.imwrite(os.path.join(coco, "panoptic_val2017", name + ".png"),
                    rgb[..., ::-1].astype(np.uint8))
        images.append({"id": k, "file_name": name + ".jpg", "height": 6, "width": 8})
        annotations.append({"image_id": k, "file_name": name + ".png", "segments_info": info})
    categories = [{"id": c["id"], "name": c["name"], "isthing": c["isthing"]}
                  for c in COCO_CATEGORIES]
    with open(os.path.join(coco, "annotations", "panoptic_val2017.json"), "w") as f:
        json.dump({"images": images, "annotations": annotations, "categories": categories}, f)
    with open(os.path.join(coco, "annotations", "instances_val2017.json"), "w") as f:
        json.dump({"images": images, "annotations": [], "categories": []}, f)
    return coco


def _register(tmp_path):
    """The two names registered under tmp_path (as they are under $DETECTRON2_DATASETS)."""
    for name in COCO_SEMSEG_SPLITS:
        if name in DatasetCatalog.list():
            DatasetCatalog.remove(name)
            MetadataCatalog.remove(name)
    register_coco_panoptic_with_sem_seg(str(tmp_path))


@pytest.fixture
def restore_registration():
    yield
    for name in COCO_SEMSEG_SPLITS:
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)
    from instunique.data.datasets import _builtin_root

    register_coco_panoptic_with_sem_seg(_builtin_root())


def test_semantic_map_by_hand():
    ids = np.array([[0, 5, 5], [9, 9, 6]])
    info = [{"id": 5, "category_id": 10}, {"id": 9, "category_id": 30},
            {"id": 6, "category_id": 10, "iscrowd": 1}]
    semantic = semantic_from_panoptic(ids, info, {10: 0, 30: 132})
    assert semantic.dtype == np.uint8
    assert semantic.tolist() == [[255, 0, 0], [132, 132, 255]]


def test_tool_writes_class_maps_and_the_dataset_loads_them(tmp_path, capsys,
                                                          restore_registration):
    coco = _write_coco(str(tmp_path))
    assert prepare.main(["--root", coco, "--splits", "val2017", "--workers", "1"]) == 0
    assert "val2017: wrote 2 semantic PNGs" in capsys.readouterr().out
    out = os.path.join(coco, "panoptic_semseg_val2017")
    first = cv2.imread(os.path.join(out, "000000000001.png"), cv2.IMREAD_UNCHANGED)
    assert first.shape == (6, 8)
    assert (first[:, :2] == RANK[PERSON]).all() and (first[:, 2:5] == RANK[CAR]).all()
    assert (first[:, 5:] == RANK[SKY]).all() and RANK[SKY] > 79  # stuff after the 80 things
    second = cv2.imread(os.path.join(out, "000000000002.png"), cv2.IMREAD_UNCHANGED)
    assert (second == 255).all()  # crowd and void
    # A rerun keeps what is there.
    assert prepare.main(["--root", coco, "--splits", "val2017", "--workers", "1"]) == 0
    assert "wrote 0 semantic PNGs" in capsys.readouterr().out

    _register(tmp_path)
    name = "coco_2017_val_panoptic_with_sem_seg"
    meta = check_dataset(name)
    assert meta.evaluator_type == "coco_panoptic_seg" and meta.sem_seg_root == out
    assert len(meta.stuff_dataset_id_to_contiguous_id) == 133
    assert len(meta.thing_dataset_id_to_contiguous_id) == 80
    dicts = DatasetCatalog.get(name)
    assert [d["sem_seg_file_name"] for d in dicts] == [
        os.path.join(out, "000000000001.png"), os.path.join(out, "000000000002.png")]
    assert [s["category_id"] for s in dicts[0]["segments_info"]] == [
        RANK[PERSON], RANK[CAR], RANK[SKY]]
    # The COCO panoptic config tests on it: PQ, mIoU and the things' mask AP.
    cfg = get_config("coco/panoptic-segmentation/mask2former_R50_bs16_50ep.yaml")
    assert cfg.DATASETS.TEST == (name,)
    evaluators = build_dataset_evaluators(cfg, name, str(tmp_path / "eval"))
    assert [type(e) for e in evaluators] == [COCOPanopticEvaluator, SemSegEvaluator,
                                             COCOEvaluator]


def test_missing_semantic_pngs_say_how_to_make_them(tmp_path, restore_registration):
    _write_coco(str(tmp_path))
    _register(tmp_path)
    with pytest.raises(FileNotFoundError) as e:
        check_dataset("coco_2017_val_panoptic_with_sem_seg")
    message = str(e.value)
    assert "sem_seg_root = " in message and "panoptic_semseg_val2017" in message
    assert "tools/prepare_coco_semantic_from_panoptic.py" in message


def test_tool_names_a_wrong_root(tmp_path):
    with pytest.raises(SystemExit, match="annotations/panoptic_val2017.json does not exist: "
                                         "--root must be the COCO folder"):
        prepare.main(["--root", str(tmp_path), "--splits", "val2017"])
