"""Mask2Former's MSDeformAttn pixel decoder: shapes, gradients, official names, registry."""
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from detectron2.config import get_cfg
from detectron2.layers import ShapeSpec

from instunique.segmenters.mask2former.config import add_mask2former_config
from instunique.segmenters.mask2former.pixel_decoder import (
    PIXEL_DECODER_REGISTRY,
    MSDeformAttnEncoderLayer,
    MSDeformAttnPixelDecoder,
    MSDeformAttnTransformerEncoder,
    build_pixel_decoder,
)
from instunique.segmenters.mask2former.position_encoding import PositionEmbeddingSine

DATA = Path(__file__).resolve().parent / "data"
NAMES = ("res2", "res3", "res4", "res5")
STRIDES = (4, 8, 16, 32)
SMALL_CHANNELS = (8, 16, 32, 64)
R50_CHANNELS = (256, 512, 1024, 2048)


def _cfg(small=True):
    cfg = get_cfg()
    add_mask2former_config(cfg)
    head = cfg.MODEL.SEM_SEG_HEAD
    head.IN_FEATURES = list(NAMES)
    head.NORM = "GN"
    head.COMMON_STRIDE = 4
    if small:
        head.CONVS_DIM = head.MASK_DIM = 32
        head.TRANSFORMER_ENC_LAYERS = 2
        head.DEFORMABLE_TRANSFORMER_ENCODER_N_HEADS = 4
    else:  # the official R50 model
        head.CONVS_DIM = head.MASK_DIM = 256
        head.TRANSFORMER_ENC_LAYERS = 6
        head.DEFORMABLE_TRANSFORMER_ENCODER_N_HEADS = 8
    return cfg


def _input_shape(channels=SMALL_CHANNELS):
    return {n: ShapeSpec(channels=c, stride=s) for n, c, s in zip(NAMES, channels, STRIDES)}


def _features(batch, res2_hw, res5_hw=None, seed=0, dtype=torch.float32):
    """Backbone-like maps; res3/res4 sizes lie between res2 and res5 (ceil-halving)."""
    g = torch.Generator().manual_seed(seed)
    h, w = res2_hw
    feats = {}
    for name, c in zip(NAMES, SMALL_CHANNELS):
        feats[name] = torch.randn(batch, c, h, w, generator=g).to(dtype)
        h, w = math.ceil(h / 2), math.ceil(w / 2)
    if res5_hw is not None:
        assert feats["res5"].shape[-2:] == res5_hw
    return feats


@pytest.fixture(scope="module")
def decoder():
    torch.manual_seed(0)
    return build_pixel_decoder(_cfg(), _input_shape())


def test_output_shapes_for_a_64x96_image(decoder):
    feats = _features(2, (16, 24), res5_hw=(2, 3))
    mask_features, encoder_out, multi_scale = decoder.forward_features(feats)
    assert mask_features.shape == (2, 32, 16, 24)
    assert encoder_out.shape == (2, 32, 2, 3)
    assert [tuple(x.shape) for x in multi_scale] == [(2, 32, 2, 3), (2, 32, 4, 6), (2, 32, 8, 12)]
    # The coarsest multi-scale map is the encoder output itself.
    torch.testing.assert_close(multi_scale[0], encoder_out)
    assert all(torch.isfinite(x).all() for x in (mask_features, *multi_scale))


@pytest.mark.parametrize(
    "res2_hw, res5_hw",
    [((24, 40), (3, 5)), ((8, 12), (1, 2)), ((13, 19), (2, 3))],
    ids=["96x160-padded", "32x48", "odd-unpadded"],
)
def test_arbitrary_small_maps(decoder, res2_hw, res5_hw):
    feats = _features(1, res2_hw, res5_hw=res5_hw)
    mask_features, encoder_out, multi_scale = decoder.forward_features(feats)
    assert mask_features.shape == (1, 32, *res2_hw)
    assert encoder_out.shape == (1, 32, *res5_hw)
    assert [x.shape[-2:] for x in multi_scale] == [feats[n].shape[-2:] for n in NAMES[:0:-1]]


def test_backward_reaches_every_parameter():
    torch.manual_seed(0)
    decoder = build_pixel_decoder(_cfg(), _input_shape())
    # At init queries do not steer the attention (zero offset/weight matrices); move away from
    # it, as training does, so positions and level embeddings matter.
    with torch.no_grad():
        for layer in decoder.transformer.encoder.layers:
            layer.self_attn.sampling_offsets.weight.normal_(std=0.1)
            layer.self_attn.attention_weights.weight.normal_(std=0.1)
    feats = _features(2, (16, 24))
    for f in feats.values():
        f.requires_grad_(True)
    mask_features, _, multi_scale = decoder.forward_features(feats)
    loss = sum((x * torch.randn_like(x)).sum() for x in (mask_features, *multi_scale))
    loss.backward()
    for name, p in decoder.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name
    assert all(f.grad.abs().sum() > 0 for f in feats.values())


def test_images_of_a_batch_do_not_interact(decoder):
    feats = _features(2, (8, 12), seed=3)
    batched = decoder.forward_features(feats)
    for i in range(2):
        single = decoder.forward_features({k: v[i : i + 1] for k, v in feats.items()})
        torch.testing.assert_close(single[0], batched[0][i : i + 1], rtol=1e-4, atol=1e-5)
        for a, b in zip(single[2], batched[2]):
            torch.testing.assert_close(a, b[i : i + 1], rtol=1e-4, atol=1e-5)


def test_top_down_path_upsamples_bilinearly(decoder):
    """With the lateral adapter silenced, the stride-4 map is the bilinear (half-pixel)
    upsampling of the stride-8 encoder output through layer_1 and mask_features."""
    feats = _features(1, (10, 14), seed=5)
    with torch.no_grad():
        saved = decoder.adapter_1.weight.clone()
        decoder.adapter_1.weight.zero_()  # GroupNorm of zeros is its bias: 0 at init
        try:
            mask_features, _, multi_scale = decoder.forward_features(feats)
            up = F.interpolate(multi_scale[-1], size=(10, 14), mode="bilinear", align_corners=False)
            expected = decoder.mask_features(decoder.layer_1(up))
        finally:
            decoder.adapter_1.weight.copy_(saved)
    torch.testing.assert_close(mask_features, expected)


def test_encoder_layer_is_post_norm_with_positions_on_queries_only():
    torch.manual_seed(0)
    layer = MSDeformAttnEncoderLayer(d_model=8, d_ffn=16, dropout=0.0, n_levels=2, n_heads=2)
    with torch.no_grad():
        layer.self_attn.sampling_offsets.weight.normal_(std=0.5)
        layer.self_attn.attention_weights.weight.normal_(std=0.5)
    shapes = torch.tensor([[2, 3], [1, 2]])
    start = torch.tensor([0, 6])
    src, pos = torch.randn(2, 8, 8), torch.randn(2, 8, 8)
    ref = torch.rand(2, 8, 2, 2)
    out = layer(src, pos, ref, shapes, start)
    attn = layer.self_attn(src + pos, ref, src, shapes, start)
    x = layer.norm1(src + attn)
    expected = layer.norm2(x + layer.linear2(torch.relu(layer.linear1(x))))
    torch.testing.assert_close(out, expected)
    # Positions steer sampling, so they change the output.
    assert not torch.allclose(layer(src, torch.zeros_like(pos), ref, shapes, start), out)


def _official_pixel_decoder_entries(tsv):
    prefix = "sem_seg_head.pixel_decoder."
    entries = []
    for line in (DATA / tsv).read_text().splitlines():
        name, shape, _ = line.split("\t")
        if name.startswith(prefix):
            entries.append((name[len(prefix) :], shape))
    return entries


@pytest.mark.parametrize("tsv", ["m2f_coco_instance_R50.tsv", "m2f_coco_panoptic_R50.tsv"])
def test_state_dict_matches_official_r50(tsv):
    decoder = build_pixel_decoder(_cfg(small=False), _input_shape(R50_CHANNELS))
    ours = [(k, str(tuple(v.shape))) for k, v in decoder.state_dict().items()]
    official = _official_pixel_decoder_entries(tsv)
    assert len(official) == 117
    assert ours == official


def test_official_init():
    decoder = build_pixel_decoder(_cfg(), _input_shape())
    for proj in decoder.input_proj:
        assert torch.count_nonzero(proj[0].bias) == 0
        assert isinstance(proj[1], torch.nn.GroupNorm) and proj[1].num_groups == 32
    assert torch.count_nonzero(decoder.mask_features.bias) == 0
    assert decoder.adapter_1.bias is None and decoder.layer_1.bias is None
    for layer in decoder.transformer.encoder.layers:
        assert torch.count_nonzero(layer.self_attn.sampling_offsets.weight) == 0
        assert torch.count_nonzero(layer.self_attn.attention_weights.weight) == 0
    assert decoder.pe_layer.num_pos_feats == 16 and decoder.pe_layer.normalize


def test_config_keys_reach_the_modules():
    cfg = _cfg()
    cfg.MODEL.SEM_SEG_HEAD.DEFORMABLE_TRANSFORMER_ENCODER_N_POINTS = 2
    cfg.MODEL.MASK_FORMER.DROPOUT = 0.25
    cfg.MODEL.SEM_SEG_HEAD.MASK_DIM = 16
    decoder = build_pixel_decoder(cfg, _input_shape())
    layer = decoder.transformer.encoder.layers[0]
    # heads * levels * points * (x, y)
    assert layer.self_attn.sampling_offsets.out_features == 4 * 3 * 2 * 2
    assert layer.dropout1.p == 0.25 and layer.linear1.out_features == 1024
    assert len(decoder.transformer.encoder.layers) == 2
    assert decoder.forward_features(_features(1, (8, 12)))[0].shape == (1, 16, 8, 12)


def test_decoder_runs_in_full_precision_under_autocast(decoder):
    feats = _features(1, (8, 12), dtype=torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mask_features, _, multi_scale = decoder.forward_features(feats)
    assert mask_features.dtype == torch.float32
    assert all(x.dtype == torch.float32 for x in multi_scale)


def test_unknown_decoder_name_lists_registered_ones():
    assert "MSDeformAttnPixelDecoder" in PIXEL_DECODER_REGISTRY
    assert PIXEL_DECODER_REGISTRY.get("MSDeformAttnPixelDecoder") is MSDeformAttnPixelDecoder
    cfg = _cfg()
    cfg.MODEL.SEM_SEG_HEAD.PIXEL_DECODER_NAME = "NoSuchDecoder"
    with pytest.raises(KeyError, match="NoSuchDecoder.*MSDeformAttnPixelDecoder"):
        build_pixel_decoder(cfg, _input_shape())


def test_bad_inputs_raise_clear_errors(decoder):
    feats = _features(1, (8, 12))
    del feats["res2"]
    with pytest.raises(KeyError, match="res2"):
        decoder.forward_features(feats)
    cfg = _cfg()
    cfg.MODEL.SEM_SEG_HEAD.DEFORMABLE_TRANSFORMER_ENCODER_IN_FEATURES = ["res3", "res4", "res6"]
    with pytest.raises(ValueError, match="res6"):
        build_pixel_decoder(cfg, _input_shape())
    cfg = _cfg()
    cfg.MODEL.SEM_SEG_HEAD.IN_FEATURES = ["res2", "res3", "res4", "res5", "p7"]
    with pytest.raises(ValueError, match="p7"):
        build_pixel_decoder(cfg, _input_shape())


def test_reference_points_are_pixel_centres():
    ref = MSDeformAttnTransformerEncoder.get_reference_points(
        [(2, 3), (1, 2)], torch.ones(1, 2, 2, dtype=torch.float64)
    )
    assert ref.shape == (1, 6 + 2, 2, 2)
    expected = torch.tensor(
        [[x / 6, y / 4] for y in (1, 3) for x in (1, 3, 5)] + [[1 / 4, 1 / 2], [3 / 4, 1 / 2]],
        dtype=torch.float64,
    )
    # The same normalized point is used on every level.
    torch.testing.assert_close(ref[0, :, 0], expected)
    torch.testing.assert_close(ref[0, :, 1], expected)


def test_position_embedding_values():
    pe = PositionEmbeddingSine(num_pos_feats=4, temperature=100)
    x = torch.zeros(1, 7, 2, 3)
    pos = pe(x)
    assert pos.shape == (1, 8, 2, 3)
    # Unnormalized positions count from 1; channel c uses wavelength 100 ** (2 * (c // 2) / 4).
    y, xx = 2.0, 3.0  # pixel (row 1, col 2)
    expected_y = [math.sin(y), math.cos(y), math.sin(y / 10), math.cos(y / 10)]
    expected_x = [math.sin(xx), math.cos(xx), math.sin(xx / 10), math.cos(xx / 10)]
    torch.testing.assert_close(pos[0, :, 1, 2], torch.tensor(expected_y + expected_x))
    assert not any(p.requires_grad for p in pe.parameters())
    assert len(pe.state_dict()) == 0


def test_position_embedding_normalize_and_mask():
    pe = PositionEmbeddingSine(num_pos_feats=2, normalize=True)
    x = torch.zeros(1, 1, 4, 4)
    # The first channel is sin of the normalized row position, (row + 1) / H * 2 pi.
    rows = pe(x)[0, 0, :, 0]
    expected = torch.sin(torch.arange(1, 5) / 4 * 2 * math.pi)
    torch.testing.assert_close(rows, expected, atol=1e-5, rtol=0)
    # Padding (mask True) does not shift positions of valid pixels: a 4x4 map with its last
    # two columns padded embeds the valid part like an unpadded 4x2 map.
    mask = torch.zeros(1, 4, 4, dtype=torch.bool)
    mask[:, :, 2:] = True
    padded = pe(x, mask)[..., :2]
    torch.testing.assert_close(padded, pe(torch.zeros(1, 1, 4, 2)))
    with pytest.raises(ValueError, match="scale"):
        PositionEmbeddingSine(scale=1.0)
