"""MODEL.MASK_FORMER.MASK_POSITION_FEATURES: position features added to the mask features."""
import torch
from detectron2.modeling import build_model
from detectron2.utils.events import EventStorage

from utils import fake_view, get_config, tiny_opts

ON = ["MODEL.MASK_FORMER.MASK_POSITION_FEATURES", True]


def _raw(model, batch):
    images = model.preprocess_image(batch)
    return model.predict(images)


def test_off_keeps_the_official_state_dict_and_on_adds_only_its_projection():
    off = build_model(get_config("shapes/mask2former_shapes.yaml", *tiny_opts()))
    on = build_model(get_config("shapes/mask2former_shapes.yaml", *tiny_opts(), *ON))
    extra = set(on.state_dict()) - set(off.state_dict())
    assert extra == {"sem_seg_head.mask_position.proj.weight",
                     "sem_seg_head.mask_position.proj.bias"}
    assert set(off.state_dict()) <= set(on.state_dict())


def test_starts_as_the_plain_model_then_adds_a_position_dependent_term():
    torch.manual_seed(0)
    off = build_model(get_config("shapes/mask2former_shapes.yaml", *tiny_opts())).eval()
    on = build_model(get_config("shapes/mask2former_shapes.yaml", *tiny_opts(), *ON)).eval()
    on.load_state_dict(off.state_dict(), strict=False)
    batch = [fake_view(64, 96, 2, 0)]
    with torch.no_grad():
        a, b = _raw(off, batch), _raw(on, batch)
        assert torch.equal(a["pred_masks"], b["pred_masks"])  # zero-initialised projection
        on.sem_seg_head.mask_position.proj.weight.normal_()
        c = _raw(on, batch)
    shift = c["pixel_embeds"] - a["pixel_embeds"]
    # The same for every image, different across positions.
    assert shift.abs().amax() > 0.1
    assert not torch.allclose(shift[..., :, 0], shift[..., :, -1])
    # Masks stay e . F of the embeddings the objectives read.
    masks = torch.einsum("bqc,bchw->bqhw", c["pred_embeds"], c["pixel_embeds"])
    torch.testing.assert_close(c["pred_masks"], masks)


def test_projection_gets_gradient_in_training():
    torch.manual_seed(0)
    model = build_model(get_config("shapes/mask2former_shapes.yaml", *tiny_opts(), *ON))
    model.train()
    with EventStorage():
        losses = model([fake_view(64, 96, 2, 0), fake_view(64, 96, 1, 1)])
    sum(losses.values()).backward()
    assert model.sem_seg_head.mask_position.proj.weight.grad.abs().sum() > 0
