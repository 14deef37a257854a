"""The timm backbone adapter: Swin-T/S/B/L structure, strides and channels at odd sizes, the
official Swin computation order, config errors, the Swin checkpoint converter, the Swin-B
configs and the optimizer's Swin rule.

Swin-S/B/L are built and run forward on the meta device, which checks every shape without
computing; Swin-T runs forward and backward on the CPU (Swin-S/B/L too in the slow test)."""
import copy
import importlib.util
import math
import os
import pickle
import re

import pytest
import torch
import torch.nn.functional as F
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.config import get_cfg
from detectron2.modeling import build_backbone, build_model
from timm.models.swin_transformer import PatchMerging, SwinTransformerBlock
from torch import nn

from instunique import add_instunique_config
from instunique.backbones.swin import _OfficialOrderBlock
from instunique.solver import build_optimizer

from utils import ROOT, get_config, tiny_opts

_spec = importlib.util.spec_from_file_location(
    "instunique_convert_swin_cli", os.path.join(ROOT, "tools", "convert_swin_to_d2.py")
)
convert_swin_to_d2 = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(convert_swin_to_d2)

SWIN_B_CONFIG = "coco/instance-segmentation/swin/mask2former_swin_base_IN21k_384_bs16_50ep.yaml"
# Swin paper (Liu et al. 2021) Table 1 and the official configs: embed dim, depths, heads,
# window, and parameters in millions with the 1000-class ImageNet head.
SWIN = {
    "swin_tiny_patch4_window7_224": (96, (2, 2, 6, 2), (3, 6, 12, 24), 7, 28),
    "swin_small_patch4_window7_224": (96, (2, 2, 18, 2), (3, 6, 12, 24), 7, 50),
    "swin_base_patch4_window12_384": (128, (2, 2, 18, 2), (4, 8, 16, 32), 12, 88),
    "swin_large_patch4_window12_384": (192, (2, 2, 18, 2), (6, 12, 24, 48), 12, 197),
}
ODD = (97, 131)
STRIDES = {"res2": 4, "res3": 8, "res4": 16, "res5": 32}


def _cfg(*opts):
    cfg = get_cfg()
    add_instunique_config(cfg)
    cfg.MODEL.BACKBONE.NAME = "build_timm_backbone"
    cfg.MODEL.BACKBONE.FREEZE_AT = 0
    cfg.merge_from_list(list(opts))
    return cfg


@pytest.fixture(scope="module")
def swin_t():
    torch.manual_seed(0)
    return build_backbone(_cfg())


def _blocks(backbone):
    return [m for m in backbone.modules() if isinstance(m, SwinTransformerBlock)]


def _check_outputs(backbone, out, size, batch):
    shapes = backbone.output_shape()
    assert list(out) == list(shapes) == list(STRIDES)
    assert {k: s.stride for k, s in shapes.items()} == STRIDES
    for name, feat in out.items():
        stride = shapes[name].stride
        hw = tuple(math.ceil(n / stride) for n in size)
        assert feat.shape == (batch, shapes[name].channels, *hw), name


def _check_official_structure(backbone, name):
    embed, depths, heads, window, paper_millions = SWIN[name]
    assert backbone.size_divisibility == 32
    channels = [s.channels for s in backbone.output_shape().values()]
    assert channels == [embed, 2 * embed, 4 * embed, 8 * embed]
    # The paper counts the classifier (final norm + 1000-way head), which the backbone
    # leaves out, and not the four output norms, which it adds.
    params = sum(p.numel() for p in backbone.parameters())
    params += 8 * embed * 1002 - 2 * sum(channels)
    assert abs(params / 1e6 - paper_millions) / paper_millions < 0.02, params

    blocks = _blocks(backbone)
    assert all(type(b) is _OfficialOrderBlock for b in blocks)
    stages = [_blocks(getattr(backbone.body, f"layers_{i}")) for i in range(4)]
    assert [len(s) for s in stages] == list(depths)
    assert [s[0].attn.num_heads for s in stages] == list(heads)
    # Full windows everywhere, every second block shifted by half a window, as official.
    for stage in stages:
        for i, block in enumerate(stage):
            assert tuple(block.window_size) == (window, window)
            assert tuple(block.shift_size) == ((window // 2,) * 2 if i % 2 else (0, 0))
    # Stochastic depth rising linearly from 0 to DROP_PATH_RATE over all blocks.
    rates = [getattr(b.drop_path1, "drop_prob", 0.0) for b in blocks]
    expected = torch.linspace(0, 0.3, len(blocks), device="cpu").tolist()
    assert rates == pytest.approx(expected, abs=1e-6)


@pytest.mark.parametrize("name", list(SWIN)[1:])
def test_larger_swin_structure_and_shapes_on_the_meta_device(name):
    # Forward only: meta tensors skip the arithmetic but not the per-op Python shape logic,
    # which a backward would double; the slow test runs both for real.
    with torch.device("meta"):
        backbone = build_backbone(_cfg("MODEL.TIMM.NAME", name))
        _check_official_structure(backbone, name)
        with torch.no_grad():
            _check_outputs(backbone, backbone(torch.empty(1, 3, *ODD)), ODD, batch=1)


def _forward_backward_on_cpu(backbone):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 3, *ODD, generator=g)
    backbone.train()
    out = backbone(x)
    _check_outputs(backbone, out, ODD, batch=1)
    assert all(torch.isfinite(f).all() for f in out.values())
    loss = sum((f * torch.randn(f.shape, generator=g)).mean() for f in out.values())
    backbone.zero_grad()
    loss.backward()
    grads = dict(backbone.named_parameters())
    for name, p in grads.items():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    # Stochastic depth drops whole residual branches at random: those get no gradient.
    nonzero = [n for n, p in grads.items() if p.grad.abs().sum() > 0]
    assert len(nonzero) > 0.8 * len(grads)
    for name in ("body.patch_embed.proj.weight", "body.layers_3.downsample.reduction.weight",
                 "norm0.weight", "norm3.weight"):
        assert name in nonzero, name


def test_swin_tiny_structure_and_forward_backward_at_an_odd_size(swin_t):
    _check_official_structure(swin_t, "swin_tiny_patch4_window7_224")
    _forward_backward_on_cpu(swin_t)
    # The switched block class survives copies (model EMA and other tools deep-copy).
    assert type(copy.deepcopy(swin_t).body.layers_0.blocks[1]) is _OfficialOrderBlock


@pytest.mark.slow
@pytest.mark.parametrize("name", list(SWIN)[1:])
def test_larger_swin_forward_backward_at_an_odd_size(name):
    torch.manual_seed(0)
    _forward_backward_on_cpu(build_backbone(_cfg("MODEL.TIMM.NAME", name)))


def _block_pair(window=6, dim=8, heads=2):
    """A timm Swin block with a shift and the same block computing in the official order."""
    torch.manual_seed(0)
    stock = SwinTransformerBlock(
        dim, (24, 24), num_heads=heads, window_size=window, shift_size=window // 2,
        always_partition=True, dynamic_mask=True,
    ).eval()  # fmt: skip
    official = copy.deepcopy(stock)
    official.__class__ = _OfficialOrderBlock
    return stock, official


def test_official_order_is_attention_on_the_zero_padded_map():
    stock, official = _block_pair()
    with torch.no_grad():
        # Multiples of the window: nothing is padded, and both orders agree.
        x = torch.randn(2, 12, 18, 8)
        torch.testing.assert_close(official._attn(x), stock._attn(x))
        # Otherwise the official block is plain shifted-window attention over the map padded
        # with zeros to whole windows, cropped back.
        x = torch.randn(2, 9, 14, 8)
        padded = F.pad(x, (0, 0, 0, 4, 0, 3))
        torch.testing.assert_close(official._attn(x), stock._attn(padded)[:, :9, :14])


def test_official_order_keeps_opposite_borders_apart():
    """Why the blocks are switched: timm's own order lets the top rows attend to the bottom
    ones unless the padding to whole windows is 0 or exactly the shift (here 10 rows, window
    6: 2 padding rows, shift 3); the official order never does."""
    stock, official = _block_pair()
    for block, leaks in ((stock, True), (official, False)):
        x = torch.randn(1, 10, 12, 8, requires_grad=True)
        block._attn(x)[0, 0].sum().backward()
        # Masked pairs get a logit of -100 (both codes), hence weights near 1e-44, not zero.
        bottom = x.grad[0, -1].abs().max()
        assert (bottom > 1e-4) if leaks else (bottom < 1e-30), (type(block).__name__, bottom)
        assert x.grad[0, 0].abs().max() > 1e-4


def test_patch_merging_and_bias_index_follow_the_official_layout():
    """Official weights need no reordering: the official merge concatenates x[0::2, 0::2],
    x[1::2, 0::2], x[0::2, 1::2], x[1::2, 1::2]; the bias of query (i, j) and key (k, l) is
    table row (i - k + w - 1) * (2w - 1) + (j - l + w - 1)."""
    torch.manual_seed(0)
    merge = PatchMerging(4)
    x = torch.randn(2, 6, 10, 4)
    cat = torch.cat([x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]], -1)
    with torch.no_grad():
        torch.testing.assert_close(merge(x), merge.reduction(merge.norm(cat)))

    w = 3
    block = SwinTransformerBlock(8, (6, 6), num_heads=2, window_size=w)
    pos = [(i, j) for i in range(w) for j in range(w)]
    expected = torch.tensor(
        [[(i - k + w - 1) * (2 * w - 1) + (j - m + w - 1) for k, m in pos] for i, j in pos]
    )
    assert torch.equal(block.attn.relative_position_index, expected)


def test_unknown_name_lists_close_names():
    with pytest.raises(ValueError, match=r"MODEL\.TIMM\.NAME") as e:
        build_backbone(_cfg("MODEL.TIMM.NAME", "swin_bse_patch4_window12_384"))
    assert "swin_base_patch4_window12_384" in str(e.value)


@pytest.mark.parametrize(
    "opts,key",
    [
        (["MODEL.TIMM.OUT_FEATURES", ["res3", "res6"]], "MODEL.TIMM.OUT_FEATURES"),
        (["MODEL.TIMM.OUT_FEATURES", []], "MODEL.TIMM.OUT_FEATURES"),
        (["MODEL.TIMM.DROP_PATH_RATE", 1.0], "MODEL.TIMM.DROP_PATH_RATE"),
        (["MODEL.BACKBONE.FREEZE_AT", 2], "MODEL.BACKBONE.FREEZE_AT"),
        # A plain ViT has every level at stride 16.
        (["MODEL.TIMM.NAME", "vit_tiny_patch16_224"], "MODEL.TIMM.NAME"),
    ],
)
def test_bad_config_names_the_key(opts, key):
    with torch.device("meta"), pytest.raises(ValueError, match=re.escape(key)):
        build_backbone(_cfg(*opts))


def test_cnn_with_a_subset_of_outputs():
    """A channels-first model, levels counted from the deepest, norms named by stage."""
    torch.manual_seed(0)
    backbone = build_backbone(
        _cfg("MODEL.TIMM.NAME", "convnext_atto", "MODEL.TIMM.OUT_FEATURES", ["res5", "res3"])
    )
    shapes = backbone.output_shape()
    assert [(k, s.channels, s.stride) for k, s in shapes.items()] == [
        ("res3", 80, 8), ("res5", 320, 32)
    ]  # fmt: skip
    assert {k for k in backbone.state_dict() if not k.startswith("body.")} == {
        "norm1.weight", "norm1.bias", "norm3.weight", "norm3.bias"
    }  # fmt: skip
    out = backbone(torch.randn(1, 3, 64, 96))
    assert [tuple(f.shape) for f in out.values()] == [(1, 80, 8, 12), (1, 320, 2, 3)]
    # Each output is normalized over its channels at every pixel.
    torch.testing.assert_close(out["res3"].mean(1), torch.zeros(1, 8, 12), atol=1e-4, rtol=0)


def _source_name(key, layout):
    """Inverse of the converter's mapping: an adapter key in the layout of a source file."""
    key = key.removeprefix("body.")
    downsample = re.fullmatch(r"layers_(\d+)\.downsample\.(.+)", key)
    if downsample and layout != "timm":  # official: patch merging closes the stage before
        return f"layers.{int(downsample.group(1)) - 1}.downsample.{downsample.group(2)}"
    return re.sub(r"^layers_(\d+)\.", r"layers.\1.", key)


def _fake_official_checkpoint(adapter, layout):
    """Official-layout tensors of the right shapes, each filled with its own value; returns
    the state and {official key: adapter key} for the parameters it carries."""
    state, origin = {}, {}
    for i, (key, value) in enumerate(adapter.state_dict().items()):
        official = _source_name(key, layout)
        if layout != "mask2former" and re.fullmatch(r"norm\d\..+", official):
            continue  # the ImageNet files have no per-output norms
        prefix = "backbone." if layout == "mask2former" else ""
        state[prefix + official] = torch.full(value.shape, float(i + 1))
        origin[prefix + official] = key
    for name, block in adapter.body.named_modules():
        if not isinstance(block, SwinTransformerBlock):
            continue
        stage, index = re.fullmatch(r"layers_(\d+)\.blocks\.(\d+)", name).groups()
        prefix = f"{'backbone.' if layout == 'mask2former' else ''}layers.{stage}.blocks.{index}"
        n = block.window_area
        state[f"{prefix}.attn.relative_position_index"] = torch.zeros(n, n, dtype=torch.long)
        if layout == "microsoft" and int(index) % 2:
            state[f"{prefix}.attn_mask"] = torch.zeros(3, n, n)
    if layout != "mask2former":
        head = "head" if layout == "microsoft" else "head.fc"
        state.update({"norm.weight": torch.ones(768), "norm.bias": torch.zeros(768),
                      f"{head}.weight": torch.zeros(1000, 768), f"{head}.bias": torch.zeros(1000)})
    if layout == "mask2former":
        state.update({"sem_seg_head.weight": torch.full((2, 4), -1.0),
                      "sem_seg_head.bias": torch.full((2,), -2.0)})
    return state, origin


class _Model(nn.Module):
    def __init__(self, backbone, head=False):
        super().__init__()
        self.backbone = backbone
        if head:
            self.sem_seg_head = nn.Linear(4, 2)


@pytest.mark.parametrize("layout", ["microsoft", "mask2former", "timm"])
def test_converter_round_trip(swin_t, tmp_path, layout):
    """Microsoft's ImageNet file (.pth), a trained Mask2Former model (.pkl, "backbone."
    prefix, heads beside) and timm's own Swin weights (.pth, downsample opening stages)."""
    state, origin = _fake_official_checkpoint(swin_t, layout)
    keys = set(state)
    p = "backbone." if layout == "mask2former" else ""
    # The source names and shapes the mapping rests on (Swin-T).
    assert state[f"{p}patch_embed.proj.weight"].shape == (96, 3, 4, 4)
    merges = (1, 2, 3) if layout == "timm" else (0, 1, 2)
    assert {k.split(".downsample.")[0] for k in keys if ".downsample." in k} == {
        f"{p}layers.{i}" for i in merges
    }  # fmt: skip
    assert state[f"{p}layers.{merges[0]}.downsample.reduction.weight"].shape == (192, 384)
    assert state[f"{p}layers.{merges[2]}.downsample.norm.weight"].shape == (1536,)
    assert state[f"{p}layers.2.blocks.5.attn.relative_position_bias_table"].shape == (169, 12)
    assert state[f"{p}layers.1.blocks.1.mlp.fc2.weight"].shape == (192, 768)
    assert (f"{p}norm3.weight" in keys) == (layout == "mask2former")
    assert len(origin) == (177 if layout == "mask2former" else 169)

    source = tmp_path / ("model_final.pkl" if layout == "mask2former" else "swin_tiny.pth")
    if layout != "mask2former":
        torch.save({"model": state}, source)
    else:
        with open(source, "wb") as f:
            pickle.dump({"model": {k: v.numpy() for k, v in state.items()}}, f)
    target = tmp_path / "converted.pkl"
    convert_swin_to_d2.main([str(source), str(target)])

    with open(target, "rb") as f:
        converted = pickle.load(f)["model"]
    backbone_state = {
        k.removeprefix("backbone."): torch.from_numpy(v)
        for k, v in converted.items() if k.startswith("backbone.")
    }  # fmt: skip
    output_norms = {f"norm{i}.{w}" for i in range(4) for w in ("weight", "bias")}
    missing, unexpected = swin_t.load_state_dict(backbone_state, strict=False)
    assert unexpected == []
    assert set(missing) == (set() if layout == "mask2former" else output_norms)
    adapter_state = swin_t.state_dict()
    for official, key in origin.items():
        assert torch.equal(adapter_state[key], state[official]), (official, key)
    if layout == "mask2former":
        assert set(converted) - {f"backbone.{k}" for k in adapter_state} == {
            "sem_seg_head.weight", "sem_seg_head.bias"
        }  # fmt: skip
        assert (converted["sem_seg_head.bias"] == -2.0).all()

    # Through detectron2's checkpointer, by name: only the per-output norms, which the
    # ImageNet files lack, stay at their initialization (as with the official code).
    model = _Model(swin_t, head=layout == "mask2former")
    checkpointer = DetectionCheckpointer(model)
    incompatible = checkpointer._load_model(checkpointer._load_file(str(target)))
    expected_missing = set() if layout == "mask2former" else {f"backbone.{k}" for k in output_norms}
    assert set(incompatible.missing_keys) == expected_missing
    assert incompatible.unexpected_keys == [] and incompatible.incorrect_shapes == []


def test_converter_refuses_unknown_backbone_keys(tmp_path):
    source = tmp_path / "ape.pth"
    torch.save({"model": {"absolute_pos_embed": torch.zeros(1, 96, 56, 56)}}, source)
    with pytest.raises(ValueError, match="absolute_pos_embed"):
        convert_swin_to_d2.main([str(source), str(tmp_path / "out.pkl")])


@pytest.mark.parametrize("task", ["instance", "panoptic"])
def test_swin_b_configs(task):
    """Each Swin-B config is its R50 counterpart with the official Swin-B backbone keys."""
    folder = f"coco/{task}-segmentation"
    for prefix in ("", "instunique_"):
        cfg = get_config(f"{folder}/swin/{prefix}mask2former_swin_base_IN21k_384_bs16_50ep.yaml")
        r50 = get_config(f"{folder}/{prefix}mask2former_R50_bs16_50ep.yaml")
        assert cfg.MODEL.BACKBONE.NAME == "build_timm_backbone"
        assert cfg.MODEL.TIMM.NAME == "swin_base_patch4_window12_384"
        assert cfg.MODEL.TIMM.DROP_PATH_RATE == 0.3
        assert list(cfg.MODEL.TIMM.OUT_FEATURES) == list(STRIDES)
        assert cfg.MODEL.TIMM.OUTPUT_NORMS is True
        assert cfg.MODEL.PIXEL_MEAN == [123.675, 116.280, 103.530]
        assert cfg.MODEL.PIXEL_STD == [58.395, 57.120, 57.375]
        assert cfg.MODEL.WEIGHTS == "pretrained_models/swin_base_patch4_window12_384_22k.pkl"
        assert cfg.SOLVER.BACKBONE_MULTIPLIER == 0.1
        for key in ("BACKBONE", "TIMM", "WEIGHTS"):
            cfg.MODEL[key] = r50.MODEL[key]
        assert cfg == r50, prefix


def test_mask2former_from_the_swin_b_config_runs_in_eval_mode():
    # Swin-T for Swin-B keeps the build short; Swin-B's own shapes are checked above and its
    # full model is built by test_model_e2e.py's test_every_config_builds.
    cfg = get_config(SWIN_B_CONFIG, *tiny_opts(), "MODEL.TIMM.NAME", "swin_tiny_patch4_window7_224")
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    assert type(model.backbone).__name__ == "TimmBackbone"
    image = torch.randint(0, 256, (3, 61, 83), dtype=torch.uint8)
    with torch.no_grad():
        out = model([{"image": image, "height": 61, "width": 83}])
    inst = out[0]["instances"]
    assert inst.pred_masks.shape[-2:] == (61, 83)
    assert len(inst) == cfg.TEST.DETECTIONS_PER_IMAGE


def test_optimizer_does_not_decay_swin_position_tables(swin_t):
    cfg = _cfg("SOLVER.OPTIMIZER", "ADAMW", "SOLVER.WEIGHT_DECAY", 0.05)
    optimizer = build_optimizer(cfg, _Model(swin_t))
    decay = {id(g["params"][0]): g["weight_decay"] for g in optimizer.param_groups}
    assert cfg.SOLVER.WEIGHT_DECAY_NORM == 0.0
    tables = 0
    for module in swin_t.modules():
        for name, p in module.named_parameters(recurse=False):
            exempt = isinstance(module, nn.LayerNorm) or name == "relative_position_bias_table"
            assert decay[id(p)] == (0.0 if exempt else 0.05), name
            tables += name == "relative_position_bias_table"
    assert tables == 12
