"""InstUnique on CondInst: the adapter's query/pixel packing, the dynamic head as the
query-pixel response, Eq. 5 / Eq. 8 through it, inference parity and the new configs."""
import glob
import os

import pytest
import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.modeling import build_model

from instunique.adapter import build_adapter
from instunique.objectives import external_focal_loss

from utils import CONFIGS, fake_pair, fake_view, get_config, train_step

BASE = "shapes/condinst_effl0_shapes.yaml"
INSTUNIQUE = "shapes/instunique_condinst_effl0_shapes.yaml"
PAIRED = "shapes/paired_views_condinst_effl0_shapes.yaml"
# Random backbone weights (faster, and no test needs ImageNet features); every detection
# kept, so an untrained model has masks to compare.
FAST = ("MODEL.EFFICIENTNET.WEIGHTS", "", "MODEL.FCOS.INFERENCE_TH_TEST", 0.0)


def _pairs():
    return [fake_pair(64, 64, 2, 0, 1), fake_pair(64, 64, 1, 1, 2)]


def _forward(model, views):
    adapter = build_adapter(model)
    images = adapter.preprocess(views)
    return adapter, images, adapter.targets(views, images), adapter.forward_train(images)


def test_instunique_inference_equals_base_model_bit_for_bit(tmp_path):
    torch.manual_seed(0)
    model = build_model(get_config(INSTUNIQUE, *FAST))
    losses = train_step(model, _pairs())
    assert {"loss_cross_image", "loss_equi_mask", "loss_mask", "loss_fcos_cls"} <= set(losses)
    assert not any(k.startswith("loss_equi_fcos") for k in losses)  # see final_layer_outputs
    DetectionCheckpointer(model, save_dir=str(tmp_path)).save("ckpt")
    base = build_model(get_config(BASE, *FAST))
    saved = torch.load(str(tmp_path / "ckpt.pth"), weights_only=False)["model"]
    assert set(saved) - set(base.state_dict()) == {
        f"memory.{k}" for k in ("feats", "labels", "image_ids", "ptr", "size")}
    DetectionCheckpointer(base).load(str(tmp_path / "ckpt.pth"))
    x = [{"image": fake_view(75, 61, 0, 5)["image"], "height": 150, "width": 122}]
    model.eval()
    base.eval()
    with torch.no_grad():
        a, b = model(x)[0]["instances"], base(x)[0]["instances"]
    assert len(a) > 0
    for field in ("scores", "pred_classes", "pred_masks", "pred_boxes"):
        va, vb = a.get(field), b.get(field)
        va, vb = getattr(va, "tensor", va), getattr(vb, "tensor", vb)
        assert torch.equal(va, vb), field


def test_adapter_packs_queries_and_pixels_and_rebuilds_the_mask_loss():
    torch.manual_seed(0)
    model = build_model(get_config(BASE, *FAST))
    views = [fake_view(64, 96, 3, 0), fake_view(64, 96, 1, 1)]
    adapter, images, targets, out = _forward(model, views)
    raw = out.raw
    p_gen, c = model.mask_head.num_gen_params, model.mask_head.in_channels
    b, num_loc = raw["params"].shape[:2]
    assert adapter.pixel_stride == 8 and adapter.embed_dim == 2 + c
    assert out.pixel_embeds.shape == (b, 2 + c, 8, 12)
    assert out.query_embeds.shape == (b, num_loc, p_gen + 3)
    assert out.class_logits.shape == (b, num_loc, 4 + 1)
    # Channels 0-1 of a pixel: its input-pixel (x, y); of a query: its location and level.
    assert out.pixel_embeds[1, :2, 2, 5].tolist() == [5 * 8 + 4, 2 * 8 + 4]
    assert torch.equal(out.query_embeds[..., p_gen : p_gen + 2], raw["locations"])
    assert torch.equal(out.query_embeds[..., -1].long(), raw["levels"])

    losses, matching = adapter.base_losses(raw, targets)
    assert set(losses) == {"loss_fcos_cls", "loss_fcos_loc", "loss_fcos_ctr", "loss_mask"}
    assert sum(len(s) for s, _ in matching) > 0
    rebuilt = adapter.final_layer_outputs(out.class_logits, out.query_embeds, out.pixel_embeds)
    again, _ = adapter.base_losses(rebuilt, targets, matching=matching)
    assert set(again) == {"loss_mask"}
    torch.testing.assert_close(again["loss_mask"], losses["loss_mask"], rtol=1e-6, atol=0)
    # CondInst's own detection score.
    expected = (raw["cls_logits"].sigmoid().max(-1).values * raw["ctrness"][..., 0].sigmoid())
    torch.testing.assert_close(adapter.query_scores(out.class_logits), expected.sqrt())


def test_the_response_is_the_dot_product_for_mask2former_and_the_dynamic_head_here():
    """The same small example through both adapters: Mask2Former's logit is e . f; CondInst's
    is its three 1x1 layers on [relative coordinates, features], computed here by hand."""
    torch.manual_seed(0)
    m2f = build_adapter(build_model(get_config("shapes/mask2former_shapes.yaml")))
    e, f = torch.randn(3, 6), torch.randn(5, 6)
    torch.testing.assert_close(m2f.pixel_logits(e, f), e @ f.t())
    assert m2f.linear_response

    model = build_model(get_config(BASE, *FAST))
    adapter = build_adapter(model)
    assert not adapter.linear_response
    head = model.mask_head
    c, p_gen = head.in_channels, head.num_gen_params
    params = torch.randn(3, p_gen) * 0.5
    locations = torch.tensor([[20.0, 36.0], [4.0, 4.0], [100.0, 12.0]])
    levels = torch.tensor([0, 1, 2])
    queries = torch.cat([params, locations, levels[:, None].float()], 1)
    pixels = torch.cat([torch.tensor([[12.0, 28.0], [60.0, 4.0], [4.0, 84.0], [36.0, 36.0],
                                      [20.0, 36.0]]), torch.randn(5, c)], 1)
    got = adapter.pixel_logits(queries, pixels)
    soi = head.sizes_of_interest.float()
    widths = [c + 2, head.channels, head.channels, 1]
    for r in range(3):
        sizes = [i * o for i, o in zip(widths[:-1], widths[1:])] + widths[1:]
        chunks = torch.split(params[r], sizes)
        for n in range(5):
            rel = (locations[r] - pixels[n, :2]) / soi[levels[r]]
            x = torch.cat([rel, pixels[n, 2:]])
            for layer in range(3):
                w = chunks[layer].reshape(widths[layer + 1], widths[layer])
                x = w @ x + chunks[3 + layer]
                if layer < 2:
                    x = x.relu()
            torch.testing.assert_close(got[r, n], x[0], rtol=1e-5, atol=1e-6)


def test_adapter_masks_are_condinst_inference_masks():
    """The uniqueness evaluator's own mask of a query is what CondInst's inference predicts
    for that location: the grid logits, x2 aligned, sigmoid, to the input, crop, resize."""
    torch.manual_seed(0)
    model = build_model(get_config(BASE, *FAST)).eval()
    adapter = build_adapter(model)
    inputs = [{"image": fake_view(60, 90, 0, 3)["image"], "height": 45, "width": 67}]
    with torch.no_grad():
        images = adapter.preprocess(inputs)
        out = adapter.forward_train(images)
        result = model.inference(out.raw, inputs, images)[0]["instances"]
        inds = result.location_inds
        logits = adapter.mask_logits(out.query_embeds[:, inds], out.pixel_embeds)[0]
        padded, size = tuple(images.tensor.shape[-2:]), images.image_sizes[0]
        probs = adapter.output_probabilities(logits, padded, size, (45, 67))
    assert len(inds) > 0 and padded != size
    masks = probs > adapter.mask_threshold
    assert torch.equal(masks, result.pred_masks) and 0 < masks.float().mean() < 1


def test_eq5_on_condinst_an_external_copy_of_the_own_instance_fires_and_is_trained_down():
    """Pixels of a query's own instance, copied into another image (same features, same
    coordinates), get exactly the logits they get at home; Eq. 5 through the dynamic head
    lowers them."""
    torch.manual_seed(0)
    model = build_model(get_config(BASE, *FAST))
    adapter, images, targets, out = _forward(model, [fake_view(64, 64, 1, 4)])
    _, matching = adapter.base_losses(out.raw, targets)
    src, _ = matching[0]
    query = out.query_embeds[0, src[:1]].detach()  # (1, D): one positive location
    f = out.pixel_embeds[0].detach()
    inside = targets[0]["masks"][0, 4::8, 4::8]  # cells whose centre is on the instance
    own = f[:, inside].t()  # (n, 2 + C)
    home = adapter.mask_logits(query[None], f[None])[0, 0][inside]
    torch.testing.assert_close(adapter.pixel_logits(query, own)[0], home, rtol=1e-5, atol=1e-6)

    params = query.clone().requires_grad_()
    optimizer = torch.optim.SGD([params], lr=0.5)
    ids = torch.zeros(1, dtype=torch.long)
    history = []
    for _ in range(20):
        loss = external_focal_loss(params, own, ids, torch.ones(len(own), dtype=torch.long),
                                   torch.full((1,), -1), torch.full((len(own),), -1),
                                   response=adapter.pixel_logits)
        optimizer.zero_grad()
        loss.backward()
        # Only the query's filters learn; its location and level are not parameters.
        assert params.grad[0, :-3].abs().sum() > 0 and not params.grad[0, -3:].any()
        optimizer.step()
        history.append(loss.item())
    assert history[-1] < 0.5 * history[0]
    assert adapter.pixel_logits(params.detach(), own).max() < home.max()


def test_eq5_chunks_by_the_dynamic_heads_width_with_the_same_loss_and_gradient():
    """The automatic chunk counts the head's hidden activations (CondInst's width 8): more,
    smaller chunks than for a dot product, and the same loss and query gradient."""
    torch.manual_seed(0)
    model = build_model(get_config(INSTUNIQUE, *FAST))
    adapter = model.adapter
    assert adapter.response_width == adapter.model.mask_head.channels == 8
    assert model.cross_image.response_width == 8
    r, n = 64, 2000
    params = torch.randn(r, adapter.model.mask_head.num_gen_params) * 0.3
    queries = torch.cat([params, torch.rand(r, 2) * 128, torch.zeros(r, 1)], 1)
    pixels = torch.cat([torch.rand(n, 2) * 128, torch.randn(n, adapter.embed_dim - 2)], 1)
    ids_q, ids_p = torch.zeros(r, dtype=torch.long), torch.ones(n, dtype=torch.long)
    results = {}
    for width in (1, 8):
        calls = []

        def response(q, f, calls=calls):
            calls.append(len(f))
            return adapter.pixel_logits(q, f)

        q = queries.clone().requires_grad_()
        loss = external_focal_loss(q, pixels, ids_q, ids_p, torch.full((r,), -1),
                                   torch.full((n,), -1), response=response,
                                   response_width=width)
        loss.backward()
        results[width] = (loss.detach(), q.grad, calls)
    assert results[1][2] == [n] and results[8][2] == [512, 512, 512, 464]
    torch.testing.assert_close(results[8][0], results[1][0], rtol=1e-5, atol=0)
    torch.testing.assert_close(results[8][1], results[1][1], rtol=1e-4, atol=1e-9)


def test_eq5_options_written_for_the_dot_product_fail_at_build():
    with pytest.raises(ValueError, match="CROSS_IMAGE.HARD_NEGATIVES 'topk' needs .* dot "):
        build_model(get_config(INSTUNIQUE, *FAST,
                               "MODEL.INST_UNIQUE.CROSS_IMAGE.HARD_NEGATIVES", "topk"))


@pytest.mark.parametrize("config", [INSTUNIQUE, PAIRED, BASE])
def test_shapes_configs_take_a_training_step(config):
    torch.manual_seed(0)
    cfg = get_config(config, *FAST)
    model = build_model(cfg)
    batch = _pairs() if cfg.MODEL.META_ARCHITECTURE == "InstUnique" else [
        fake_view(64, 64, 2, 0, 1), fake_view(64, 64, 0, 1, 2)]
    losses = train_step(model, batch)
    terms = {k for k in losses if k.startswith(("loss_cross", "loss_equi"))}
    assert bool(terms) == (config == INSTUNIQUE)


def test_coco_configs_build_with_the_paper_settings():
    cfg = get_config("coco/instance-segmentation/instunique_condinst_R50_1x.yaml",
                     "MODEL.WEIGHTS", "")
    iu = cfg.MODEL.INST_UNIQUE
    assert iu.BASE_META_ARCHITECTURE == "CondInst" and iu.CROSS_IMAGE.MEMORY_PIXELS == 100000
    assert list(iu.EQUIVARIANCE.TRANSFORMS) == ["flip", "crop", "rotation", "scaling"]
    torch.manual_seed(0)
    model = build_model(cfg)
    assert model.memory.feats.shape == (100000, 2 + 8)
    losses = train_step(model, [fake_pair(64, 64, 1, 0, 1)])
    assert losses["loss_cross_image"] >= 0 and "loss_equi_mask" in losses
    ablations = sorted(glob.glob(os.path.join(
        CONFIGS, "coco/instance-segmentation/ablations/instunique_condinst_*.yaml")))
    assert len(ablations) == 9  # Table S3's four transform sets, Table S4's five memories
    for path in ablations:
        a = get_config(os.path.relpath(path, CONFIGS)).MODEL.INST_UNIQUE
        assert a.BASE_META_ARCHITECTURE == "CondInst"
        assert ("equi_" in path) == (not a.CROSS_IMAGE.ENABLED)


def test_uniqueness_evaluator_watches_condinst_inference():
    """The evaluator reads the embeddings of the very inference forward (through the raw
    structure's identity module) and scores external firing with the dynamic head."""
    from instunique.evaluation import QueryUniquenessEvaluator

    torch.manual_seed(0)
    model = build_model(get_config(BASE, *FAST)).eval()
    ev = QueryUniquenessEvaluator(None, model, group_size=2, score_thresh=0.0,
                                  pixels_per_image=0, distributed=False)
    ev.reset()
    assert ev._handle is not None  # a forward hook, not a second forward
    with torch.no_grad():
        for seed in (0, 1):
            inputs = [{"image": fake_view(64, 64, 0, seed)["image"], "image_id": seed}]
            ev.process(inputs, model(inputs))
    assert ev._captured == []  # consumed: no second forward was run
    res = ev.evaluate()["uniqueness"]
    assert 0.0 <= res["external_fire"] <= 100.0 and 0 < res["external_max_prob"] < 1
    # Threshold 0: every FCOS location of a 64 x 64 input is a query (P3-P7: 64 + 16 + 4 + 1
    # + 1), counted before NMS.
    assert res["confident_per_image"] == 86
