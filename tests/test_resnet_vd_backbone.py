"""SparseInst's ResNet-vd(-DCN) backbone: official names and shapes, deformable convs on the CPU,
output strides, FREEZE_AT, config errors, timm checkpoint loading, and the DCN configs."""
import math
import os
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.config import get_cfg
from detectron2.layers import FrozenBatchNorm2d
from detectron2.modeling import BACKBONE_REGISTRY, build_backbone, build_model
from torch import nn
from torchvision.ops import deform_conv2d

from instunique.segmenters.sparseinst.resnet_vd import BottleneckVd, build_resnet_vd_backbone

from utils import get_config

DATA = Path(__file__).resolve().parent / "data"
CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "coco" / "instance-segmentation"


def _cfg(*opts):
    """The official R50-vd-DCN backbone settings (reference sparseinst_R50vd_dcn_giam.cfg.yaml)."""
    cfg = get_cfg()
    cfg.MODEL.BACKBONE.NAME = "build_resnet_vd_backbone"
    cfg.MODEL.BACKBONE.FREEZE_AT = 0
    cfg.MODEL.RESNETS.NORM = "FrozenBN"
    cfg.MODEL.RESNETS.STRIDE_IN_1X1 = False
    cfg.MODEL.RESNETS.OUT_FEATURES = ["res3", "res4", "res5"]
    cfg.MODEL.RESNETS.DEFORM_ON_PER_STAGE = [False, False, True, True]
    cfg.merge_from_list(list(opts))
    return cfg


@pytest.fixture(scope="module")
def r50_dcn():
    torch.manual_seed(0)
    return build_backbone(_cfg())


def _randomize(module: nn.Module, seed: int) -> None:
    """Random weights and norm statistics (variances kept positive)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in module.state_dict().items():
            if t.is_floating_point():
                lo = 0.5 if name.endswith("running_var") else -0.5
                t.copy_(torch.rand(t.shape, generator=g) + lo)


def _ceil_div(hw, stride):
    """Every level halves the previous one rounding up, so level k has ceil(H / stride_k)."""
    return tuple(math.ceil(n / stride) for n in hw)


def test_state_dict_matches_official(r50_dcn):
    assert BACKBONE_REGISTRY.get("build_resnet_vd_backbone") is build_resnet_vd_backbone
    rows = (DATA / "sparseinst_R50vd_dcn_giam.tsv").read_text().splitlines()
    official = [tuple(r.split("\t")) for r in rows if r.startswith("backbone.")]
    ours = [
        (f"backbone.{k}", str(tuple(v.shape)), str(v.dtype).replace("torch.", ""))
        for k, v in r50_dcn.state_dict().items()
    ]
    assert len(official) == 293
    assert ours == official


def test_offset_convs_start_at_zero(r50_dcn):
    offsets = {k: v for k, v in r50_dcn.state_dict().items() if "conv2_offset" in k}
    # Every block of layer3 (6) and layer4 (3) has a weight and a bias; no other stage has any.
    assert len(offsets) == 2 * (6 + 3)
    assert all(k.startswith(("layer3.", "layer4.")) for k in offsets)
    assert all(torch.count_nonzero(v) == 0 for v in offsets.values())


@pytest.mark.parametrize("modulated,groups", [(False, 1), (False, 2), (True, 1)])
def test_deformable_block_with_zero_offsets_is_plain_block(modulated, groups):
    torch.manual_seed(0)
    kwargs = dict(stride=2, norm="BN", deform_modulated=modulated, deform_num_groups=groups)
    deform = BottleneckVd(16, 8, deform=True, **kwargs).eval()
    plain = BottleneckVd(16, 8, deform=False, **kwargs).eval()
    _randomize(deform, seed=1)
    nn.init.zeros_(deform.conv2_offset.weight)
    nn.init.zeros_(deform.conv2_offset.bias)
    state = deform.state_dict()
    if modulated:  # a zero mask logit weighs every tap by sigmoid(0) = 1/2
        state["conv2.weight"] = state["conv2.weight"] * 0.5
    missing, unexpected = plain.load_state_dict(state, strict=False)
    assert missing == [] and unexpected == ["conv2_offset.weight", "conv2_offset.bias"]
    assert deform.conv2_offset.out_channels == (27 if modulated else 18) * groups

    x = torch.randn(2, 16, 9, 11)
    with torch.no_grad():
        out = deform(x)
        expected = plain(x)
    assert out.shape == (2, 32, 5, 6)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    if modulated:
        # detectron2's order: offsets, then mask logits. Saturated masks give the plain conv.
        with torch.no_grad():
            deform.conv2_offset.bias[18:] = 30.0
            plain.conv2.weight.mul_(2.0)
            torch.testing.assert_close(deform(x), plain(x), rtol=1e-5, atol=1e-5)
    # A non-zero offset must change the result, or the comparisons above prove nothing.
    nn.init.constant_(deform.conv2_offset.bias, 0.7)
    with torch.no_grad():
        assert not torch.allclose(deform(x), expected, atol=1e-3)


@pytest.mark.parametrize("axis", [0, 1])
def test_offset_channels_are_dy_dx_pairs(axis):
    """The official checkpoints' conv2_offset was trained for detectron2's DeformConv, which reads
    channel 2k as the row and 2k + 1 as the column shift of tap k; torchvision must agree."""
    torch.manual_seed(0)
    x = torch.randn(1, 4, 7, 8)
    weight = torch.randn(5, 4, 3, 3)
    offset = torch.zeros(1, 18, 7, 8)
    offset[:, axis::2] = 1.0  # every tap samples one pixel further down (rows) or right
    # That is a plain conv whose zero padding moves from before to after the shifted axis:
    # pad (left, right, top, bottom).
    padded = F.pad(x, (1, 1, 0, 2) if axis == 0 else (0, 2, 1, 1))
    out = deform_conv2d(x, offset, weight, padding=1)
    torch.testing.assert_close(out, F.conv2d(padded, weight), rtol=1e-5, atol=1e-5)


def test_forward_backward_odd_size_on_cpu(r50_dcn):
    x = torch.randn(1, 3, 37, 45)
    out = r50_dcn(x)
    shapes = r50_dcn.output_shape()
    assert list(out) == list(shapes) == ["res3", "res4", "res5"]
    assert [(s.channels, s.stride) for s in shapes.values()] == [(512, 8), (1024, 16), (2048, 32)]
    for name, feat in out.items():
        stride = shapes[name].stride
        assert feat.shape == (1, shapes[name].channels, *_ceil_div((37, 45), stride))
        assert torch.isfinite(feat).all()

    g = torch.Generator().manual_seed(0)
    loss = sum((f * torch.randn(f.shape, generator=g)).mean() for f in out.values())
    r50_dcn.zero_grad()
    loss.backward()
    grads = {k: p.grad for k, p in r50_dcn.named_parameters()}
    assert all(g is not None and torch.isfinite(g).all() for g in grads.values())
    # Gradients reach the offsets although they start at zero, so they can learn.
    for block in ("layer3.0", "layer4.2"):
        assert grads[f"{block}.conv2_offset.weight"].abs().sum() > 0
        assert grads[f"{block}.conv2.weight"].abs().sum() > 0
    assert grads["conv1.0.weight"].abs().sum() > 0


@pytest.mark.parametrize("freeze_at", [0, 1, 2, 5])
def test_freeze_at(freeze_at):
    cfg = _cfg(
        "MODEL.RESNETS.DEPTH", 18,
        "MODEL.RESNETS.RES2_OUT_CHANNELS", 64,
        "MODEL.RESNETS.NORM", "BN",
        "MODEL.RESNETS.OUT_FEATURES", ["res2", "res3", "res4", "res5"],
        "MODEL.RESNETS.DEFORM_ON_PER_STAGE", [False] * 4,
        "MODEL.BACKBONE.FREEZE_AT", freeze_at,
    )  # fmt: skip
    model = build_backbone(cfg).train()
    shapes = model.output_shape()
    assert [(s.channels, s.stride) for s in shapes.values()] == [
        (64, 4), (128, 8), (256, 16), (512, 32)
    ]  # fmt: skip
    groups = [("conv1.", "bn1."), ("layer1.",), ("layer2.",), ("layer3.",), ("layer4.",)]
    frozen_prefixes = sum(groups[:freeze_at], ())

    for name, p in model.named_parameters():
        assert p.requires_grad == (not name.startswith(frozen_prefixes)), name
    for name, m in model.named_modules():
        if isinstance(m, (nn.BatchNorm2d, FrozenBatchNorm2d)):
            frozen = f"{name}.".startswith(frozen_prefixes)
            assert isinstance(m, FrozenBatchNorm2d) == frozen, name

    before = {k: v.clone() for k, v in model.state_dict().items() if "running_mean" in k}
    x = torch.randn(2, 3, 33, 31, requires_grad=True)
    out = model(x)
    for name, feat in out.items():
        stride = shapes[name].stride
        assert feat.shape[1:] == (shapes[name].channels, *_ceil_div((33, 31), stride))
    sum(f.mean() for f in out.values()).backward()
    assert x.grad is not None
    for name, p in model.named_parameters():
        assert (p.grad is None) == name.startswith(frozen_prefixes), name
    for k, v in model.state_dict().items():
        if "running_mean" in k:
            assert torch.equal(v, before[k]) == k.startswith(frozen_prefixes), k


@pytest.mark.parametrize(
    "opts,key",
    [
        (["MODEL.RESNETS.OUT_FEATURES", ["res3", "res6"]], "MODEL.RESNETS.OUT_FEATURES"),
        (["MODEL.RESNETS.DEPTH", 42], "MODEL.RESNETS.DEPTH"),
        (["MODEL.RESNETS.NORM", ""], "MODEL.RESNETS.NORM"),
        (["MODEL.RESNETS.NORM", "MadeUpBN"], "MODEL.RESNETS.NORM"),
        (["MODEL.RESNETS.STRIDE_IN_1X1", True], "MODEL.RESNETS.STRIDE_IN_1X1"),
        (["MODEL.RESNETS.RES5_DILATION", 2], "MODEL.RESNETS.RES5_DILATION"),
        (["MODEL.RESNETS.NUM_GROUPS", 32], "MODEL.RESNETS.NUM_GROUPS"),
        (["MODEL.RESNETS.DEFORM_ON_PER_STAGE", [True] * 3], "MODEL.RESNETS.DEFORM_ON_PER_STAGE"),
        (["MODEL.RESNETS.DEFORM_NUM_GROUPS", 3], "MODEL.RESNETS.DEFORM_NUM_GROUPS"),
        (["MODEL.BACKBONE.FREEZE_AT", 6], "MODEL.BACKBONE.FREEZE_AT"),
        (
            ["MODEL.RESNETS.DEPTH", 18, "MODEL.RESNETS.RES2_OUT_CHANNELS", 64],
            "MODEL.RESNETS.DEFORM_ON_PER_STAGE",  # basic blocks have no deformable variant
        ),
        (["MODEL.RESNETS.DEPTH", 18], "MODEL.RESNETS.RES2_OUT_CHANNELS"),
    ],
)
def test_bad_config_names_the_key(opts, key):
    with pytest.raises(ValueError, match=key.replace(".", r"\.")):
        build_backbone(_cfg(*opts))


def test_timm_checkpoint_loads_by_suffix(r50_dcn, tmp_path):
    """The DCN configs' WEIGHTS: timm's resnet50d file (no "backbone." prefix, an fc head,
    BatchNorm counters, no offset convs) fills every backbone tensor but the offsets."""
    g = torch.Generator().manual_seed(0)
    timm_state = {}
    for k, v in r50_dcn.state_dict().items():
        if "conv2_offset" in k:
            continue
        timm_state[k] = torch.rand(v.shape, generator=g) + 0.5
        if k.endswith("running_var"):
            timm_state[k.replace("running_var", "num_batches_tracked")] = torch.tensor(7)
    timm_state["fc.weight"] = torch.randn(1000, 2048, generator=g)
    timm_state["fc.bias"] = torch.randn(1000, generator=g)
    path = os.path.join(tmp_path, "resnet50d_ra2-464e36ba.pth")
    torch.save(timm_state, path)

    class Wrapper(nn.Module):
        def __init__(self):
            super().__init__()
            self.backbone = build_backbone(_cfg())

    model = Wrapper()
    weights = yaml.safe_load((CONFIGS / "sparseinst_R50vd_dcn_giam.yaml").read_text())["MODEL"]
    query = weights["WEIGHTS"].partition("?")[2]
    DetectionCheckpointer(model).load(f"{path}?{query}")
    loaded = model.state_dict()
    for k in r50_dcn.state_dict():
        if "conv2_offset" in k:
            assert torch.count_nonzero(loaded[f"backbone.{k}"]) == 0, k
        else:
            assert torch.equal(loaded[f"backbone.{k}"], timm_state[k]), k


def _flatten(tree, prefix=""):
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


@pytest.mark.parametrize(
    "name,base",
    [
        ("sparseinst_R50vd_dcn_giam.yaml", "sparseinst_R50_giam.yaml"),
        ("instunique_sparseinst_R50vd_dcn_giam.yaml", "instunique_sparseinst_R50_giam.yaml"),
    ],
)
def test_dcn_configs_build_the_official_model(name, base):
    """Over its R50 base, each DCN config sets exactly what the official
    sparse_inst_r50vd_dcn_giam_aug.yaml changes (reference *.cfg.yaml files) plus WEIGHTS and
    OUTPUT_DIR, and builds a model with the official state_dict names and shapes."""
    raw = yaml.safe_load((CONFIGS / name).read_text())
    assert raw.pop("_BASE_") == base
    assert set(_flatten(raw)) == {
        "MODEL.WEIGHTS",
        "MODEL.BACKBONE.NAME",
        "MODEL.BACKBONE.FREEZE_AT",
        "MODEL.RESNETS.DEFORM_ON_PER_STAGE",
        "INPUT.CROP.ENABLED",
        "INPUT.CROP.TYPE",
        "INPUT.CROP.SIZE",
        "INPUT.MASK_FORMAT",
        "OUTPUT_DIR",
    }
    cfg = get_config(str(Path("coco/instance-segmentation") / name))
    assert cfg.MODEL.BACKBONE.NAME == "build_resnet_vd_backbone"
    assert cfg.MODEL.BACKBONE.FREEZE_AT == 0
    assert list(cfg.MODEL.RESNETS.DEFORM_ON_PER_STAGE) == [False, False, True, True]
    assert cfg.INPUT.CROP.ENABLED is True
    assert cfg.INPUT.CROP.TYPE == "absolute_range"
    assert list(cfg.INPUT.CROP.SIZE) == [384, 600]
    assert cfg.INPUT.MASK_FORMAT == "polygon"
    assert cfg.MODEL.WEIGHTS.startswith("pretrained_models/resnet50d_ra2-464e36ba.pth?")
    assert cfg.OUTPUT_DIR.endswith(name[: -len(".yaml")])

    rows = (DATA / "sparseinst_R50vd_dcn_giam.tsv").read_text().splitlines()
    official = [tuple(r.split("\t")[:2]) for r in rows]
    model = build_model(cfg)
    ours = [
        (k, str(tuple(v.shape)))
        for k, v in model.state_dict().items()
        if not k.startswith("memory.")  # InstUnique's pixel memory, not a SparseInst tensor
    ]
    assert len(official) == 345
    assert ours == official
