"""The synthetic ``shapes`` dataset: files, content, registration and dataset checks."""

import glob
import json
import os
import subprocess
import sys
import textwrap

import cv2
import numpy as np
import pycocotools.mask as mask_util
import pytest
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.detection_utils import annotations_to_instances
from detectron2.structures import BoxMode

from instunique.data.datasets import DatasetNotRegisteredError, check_dataset
from instunique.data.synthetic import shapes
from instunique.data.synthetic.shapes import (
    SHAPES_CLASSES,
    ensure_shapes,
    generate_shapes,
    register_shapes,
    shapes_paths,
)

from utils import run_concurrently

NUM_IMAGES = 20
SIZE = 128


def _load(root, split):
    json_file, image_root = shapes_paths(str(root), split)
    with open(json_file) as f:
        coco = json.load(f)
    return coco, image_root


def _png_bytes(image_root):
    out = {}
    for path in sorted(glob.glob(os.path.join(image_root, "*.png"))):
        with open(path, "rb") as f:
            out[os.path.basename(path)] = f.read()
    return out


def _masks_by_image(coco):
    """{image_id: [(category_id, (H, W) bool mask), ...]}."""
    by_image = {img["id"]: [] for img in coco["images"]}
    for ann in coco["annotations"]:
        mask = mask_util.decode(ann["segmentation"]).astype(bool)
        by_image[ann["image_id"]].append((ann["category_id"], mask))
    return by_image


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = tmp_path_factory.mktemp("d2data")
    generate_shapes(str(root), "train", NUM_IMAGES, seed=0)
    generate_shapes(str(root), "val", NUM_IMAGES, seed=1)
    return root


def test_generation_is_deterministic(root, tmp_path):
    generate_shapes(str(tmp_path), "train", NUM_IMAGES, seed=0)
    for r in (root, tmp_path):
        assert os.path.isfile(shapes_paths(str(r), "train")[0])
    with open(shapes_paths(str(root), "train")[0], "rb") as a:
        with open(shapes_paths(str(tmp_path), "train")[0], "rb") as b:
            assert a.read() == b.read()
    first = _png_bytes(shapes_paths(str(root), "train")[1])
    second = _png_bytes(shapes_paths(str(tmp_path), "train")[1])
    assert len(first) == NUM_IMAGES
    assert first == second
    # No temporary files are left behind.
    assert not glob.glob(os.path.join(str(tmp_path), "shapes", "**", "*.tmp*"), recursive=True)


def test_train_and_val_share_no_image(root):
    train = set(_png_bytes(shapes_paths(str(root), "train")[1]).values())
    val = set(_png_bytes(shapes_paths(str(root), "val")[1]).values())
    assert len(train) == len(val) == NUM_IMAGES
    assert not train & val


def test_coco_json_is_consistent_with_masks_and_images(root):
    coco, image_root = _load(root, "train")
    assert [c["name"] for c in sorted(coco["categories"], key=lambda c: c["id"])] == SHAPES_CLASSES
    assert len(coco["images"]) == NUM_IMAGES
    assert len({a["id"] for a in coco["annotations"]}) == len(coco["annotations"])
    assert min(a["id"] for a in coco["annotations"]) >= 1
    for img in coco["images"]:
        pixels = cv2.imread(os.path.join(image_root, img["file_name"]))
        assert pixels.shape == (img["height"], img["width"], 3) == (SIZE, SIZE, 3)
    for ann in coco["annotations"]:
        assert isinstance(ann["segmentation"]["counts"], str)
        assert ann["iscrowd"] == 0 and 1 <= ann["category_id"] <= len(SHAPES_CLASSES)
        mask = mask_util.decode(ann["segmentation"])
        assert mask.shape == (SIZE, SIZE)
        assert ann["area"] == int(mask.sum())
        ys, xs = np.nonzero(mask)
        x0, y0 = xs.min(), ys.min()
        assert ann["bbox"] == [x0, y0, xs.max() - x0 + 1, ys.max() - y0 + 1]


def test_visible_masks_are_disjoint_and_large_enough(root):
    coco, _ = _load(root, "train")
    layout = shapes._SHAPES_LAYOUT
    for instances in _masks_by_image(coco).values():
        assert layout.min_instances <= len(instances) <= layout.max_instances
        stack = np.stack([m for _, m in instances])
        assert stack.sum(0).max() == 1  # every pixel belongs to at most one instance
        assert stack.sum((1, 2)).min() >= layout.min_visible_px


def test_same_class_instances_touch_and_look_alike(root):
    coco, image_root = _load(root, "train")
    kernel = np.ones((3, 3), np.uint8)
    touching_pairs, images_with_repeats = 0, 0
    class_colours = {c: [] for c in range(1, len(SHAPES_CLASSES) + 1)}
    for img in coco["images"]:
        pixels = cv2.imread(os.path.join(image_root, img["file_name"])).astype(np.float64)
        instances = _masks_by_image(coco)[img["id"]]
        cats = [c for c, _ in instances]
        images_with_repeats += len(set(cats)) < len(cats)
        dilated = [cv2.dilate(m.astype(np.uint8), kernel).astype(bool) for _, m in instances]
        means = [pixels[m].mean(0) for _, m in instances]
        for i in range(len(instances)):
            class_colours[cats[i]].append(means[i])
            for j in range(i + 1, len(instances)):
                if cats[i] != cats[j]:
                    continue
                touching_pairs += bool((dilated[i] & instances[j][1]).any())
                # Same class, same image: one shared colour up to a small shade jitter.
                assert np.abs(means[i] - means[j]).max() < 25
    assert images_with_repeats >= NUM_IMAGES // 2
    assert touching_pairs >= 5
    # Across images a class keeps its hue band but varies in shade.
    for colours in class_colours.values():
        assert len(colours) >= 3
        assert np.std(np.array(colours), axis=0).max() > 5


def test_register_load_and_convert_to_instances(tmp_path):
    root = tmp_path / "root"
    names = register_shapes(str(root), prefix="t_shapes_load", num_train=4, num_val=6)
    assert names == ["t_shapes_load_train", "t_shapes_load_val"]
    assert not root.exists()  # registration must not touch the disk
    meta = MetadataCatalog.get("t_shapes_load_val")
    assert meta.evaluator_type == "coco"
    assert meta.thing_classes == SHAPES_CLASSES
    assert len(meta.thing_colors) == len(SHAPES_CLASSES)

    dicts = DatasetCatalog.get("t_shapes_load_val")  # generates both splits on first load
    assert len(dicts) == 6 and len(DatasetCatalog.get("t_shapes_load_train")) == 4
    assert os.path.isfile(meta.json_file) and os.path.isdir(meta.image_root)
    for d in dicts:
        assert os.path.isfile(d["file_name"]) and (d["height"], d["width"]) == (SIZE, SIZE)
        annos = d["annotations"]
        assert all(a["bbox_mode"] == BoxMode.XYWH_ABS for a in annos)
        inst = annotations_to_instances(annos, (SIZE, SIZE), mask_format="bitmask")
        assert inst.gt_masks.tensor.shape == (len(annos), SIZE, SIZE)
        assert inst.gt_classes.min() >= 0 and inst.gt_classes.max() < len(SHAPES_CLASSES)
        areas = inst.gt_masks.tensor.flatten(1).sum(1).tolist()
        assert areas == [float(mask_util.area(a["segmentation"])) for a in annos]
        # Boxes in XYXY enclose their masks exactly.
        boxes = inst.gt_masks.get_bounding_boxes().tensor
        assert np.allclose(boxes.numpy(), inst.gt_boxes.tensor.numpy())

    with pytest.raises(ValueError, match="already registered"):
        register_shapes(str(root), prefix="t_shapes_load")


def test_default_registration_and_check_dataset(tmp_path):
    assert {"shapes_train", "shapes_val"} <= set(DatasetCatalog.list())
    meta = MetadataCatalog.get("shapes_val")
    assert meta.json_file.endswith(os.path.join("shapes", "annotations", "instances_val.json"))
    assert meta.thing_dataset_id_to_contiguous_id == {1: 0, 2: 1, 3: 2, 4: 3}

    with pytest.raises(DatasetNotRegisteredError) as info:
        check_dataset("nonexistent")
    assert isinstance(info.value, KeyError)
    message = str(info.value)
    assert "'nonexistent'" in message and "shapes_train" in message and "coco_2017_val" in message
    with pytest.raises(DatasetNotRegisteredError, match="Did you mean 'shapes_val'"):
        check_dataset("shapes_vall")
    with pytest.raises(ValueError, match="must be a str"):
        check_dataset(["shapes_val"])

    # A shapes dataset is generated by the check.
    register_shapes(str(tmp_path), prefix="t_shapes_check", num_train=2, num_val=3)
    meta = check_dataset("t_shapes_check_val")
    assert meta.name == "t_shapes_check_val"
    with open(meta.json_file) as f:
        assert len(json.load(f)["images"]) == 3


def test_missing_coco_names_layout_and_registration_touches_no_disk(tmp_path):
    # detectron2 reads DETECTRON2_DATASETS when it is imported: use a fresh interpreter.
    code = textwrap.dedent(
        """
        import os, sys
        from instunique.data.datasets import check_dataset
        assert os.listdir(sys.argv[1]) == [], os.listdir(sys.argv[1])
        try:
            check_dataset("coco_2017_val")
        except FileNotFoundError as e:
            print(e)
        else:
            raise SystemExit("no error")
        assert os.listdir(sys.argv[1]) == [], os.listdir(sys.argv[1])
        """
    )
    env = dict(os.environ, DETECTRON2_DATASETS=str(tmp_path))
    proc = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path)], env=env, capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    assert "'coco_2017_val'" in out
    assert "$DETECTRON2_DATASETS/coco/annotations/instances_val2017.json" in out
    assert "$DETECTRON2_DATASETS/coco/val2017/" in out
    assert str(tmp_path) in out


def test_concurrent_ensure_shapes_writes_one_consistent_dataset(tmp_path):
    # Two loaders racing on a fresh root (e.g. two GPU processes) must not corrupt it.
    run_concurrently(lambda: ensure_shapes(str(tmp_path / "race"), num_train=8, num_val=4))
    generate_shapes(str(tmp_path / "ref"), "train", 8, seed=0)
    for split, num in (("train", 8), ("val", 4)):
        coco, image_root = _load(tmp_path / "race", split)
        assert len(coco["images"]) == num
        assert len(_png_bytes(image_root)) == num
    with open(shapes_paths(str(tmp_path / "race"), "train")[0], "rb") as a:
        with open(shapes_paths(str(tmp_path / "ref"), "train")[0], "rb") as b:
            assert a.read() == b.read()
    assert _png_bytes(shapes_paths(str(tmp_path / "race"), "train")[1]) == _png_bytes(
        shapes_paths(str(tmp_path / "ref"), "train")[1]
    )


def test_prepare_datasets_generates_checks_and_names_what_is_missing(tmp_path):
    """train_net's one data step: built-in data generated, the class count taken from it,
    unknown names fail before a model exists; --eval-only (train=False) does not read
    DATASETS.TRAIN."""
    from detectron2.config import get_cfg

    from instunique.config import add_instunique_config
    from instunique.data.prepare import prepare_datasets

    register_shapes(str(tmp_path), prefix="t_shapes_prep", num_train=2, num_val=2)
    cfg = get_cfg()
    add_instunique_config(cfg)
    cfg.DATASETS.TRAIN = ("t_shapes_prep_no_such_split",)
    cfg.DATASETS.TEST = ("t_shapes_prep_val",)
    cfg.MODEL.ROI_HEADS.NUM_CLASSES = -1  # taken from the data
    prepare_datasets(cfg, train=False)
    assert cfg.MODEL.ROI_HEADS.NUM_CLASSES == 4
    assert os.path.exists(MetadataCatalog.get("t_shapes_prep_val").json_file)
    with pytest.raises(DatasetNotRegisteredError, match="t_shapes_prep_no_such_split"):
        prepare_datasets(cfg, train=True)
