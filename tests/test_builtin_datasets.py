"""The built-in synthetic datasets beside ``shapes``: ``blobs``, ``shapes_crowd`` and
``shapes_diverse``."""
import glob
import json
import os

import cv2
import numpy as np
import pycocotools.mask as mask_util
import pytest
from detectron2.data import DatasetCatalog, MetadataCatalog

from instunique.data.datasets import check_dataset
from instunique.data.synthetic.blobs import BLOBS
from instunique.data.synthetic.shapes import SHAPES, SHAPES_CROWD
from instunique.data.synthetic.shapes_diverse import SHAPES_DIVERSE
from instunique.data.synthetic.spec import (
    dataset_paths,
    ensure_splits,
    generate_split,
    register_synthetic,
)

from utils import run_concurrently


def _files(spec, root, split):
    json_file, image_root = dataset_paths(spec, str(root), split)
    out = {}
    for path in sorted(glob.glob(os.path.join(image_root, "*.png")) + [json_file]):
        with open(path, "rb") as f:
            out[os.path.basename(path)] = f.read()
    return out


def _instances(spec, root, split):
    """{image_id: (N, H, W) bool masks} and the coco dict."""
    with open(dataset_paths(spec, str(root), split)[0]) as f:
        coco = json.load(f)
    masks = {img["id"]: [] for img in coco["images"]}
    for ann in coco["annotations"]:
        masks[ann["image_id"]].append(mask_util.decode(ann["segmentation"]).astype(bool))
    return {k: np.stack(v) for k, v in masks.items()}, coco


@pytest.mark.parametrize("spec", [BLOBS, SHAPES_CROWD, SHAPES_DIVERSE], ids=lambda s: s.folder)
def test_generation_is_deterministic_and_atomic(spec, tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    generate_split(spec, str(a), "train", 3, seed=0)
    generate_split(spec, str(b), "train", 3, seed=0)
    assert _files(spec, a, "train") == _files(spec, b, "train")
    generate_split(spec, str(b), "train", 3, seed=5)
    assert _files(spec, a, "train") != _files(spec, b, "train")
    # Racing writers on a fresh root leave one complete, identical dataset and no temporary.
    run_concurrently(lambda: ensure_splits(spec, str(tmp_path / "race"), num_train=3, num_val=2))
    assert _files(spec, tmp_path / "race", "train") == _files(spec, a, "train")
    leftovers = glob.glob(str(tmp_path / "race" / "**" / "*.tmp*"), recursive=True)
    assert leftovers == []


def test_blobs_are_many_small_touching_look_alikes(tmp_path):
    generate_split(BLOBS, str(tmp_path), "val", 4, seed=1)
    by_image, coco = _instances(BLOBS, tmp_path, "val")
    assert {c["name"] for c in coco["categories"]} == {"blob"}
    assert all(img["height"] == img["width"] == 256 for img in coco["images"])
    for masks in by_image.values():
        assert 15 <= len(masks) <= 60
        areas = masks.sum((1, 2))
        assert areas.min() >= 15 and np.median(areas) < 250  # a few dozen to ~200 px
        assert masks.sum(0).max() == 1  # visible parts never overlap
        # Most instances touch another: dilating a mask by one pixel reaches a neighbour.
        grown = masks.copy()
        grown[:, 1:] |= masks[:, :-1]
        grown[:, :-1] |= masks[:, 1:]
        grown[:, :, 1:] |= masks[:, :, :-1]
        grown[:, :, :-1] |= masks[:, :, 1:]
        others = masks.sum(0, keepdims=True) - masks
        touching = (grown & (others > 0)).any((1, 2))
        assert touching.mean() > 0.4


def test_crowd_images_hold_one_class_in_one_colour(tmp_path):
    generate_split(SHAPES_CROWD, str(tmp_path), "val", 4, seed=1)
    by_image, coco = _instances(SHAPES_CROWD, tmp_path, "val")
    image_root = dataset_paths(SHAPES_CROWD, str(tmp_path), "val")[1]
    for img in coco["images"]:
        cats = {a["category_id"] for a in coco["annotations"] if a["image_id"] == img["id"]}
        masks = by_image[img["id"]]
        assert len(cats) == 1 and 8 <= len(masks) <= 20
        image = cv2.imread(os.path.join(image_root, img["file_name"])).astype(int)
        # Same colour: instance means differ by the sensor noise's few levels only.
        means = np.stack([image[m].mean(0) for m in masks])
        assert np.abs(means - means.mean(0)).max() < 4


def _touching(masks):
    """(N, N) bool: mask i dilated by one pixel reaches mask j (i != j)."""
    grown = masks.copy()
    grown[:, 1:] |= masks[:, :-1]
    grown[:, :-1] |= masks[:, 1:]
    grown[:, :, 1:] |= masks[:, :, :-1]
    grown[:, :, :-1] |= masks[:, :, 1:]
    out = (grown[:, None] & masks[None]).any((2, 3))
    np.fill_diagonal(out, False)
    return out


def _same_class_pairs(spec, root):
    """Per same-class instance pair of one image: (distance of their mean colours, distance
    of their colour spreads, whether they touch)."""
    generate_split(spec, str(root), "val", 12, seed=1)
    by_image, coco = _instances(spec, root, "val")
    image_root = dataset_paths(spec, str(root), "val")[1]
    pairs = []
    for img in coco["images"]:
        cats = [a["category_id"] for a in coco["annotations"] if a["image_id"] == img["id"]]
        masks = by_image[img["id"]]
        image = cv2.imread(os.path.join(image_root, img["file_name"])).astype(float)
        touch = _touching(masks)
        for i in range(len(cats)):
            for j in range(i + 1, len(cats)):
                if cats[i] == cats[j]:
                    a, b = image[masks[i]], image[masks[j]]
                    pairs.append((np.linalg.norm(a.mean(0) - b.mean(0)),
                                  np.linalg.norm(a.std(0) - b.std(0)), touch[i, j]))
    return np.array(pairs)


def test_diverse_instances_of_one_class_look_different_and_touch(tmp_path):
    generate_split(SHAPES_DIVERSE, str(tmp_path), "val", 12, seed=1)
    by_image, coco = _instances(SHAPES_DIVERSE, tmp_path, "val")
    assert len(coco["categories"]) == 6
    for img in coco["images"]:
        cats = [a["category_id"] for a in coco["annotations"] if a["image_id"] == img["id"]]
        assert 3 <= len(cats) <= 12 and len(set(cats)) < len(cats)  # a class repeats
        assert by_image[img["id"]].sum(0).max() == 1
    diverse = _same_class_pairs(SHAPES_DIVERSE, tmp_path / "diverse")
    # Two instances of one class in one image: their colours lie far apart (RGB levels),
    # where in ``shapes`` they share one colour; and same-class neighbours touch.
    assert np.median(diverse[:, 0]) > 80 and (diverse[:, 0] > 40).mean() > 0.9
    assert diverse[:, 2].sum() >= 5
    alike = _same_class_pairs(SHAPES, tmp_path / "shapes")
    assert np.median(alike[:, 0]) < 20
    # Textures differ too: the spread of colours inside one instance is its own.
    assert np.median(diverse[:, 1]) > 3 * np.median(alike[:, 1])


def test_builtin_names_are_registered_and_materialize(tmp_path):
    for name in ("blobs_train", "blobs_val", "shapes_crowd_train", "shapes_crowd_val",
                 "shapes_diverse_train", "shapes_diverse_val"):
        assert name in DatasetCatalog.list()
    names = register_synthetic(BLOBS, str(tmp_path), prefix="t_blobs", num_train=2, num_val=1)
    meta = check_dataset(names[1])
    assert meta.thing_classes == ["blob"] and meta.evaluator_type == "coco"
    assert len(DatasetCatalog.get(names[0])) == 2
    assert MetadataCatalog.get(names[0]).thing_dataset_id_to_contiguous_id == {1: 0}
