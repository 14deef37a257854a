"""Helpers shared by the tests: configs, fake inputs."""
import os
import threading

import torch
from detectron2.structures import BitMasks, Instances
from detectron2.utils.events import EventStorage

from instunique import load_config
from instunique.transforms import AffineWarp

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = os.path.join(ROOT, "configs")
DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data")


def read_reference(name: str):
    """[(state_dict key, shape)] of a reference tsv in tests/data (name, shape, dtype rows)."""
    with open(os.path.join(DATA, name)) as f:
        rows = [line.rstrip("\n").split("\t") for line in f if line.strip()]
    return [
        (k, tuple(int(s) for s in shape.strip("()").split(",") if s.strip()))
        for k, shape, _ in rows
    ]


def get_config(path: str, *opts):
    return load_config(os.path.join(CONFIGS, path), ["MODEL.DEVICE", "cpu", *opts])


def run_concurrently(fn, workers: int = 3):
    """Call ``fn()`` from ``workers`` threads at once; raise the first error any raised."""
    errors = []

    def run():
        try:
            fn()
        except Exception as e:  # noqa: BLE001 - re-raised below
            errors.append(e)

    threads = [threading.Thread(target=run) for _ in range(workers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]


def train_step(model, batch):
    """One training forward + backward; asserts every loss is finite, returns the losses."""
    model.train()
    with EventStorage():
        losses = model(batch)
    assert all(torch.isfinite(v) for v in losses.values()), losses
    sum(losses.values()).backward()
    return losses


def tiny_opts():
    """Shrink the shapes configs further so a forward/backward takes well under a second."""
    return [
        "MODEL.SEM_SEG_HEAD.TRANSFORMER_ENC_LAYERS", 1,
        "MODEL.MASK_FORMER.DEC_LAYERS", 3,
        "MODEL.MASK_FORMER.TRAIN_NUM_POINTS", 256,
    ]


def fake_view(h: int, w: int, num_instances: int, seed: int, image_id: int = 0):
    """A mapper-style dict with rectangular instances (possibly none)."""
    g = torch.Generator().manual_seed(seed)
    masks = torch.zeros(num_instances, h, w, dtype=torch.bool)
    for i in range(num_instances):
        y0 = int(torch.randint(0, h // 2, (1,), generator=g))
        x0 = int(torch.randint(0, w // 2, (1,), generator=g))
        masks[i, y0 : y0 + h // 3, x0 : x0 + w // 3] = True
    inst = Instances((h, w))
    inst.gt_masks = BitMasks(masks)
    inst.gt_boxes = inst.gt_masks.get_bounding_boxes()
    inst.gt_classes = torch.randint(0, 4, (num_instances,), generator=g)
    image = torch.randint(0, 256, (3, h, w), generator=g, dtype=torch.uint8)
    return {"image": image, "instances": inst, "image_id": image_id, "height": h, "width": w}


def fake_pair(h: int, w: int, num_instances: int, seed: int, image_id: int):
    """View x with its horizontally flipped view x' and the warp between them."""
    x = fake_view(h, w, num_instances, seed, image_id)
    x2 = dict(x)
    x2["image"] = x["image"].flip(-1)
    inst = Instances((h, w))
    inst.gt_masks = BitMasks(x["instances"].gt_masks.tensor.flip(-1))
    inst.gt_boxes = inst.gt_masks.get_bounding_boxes()
    inst.gt_classes = x["instances"].gt_classes
    x2["instances"] = inst
    x["paired_view"] = x2
    x["warp"] = AffineWarp.hflip(h, w)
    return x
