"""Query-uniqueness evaluation: the measures on hand-built outputs, the evaluator on tiny
real models (plain Mask2Former and InstUnique), train_net and the curves."""
import json
import math
import os
import sys

import pytest
import torch
from detectron2.data import build_detection_test_loader
from detectron2.evaluation import inference_on_dataset
from detectron2.modeling import build_model

from instunique.data.synthetic.shapes import register_shapes
from instunique.evaluation import (
    QueryUniquenessEvaluator,
    count_duplicates,
    count_merges_and_splits,
    external_firing,
)
from instunique.visualization import curve_keys, plot_curves

from utils import ROOT, get_config, tiny_opts

sys.path.insert(0, ROOT)
import train_net  # noqa: E402


def rect(h, w, y0, y1, x0, x1):
    m = torch.zeros(h, w, dtype=torch.bool)
    m[y0:y1, x0:x1] = True
    return m


def half_firing_scene():
    """Image A: one query e = (1, 0). Image B: 8 x 8 pixels, channel 0 is +1 on the left
    half and -1 on the right half, so e fires (p = sigmoid(1) > 0.5) on exactly half."""
    query = torch.tensor([[1.0, 0.0]])
    pixels_b = torch.zeros(2, 8, 8)
    pixels_b[0, :, :4] = 1.0
    pixels_b[0, :, 4:] = -1.0
    pixels_a = torch.zeros(2, 8, 8)
    pixels_a[1] = 1.0  # orthogonal to the query: logit 0 everywhere, p = 0.5, not > 0.5
    return query, pixels_a, pixels_b


# ----------------------------------------------------------------------------- measures
def test_query_firing_on_half_of_another_image_gives_half():
    query, pixels_a, pixels_b = half_firing_scene()
    fire, peak, pairs = external_firing(
        [query, query[:0]], [pixels_a.flatten(1).t(), pixels_b.flatten(1).t()]
    )
    assert pairs == 1
    assert fire == pytest.approx(0.5)
    assert peak == pytest.approx(1 / (1 + math.exp(-1.0)))


def test_duplicates_on_hand_built_masks():
    h = w = 10
    a = rect(h, w, 0, 5, 0, 5)  # 25 pixels
    a_dup = rect(h, w, 0, 5, 0, 4)  # IoU 20 / 25 = 0.8 with a
    a_half = rect(h, w, 0, 5, 0, 2)  # IoU 10 / 25 = 0.4 with a: not a duplicate
    b = rect(h, w, 6, 10, 6, 10)
    b_dup = rect(h, w, 6, 10, 6, 10)  # identical to b
    masks = torch.stack([a, b, a_dup, a_half, b_dup])
    assert count_duplicates(masks) == 2
    # IoU exactly 0.5 is not above the threshold.
    assert count_duplicates(torch.stack([rect(h, w, 0, 4, 0, 4), rect(h, w, 0, 4, 0, 2)])) == 0
    assert count_duplicates(masks[:1]) == 0 and count_duplicates(masks[:0]) == 0


def test_merges_and_splits_on_hand_built_masks():
    h, w = 10, 20
    g0 = rect(h, w, 0, 10, 0, 5)  # 50 pixels each, side by side
    g1 = rect(h, w, 0, 10, 5, 10)
    g2 = rect(h, w, 0, 10, 12, 20)  # 80 pixels
    gt = torch.stack([g0, g1, g2])
    merged = rect(h, w, 0, 10, 0, 10)  # covers all of g0 and g1: one merge
    top = rect(h, w, 0, 5, 12, 20)  # g2 in two halves: a split (each IoU 0.5)
    bottom = rect(h, w, 5, 10, 12, 20)
    assert count_merges_and_splits(torch.stack([merged, top, bottom]), gt) == (1, 1)

    # A whole prediction of g2 plus its duplicate: matched, not split; separate g0, g1: fine.
    whole = torch.stack([g0, g1, g2, g2])
    assert count_merges_and_splits(whole, gt) == (0, 0)
    # Two small specks on g2 (together 8 of its 80 pixels) do not make a split.
    specks = torch.stack([rect(h, w, 0, 2, 12, 14), rect(h, w, 8, 10, 18, 20)])
    assert count_merges_and_splits(specks, gt) == (0, 0)
    # Covering 3 of 4 quarters of g2 with 3 pieces is a split; a prediction covering
    # half of g0 only (25 of 50, not more than half) and all of g1 is no merge.
    pieces = torch.stack([rect(h, w, 0, 5, 12, 16), rect(h, w, 0, 5, 16, 20),
                          rect(h, w, 5, 10, 12, 16), rect(h, w, 0, 5, 0, 10)])
    assert count_merges_and_splits(pieces, gt) == (0, 1)
    assert count_merges_and_splits(pieces[:0], gt) == (0, 0)
    assert count_merges_and_splits(pieces, gt[:0]) == (0, 0)


class _NoModel(torch.nn.Module):
    """Stands for a model: the evaluator is fed through add_image only."""


@pytest.fixture
def bare_evaluator(monkeypatch):
    # No adapter is needed to feed add_image: give _NoModel a trivial one.
    from instunique.evaluation import uniqueness

    monkeypatch.setattr(uniqueness, "build_adapter", lambda model: _WatchNothing())
    return lambda **kw: QueryUniquenessEvaluator(None, _NoModel(), **kw)


class _WatchNothing:
    pixel_stride = 4
    mask_threshold = 0.5

    @staticmethod
    def pixel_logits(queries, pixels):
        return queries @ pixels.t()

    def watch_inference(self, callback):
        return None


def test_evaluator_on_constructed_outputs(bare_evaluator, tmp_path):
    query, pixels_a, pixels_b = half_firing_scene()
    ev = bare_evaluator(group_size=2, pixels_per_image=0, output_dir=str(tmp_path))
    ev.reset()
    h, w = 10, 20
    g0, g1 = rect(h, w, 0, 10, 0, 5), rect(h, w, 0, 10, 5, 10)
    # Image A: the firing query, whose own mask merges g0 and g1, and a duplicate of it.
    own = torch.where(rect(h, w, 0, 10, 0, 10), 3.0, -3.0)
    ev.add_image(torch.cat([query, query]), pixels_a, torch.stack([own, own]) > 0,
                 torch.stack([g0, g1]))
    # Image B: no confident query; ground truth unknown.
    ev.add_image(query[:0], pixels_b, torch.zeros(0, h, w, dtype=torch.bool))
    # Image C opens a new group: its query is not scored against A or B, and a group of
    # one image has no external pairs.
    ev.add_image(query, pixels_b, own[None] > 0, torch.stack([g0]))
    res = ev.evaluate()["uniqueness"]
    # Two confident queries of A, each on half of B's pixels.
    assert res["external_fire"] == pytest.approx(50.0)
    assert res["external_max_prob"] == pytest.approx(1 / (1 + math.exp(-1.0)))
    assert res["duplicates"] == 1 and res["duplicate_rate"] == pytest.approx(100 / 3)
    assert res["merged"] == 2 and res["merged_rate"] == pytest.approx(200 / 3)
    assert res["split"] == 0 and res["split_rate"] == 0.0
    assert res["confident_per_image"] == pytest.approx(1.0)
    with open(tmp_path / "uniqueness.json") as f:
        saved = json.load(f)
    assert saved["counts"]["groups"] == 1 and saved["counts"]["gt_instances"] == 3

    # reset() starts over; nothing measured gives NaN rates, not an error.
    ev.reset()
    empty = ev.evaluate()["uniqueness"]
    assert math.isnan(empty["external_fire"]) and math.isnan(empty["split_rate"])


def test_pixel_sample_bounds_the_external_pixels(bare_evaluator):
    query, pixels_a, pixels_b = half_firing_scene()
    ev = bare_evaluator(group_size=2, pixels_per_image=16)
    ev.add_image(query, pixels_a, torch.zeros(1, 8, 8, dtype=torch.bool))
    assert ev._group[0][1].shape == (16, 2)
    ev.add_image(query[:0], pixels_b, torch.zeros(0, 8, 8, dtype=torch.bool))
    fire = ev.evaluate()["uniqueness"]["external_fire"]
    # A 16-pixel sample of an image that is half firing: a share k/16, near 50%.
    assert fire * 16 / 100 == pytest.approx(round(fire * 16 / 100)) and 20 <= fire <= 80


@pytest.mark.parametrize("key, value", [("GROUP_SIZE", 1), ("SCORE_THRESH", 1.0),
                                        ("PIXELS_PER_IMAGE", -1)])
def test_bad_evaluator_keys_name_the_key(key, value):
    cfg = get_config("shapes/mask2former_shapes.yaml", *tiny_opts(),
                     f"TEST.UNIQUENESS.{key}", value)
    with pytest.raises(ValueError, match=f"TEST.UNIQUENESS.{key}"):
        QueryUniquenessEvaluator(cfg, None, build_model(cfg))


# ----------------------------------------------------------------------- real models
@pytest.fixture(scope="module")
def tiny_val(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("uniqueness"))
    register_shapes(root, prefix="uq_shapes", num_train=2, num_val=4)
    return "uq_shapes_val"


def _evaluate(cfg, model, name, watch=True):
    ev = QueryUniquenessEvaluator(cfg, name, model)
    if not watch:  # the fallback path: the evaluator runs the adapter's forward itself
        ev.adapter.watch_inference = lambda callback: None
    loader = build_detection_test_loader(cfg, name)
    return ev, inference_on_dataset(model, loader, ev)["uniqueness"]


@pytest.mark.parametrize("config", ["shapes/mask2former_shapes.yaml",
                                    "shapes/instunique_mask2former_shapes.yaml"])
def test_evaluator_on_tiny_real_models(tiny_val, config):
    cfg = get_config(config, *tiny_opts(), "TEST.UNIQUENESS.GROUP_SIZE", 2,
                     "TEST.UNIQUENESS.SCORE_THRESH", 0.0, "DATALOADER.NUM_WORKERS", 0)
    torch.manual_seed(0)
    model = build_model(cfg)
    ev, watched = _evaluate(cfg, model, tiny_val)
    # The hook was removed by evaluate(): no capture outside the evaluation.
    assert ev._handle is None
    with torch.no_grad():
        model.eval()
        model([{"image": torch.zeros(3, 64, 64, dtype=torch.uint8)}])
    assert ev._captured == []

    # Score threshold 0: every query is confident, each image scored against one other.
    q = cfg.MODEL.MASK_FORMER.NUM_OBJECT_QUERIES
    assert watched["confident_per_image"] == q
    assert 0.0 <= watched["external_fire"] <= 100.0
    assert 0.0 < watched["external_max_prob"] < 1.0
    assert 0.0 <= watched["duplicate_rate"] <= 100.0
    assert not math.isnan(watched["split_rate"])  # ground truth was found by image_id
    counts = ev._stats
    assert counts["images"] == 4 and counts["groups"] == 2 and counts["pairs"] == 4 * q
    assert counts["gt_instances"] > 0

    # The hook reads the very forward of inference: re-running the adapter agrees.
    _, rerun = _evaluate(cfg, model, tiny_val, watch=False)
    for k, v in watched.items():
        assert rerun[k] == pytest.approx(v, rel=1e-5, abs=1e-6), k


def test_train_net_eval_only_reports_uniqueness(tmp_path):
    register_shapes(str(tmp_path / "data"), prefix="uq_net", num_train=4, num_val=2)
    config = os.path.join(ROOT, "configs/shapes/instunique_mask2former_shapes.yaml")
    argv = ["--config-file", config, "--eval-only", "DATASETS.TRAIN", "('uq_net_train',)",
            "DATASETS.TEST", "('uq_net_val',)", "DATALOADER.NUM_WORKERS", "0",
            "OUTPUT_DIR", str(tmp_path), "TEST.ALLOW_RANDOM_WEIGHTS", "True",
            *[str(o) for o in tiny_opts()]]
    from detectron2.engine import default_argument_parser

    results = train_net.main(default_argument_parser().parse_args(argv))
    assert {"AP", "AP50"} <= set(results["segm"])
    assert {"external_fire", "duplicate_rate", "merged_rate", "split_rate"} <= set(
        results["uniqueness"])
    assert os.path.isfile(tmp_path / "inference" / "uniqueness.json")

    cfg = train_net.setup(default_argument_parser().parse_args(
        argv + ["TEST.UNIQUENESS.ENABLED", "False"]))
    assert not isinstance(train_net.Trainer.build_evaluator(cfg, "uq_net_val"),
                          QueryUniquenessEvaluator)


def test_curves_draw_the_uniqueness_metrics(tmp_path):
    records = [{"iteration": i, "total_loss": 1.0 / (i + 1), "loss_ce": 0.5} for i in range(5)]
    records.append({"iteration": 4, "segm/AP": 10.0, "uniqueness/external_fire": 3.1,
                    "uniqueness/duplicate_rate": 20.0, "uniqueness/confident_per_image": 4})
    keys = curve_keys([records])
    assert keys[-3:] == ["segm/AP", "uniqueness/external_fire", "uniqueness/duplicate_rate"]
    out = plot_curves({"run": records}, str(tmp_path / "c.png"), keys=keys)
    assert os.path.getsize(out) > 0
