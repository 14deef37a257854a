"""End-to-end: build from config, forward/backward, checkpoint names, save/load, parity."""
import glob
import os

import pytest
import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.modeling import build_model
from detectron2.utils.events import EventStorage

from utils import (
    CONFIGS,
    fake_pair,
    fake_view,
    get_config,
    read_reference,
    tiny_opts,
    train_step,
)

ALL_CONFIGS = sorted(
    os.path.relpath(p, CONFIGS)
    for p in glob.glob(os.path.join(CONFIGS, "**/*.yaml"), recursive=True)
    if not os.path.basename(p).startswith("Base-")
)



@pytest.mark.parametrize("path", ALL_CONFIGS)
def test_every_config_builds(path):
    cfg = get_config(path)
    model = build_model(cfg)
    assert sum(p.numel() for p in model.parameters()) > 0


def test_state_dict_matches_official_reference():
    reference = read_reference("m2f_coco_instance_R50.tsv")
    for path in ("coco/instance-segmentation/mask2former_R50_bs16_50ep.yaml",
                 "coco/instance-segmentation/instunique_mask2former_R50_bs16_50ep.yaml"):
        model = build_model(get_config(path))
        ours = [(k, tuple(v.shape)) for k, v in model.state_dict().items()
                if not k.startswith("memory.")]
        assert ours == reference, path


@pytest.mark.parametrize("meta", ["mask2former", "instunique"])
def test_forward_backward_odd_sizes_and_empty_image(meta):
    cfg = get_config(f"shapes/{meta}_mask2former_shapes.yaml" if meta == "instunique"
                     else "shapes/mask2former_shapes.yaml", *tiny_opts())
    torch.manual_seed(0)
    model = build_model(cfg)
    if meta == "instunique":
        batch = [fake_pair(67, 95, 3, 0, 1), fake_pair(81, 53, 0, 1, 2)]
    else:
        batch = [fake_view(67, 95, 3, 0), fake_view(81, 53, 0, 1)]
    losses = train_step(model, batch)
    assert {"loss_ce", "loss_mask", "loss_dice"} <= set(losses)
    if meta == "instunique":
        extra = {"loss_cross_image", "loss_equi_ce", "loss_equi_mask", "loss_equi_dice"}
        assert extra <= set(losses)
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert sum(g is not None and bool(g.abs().sum() > 0) for g in grads) > 0.9 * len(grads)

    model.eval()
    with torch.no_grad():
        out = model([{k: v for k, v in batch[0].items() if k in ("image", "height", "width")}])
    inst = out[0]["instances"]
    assert inst.pred_masks.shape[-2:] == (67, 95)
    assert len(inst) == cfg.TEST.DETECTIONS_PER_IMAGE


def test_all_empty_batch_trains():
    cfg = get_config("shapes/instunique_mask2former_shapes.yaml", *tiny_opts())
    model = build_model(cfg)
    losses = train_step(model, [fake_pair(64, 64, 0, 0, 1), fake_pair(64, 64, 0, 1, 2)])
    assert float(losses["loss_mask"]) == 0.0


def test_save_load_round_trip_gives_identical_outputs(tmp_path):
    cfg = get_config("shapes/instunique_mask2former_shapes.yaml", *tiny_opts())
    torch.manual_seed(0)
    model = build_model(cfg)
    train_step(model, [fake_pair(64, 64, 2, 0, 1), fake_pair(64, 64, 1, 1, 2)])  # fill memory
    DetectionCheckpointer(model, save_dir=str(tmp_path)).save("ckpt")

    torch.manual_seed(1)
    clone = build_model(cfg)
    DetectionCheckpointer(clone).load(str(tmp_path / "ckpt.pth"))
    for (k, a), (k2, b) in zip(model.state_dict().items(), clone.state_dict().items()):
        assert k == k2 and torch.equal(a, b), k
    assert len(clone.memory) == len(model.memory) > 0

    x = [{"image": fake_view(70, 90, 0, 3)["image"]}]
    model.eval()
    clone.eval()
    with torch.no_grad():
        a, b = model(x)[0]["instances"], clone(x)[0]["instances"]
    assert torch.equal(a.scores, b.scores) and torch.equal(a.pred_masks, b.pred_masks)


def test_instunique_inference_equals_base_model_bit_for_bit(tmp_path):
    cfg = get_config("shapes/instunique_mask2former_shapes.yaml", *tiny_opts())
    torch.manual_seed(0)
    model = build_model(cfg)
    train_step(model, [fake_pair(64, 64, 2, 0, 1), fake_pair(64, 64, 1, 1, 2)])
    DetectionCheckpointer(model, save_dir=str(tmp_path)).save("ckpt")

    base_cfg = get_config("shapes/mask2former_shapes.yaml", *tiny_opts())
    base = build_model(base_cfg)
    saved = torch.load(str(tmp_path / "ckpt.pth"), weights_only=False)["model"]
    # The InstUnique checkpoint holds every key of the base model; its extras are the memory.
    assert set(base.state_dict()) <= set(saved)
    assert all(k.startswith("memory.") for k in set(saved) - set(base.state_dict()))
    DetectionCheckpointer(base).load(str(tmp_path / "ckpt.pth"))

    x = [{"image": fake_view(75, 61, 0, 5)["image"], "height": 150, "width": 122}]
    model.eval()
    base.eval()
    with torch.no_grad():
        a, b = model(x)[0]["instances"], base(x)[0]["instances"]
    for field in ("scores", "pred_classes", "pred_masks"):
        assert torch.equal(a.get(field), b.get(field)), field
    assert torch.equal(a.pred_boxes.tensor, b.pred_boxes.tensor)


def test_checkpoint_with_other_shapes_loads_with_mismatches_skipped(tmp_path):
    small = build_model(get_config("shapes/instunique_mask2former_shapes.yaml", *tiny_opts(),
                                   "MODEL.SEM_SEG_HEAD.NUM_CLASSES", 2))
    DetectionCheckpointer(small, save_dir=str(tmp_path)).save("small")
    model = build_model(get_config("shapes/instunique_mask2former_shapes.yaml", *tiny_opts()))
    before = model.sem_seg_head.predictor.class_embed.weight.clone()
    DetectionCheckpointer(model).load(str(tmp_path / "small.pth"))
    # The class head (2 vs 4 classes) is skipped; everything else is loaded.
    assert torch.equal(model.sem_seg_head.predictor.class_embed.weight, before)
    assert torch.equal(model.backbone.stem.conv1.weight, small.backbone.stem.conv1.weight)


@pytest.mark.parametrize("on", [True, False])
def test_base_loss_on_paired_view_switch(on):
    """BASE_LOSS_ON_PAIRED_VIEW True: L_base over x and x' (the plain model's loss on all
    views); False: over x alone (the plain model's loss on the x views), while x' still
    gets Eq. 8. FrozenBN: batch statistics would tie x's features to x'."""
    frozen = ["MODEL.RESNETS.NORM", "FrozenBN"]
    cfg = get_config("shapes/instunique_mask2former_shapes.yaml", *tiny_opts(), *frozen,
                     "MODEL.INST_UNIQUE.CROSS_IMAGE.ENABLED", False,
                     "MODEL.INST_UNIQUE.EQUIVARIANCE.BASE_LOSS_ON_PAIRED_VIEW", on)
    torch.manual_seed(0)
    model = build_model(cfg)
    base = build_model(get_config("shapes/mask2former_shapes.yaml", *tiny_opts(), *frozen))
    base.load_state_dict(model.state_dict())
    batch = [fake_pair(64, 64, 2, 0, 1), fake_pair(64, 64, 1, 1, 2)]
    views = list(batch) + ([x["paired_view"] for x in batch] if on else [])
    model.train()
    base.train()
    with EventStorage():
        torch.manual_seed(5)  # the matcher and criterion sample points: same draws
        losses = model(batch)
        torch.manual_seed(5)
        ref = base([{k: v for k, v in x.items() if k not in ("paired_view", "warp")}
                    for x in views])
    equi = {k for k in losses if k.startswith("loss_equi_")}
    assert equi == {"loss_equi_ce", "loss_equi_mask", "loss_equi_dice"}
    assert set(losses) - equi == set(ref)
    for k in ref:
        torch.testing.assert_close(losses[k], ref[k], rtol=1e-4, atol=1e-6)
    assert all(losses[k] > 0 for k in equi)
    # Eq. 8 alone trains the x' queries: its gradient reaches the decoder's query tables.
    sum(losses[k] for k in equi).backward()
    assert model.segmenter.sem_seg_head.predictor.query_feat.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("opts", [
    ["MODEL.INST_UNIQUE.EQUIVARIANCE.MATCHING", "view"],
    ["MODEL.INST_UNIQUE.CROSS_IMAGE.QUERIES", "matched"],
])
def test_paired_view_matching_without_its_loss(opts, monkeypatch):
    """Without x' base loss, the terms that read x' matching still get it, computed without
    a loss graph."""
    cfg = get_config("shapes/instunique_mask2former_shapes.yaml", *tiny_opts(), *opts,
                     "MODEL.INST_UNIQUE.EQUIVARIANCE.BASE_LOSS_ON_PAIRED_VIEW", False)
    torch.manual_seed(0)
    model = build_model(cfg)
    calls = []
    base_losses = model.adapter.base_losses

    def spy(raw, targets, *args, **kwargs):
        calls.append((len(targets), torch.is_grad_enabled()))
        return base_losses(raw, targets, *args, **kwargs)

    monkeypatch.setattr(model.adapter, "base_losses", spy)
    losses = train_step(model, [fake_pair(64, 64, 2, 0, 1), fake_pair(64, 64, 1, 1, 2)])
    # x (with grad), x' matching (no grad), then Eq. 8 on x' (with grad).
    assert calls == [(2, True), (2, False), (2, True)]
    assert {"loss_cross_image", "loss_equi_mask"} <= set(losses)


@pytest.mark.parametrize("segmenter", ["mask2former", "sparseinst"])
def test_terms_at_weight_zero_train_exactly_as_the_paired_view_baseline(segmenter):
    # A term at weight 0 must change nothing but the logged losses: not the base losses,
    # the clipped gradient, the BatchNorm statistics nor the weights (the SparseInst study
    # lost AP to the terms; this rules out a side effect of their mere presence).
    from instunique.solver import build_optimizer

    # The optimizer clips the sum here (the trainer's clipping apart has its own tests).
    extra = [*(tiny_opts() if segmenter == "mask2former" else []),
             "MODEL.INST_UNIQUE.TERMS_CLIP_VALUE", 0.0]
    batches = [[fake_pair(64, 64, 2, 2 * s, 1), fake_pair(64, 64, 1, 2 * s + 1, 2)]
               for s in range(2)]

    def train(path, *opts):
        cfg = get_config(f"shapes/{path}_{segmenter}_shapes.yaml", *extra, *opts)
        torch.manual_seed(0)
        model = build_model(cfg)
        optimizer = build_optimizer(cfg, model)
        base_losses = []
        for step, batch in enumerate(batches):
            torch.manual_seed(100 + step)  # the trainer seeds every step (SeedEachStep)
            optimizer.zero_grad()
            losses = train_step(model, batch)
            base_losses.append({k: v for k, v in losses.items() if "equi" not in k
                                and "cross" not in k})
            optimizer.step()
        return base_losses, model.state_dict()

    base, base_state = train("paired_views")
    terms, terms_state = train("instunique", "MODEL.INST_UNIQUE.CROSS_IMAGE.WEIGHT", 0.0,
                               "MODEL.INST_UNIQUE.EQUIVARIANCE.WEIGHT", 0.0)
    assert base == terms
    assert set(terms_state) - set(base_state) == {
        f"memory.{k}" for k in ("feats", "labels", "image_ids", "ptr", "size")}
    for key, value in base_state.items():
        assert torch.equal(value, terms_state[key]), key
    # ... and at weight 1 the same steps do move the weights differently.
    _, moved = train("instunique")
    assert not all(torch.equal(v, moved[k]) for k, v in base_state.items())
