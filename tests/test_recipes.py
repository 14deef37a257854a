"""The small-data recipes and the Mask R-CNN anchor: each config builds, trains a few
iterations through train_net.py and evaluates."""
import json
import os
import sys

import pytest
from detectron2.engine import default_argument_parser

from instunique.data.synthetic.blobs import BLOBS
from instunique.data.synthetic.spec import register_synthetic

from utils import CONFIGS, ROOT, tiny_opts

sys.path.insert(0, ROOT)
import train_net  # noqa: E402


@pytest.fixture(scope="module")
def tiny_blobs(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("recipes"))
    register_synthetic(BLOBS, root, prefix="tiny_blobs", num_train=2, num_val=1, image_size=96)
    return "tiny_blobs"


def _run(config, out_dir, prefix, *opts):
    argv = [
        "--config-file", os.path.join(CONFIGS, config),
        "DATASETS.TRAIN", f"('{prefix}_train',)", "DATASETS.TEST", f"('{prefix}_val',)",
        "INPUT.MIN_SIZE_TRAIN", "(96,)", "INPUT.MAX_SIZE_TRAIN", "96",
        "INPUT.MIN_SIZE_TEST", "96", "INPUT.MAX_SIZE_TEST", "96", "INPUT.IMAGE_SIZE", "96",
        "SOLVER.IMS_PER_BATCH", "2", "SOLVER.MAX_ITER", "2", "SOLVER.WARMUP_ITERS", "1",
        "DATALOADER.NUM_WORKERS", "0", "OUTPUT_DIR", str(out_dir), *[str(o) for o in opts],
    ]
    train_net.main(default_argument_parser().parse_args(argv))
    with open(os.path.join(out_dir, "metrics.json")) as f:
        return [json.loads(line) for line in f]


def test_mask_rcnn_anchor_trains_and_evaluates_masks(tiny_blobs, tmp_path):
    rows = _run("blobs/mask_rcnn_R18_FPN_blobs.yaml", tmp_path, tiny_blobs)
    train = [r for r in rows if "loss_mask" in r]
    assert train and all(r["loss_mask"] > 0 and r["loss_rpn_cls"] > 0 for r in train)
    final = rows[-1]
    # Evaluated as instance segmentation by the same COCOEvaluator as our models.
    assert "segm/AP" in final and "bbox/AP" in final


@pytest.mark.parametrize("config", ["blobs/mask2former_blobs.yaml"])
def test_mask2former_recipe_trains_and_evaluates(config, tiny_blobs, tmp_path):
    rows = _run(config, tmp_path, tiny_blobs, *tiny_opts())
    train = [r for r in rows if "loss_dice" in r]
    assert train and all(r["loss_dice"] > 0 for r in train)
    assert "segm/AP" in rows[-1]


def test_sparseinst_recipe_trains_and_evaluates(tiny_blobs, tmp_path):
    rows = _run("blobs/sparseinst_blobs.yaml", tmp_path, tiny_blobs)
    train = [r for r in rows if "loss_dice" in r]
    assert train and all(r["loss_dice"] > 0 and r["loss_objectness"] > 0 for r in train)
    assert "segm/AP" in rows[-1]
