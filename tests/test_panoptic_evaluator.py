"""The evaluators of a dataset (train_net.py's choice by evaluator_type) and PQ itself."""
import cv2
import pytest
import torch
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.evaluation import COCOEvaluator, COCOPanopticEvaluator, SemSegEvaluator

from instunique.data.panoptic import read_segment_ids
from instunique.data.synthetic.shapes import SHAPES
from instunique.data.synthetic.shapes_panoptic import SHAPES_PANOPTIC
from instunique.data.synthetic.spec import materialize_synthetic, register_synthetic
from instunique.evaluation import build_dataset_evaluators, model_outputs

from utils import get_config

PANOPTIC = "shapes/mask2former_panoptic_shapes.yaml"
NUM_CLASSES = 7


@pytest.fixture(scope="module")
def datasets(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("evaluated"))
    names = register_synthetic(SHAPES_PANOPTIC, root, prefix="eval_pan", num_train=1,
                               num_val=5)
    names += register_synthetic(SHAPES, root, prefix="eval_inst", num_train=1, num_val=2)
    for name in names:
        materialize_synthetic(name)
    yield {"panoptic": "eval_pan_val", "instances": "eval_inst_val"}
    for name in names:
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)


def _ground_truth_as_predictions(dicts, drop_first_thing_of=None):
    """Model-style outputs equal to the ground truth: panoptic from the panoptic PNG,
    semantic scores one-hot from the semantic PNG."""
    inputs, outputs = [], []
    for d in dicts:
        ids = torch.from_numpy(read_segment_ids(d["pan_seg_file_name"])).int()
        info = [{"id": s["id"], "category_id": s["category_id"], "isthing": s["isthing"]}
                for s in d["segments_info"]]
        if d["image_id"] == drop_first_thing_of:
            first = next(s for s in info if s["isthing"])
            ids[ids == first["id"]] = 0
            info.remove(first)
        semantic = torch.from_numpy(cv2.imread(d["sem_seg_file_name"], cv2.IMREAD_UNCHANGED))
        scores = torch.nn.functional.one_hot(semantic.long(), NUM_CLASSES).permute(2, 0, 1)
        inputs.append({"file_name": d["file_name"], "image_id": d["image_id"]})
        outputs.append({"panoptic_seg": (ids, info), "sem_seg": scores.float()})
    return inputs, outputs


def _evaluate(evaluators, inputs, outputs):
    results = {}
    for evaluator in evaluators:
        evaluator.reset()
        for x, y in zip(inputs, outputs):
            evaluator.process([x], [y])
        results.update(evaluator.evaluate())
    return results


def test_ground_truth_scores_pq_100_and_miou_100(datasets, tmp_path):
    name = datasets["panoptic"]
    evaluators = build_dataset_evaluators(get_config(PANOPTIC), name, str(tmp_path))
    assert [type(e) for e in evaluators] == [COCOPanopticEvaluator, SemSegEvaluator]
    results = _evaluate(evaluators, *_ground_truth_as_predictions(DatasetCatalog.get(name)))
    pq = results["panoptic_seg"]
    assert pq["PQ"] == pytest.approx(100) and pq["PQ_th"] == pytest.approx(100)
    assert pq["PQ_st"] == pytest.approx(100)
    assert results["sem_seg"]["mIoU"] == pytest.approx(100)


def test_a_missing_thing_lowers_pq_things_only(datasets, tmp_path):
    name = datasets["panoptic"]
    evaluators = build_dataset_evaluators(get_config(PANOPTIC), name, str(tmp_path))[:1]
    inputs, outputs = _ground_truth_as_predictions(DatasetCatalog.get(name), 1)
    pq = _evaluate(evaluators, inputs, outputs)["panoptic_seg"]
    assert pq["PQ_th"] < 100 and pq["PQ_st"] == pytest.approx(100) and pq["PQ"] < 100


def test_evaluators_follow_the_evaluator_type_and_the_model_outputs(datasets, tmp_path):
    out = str(tmp_path)
    cfg = get_config(PANOPTIC, "MODEL.MASK_FORMER.TEST.INSTANCE_ON", "True")
    assert model_outputs(cfg) == {"sem_seg", "panoptic_seg", "instances"}
    # No instances JSON for shapes_panoptic: no COCOEvaluator.
    assert [type(e) for e in build_dataset_evaluators(cfg, datasets["panoptic"], out)] == [
        COCOPanopticEvaluator, SemSegEvaluator
    ]
    no_sem = get_config(PANOPTIC, "MODEL.MASK_FORMER.TEST.SEMANTIC_ON", "False")
    assert [type(e) for e in build_dataset_evaluators(no_sem, datasets["panoptic"], out)] == [
        COCOPanopticEvaluator
    ]
    # COCO panoptic through detectron2's builtin registration: no semantic PNGs there.
    coco = get_config("coco/panoptic-segmentation/mask2former_R50_bs16_50ep.yaml")
    assert [type(e) for e in build_dataset_evaluators(coco, "coco_2017_val_panoptic", out)] == [
        COCOPanopticEvaluator
    ]
    instances = get_config("shapes/mask2former_shapes.yaml")
    assert [type(e) for e in build_dataset_evaluators(instances, datasets["instances"], out)] == [
        COCOEvaluator
    ]


def test_unusable_combinations_are_refused_naming_the_dataset(datasets, tmp_path):
    out = str(tmp_path)
    instance_model = get_config("shapes/mask2former_shapes.yaml")
    with pytest.raises(ValueError, match="eval_pan_val.*PANOPTIC_ON"):
        build_dataset_evaluators(instance_model, datasets["panoptic"], out)
    sparseinst = get_config("shapes/instunique_sparseinst_shapes.yaml")
    assert model_outputs(sparseinst) == {"instances"}
    with pytest.raises(ValueError, match="eval_pan_val"):
        build_dataset_evaluators(sparseinst, datasets["panoptic"], out)
    with pytest.raises(ValueError, match="cityscapes_fine_instance_seg_val.*'cityscapes_instance'"):
        build_dataset_evaluators(instance_model, "cityscapes_fine_instance_seg_val", out)
