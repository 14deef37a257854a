"""The panoptic configs: the official COCO panoptic model's parameters, shapes panoptic."""

import pytest
from detectron2.modeling import build_model

from utils import get_config, read_reference


@pytest.mark.parametrize("path", [
    "coco/panoptic-segmentation/mask2former_R50_bs16_50ep.yaml",
    "coco/panoptic-segmentation/instunique_mask2former_R50_bs16_50ep.yaml",
])
def test_coco_panoptic_state_dict_matches_official_reference(path):
    cfg = get_config(path)
    model = build_model(cfg)
    ours = [(k, tuple(v.shape)) for k, v in model.state_dict().items()
            if not k.startswith("memory.")]
    assert ours == read_reference("m2f_coco_panoptic_R50.tsv")
    assert tuple(cfg.DATASETS.TRAIN) == ("coco_2017_train_panoptic",)
    test = cfg.MODEL.MASK_FORMER.TEST
    assert test.PANOPTIC_ON and test.SEMANTIC_ON and test.INSTANCE_ON


def test_coco_panoptic_instunique_has_stuff_targets_of_the_53_stuff_classes():
    model = build_model(get_config(
        "coco/panoptic-segmentation/instunique_mask2former_R50_bs16_50ep.yaml"))
    assert model.cross_image.stuff_classes == tuple(range(80, 133))
    # Panoptic inference reads the things of DATASETS.TEST[0] (COCO's first 80 classes).
    assert model.segmenter.thing_classes == tuple(range(80))
