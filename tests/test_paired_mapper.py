"""The paired-view mapper: view x, view x' = T(x), consistent ground truth."""
import numpy as np
import pytest
import torch
from detectron2.data import DatasetCatalog

from instunique.data import InstanceViewMapper, PairedViewMapper
from instunique.data.synthetic.shapes import register_shapes
from instunique.transforms import AffineWarp

from utils import get_config


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("mapper"))
    register_shapes(root, prefix="mapper_shapes", num_train=6, num_val=2)
    return DatasetCatalog.get("mapper_shapes_train")


def _cfg(*opts):
    return get_config("shapes/instunique_mask2former_shapes.yaml", *opts)


def test_pair_ground_truth_is_the_warped_ground_truth(dataset):
    mapper = PairedViewMapper(_cfg("MODEL.INST_UNIQUE.EQUIVARIANCE.TRANSFORMS",
                                   '["flip", "crop", "rotation", "scaling"]'))
    np.random.seed(0)
    for d in dataset:
        out = mapper(d)
        x, x2, warp = out, out["paired_view"], out["warp"]
        assert isinstance(warp, AffineWarp)
        assert tuple(x["image"].shape[-2:]) == warp.src_size
        assert tuple(x2["image"].shape[-2:]) == warp.dst_size
        assert x2["image_id"] == x["image_id"]
        expected = [warp.apply_segmentation(m.numpy().astype(np.uint8)).astype(bool)
                    for m in x["instances"].gt_masks.tensor]
        expected = [m for m in expected if m.any()]
        got = x2["instances"].gt_masks.tensor.numpy()
        assert len(got) == len(expected) <= len(x["instances"])
        for a, b in zip(got, expected):
            assert np.array_equal(a, b)
        # Boxes enclose the masks exactly.
        boxes = x2["instances"].gt_boxes.tensor
        assert torch.equal(boxes, x2["instances"].gt_masks.get_bounding_boxes().tensor)
        # The image is warped like the masks: T(x) equals x' on its valid region.
        img = x["image"].permute(1, 2, 0).numpy()
        ref = np.stack([warp.apply_image(img[..., c], mapper.fill[c]) for c in range(3)], -1)
        valid = warp.valid_mask()
        diff = np.abs(ref.astype(int) - x2["image"].permute(1, 2, 0).numpy().astype(int))
        assert diff[valid].max() <= 1


def test_same_seed_same_pairs(dataset):
    mapper = PairedViewMapper(_cfg())

    def run():
        np.random.seed(3)
        return [mapper(d) for d in dataset]

    for a, b in zip(run(), run()):
        assert np.allclose(a["warp"].matrix, b["warp"].matrix)
        assert torch.equal(a["paired_view"]["image"], b["paired_view"]["image"])


def test_instances_leaving_the_frame_are_dropped_and_an_empty_view_is_legal(dataset):
    mapper = PairedViewMapper(_cfg())
    d = dataset[0]
    h, w = d["height"], d["width"]
    # A crop of a corner no instance reaches: x' is a legal, empty view.
    masks = InstanceViewMapper(_cfg())(d)["instances"].gt_masks.tensor.any(0)
    ys, xs = np.nonzero(~masks.numpy())
    corner = AffineWarp.crop(h, w, int(ys[0]), int(xs[0]), 1, 1)
    mapper.family.sample = lambda *_: corner
    out = mapper(d)
    assert len(out["paired_view"]["instances"]) == 0
    assert out["paired_view"]["image"].shape[-2:] == (1, 1)


def test_base_mapper_keeps_instances_and_ids(dataset):
    out = InstanceViewMapper(_cfg())(dataset[0])
    assert out["image"].dtype == torch.uint8 and out["image"].shape[0] == 3
    assert len(out["instances"]) == len([a for a in dataset[0]["annotations"]])
    assert "annotations" not in out and out["image_id"] == dataset[0]["image_id"]


def test_input_crop_crops_half_of_the_images_as_the_official_sparseinst_mapper(dataset):
    # 128 px shapes: the official pre-resize to a 400/500/600 short side, then a 384-600 px
    # crop, then the configured resize to 128: a crop shows as fewer or cut instances.
    d = dataset[0]
    plain = InstanceViewMapper(_cfg())
    cropping = InstanceViewMapper(_cfg("INPUT.CROP.ENABLED", True, "INPUT.CROP.TYPE",
                                       "absolute_range", "INPUT.CROP.SIZE", (384, 600)))
    np.random.seed(0)
    area = [plain(d)["instances"].gt_masks.tensor.sum().item() for _ in range(10)]
    assert len(set(area)) <= 2  # flips only
    np.random.seed(0)
    views = [cropping(d) for _ in range(40)]
    cropped = [v for v in views if v["instances"].gt_masks.tensor.sum().item() not in area]
    assert 8 <= len(cropped) <= 32  # about half
    assert all(max(v["image"].shape[1:]) <= 128 for v in views)
