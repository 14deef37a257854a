"""The built-in panoptic data ``shapes_panoptic`` and the panoptic dataset dicts."""
import copy
import dataclasses
import glob
import json
import os

import cv2
import numpy as np
import pycocotools.mask as mask_util
import pytest
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.detection_utils import annotations_to_instances
from detectron2.structures import BoxMode

from instunique.data.datasets import check_dataset
from instunique.data.metadata import stuff_contiguous_ids, thing_contiguous_ids
from instunique.data.panoptic import (
    PanopticDataError,
    load_panoptic_json,
    panoptic_annotations,
    read_segment_ids,
)
from instunique.data.synthetic import shapes_panoptic
from instunique.data.synthetic.panoptic_files import panoptic_paths
from instunique.data.synthetic.shapes_panoptic import SHAPES_PANOPTIC
from instunique.data.synthetic.spec import ensure_splits, generate_split, register_synthetic

from utils import run_concurrently

NUM_IMAGES = 6
NUM_THINGS = 4


def _paths(root, split="train"):
    return panoptic_paths(os.path.join(str(root), SHAPES_PANOPTIC.folder), split)


def _files(root):
    """{relative path: bytes} of every file under the dataset folder."""
    base = os.path.join(str(root), SHAPES_PANOPTIC.folder)
    out = {}
    for path in sorted(glob.glob(os.path.join(base, "**", "*"), recursive=True)):
        if os.path.isfile(path):
            with open(path, "rb") as f:
                out[os.path.relpath(path, base)] = f.read()
    return out


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = tmp_path_factory.mktemp("panoptic")
    generate_split(SHAPES_PANOPTIC, str(root), "train", NUM_IMAGES, seed=0)
    return root


@pytest.fixture(scope="module")
def dicts(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("registered"))
    names = register_synthetic(SHAPES_PANOPTIC, root, prefix="test_pan", num_train=4,
                               num_val=2)
    yield DatasetCatalog.get(names[0])
    for name in names:
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)


def test_generation_is_deterministic_and_leaves_no_temporary(root, tmp_path):
    generate_split(SHAPES_PANOPTIC, str(tmp_path / "a"), "train", NUM_IMAGES, seed=0)
    first, second = _files(root), _files(tmp_path / "a")
    # Image, panoptic PNG and semantic PNG per image, and the JSON.
    assert len(first) == 3 * NUM_IMAGES + 1
    assert first == second
    assert not [p for p in first if ".tmp" in p]
    generate_split(SHAPES_PANOPTIC, str(tmp_path / "b"), "train", NUM_IMAGES, seed=5)
    assert _files(tmp_path / "b") != first


def test_a_failed_generation_leaves_no_json_and_is_redone(root, tmp_path):
    calls = []

    def failing(rng, size):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("disk full")
        return SHAPES_PANOPTIC.render(rng, size)

    with pytest.raises(RuntimeError):
        ensure_splits(dataclasses.replace(SHAPES_PANOPTIC, render=failing), str(tmp_path),
                      num_train=NUM_IMAGES, num_val=1)
    paths = _paths(tmp_path)
    # Without its JSON a split counts as absent; no temporary file is left behind.
    assert not os.path.exists(paths.panoptic_json)
    assert not glob.glob(str(tmp_path / "**" / "*.tmp*"), recursive=True)
    ensure_splits(SHAPES_PANOPTIC, str(tmp_path), num_train=NUM_IMAGES, num_val=1)
    assert {k: v for k, v in _files(tmp_path).items() if "val" not in k} == _files(root)


def test_concurrent_generation_writes_one_consistent_dataset(root, tmp_path):
    run_concurrently(lambda: ensure_splits(SHAPES_PANOPTIC, str(tmp_path), num_train=NUM_IMAGES,
                                           num_val=1))
    assert {k: v for k, v in _files(tmp_path).items() if "val" not in k} == _files(root)


def test_pngs_and_json_agree(root):
    paths = _paths(root)
    with open(paths.panoptic_json) as f:
        data = json.load(f)
    categories = {c["id"]: c for c in data["categories"]}
    assert [c["name"] for c in data["categories"]] == [
        "circle", "square", "triangle", "ring", "sky", "ground", "water"
    ]
    assert [c["isthing"] for c in data["categories"]] == [1, 1, 1, 1, 0, 0, 0]
    assert [a["image_id"] for a in data["annotations"]] == [i["id"] for i in data["images"]]
    stuff_seen = set()
    for image, ann in zip(data["images"], data["annotations"]):
        assert image["file_name"] == ann["file_name"]
        ids = read_segment_ids(os.path.join(paths.panoptic_root, ann["file_name"]))
        semantic = cv2.imread(os.path.join(paths.sem_seg_root, ann["file_name"]),
                              cv2.IMREAD_UNCHANGED)
        assert ids.shape == semantic.shape == (image["height"], image["width"])
        # Every pixel is in exactly one listed segment: no void, nothing unlisted.
        assert sorted(np.unique(ids).tolist()) == sorted(s["id"] for s in ann["segments_info"])
        stuff_classes = []
        for seg in ann["segments_info"]:
            mask = ids == seg["id"]
            assert seg["area"] == mask.sum()
            rows, cols = np.nonzero(mask)
            assert seg["bbox"] == [cols.min(), rows.min(), cols.max() - cols.min() + 1,
                                   rows.max() - rows.min() + 1]
            assert (semantic[mask] == seg["category_id"] - 1).all()
            assert seg["id"] // 1000 == seg["category_id"]
            if not categories[seg["category_id"]]["isthing"]:
                stuff_classes.append(seg["category_id"])
        # A stuff class is one segment per image; every image has things and stuff.
        assert len(stuff_classes) == len(set(stuff_classes)) >= 1
        assert len(ann["segments_info"]) > len(stuff_classes)
        stuff_seen.update(stuff_classes)
    assert len(stuff_seen) >= 2


def test_registration_metadata_and_dicts(dicts):
    meta = MetadataCatalog.get("test_pan_train")
    assert meta.evaluator_type == "coco_panoptic_seg"
    assert meta.thing_classes == meta.stuff_classes and len(meta.stuff_classes) == 7
    assert thing_contiguous_ids(meta) == (0, 1, 2, 3)
    assert stuff_contiguous_ids(meta) == (4, 5, 6)
    assert meta.ignore_label == 255 and meta.label_divisor == 1000
    assert len(dicts) == 4
    for d in dicts:
        assert os.path.isfile(d["file_name"]) and os.path.isfile(d["pan_seg_file_name"])
        assert os.path.isfile(d["sem_seg_file_name"])
        for seg in d["segments_info"]:
            assert seg["isthing"] == (seg["category_id"] < NUM_THINGS)
    # check_dataset accepts it: the files the metadata names exist.
    assert check_dataset("test_pan_train") is meta


def test_builtin_names_are_registered():
    for split in ("train", "val"):
        meta = MetadataCatalog.get(f"shapes_panoptic_{split}")
        assert f"shapes_panoptic_{split}" in DatasetCatalog.list()
        assert meta.evaluator_type == "coco_panoptic_seg"
    assert shapes_panoptic.SHAPES_PANOPTIC.stuff_classes == ["sky", "ground", "water"]


def test_panoptic_annotations_feed_detectron2(dicts):
    d = dicts[0]
    ids = read_segment_ids(d["pan_seg_file_name"])
    annos = panoptic_annotations(d)
    assert [a["id"] for a in annos] == [s["id"] for s in d["segments_info"]]
    for anno, seg in zip(annos, d["segments_info"]):
        assert np.array_equal(mask_util.decode(anno["segmentation"]).astype(bool),
                              ids == seg["id"])
        assert anno["category_id"] == seg["category_id"] and anno["isthing"] == seg["isthing"]
        assert anno["bbox_mode"] == BoxMode.XYWH_ABS and anno["bbox"] == seg["bbox"]
    inst = annotations_to_instances(annos, ids.shape, mask_format="bitmask")
    assert inst.gt_classes.tolist() == [s["category_id"] for s in d["segments_info"]]
    assert inst.gt_masks.tensor.sum(0).eq(1).all()  # the segments tile the image


def test_missing_png_names_the_file_and_image_id(dicts):
    d = copy.deepcopy(dicts[1])
    d["pan_seg_file_name"] = d["pan_seg_file_name"].replace(".png", "_gone.png")
    with pytest.raises(FileNotFoundError) as e:
        panoptic_annotations(d)
    assert d["pan_seg_file_name"] in str(e.value)
    assert f"image id {d['image_id']}" in str(e.value)


@pytest.mark.parametrize("fault", ["unlisted", "absent", "duplicate", "size"])
def test_mismatched_segment_ids_name_the_file_and_image_id(dicts, fault):
    d = copy.deepcopy(dicts[1])
    segments = d["segments_info"]
    if fault == "unlisted":  # a segment of the PNG that the JSON lacks
        missing = segments.pop(0)["id"]
    elif fault == "absent":  # a JSON segment that the PNG lacks
        segments.append({**segments[0], "id": 999999})
        missing = 999999
    elif fault == "duplicate":
        segments.append(dict(segments[0]))
        missing = segments[0]["id"]
    else:
        d["height"] += 1
        missing = d["height"]
    with pytest.raises(PanopticDataError) as e:
        panoptic_annotations(d)
    message = str(e.value)
    assert d["pan_seg_file_name"] in message
    assert f"image id {d['image_id']}" in message
    assert str(missing) in message


def test_unknown_category_in_json_names_the_json_and_image_id(root, dicts, tmp_path):
    paths = _paths(root)
    with open(paths.panoptic_json) as f:
        data = json.load(f)
    data["annotations"][2]["segments_info"][0]["category_id"] = 42
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(data))
    meta = MetadataCatalog.get("test_pan_train").as_dict()
    with pytest.raises(PanopticDataError, match=r"bad\.json: image id 3, .*category_id 42"):
        load_panoptic_json(str(bad), paths.image_root, paths.panoptic_root, meta)
