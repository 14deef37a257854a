import os

import pytest
import torch
from detectron2.config import get_cfg
from torch import nn

from instunique.segmenters.mask2former.config import add_mask2former_config
from instunique.segmenters.mask2former.transformer_decoder import (
    MultiScaleMaskedTransformerDecoder,
    build_transformer_decoder,
)

REFERENCE_TSV = os.path.join(os.path.dirname(__file__), "data", "m2f_coco_instance_R50.tsv")
PREFIX = "sem_seg_head.predictor."


def small_cfg(**overrides):
    cfg = get_cfg()
    add_mask2former_config(cfg)
    mf = cfg.MODEL.MASK_FORMER
    mf.HIDDEN_DIM, mf.NHEADS, mf.DIM_FEEDFORWARD = 32, 4, 64
    mf.DEC_LAYERS, mf.NUM_OBJECT_QUERIES = 4, 7
    cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES = 3
    cfg.MODEL.SEM_SEG_HEAD.MASK_DIM = 32
    for key, value in overrides.items():
        setattr(mf, key, value)
    return cfg


def random_inputs(batch=2, channels=32, mask_dim=32):
    sizes = [(3, 5), (5, 9), (11, 17)]  # coarsest first, odd sizes
    feats = [torch.randn(batch, channels, h, w) for h, w in sizes]
    return feats, torch.randn(batch, mask_dim, 21, 33)


def test_output_shapes_and_embeds():
    torch.manual_seed(0)
    decoder = build_transformer_decoder(small_cfg(), 32)
    feats, mask_features = random_inputs()
    out = decoder(feats, mask_features)

    assert out["pred_logits"].shape == (2, 7, 4)
    assert out["pred_masks"].shape == (2, 7, 21, 33)
    assert out["pred_embeds"].shape == (2, 7, 32)
    expected = torch.einsum("bqc,bchw->bqhw", out["pred_embeds"], mask_features)
    torch.testing.assert_close(out["pred_masks"], expected)

    assert len(out["aux_outputs"]) == 3  # DEC_LAYERS - 1
    for aux in out["aux_outputs"]:
        assert set(aux) == {"pred_logits", "pred_masks"}
        assert aux["pred_logits"].shape == (2, 7, 4)
        assert aux["pred_masks"].shape == (2, 7, 21, 33)
    # Every layer changes the queries, so consecutive predictions differ.
    assert not torch.allclose(out["aux_outputs"][-1]["pred_masks"], out["pred_masks"])


def test_backward_reaches_queries_and_inputs():
    torch.manual_seed(0)
    decoder = build_transformer_decoder(small_cfg(), 32)
    feats, mask_features = random_inputs()
    for f in feats:
        f.requires_grad_(True)
    out = decoder(feats, mask_features)
    loss = out["pred_logits"].sum() + out["pred_masks"].square().mean()
    loss = loss + sum(a["pred_masks"].mean() for a in out["aux_outputs"])
    loss.backward()
    for name in ("query_feat", "query_embed", "level_embed"):
        grad = getattr(decoder, name).weight.grad
        assert grad is not None and grad.abs().sum() > 0, name
    assert all(f.grad is not None and f.grad.abs().sum() > 0 for f in feats)


def _decoder_with_constant_embeds(cfg, direction):
    """Every query predicts the mask embedding ``direction`` (the MLP's last layer is 0)."""
    decoder = build_transformer_decoder(cfg, 32)
    last = decoder.mask_embed.layers[-1]
    nn.init.zeros_(last.weight)
    with torch.no_grad():
        last.bias.copy_(direction)
    return decoder.eval()


def test_masked_attention_ignores_pixels_outside_the_predicted_mask():
    torch.manual_seed(0)
    cfg = small_cfg(DEC_LAYERS=2)  # a single layer, attending the coarsest level
    direction = torch.randn(32)
    decoder = _decoder_with_constant_embeds(cfg, direction)
    feats = [torch.randn(1, 32, 4, 4), torch.randn(1, 32, 4, 4), torch.randn(1, 32, 8, 8)]
    # Initial masks of all queries: positive on the left half, negative on the right.
    sign = torch.ones(8, 8)
    sign[:, 4:] = -1
    mask_features = (direction[:, None, None] * sign)[None]

    with torch.no_grad():
        base = decoder(feats, mask_features)["pred_logits"]
        right = [f.clone() for f in feats]
        right[0][..., 2:] += 5 * torch.randn(1, 32, 4, 2)
        left = [f.clone() for f in feats]
        left[0][..., :2] += 5 * torch.randn(1, 32, 4, 2)
        torch.testing.assert_close(decoder(right, mask_features)["pred_logits"], base)
        assert not torch.allclose(decoder(left, mask_features)["pred_logits"], base)


def test_fully_masked_queries_attend_everywhere():
    torch.manual_seed(0)
    direction = torch.randn(32)
    decoder = _decoder_with_constant_embeds(small_cfg(DEC_LAYERS=2), direction)
    feats = [torch.randn(1, 32, 4, 4), torch.randn(1, 32, 4, 4), torch.randn(1, 32, 8, 8)]
    mask_features = -direction[None, :, None, None].expand(1, 32, 8, 8)  # empty masks
    with torch.no_grad():
        base = decoder(feats, mask_features)["pred_logits"]
        changed = [f.clone() for f in feats]
        changed[0][..., 2:] += 5 * torch.randn(1, 32, 4, 2)
        out = decoder(changed, mask_features)["pred_logits"]
    assert torch.isfinite(base).all()
    assert not torch.allclose(out, base)


def test_pre_norm_and_input_projection():
    torch.manual_seed(0)
    decoder = build_transformer_decoder(small_cfg(PRE_NORM=True), 48)
    assert all(isinstance(p, nn.Conv2d) for p in decoder.input_proj)
    feats, mask_features = random_inputs(batch=1, channels=48)
    out = decoder(feats, mask_features)
    assert torch.isfinite(out["pred_masks"]).all()

    enforced = build_transformer_decoder(small_cfg(ENFORCE_INPUT_PROJ=True), 32)
    assert all(isinstance(p, nn.Conv2d) for p in enforced.input_proj)
    plain = build_transformer_decoder(small_cfg(), 32)
    assert all(isinstance(p, nn.Sequential) and len(p) == 0 for p in plain.input_proj)


def test_bad_config_and_inputs():
    with pytest.raises(ValueError, match="MODEL.MASK_FORMER.DEC_LAYERS"):
        build_transformer_decoder(small_cfg(DEC_LAYERS=1), 32)
    with pytest.raises(ValueError, match="MultiScaleMaskedTransformerDecoder"):
        build_transformer_decoder(small_cfg(TRANSFORMER_DECODER_NAME="NoSuchDecoder"), 32)
    decoder = build_transformer_decoder(small_cfg(), 32)
    feats, mask_features = random_inputs()
    with pytest.raises(ValueError, match="3 feature maps"):
        decoder(feats[:2], mask_features)
    with pytest.raises(ValueError, match="mask_features"):
        decoder(feats, mask_features[:, :16])


def test_state_dict_matches_official_reference():
    cfg = get_cfg()
    add_mask2former_config(cfg)
    cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES = 80
    decoder = build_transformer_decoder(cfg, 256)
    assert isinstance(decoder, MultiScaleMaskedTransformerDecoder)
    ours = [(PREFIX + k, tuple(v.shape)) for k, v in decoder.state_dict().items()]

    reference = []
    with open(REFERENCE_TSV) as f:
        for line in f:
            name, shape, _ = line.rstrip("\n").split("\t")
            if name.startswith(PREFIX):
                reference.append((name, tuple(int(s) for s in shape.strip("()").split(",") if s)))
    assert len(reference) == 175
    assert ours == reference


def test_query_selection_takes_each_images_top_scoring_tokens_with_their_positions():
    torch.manual_seed(0)
    decoder = build_transformer_decoder(small_cfg(QUERY_SELECTION=True), 32)
    names = {n.split(".")[0] for n, _ in decoder.named_parameters()}
    assert {"selection_proj", "selection_norm"} <= names
    assert not {"query_feat", "query_embed"} & names
    feats, mask_features = random_inputs()
    memories, positions = zip(*(decoder._flatten_level(i, f) for i, f in enumerate(feats)))
    queries, query_pos = decoder._select_queries(memories, positions)
    assert queries.shape == query_pos.shape == (7, 2, 32)

    tokens = decoder.selection_norm(decoder.selection_proj(torch.cat(memories)))
    scores = decoder.class_embed(decoder.decoder_norm(tokens)).softmax(-1)[..., :-1].amax(-1)
    all_pos = torch.cat(positions)
    for b in range(2):
        # Each chosen query is a token of its own image, with that token's position, and
        # no token left out scores higher than one chosen.
        rows = [int((tokens[:, b] == q).all(-1).nonzero()[0]) for q in queries[:, b]]
        assert len(set(rows)) == 7
        assert torch.equal(query_pos[:, b], all_pos[rows, b])
        left_out = torch.ones(len(tokens), dtype=torch.bool)
        left_out[rows] = False
        assert scores[rows, b].min() >= scores[left_out, b].max()

    out = decoder(feats, mask_features)
    assert out["pred_masks"].shape == (2, 7, 21, 33) and len(out["aux_outputs"]) == 3
    (out["pred_logits"].sum() + out["aux_outputs"][0]["pred_masks"].mean()).backward()
    assert decoder.selection_proj.weight.grad.abs().sum() > 0


def test_query_selection_bad_settings_fail_naming_the_problem():
    with pytest.raises(ValueError, match="QUERY_SELECTION"):
        MultiScaleMaskedTransformerDecoder(
            32, False, num_classes=3, hidden_dim=32, num_queries=7, nheads=4,
            dim_feedforward=64, dec_layers=3, pre_norm=False, mask_dim=32,
            enforce_input_project=False, query_selection=True)
    decoder = build_transformer_decoder(small_cfg(QUERY_SELECTION=True, NUM_OBJECT_QUERIES=500),
                                        32)
    with pytest.raises(ValueError, match="needs >= 500 memory tokens"):
        decoder(*random_inputs())
