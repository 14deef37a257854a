"""Importing instunique next to the official ``mask2former`` package, in either order.

The official package is not installed here: what it registers in detectron2's global
registries (names from facebookresearch/Mask2Former) is registered as stand-in classes.
"""
import os
import subprocess
import sys
import textwrap

import pytest
from detectron2.modeling import (
    BACKBONE_REGISTRY,
    META_ARCH_REGISTRY,
    SEM_SEG_HEADS_REGISTRY,
    build_model,
)
from torch import nn

from instunique.segmenters.mask2former import InstUniqueMaskFormerHead

from utils import ROOT, get_config, tiny_opts

# detectron2 registry -> names the official mask2former and mask2former_video register.
OFFICIAL_NAMES = {
    "SEM_SEG_HEADS_REGISTRY": ["MaskFormerHead", "PerPixelBaselineHead",
                               "PerPixelBaselinePlusHead", "BasePixelDecoder",
                               "TransformerEncoderPixelDecoder", "MSDeformAttnPixelDecoder"],
    "META_ARCH_REGISTRY": ["MaskFormer", "VideoMaskFormer"],
    "BACKBONE_REGISTRY": ["D2SwinTransformer"],
}
REGISTRIES = {"SEM_SEG_HEADS_REGISTRY": SEM_SEG_HEADS_REGISTRY,
              "META_ARCH_REGISTRY": META_ARCH_REGISTRY, "BACKBONE_REGISTRY": BACKBONE_REGISTRY}


def _heads(model):
    return getattr(model, "segmenter", model).sem_seg_head


def test_official_names_registered_after_ours(request):
    """instunique imported first (as in this process), then the official package."""
    added = []

    def unregister():
        for registry, name in added:
            registry._obj_map.pop(name)

    request.addfinalizer(unregister)
    stand_ins = {}
    for registry_name, names in OFFICIAL_NAMES.items():
        registry = REGISTRIES[registry_name]
        for name in names:
            stand_ins[name] = type(name, (nn.Module,), {})
            registry.register(stand_ins[name])  # raises if ours held the name
            added.append((registry, name))

    for config in ("shapes/mask2former_shapes.yaml", "shapes/instunique_mask2former_shapes.yaml"):
        head = _heads(build_model(get_config(config, *tiny_opts())))
        assert type(head) is InstUniqueMaskFormerHead, config
    assert SEM_SEG_HEADS_REGISTRY.get("MaskFormerHead") is stand_ins["MaskFormerHead"]


_OFFICIAL_FIRST = textwrap.dedent("""
    import json, sys
    from detectron2.modeling import BACKBONE_REGISTRY, META_ARCH_REGISTRY, SEM_SEG_HEADS_REGISTRY
    from detectron2.modeling import build_model
    from torch import nn

    names = json.loads(sys.argv[1])
    for registry_name, registry_names in names.items():
        for name in registry_names:
            globals()[registry_name].register(type(name, (nn.Module,), {"official": True}))

    import instunique  # noqa: E402
    from utils import get_config, tiny_opts  # noqa: E402

    for registry_name, registry_names in names.items():
        for name in registry_names:
            assert getattr(globals()[registry_name].get(name), "official", False), name
    model = build_model(get_config("shapes/instunique_mask2former_shapes.yaml", *tiny_opts()))
    print(type(model.segmenter.sem_seg_head).__name__)
""")


def test_official_names_registered_before_ours():
    """The official package imported first: instunique imports, leaves the official
    classes in place and still builds its models from configs naming MaskFormerHead."""
    import json

    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [os.path.join(ROOT, "tests"), os.environ.get("PYTHONPATH", "")]))
    run = subprocess.run([sys.executable, "-c", _OFFICIAL_FIRST, json.dumps(OFFICIAL_NAMES)],
                         capture_output=True, text=True, env=env, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.strip().splitlines()[-1] == "InstUniqueMaskFormerHead"


def test_head_names_in_configs():
    opts = tiny_opts()
    cfg = get_config("shapes/mask2former_shapes.yaml", *opts,
                     "MODEL.SEM_SEG_HEAD.NAME", "InstUniqueMaskFormerHead")
    assert type(build_model(cfg).sem_seg_head) is InstUniqueMaskFormerHead
    cfg = get_config("shapes/mask2former_shapes.yaml", *opts, "MODEL.SEM_SEG_HEAD.NAME", "Nope")
    with pytest.raises(KeyError, match="MODEL.SEM_SEG_HEAD.NAME='Nope' is not a registered "
                                       "segmentation head; known: .*'MaskFormerHead'"):
        build_model(cfg)


_DATASETS_EITHER_ORDER = textwrap.dedent("""
    import sys
    from detectron2.data import DatasetCatalog, MetadataCatalog
    names = ["coco_2017_train_panoptic_with_sem_seg", "coco_2017_val_panoptic_with_sem_seg"]

    def official():  # what mask2former registers at its import (it fails on a name taken)
        for name in names:
            DatasetCatalog.register(name, lambda: [])
            MetadataCatalog.get(name).set(official=True)

    if sys.argv[1] == "official first":
        official()
        import instunique  # noqa: F401
        from instunique.data.datasets import check_dataset
        print(check_dataset(names[1]).official)
    else:
        import instunique  # noqa: F401
        official()
        print(MetadataCatalog.get(names[1]).official)
""")


@pytest.mark.parametrize("order", ["official first", "ours first"])
def test_official_coco_panoptic_dataset_names_in_either_order(order):
    run = subprocess.run([sys.executable, "-c", _DATASETS_EITHER_ORDER, order],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.strip().splitlines()[-1] == "True"
