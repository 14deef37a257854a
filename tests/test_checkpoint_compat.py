"""Checkpoints both ways with the official Mask2Former: the state-dict metadata we write, a
round trip through the official head's key conversion, and the official mappers' targets."""
import copy
import os

import pytest
import torch
from detectron2.modeling import build_model
from detectron2.structures import Instances

from instunique.checkpoint import AtomicCheckpointer
from instunique.segmenters.mask2former import InstUniqueMaskFormerHead

from utils import fake_view, get_config, tiny_opts


class OfficialRuleHead(InstUniqueMaskFormerHead):
    """Our head loading like the official one: a head state of version 1 or without a
    version is the pre-release layout, and every ``sem_seg_head`` key outside ``predictor``
    moves under ``pixel_decoder.`` (re-implemented from the official MaskFormerHead)."""

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, *args):
        version = local_metadata.get("version", None)
        if version is None or version < 2:
            for key in list(state_dict):
                if "sem_seg_head" in key and not key.startswith(prefix + "predictor"):
                    state_dict[key.replace(prefix, prefix + "pixel_decoder.")] = state_dict.pop(key)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, *args)


def _model(config: str, seed: int):
    torch.manual_seed(seed)
    return build_model(get_config(config, *tiny_opts()))


def _save(model, folder) -> dict:
    AtomicCheckpointer(model, save_dir=str(folder)).save("model")
    return torch.load(os.path.join(folder, "model.pth"), weights_only=False)["model"]


def _official(seed: int = 7):
    """A plain Mask2Former whose head converts keys as the official one does."""
    model = _model("shapes/mask2former_shapes.yaml", seed)
    model.sem_seg_head.__class__ = OfficialRuleHead
    return model


def _assert_loaded(model, state):
    for key, value in model.state_dict().items():
        assert torch.equal(value, state[key]), key


@pytest.mark.parametrize("config", ["shapes/mask2former_shapes.yaml",
                                    "shapes/instunique_mask2former_shapes.yaml"])
def test_saved_checkpoint_loads_through_the_official_rule(config, tmp_path):
    state = _save(_model(config, seed=0), tmp_path)
    metadata = state._metadata
    assert metadata["sem_seg_head"] == {"version": 2}
    # InstUnique's wrapper hides its ``segmenter.`` prefix from the metadata too.
    assert not [k for k in metadata if k.startswith("segmenter")]
    assert metadata["sem_seg_head.pixel_decoder"]["version"] == 1

    official = _official()
    result = official.load_state_dict(state, strict=False)
    assert result.missing_keys == []
    # An InstUnique checkpoint's only extra keys are its pixel memory.
    assert all(k.startswith("memory.") for k in result.unexpected_keys)
    assert bool(result.unexpected_keys) == ("instunique" in config)
    _assert_loaded(official, state)


def test_version_1_files_of_ours_still_load_and_would_break_the_official_head(tmp_path):
    state = _save(_model("shapes/mask2former_shapes.yaml", seed=1), tmp_path)
    state._metadata["sem_seg_head"]["version"] = 1  # as written before the head had _version 2

    ours = _model("shapes/mask2former_shapes.yaml", seed=2)
    ours.load_state_dict(copy.copy(state), strict=True)
    _assert_loaded(ours, state)

    # The official rule on such a file moves every pixel-decoder key: the failure the
    # version-2 metadata prevents.
    result = _official().load_state_dict(copy.copy(state), strict=False)
    decoder_keys = [k for k in state if k.startswith("sem_seg_head.pixel_decoder.")]
    assert len(decoder_keys) > 20
    assert sorted(result.missing_keys) == sorted(decoder_keys)
    assert sorted(result.unexpected_keys) == sorted(
        k.replace("sem_seg_head.", "sem_seg_head.pixel_decoder.", 1) for k in decoder_keys
    )


def _as_official_mapper_output(x, dtype):
    """The official mappers' format: gt_masks a plain (N, H, W) tensor, not BitMasks."""
    inst = Instances(x["instances"].image_size)
    inst.gt_classes = x["instances"].gt_classes
    inst.gt_masks = x["instances"].gt_masks.tensor.to(dtype)
    return {**x, "instances": inst}


def test_official_mapper_targets_train_like_bitmasks():
    model = _model("shapes/mask2former_shapes.yaml", seed=3)
    model.train()
    batch = [fake_view(64, 64, 3, seed=0), fake_view(64, 64, 0, seed=1, image_id=1)]
    # uint8 masks (COCO polygons decoded by the official LSJ mapper) and the float empty
    # (0, H, W) tensor the official mappers give an image without instances.
    official = [_as_official_mapper_output(batch[0], torch.uint8),
                _as_official_mapper_output(batch[1], torch.float32)]

    losses = []
    for inputs in (batch, official):
        torch.manual_seed(0)  # the criterion samples points at random
        losses.append(model(inputs))
    assert losses[0].keys() == losses[1].keys()
    for key in losses[0]:
        torch.testing.assert_close(losses[1][key], losses[0][key])

    model.zero_grad()
    sum(losses[1].values()).backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    assert any(g.abs().sum() > 0 for g in grads)


def test_bad_gt_masks_name_the_batch_item():
    model = _model("shapes/mask2former_shapes.yaml", seed=4)
    x = fake_view(32, 32, 2, seed=0)
    classes = x["instances"].gt_classes

    def targets(*inputs):
        return model.prepare_targets(list(inputs), model.preprocess_image(list(inputs)))

    bad = Instances((32, 32), gt_classes=classes, gt_masks=[[0.0, 0.0, 5.0, 0.0, 5.0, 5.0]] * 2)
    with pytest.raises(ValueError, match=r"batched_inputs\[1\].*gt_masks must be BitMasks or "
                                         r"an \(N, H, W\) tensor, got list"):
        targets(x, {**x, "instances": bad})
    flat = Instances((32, 32), gt_classes=classes, gt_masks=torch.zeros(2, 32 * 32))
    with pytest.raises(ValueError, match=r"gt_masks has shape \(2, 1024\); expected \(2, H, W\)"):
        targets({**x, "instances": flat})
    assert targets(x)[0]["masks"].dtype == torch.bool


def test_weights_with_a_loader_option_load_and_a_missing_file_is_named(tmp_path):
    torch.manual_seed(0)
    model = build_model(get_config("shapes/mask2former_shapes.yaml", *tiny_opts()))
    path = str(tmp_path / "w.pth")
    torch.save({"model": {"backbone." + k: v for k, v in model.backbone.state_dict().items()}},
               path)
    other = build_model(get_config("shapes/mask2former_shapes.yaml", *tiny_opts()))
    AtomicCheckpointer(other).load(path + "?matching_heuristics=True")
    for key, value in model.backbone.state_dict().items():
        assert torch.equal(other.backbone.state_dict()[key], value), key
    with pytest.raises(FileNotFoundError, match=r"not found: .*missing\.pth$"):
        AtomicCheckpointer(other).load(str(tmp_path / "missing.pth") + "?matching_heuristics=True")
