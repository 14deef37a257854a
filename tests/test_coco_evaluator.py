"""detectron2's COCOEvaluator on the synthetic shapes val set (pycocotools COCOeval)."""

import pytest
import torch
from detectron2.data import DatasetCatalog
from detectron2.data.detection_utils import annotations_to_instances
from detectron2.evaluation import COCOEvaluator
from detectron2.structures import Instances

from instunique.data.datasets import check_dataset
from instunique.data.synthetic.shapes import register_shapes


@pytest.fixture(scope="module")
def val_name(tmp_path_factory):
    root = tmp_path_factory.mktemp("d2data")
    register_shapes(str(root), prefix="t_shapes_eval", num_train=1, num_val=8)
    name = "t_shapes_eval_val"
    check_dataset(name)  # COCOEvaluator opens metadata.json_file when built
    return name


def _ground_truth_predictions(record, keep_every=1):
    h, w = record["height"], record["width"]
    gt = annotations_to_instances(record["annotations"], (h, w), mask_format="bitmask")
    gt = gt[torch.arange(len(gt))[::keep_every]]
    return Instances(
        (h, w),
        pred_boxes=gt.gt_boxes,
        scores=torch.ones(len(gt)),
        pred_classes=gt.gt_classes,
        pred_masks=gt.gt_masks.tensor,
    )


def _evaluate(name, keep_every=1):
    evaluator = COCOEvaluator(
        name, tasks=("bbox", "segm"), distributed=False, output_dir=None, use_fast_impl=False
    )
    evaluator.reset()
    for record in DatasetCatalog.get(name):
        outputs = {"instances": _ground_truth_predictions(record, keep_every)}
        evaluator.process([{"image_id": record["image_id"]}], [outputs])
    return evaluator.evaluate()


def test_ground_truth_as_prediction_scores_100(val_name):
    results = _evaluate(val_name)
    assert results["segm"]["AP"] == pytest.approx(100.0)
    assert results["bbox"]["AP"] == pytest.approx(100.0)
    for cls in ("circle", "square", "triangle", "ring"):
        assert results["segm"][f"AP-{cls}"] == pytest.approx(100.0)


def test_dropping_half_the_instances_lowers_ap(val_name):
    results = _evaluate(val_name, keep_every=2)
    for task in ("segm", "bbox"):
        assert 10.0 < results[task]["AP"] < 90.0
