"""InstUnique on SparseInst: the adapter's contract, inference parity, Eq. 5 / Eq. 8 / the
memory through train_net, and the uniqueness evaluator."""
import json
import os
import sys

import pytest
import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.data import build_detection_test_loader
from detectron2.engine import default_argument_parser
from detectron2.evaluation import inference_on_dataset
from detectron2.modeling import build_model

from instunique.data.synthetic.shapes import register_shapes
from instunique.evaluation import QueryUniquenessEvaluator
from instunique.objectives import EquivarianceLoss
from instunique.transforms import AffineWarp
from instunique.visualization import query_response

from utils import CONFIGS, ROOT, fake_pair, fake_view, get_config, train_step

sys.path.insert(0, ROOT)
import train_net  # noqa: E402

BASE = "shapes/sparseinst_shapes.yaml"
INSTUNIQUE = "shapes/instunique_sparseinst_shapes.yaml"


def test_instunique_inference_equals_base_model_bit_for_bit(tmp_path):
    torch.manual_seed(0)
    model = build_model(get_config(INSTUNIQUE))
    losses = train_step(model, [fake_pair(64, 64, 2, 0, 1), fake_pair(64, 64, 1, 1, 2)])
    assert {"loss_cross_image", "loss_equi_mask", "loss_equi_dice"} <= set(losses)
    DetectionCheckpointer(model, save_dir=str(tmp_path)).save("ckpt")

    base = build_model(get_config(BASE))
    saved = torch.load(str(tmp_path / "ckpt.pth"), weights_only=False)["model"]
    assert set(base.state_dict()) <= set(saved)
    assert all(k.startswith("memory.") for k in set(saved) - set(base.state_dict()))
    DetectionCheckpointer(base).load(str(tmp_path / "ckpt.pth"))

    x = [{"image": fake_view(75, 61, 0, 5)["image"], "height": 150, "width": 122}]
    model.eval()
    base.eval()
    with torch.no_grad():
        a, b = model(x)[0]["instances"], base(x)[0]["instances"]
    assert len(a) > 0
    for field in ("scores", "pred_classes", "pred_masks"):
        assert torch.equal(a.get(field), b.get(field)), field
    assert torch.equal(a.pred_boxes.tensor, b.pred_boxes.tensor)


def test_adapter_rebuilds_the_segmenter_outputs_and_losses():
    torch.manual_seed(0)
    model = build_model(get_config(INSTUNIQUE))
    adapter, base = model.adapter, model.segmenter
    views = [fake_view(67, 95, 3, 0), fake_view(81, 53, 0, 1)]
    images = adapter.preprocess(views)
    targets = adapter.targets(views, images)
    out = adapter.forward_train(images)
    n, k, c = 20, 4, adapter.embed_dim
    h_f, w_f = (s // adapter.pixel_stride for s in images.tensor.shape[-2:])
    assert out.pixel_embeds.shape == (2, c, h_f, w_f) and out.query_embeds.shape == (2, n, c)
    # Per-query logit layout: K class logits, then the objectness logit.
    assert out.class_logits.shape == (2, n, k + 1)

    rebuilt = adapter.final_layer_outputs(out.class_logits, out.query_embeds, out.pixel_embeds)
    for key in ("pred_logits", "pred_scores", "pred_masks"):
        assert torch.equal(rebuilt[key], out.raw[key]), key
    losses, matching = adapter.base_losses(out.raw, targets)
    again, _ = adapter.base_losses(rebuilt, targets, matching=matching)
    assert set(losses) == {"loss_ce", "loss_objectness", "loss_dice", "loss_mask"}
    for key in losses:
        assert torch.equal(losses[key], again[key]), key
    masks_only, _ = adapter.base_losses(rebuilt, targets, matching=matching, mask_only=True)
    assert set(masks_only) == {"loss_dice", "loss_mask"}

    # Confidence: SparseInst's own inference score, not a softmax over the K + 1 logits.
    probs = out.raw["pred_logits"].sigmoid().max(-1).values
    expected = (probs * out.raw["pred_scores"][..., 0].sigmoid()).sqrt()
    torch.testing.assert_close(adapter.query_scores(out.class_logits), expected)
    assert base.decoder is adapter.model.decoder


def test_adapter_masks_are_sparseinst_inference_masks():
    """What the uniqueness evaluator calls a query's own mask is what SparseInst's inference
    predicts: logits x2, sigmoid, to the padded input, crop, resize, > MASK_THRESHOLD."""
    from instunique.adapter import build_adapter
    from instunique.segmenters.sparseinst.inference import sparseinst_inference

    torch.manual_seed(0)
    model = build_model(get_config(BASE)).eval()
    adapter = build_adapter(model)
    x = fake_view(60, 90, 2, 0)
    inputs = [{"image": x["image"], "height": 45, "width": 67}]
    with torch.no_grad():
        images = adapter.preprocess(inputs)
        out = adapter.forward_train(images)
        padded, size = tuple(images.tensor.shape[-2:]), images.image_sizes[0]
        logits = adapter.mask_logits(out.query_embeds, out.pixel_embeds)[0]
        probs = adapter.output_probabilities(logits, padded, size, (45, 67))
        n = logits.shape[0]
        expected = sparseinst_inference(
            out.raw["pred_logits"][0], out.raw["pred_scores"][0], out.raw["pred_masks"][0],
            size, padded, (45, 67), -1.0, model.mask_threshold, n,
        ).pred_masks
    assert padded != size and adapter.mask_threshold == model.mask_threshold == 0.45
    masks = probs > adapter.mask_threshold
    assert masks.shape == expected.shape == (n, 45, 67)
    assert torch.equal(masks, expected) and 0 < masks.float().mean() < 1


def test_query_response_reads_sparseinst_scores_and_masks():
    torch.manual_seed(0)
    model = build_model(get_config(BASE)).eval()
    x = fake_view(64, 96, 2, 0)
    inputs = [{k: x[k] for k in ("image", "height", "width")}]
    response = query_response(model, inputs)
    with torch.no_grad():
        raw = model.predict(model.preprocess_image(inputs))
    probs = raw["pred_logits"][0].sigmoid()
    scores = (probs.max(-1).values * raw["pred_scores"][0, :, 0].sigmoid()).sqrt()
    assert response.query == int(scores.argmax())
    assert response.class_id == int(probs[response.query].argmax())
    assert response.score == pytest.approx(float(scores.max()), rel=1e-5)
    assert response.probs[0].shape == (64, 96) and response.threshold == 0.45


def test_equivariance_with_identity_warp_is_the_base_loss_of_the_view():
    """Eq. 8 unchanged on SparseInst: with T = identity, e' . T(F) is the model's own
    prediction, so L_equi equals the base loss of x' under the same matching."""
    torch.manual_seed(0)
    model = build_model(get_config(INSTUNIQUE))
    adapter = model.adapter
    views = [fake_view(64, 64, 2, 0), fake_view(64, 64, 1, 1)] * 2
    images = adapter.preprocess(views)
    targets = adapter.targets(views, images)
    out = adapter.forward_train(images)
    warps = [AffineWarp.identity(64, 64)] * 2
    _, matching = adapter.base_losses(adapter.batch_slice(out.raw, 2, 4), targets[2:])
    equi = EquivarianceLoss(weight=1.0, stride=adapter.pixel_stride, matching="view")(
        adapter, out, targets, warps, images.image_sizes, matching)
    base, _ = adapter.base_losses(adapter.batch_slice(out.raw, 2, 4), targets[2:],
                                  matching=matching)
    assert set(equi) == {f"loss_equi_{k[5:]}" for k in base}
    for key, value in base.items():
        torch.testing.assert_close(equi["loss_equi_" + key[5:]], value, rtol=1e-4, atol=1e-5)


@pytest.fixture(scope="module")
def tiny_shapes(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("sparseinst_shapes"))
    register_shapes(root, prefix="si_shapes", num_train=4, num_val=2)
    return "si_shapes"


def test_shapes_config_trains_with_every_term_and_evaluates(tiny_shapes, tmp_path):
    argv = [
        "--config-file", os.path.join(CONFIGS, INSTUNIQUE),
        "DATASETS.TRAIN", f"('{tiny_shapes}_train',)", "DATASETS.TEST", f"('{tiny_shapes}_val',)",
        "INPUT.MIN_SIZE_TRAIN", "(64,)", "INPUT.MAX_SIZE_TRAIN", "64",
        "INPUT.MIN_SIZE_TEST", "64", "INPUT.MAX_SIZE_TEST", "64",
        "SOLVER.IMS_PER_BATCH", "2", "SOLVER.MAX_ITER", "3", "SOLVER.WARMUP_ITERS", "1",
        "MODEL.INST_UNIQUE.CROSS_IMAGE.MEMORY_PIXELS", "1000",
        "TEST.UNIQUENESS.GROUP_SIZE", "2", "DATALOADER.NUM_WORKERS", "0",
        "OUTPUT_DIR", str(tmp_path),
    ]
    cfg = train_net.setup(default_argument_parser().parse_args(argv))
    iu = cfg.MODEL.INST_UNIQUE
    assert iu.CROSS_IMAGE.ENABLED and iu.EQUIVARIANCE.ENABLED and iu.CROSS_IMAGE.MEMORY_PIXELS
    train_net.main(default_argument_parser().parse_args(argv))
    with open(os.path.join(tmp_path, "metrics.json")) as f:
        rows = [json.loads(line) for line in f]
    train = [r for r in rows if "total_loss" in r]
    assert train and train[-1]["iteration"] == 2
    for key in ("loss_ce", "loss_objectness", "loss_dice", "loss_mask", "loss_cross_image",
                "loss_equi_ce", "loss_equi_objectness", "loss_equi_dice", "loss_equi_mask"):
        assert all(key in r and torch.isfinite(torch.tensor(r[key])) for r in train), key
    assert train[-1]["loss_cross_image"] > 0 and train[-1]["loss_equi_mask"] > 0
    ckpt = torch.load(os.path.join(tmp_path, "model_final.pth"), weights_only=False)
    assert int(ckpt["model"]["memory.size"]) > 0
    assert "segm/AP" in rows[-1] and "uniqueness/external_fire" in rows[-1]


def test_uniqueness_evaluator_reads_the_inference_forward(tiny_shapes):
    cfg = get_config(BASE, "TEST.UNIQUENESS.GROUP_SIZE", 2, "TEST.UNIQUENESS.SCORE_THRESH", 0.0,
                     "DATALOADER.NUM_WORKERS", 0, "INPUT.MIN_SIZE_TEST", 64,
                     "INPUT.MAX_SIZE_TEST", 64)
    torch.manual_seed(0)
    model = build_model(cfg)
    name = f"{tiny_shapes}_val"

    def evaluate(watch):
        ev = QueryUniquenessEvaluator(cfg, name, model)
        if not watch:  # the fallback: the evaluator runs the adapter's forward itself
            ev.adapter.watch_inference = lambda callback: None
        loader = build_detection_test_loader(cfg, name)
        return inference_on_dataset(model, loader, ev)["uniqueness"]

    watched, rerun = evaluate(True), evaluate(False)
    assert watched["confident_per_image"] == cfg.MODEL.SPARSE_INST.DECODER.NUM_MASKS
    assert 0.0 <= watched["external_fire"] <= 100.0 and 0.0 < watched["external_max_prob"] < 1
    for key, value in watched.items():
        assert rerun[key] == pytest.approx(value, rel=1e-5, abs=1e-6), key
