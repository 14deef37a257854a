"""The evaluators of a dataset, chosen by its metadata's ``evaluator_type``."""
import logging
import os
from typing import List, Set

from detectron2.evaluation import (
    COCOEvaluator,
    COCOPanopticEvaluator,
    DatasetEvaluator,
    SemSegEvaluator,
)

from ..data.metadata import dataset_metadata

__all__ = ["build_dataset_evaluators", "model_outputs"]

logger = logging.getLogger(__name__)

# Meta-architectures whose inference follows MODEL.MASK_FORMER.TEST's switches.
_MASK_FORMER_TEST_SWITCHES = {"Mask2Former"}


def model_outputs(cfg) -> Set[str]:
    """The keys of the model's per-image inference outputs ("instances", "sem_seg",
    "panoptic_seg"); an InstUnique model's are those of its base segmenter."""
    arch = cfg.MODEL.META_ARCHITECTURE
    if arch == "InstUnique":
        arch = cfg.MODEL.INST_UNIQUE.BASE_META_ARCHITECTURE
    if arch not in _MASK_FORMER_TEST_SWITCHES:
        return {"instances"}
    test = cfg.MODEL.MASK_FORMER.TEST
    switches = (("sem_seg", test.SEMANTIC_ON), ("instances", test.INSTANCE_ON),
                ("panoptic_seg", test.PANOPTIC_ON))
    return {key for key, on in switches if on}


def _has_file(meta, field: str) -> bool:
    path = getattr(meta, field, None)
    return isinstance(path, str) and os.path.exists(path)


def _require(outputs: Set[str], key: str, dataset_name: str, evaluator_type: str, switch: str):
    if key not in outputs:
        raise ValueError(
            f"dataset {dataset_name!r} is evaluated as {evaluator_type!r}, which needs the "
            f"model's {key!r} output: set {switch} (a Mask2Former model) or evaluate on "
            f"another dataset"
        )


def build_dataset_evaluators(cfg, dataset_name: str, output_folder: str) -> List[DatasetEvaluator]:
    """The evaluators of ``dataset_name`` by its ``evaluator_type``:

    - "coco": COCOEvaluator (box and mask AP);
    - "coco_panoptic_seg": COCOPanopticEvaluator (PQ, PQ_th, PQ_st); with SEMANTIC_ON and
      semantic PNGs (metadata ``sem_seg_root``) also SemSegEvaluator (mIoU); with
      INSTANCE_ON and an instances JSON (metadata ``json_file``) also COCOEvaluator;
    - "sem_seg": SemSegEvaluator.

    Raises:
        ValueError: another evaluator type, or a model that does not produce the output
            the dataset is scored on; the message names the dataset.
    """
    meta = dataset_metadata(dataset_name)
    evaluator_type = getattr(meta, "evaluator_type", None)
    outputs = model_outputs(cfg)
    test = "MODEL.MASK_FORMER.TEST."
    if evaluator_type == "coco":
        _require(outputs, "instances", dataset_name, evaluator_type, test + "INSTANCE_ON")
        return [COCOEvaluator(dataset_name, output_dir=output_folder)]
    if evaluator_type == "sem_seg":
        _require(outputs, "sem_seg", dataset_name, evaluator_type, test + "SEMANTIC_ON")
        return [SemSegEvaluator(dataset_name, output_dir=output_folder)]
    if evaluator_type == "coco_panoptic_seg":
        _require(outputs, "panoptic_seg", dataset_name, evaluator_type, test + "PANOPTIC_ON")
        evaluators: List[DatasetEvaluator] = [COCOPanopticEvaluator(dataset_name, output_folder)]
        if "sem_seg" in outputs:
            if _has_file(meta, "sem_seg_root"):
                evaluators.append(SemSegEvaluator(dataset_name, output_dir=output_folder))
            else:
                logger.info("%s has no semantic PNGs (sem_seg_root): no mIoU", dataset_name)
        if "instances" in outputs:
            if _has_file(meta, "json_file"):
                evaluators.append(COCOEvaluator(dataset_name, output_dir=output_folder))
            else:
                logger.info("%s has no instances JSON (json_file): no mask AP", dataset_name)
        return evaluators
    raise ValueError(
        f"dataset {dataset_name!r} has evaluator_type {evaluator_type!r}; train_net.py "
        "evaluates 'coco' (instances), 'coco_panoptic_seg' and 'sem_seg'"
    )
