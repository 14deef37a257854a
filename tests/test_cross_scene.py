"""Cross-scene decoding (CROSS_IMAGE.MODE "cross_scene", the released Mask2Former code):
queries decoded on the previous batch's features, supervised with its ground truth, with
the released layer weights; the bank is model state."""
import pytest
import torch
from detectron2.modeling import build_model
from detectron2.utils.events import EventStorage

from utils import fake_pair, get_config, tiny_opts

CONFIG = "shapes/instunique_mask2former_shapes.yaml"
MODE = "MODEL.INST_UNIQUE.CROSS_IMAGE.MODE"


def _model(*opts):
    torch.manual_seed(0)
    cfg = get_config(CONFIG, *tiny_opts(), MODE, "cross_scene",
                     "MODEL.INST_UNIQUE.EQUIVARIANCE.ENABLED", False, *opts)
    return build_model(cfg).train()


def _forward(model, seed):
    batch = [fake_pair(64, 64, 2 + i, seed=seed + i, image_id=seed + i) for i in range(2)]
    views = batch + [x["paired_view"] for x in batch]
    images = model.adapter.preprocess(views)
    return model.adapter.forward_train(images), model.adapter.targets(views, images), batch


def test_first_prediction_on_its_own_scene_is_its_own_first_prediction():
    model = _model()
    with torch.no_grad():
        outputs, _, _ = _forward(model, 0)
        raw = model.adapter.decode_across(outputs.raw, model.adapter.scene(outputs.raw))
    own = outputs.raw["aux_outputs"]
    torch.testing.assert_close(raw["aux_outputs"][0]["pred_masks"], own[0]["pred_masks"])
    # Later layers re-run a layer on already decoded queries (as released): not the same.
    assert not torch.allclose(raw["pred_masks"], outputs.raw["pred_masks"])
    assert len(raw["aux_outputs"]) == len(own)


def test_decode_across_reads_the_other_scene_layer_by_layer():
    model = _model()
    predictor = model.segmenter.sem_seg_head.predictor
    with torch.no_grad():
        a, _, _ = _forward(model, 0)
        b, _, _ = _forward(model, 10)
        scene = model.adapter.scene(b.raw)
        raw = model.adapter.decode_across(a.raw, scene)
        # By hand: layer 0 takes a's queries after layer 0 and attends to b's level 0 under
        # the mask of the first prediction on b's mask features.
        mask_f, _, levels = model.segmenter.sem_seg_head.pixel_decoder.forward_features(scene)
        memory, pos = predictor._flatten_level(0, levels[0])
        first = predictor._predict(a.raw["query_states"][0].transpose(0, 1), mask_f)
        attn = predictor._attention_mask(first["pred_masks"], levels[0].shape[-2:])
        query_pos = a.raw["query_pos"].transpose(0, 1)
        q = predictor.transformer_cross_attention_layers[0](
            a.raw["query_states"][1].transpose(0, 1), memory, attn, pos=pos, query_pos=query_pos)
        q = predictor.transformer_self_attention_layers[0](q, query_pos=query_pos)
        q = predictor.transformer_ffn_layers[0](q)
        expected = predictor._predict(q, mask_f)["pred_masks"]
    torch.testing.assert_close(raw["aux_outputs"][1]["pred_masks"], expected)


def test_loss_is_the_mask_set_loss_on_the_previous_batch_with_released_weights():
    model = _model()
    term = model.cross_scene
    first, first_targets, _ = _forward(model, 0)
    with EventStorage():
        losses0 = term(model.adapter, first, first_targets)  # bank empty: its own batch
        second, second_targets, _ = _forward(model, 10)
        torch.manual_seed(1)  # the criterion samples points at random
        losses1 = term(model.adapter, second, second_targets)
        raw = model.adapter.decode_across(second.raw, model.adapter.scene(first.raw))
        torch.manual_seed(1)
        base, _ = model.adapter.base_losses(raw, first_targets, mask_only=True)
    assert set(losses0) == set(losses1)
    assert "loss_cross_image_mask" in losses1
    assert not any("_ce" in k for k in losses1)  # the class loss is dropped
    torch.testing.assert_close(losses1["loss_cross_image_mask"], base["loss_mask"] / 3)
    torch.testing.assert_close(losses1["loss_cross_image_dice"], base["loss_dice"] / 3)
    torch.testing.assert_close(losses1["loss_cross_image_dice_1"], base["loss_dice_1"] * 2 / 50)
    # The bank now holds the second batch.
    torch.testing.assert_close(term._bank["targets"][0]["masks"], second_targets[0]["masks"])


def test_gradient_reaches_the_queries_not_the_other_scene():
    model = _model()
    outputs, targets, _ = _forward(model, 0)
    with EventStorage():
        model.cross_scene(model.adapter, outputs, targets)  # fills the bank
        outputs, targets, _ = _forward(model, 10)
        losses = model.cross_scene(model.adapter, outputs, targets)
    predictor = model.segmenter.sem_seg_head.predictor
    pixel_decoder = model.segmenter.sem_seg_head.pixel_decoder
    grads = torch.autograd.grad(sum(losses.values()),
                                [predictor.query_feat.weight, *pixel_decoder.parameters()],
                                allow_unused=True)
    assert grads[0].abs().sum() > 0
    # The pixel decoder learns only through this batch's own queries (their states came
    # through its features); with those detached, the other scene passes no gradient.
    states = [q.detach() for q in outputs.raw["query_states"]]
    raw = model.adapter.decode_across(dict(outputs.raw, query_states=states),
                                      model.adapter.scene(outputs.raw))
    with EventStorage():
        base, _ = model.adapter.base_losses(raw, targets, mask_only=True)
    grads = torch.autograd.grad(sum(base.values()), list(pixel_decoder.parameters()),
                                allow_unused=True)
    assert all(g is None for g in grads)


def test_bank_is_checkpointed_and_restored():
    model = _model()
    outputs, targets, _ = _forward(model, 0)
    with EventStorage():
        model.cross_scene(model.adapter, outputs, targets)
    state = model.state_dict()
    assert "cross_scene._extra_state" in state
    fresh = _model()
    fresh.load_state_dict(state)
    torch.testing.assert_close(fresh.cross_scene._bank["targets"][1]["masks"], targets[1]["masks"])
    for k, v in model.cross_scene._bank["scene"].items():
        torch.testing.assert_close(fresh.cross_scene._bank["scene"][k], v)


def test_bad_mode_and_unsupported_base_name_the_key():
    with pytest.raises(ValueError, match="MODEL.INST_UNIQUE.CROSS_IMAGE.MODE must be one of"):
        build_model(get_config(CONFIG, *tiny_opts(), MODE, "scenes"))
    with pytest.raises(ValueError, match='CROSS_IMAGE.MODE "cross_scene" needs'):
        build_model(get_config("shapes/instunique_sparseinst_shapes.yaml", MODE, "cross_scene"))
