"""SparseInst: build from config, official names and defaults, forward/backward, targets,
inference, and the errors of bad configs and bad ground truth."""
import os

import pytest
import torch
import yaml
from detectron2.config import get_cfg
from detectron2.modeling import build_model
from detectron2.structures import BitMasks, Instances, PolygonMasks

from instunique.segmenters.sparseinst.config import add_sparseinst_config
from instunique.segmenters.sparseinst.decoder import GroupInstanceBranch, kernel_masks
from instunique.segmenters.sparseinst.inference import sparseinst_inference

from utils import DATA, fake_view, get_config, read_reference, train_step

R50 = "coco/instance-segmentation/sparseinst_R50_giam.yaml"
SHAPES = "shapes/sparseinst_shapes.yaml"


def test_state_dict_matches_official_reference():
    reference = dict(read_reference("sparseinst_R50_giam.tsv"))
    for path in (R50, "coco/instance-segmentation/instunique_sparseinst_R50_giam.yaml"):
        model = build_model(get_config(path))
        ours = {k: tuple(v.shape) for k, v in model.state_dict().items()
                if not k.startswith("memory.")}
        assert ours == reference, path


def test_config_carries_the_official_values_and_no_device():
    with open(os.path.join(DATA, "sparseinst_R50_giam.cfg.yaml")) as f:
        official = yaml.safe_load(f)
    cfg = get_config(R50)

    def as_plain(node):
        if isinstance(node, dict):
            return {k: as_plain(v) for k, v in node.items()}
        return list(node) if isinstance(node, (list, tuple)) else node

    assert as_plain(cfg.MODEL.SPARSE_INST) == as_plain(official["MODEL"]["SPARSE_INST"])
    for section, keys in (
        ("SOLVER", ("OPTIMIZER", "IMS_PER_BATCH", "BASE_LR", "STEPS", "MAX_ITER",
                    "WEIGHT_DECAY", "WEIGHT_DECAY_NORM", "BACKBONE_MULTIPLIER",
                    "WARMUP_ITERS", "WARMUP_FACTOR", "LR_SCHEDULER_NAME")),
        ("INPUT", ("MIN_SIZE_TRAIN", "MAX_SIZE_TRAIN", "MIN_SIZE_TEST", "MAX_SIZE_TEST",
                   "RANDOM_FLIP", "FORMAT")),
    ):
        for key in keys:
            assert as_plain(cfg[section][key]) == as_plain(official[section][key]), key
    assert cfg.SOLVER.CLIP_GRADIENTS.ENABLED is False and cfg.SOLVER.AMP.ENABLED is False
    # Unlike the official adder, adding the keys leaves the device alone.
    fresh = get_cfg()
    fresh.MODEL.DEVICE = "cpu"
    add_sparseinst_config(fresh)
    assert fresh.MODEL.DEVICE == "cpu"


@pytest.mark.parametrize("key, registered", [
    ("MODEL.SPARSE_INST.ENCODER.NAME", "InstanceContextEncoder"),
    ("MODEL.SPARSE_INST.DECODER.NAME", "GroupIAMDecoder"),
    ("MODEL.BACKBONE.NAME", "build_resnet_backbone"),
    ("MODEL.SPARSE_INST.MATCHER.NAME", "SparseInstMatcher"),
    ("MODEL.SPARSE_INST.LOSS.NAME", "SparseInstCriterion"),
])
def test_unknown_component_name_names_the_key_and_the_registered(key, registered):
    cfg = get_config(SHAPES, key, "NoSuchThing")
    with pytest.raises(KeyError, match=key) as info:
        build_model(cfg)
    assert "NoSuchThing" in str(info.value) and registered in str(info.value)


@pytest.mark.parametrize("opts, key", [
    (["MODEL.SPARSE_INST.ENCODER.IN_FEATURES", ["res2", "res4", "res5"]],
     "ENCODER.IN_FEATURES"),
    (["MODEL.SPARSE_INST.ENCODER.NORM", "GN"], "ENCODER.NORM"),
    (["MODEL.SPARSE_INST.DECODER.INST.DIM", 30], "DECODER.INST.DIM"),
    (["MODEL.SPARSE_INST.LOSS.ITEMS", ["labels", "boxes"]], "LOSS.ITEMS"),
])
def test_bad_values_name_the_key(opts, key):
    with pytest.raises(ValueError, match=key):
        build_model(get_config(SHAPES, *opts))


def test_forward_backward_odd_sizes_and_empty_image():
    cfg = get_config(SHAPES)
    torch.manual_seed(0)
    model = build_model(cfg)
    batch = [fake_view(67, 95, 3, 0), fake_view(81, 53, 0, 1)]
    losses = train_step(model, batch)
    assert set(losses) == {"loss_ce", "loss_objectness", "loss_dice", "loss_mask"}
    assert all(v > 0 for v in losses.values())
    params = [p for p in model.parameters() if p.requires_grad]
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in params)

    # Raw outputs: padded to 96 x 96, mask features at stride 8, masks at stride 4, and the
    # masks are exactly the kernels . features the adapter rebuilds.
    model.eval()
    with torch.no_grad():
        images = model.preprocess_image(batch)
        raw = model.predict(images)
    n, k, d = 20, 4, 64
    assert images.tensor.shape[-2:] == (96, 96)
    assert raw["pred_logits"].shape == (2, n, k) and raw["pred_scores"].shape == (2, n, 1)
    assert raw["mask_features"].shape == (2, d, 12, 12) and raw["pred_kernels"].shape == (2, n, d)
    assert raw["pred_masks"].shape == (2, n, 24, 24)
    assert torch.equal(raw["pred_masks"], kernel_masks(raw["pred_kernels"], raw["mask_features"],
                                                       2.0))

    with torch.no_grad():
        out = model([{"image": batch[0]["image"], "height": 134, "width": 190}])
    inst = out[0]["instances"]
    assert inst.image_size == (134, 190) and inst.pred_masks.shape[-2:] == (134, 190)
    assert inst.pred_masks.dtype == torch.bool and 0 < len(inst) <= 20
    boxes = BitMasks(inst.pred_masks).get_bounding_boxes().tensor
    assert torch.equal(inst.pred_boxes.tensor, boxes)


def test_all_empty_batch_trains():
    model = build_model(get_config(SHAPES))
    losses = train_step(model, [fake_view(64, 64, 0, 0), fake_view(64, 64, 0, 1)])
    assert losses["loss_ce"] > 0
    for key in ("loss_mask", "loss_dice", "loss_objectness"):
        assert losses[key].detach().item() == 0.0


def test_polygon_bitmask_and_tensor_gt_masks_give_the_same_targets():
    model = build_model(get_config(SHAPES))
    h, w = 50, 70
    polygons = [[[5.0, 5.0, 30.0, 5.0, 30.0, 40.0, 5.0, 40.0]],
                [[40.0, 10.0, 65.0, 20.0, 50.0, 45.0]]]
    reference = BitMasks.from_polygon_masks(polygons, h, w).tensor
    image = torch.zeros(3, h, w, dtype=torch.uint8)
    targets = []
    for masks in (PolygonMasks(polygons), BitMasks(reference), reference.clone()):
        inst = Instances((h, w), gt_classes=torch.tensor([1, 3]), gt_masks=masks)
        x = {"image": image, "instances": inst}
        targets.append(model.prepare_targets([x], model.preprocess_image([x]))[0])
    for t in targets:
        assert t["masks"].shape == (2, 64, 96) and t["masks"].dtype == torch.bool
        assert torch.equal(t["masks"], targets[0]["masks"])
        assert torch.equal(t["masks"][:, :h, :w], reference) and not t["masks"][:, h:].any()
        assert t["labels"].tolist() == [1, 3]


@pytest.mark.parametrize("bad", ["class", "masks"])
def test_bad_ground_truth_names_the_image(bad):
    model = build_model(get_config(SHAPES))
    x = fake_view(40, 40, 2, 0, image_id=17)
    if bad == "class":
        x["instances"].gt_classes = torch.tensor([0, 4])
        match = "image_id 17.*NUM_CLASSES"
    else:
        x["instances"].remove("gt_masks")
        match = "image_id 17.*without gt_masks"
    with pytest.raises(ValueError, match=match):
        model.prepare_targets([x], model.preprocess_image([x]))


def test_group_iam_gathers_each_instance_from_every_group():
    """Instance i's feature concatenates, for group g, the features pooled by activation map
    g * N + i (the grouped conv's layout), each map normalised to sum 1."""
    torch.manual_seed(0)
    g, n, c, k, d = 2, 3, 4, 5, 6
    branch = GroupInstanceBranch(in_channels=3, dim=c, num_convs=1, num_masks=n, num_groups=g,
                                 num_classes=k, kernel_dim=d)
    x = torch.randn(2, 3, 5, 7)
    logits, kernels, scores, iam = branch(x)
    feats = branch.inst_convs(x).flatten(2)  # (B, C, HW)
    prob = iam.sigmoid().flatten(2)
    for b in range(2):
        for i in range(n):
            pooled = [feats[b] @ (prob[b, j * n + i] / prob[b, j * n + i].sum())
                      for j in range(g)]
            inst = torch.relu(branch.fc(torch.cat(pooled)))
            torch.testing.assert_close(logits[b, i], branch.cls_score(inst))
            torch.testing.assert_close(kernels[b, i], branch.mask_kernel(inst))
            torch.testing.assert_close(scores[b, i], branch.objectness(inst))


def test_inference_thresholds_rescores_and_caps_without_nms():
    # Three predictions of K = 2 classes on a 4 x 4 mask grid of a 16 x 16 padded input
    # holding an 8 x 12 image, shown at 16 x 24.
    cls = torch.tensor([[2.0, -1.0], [-9.0, -9.0], [0.0, 1.0]])
    obj = torch.tensor([[1.0], [0.0], [3.0]])
    masks = torch.full((3, 4, 4), -5.0)
    masks[0, :2, :2] = 4.0
    masks[2, :2, 1:3] = 1.0  # p = 0.73 > 0.45
    out = sparseinst_inference(cls, obj, masks, (8, 12), (16, 16), (16, 24),
                               cls_threshold=0.05, mask_threshold=0.45, max_detections=2)
    score = (cls.sigmoid() * obj.sigmoid()).sqrt().max(1).values
    assert score[1] < 0.05  # prediction 1 is dropped by the class threshold
    expected = score[[0, 2]] * torch.sigmoid(torch.tensor([4.0, 1.0]))
    torch.testing.assert_close(out.scores, expected)
    assert out.pred_classes.tolist() == [0, 1]
    assert out.pred_masks.shape == (2, 16, 24) and out.pred_masks.dtype == torch.bool
    # Mask 0 covers the padded input's top-left 8 x 8, i.e. all 8 rows and 8 of the 12
    # image columns: 16 rows and 16 of 24 columns at the output.
    assert out.pred_masks[0, :, :14].all() and not out.pred_masks[0, :, 18:].any()
    torch.testing.assert_close(out.pred_boxes.tensor,
                               BitMasks(out.pred_masks).get_bounding_boxes().tensor)

    capped = sparseinst_inference(cls, obj, masks, (8, 12), (16, 16), (16, 24),
                                  cls_threshold=0.05, mask_threshold=0.45, max_detections=1)
    assert len(capped) == 1 and capped.scores[0] == out.scores.max()

    empty = sparseinst_inference(cls, obj, masks, (8, 12), (16, 16), (16, 24),
                                 cls_threshold=0.99, mask_threshold=0.45, max_detections=2)
    assert len(empty) == 0 and empty.pred_masks.shape == (0, 16, 24)

