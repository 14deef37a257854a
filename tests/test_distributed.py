"""Data-parallel training over CPU processes (gloo): detectron2's launcher, our trainer."""
import os
import sys

import pytest
import torch
from detectron2.engine import default_argument_parser, launch
from detectron2.utils import comm

from instunique.data.synthetic.shapes import register_shapes

from utils import CONFIGS, ROOT, tiny_opts

sys.path.insert(0, ROOT)
import train_net  # noqa: E402

CONFIG = os.path.join(CONFIGS, "shapes/instunique_mask2former_shapes.yaml")


def _replica(argv, data_root, out_dir):
    torch.set_num_threads(1)
    register_shapes(data_root, prefix="ddp_shapes", num_train=8, num_val=2)
    trainer = train_net.Trainer(train_net.setup(default_argument_parser().parse_args(argv)))
    trainer.resume_or_load(resume=False)
    trainer.train()
    model = trainer.model.module if hasattr(trainer.model, "module") else trainer.model
    torch.save(model.state_dict(), os.path.join(out_dir, f"replica{comm.get_rank()}.pth"))


@pytest.mark.parametrize("extra", [
    [], ["MODEL.INST_UNIQUE.TERMS_CLIP_VALUE", "0.1"],
    ["MODEL.INST_UNIQUE.TERMS_CLIP_VALUE", "0.1", "MODEL.INST_UNIQUE.TERMS_CLIP_PERIOD", "2"],
], ids=["clip the sum", "clip the terms apart", "clip the terms apart every 2 steps"])
def test_two_cpu_processes_keep_identical_replicas_and_memory(tmp_path, extra):
    argv = ["--config-file", CONFIG, "--num-gpus", "2",
            "DATASETS.TRAIN", "('ddp_shapes_train',)", "DATASETS.TEST", "('ddp_shapes_val',)",
            "SOLVER.IMS_PER_BATCH", "4", "SOLVER.MAX_ITER", "3", "TEST.EVAL_PERIOD", "0",
            "DATALOADER.NUM_WORKERS", "0", "OUTPUT_DIR", str(tmp_path / "out"),
            "MODEL.INST_UNIQUE.CROSS_IMAGE.MEMORY_PIXELS", "1000", "MODEL.DEVICE", "cpu",
            *[str(o) for o in tiny_opts()], *extra]
    launch(_replica, 2, dist_url="auto", args=(argv, str(tmp_path / "data"), str(tmp_path)))
    a, b = (torch.load(tmp_path / f"replica{r}.pth") for r in (0, 1))
    assert a.keys() == b.keys()
    bn_stats = [k for k in a if k.endswith("running_mean")]
    assert bn_stats, "the shapes config should train BatchNorm layers"
    # Replicas started equal; they trained on different images, so equality afterwards
    # needs synchronised gradients (DDP), BatchNorm statistics and memory.
    differ = [k for k in a if not torch.equal(a[k], b[k])]
    assert not differ, f"replicas differ in {differ[:5]}"
    assert int(a["memory.size"]) > 0
    assert any(not torch.equal(a[k], torch.zeros_like(a[k])) for k in bn_stats)
