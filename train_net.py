#!/usr/bin/env python
"""Train and evaluate InstUnique and its base segmenters with detectron2's standard CLI.

    python train_net.py --config-file configs/shapes/instunique_mask2former_shapes.yaml
    python train_net.py --config-file ... --eval-only MODEL.WEIGHTS output/model_final.pth
"""
import logging
import os
import time


def busy_cores(interval: float = 0.3, stat: str = "/proc/stat"):
    """Cores that other processes kept busy over ``interval`` seconds (this one sleeps), from
    the kernel's counters (user to steal); None where there are none (not Linux)."""
    def sample():
        with open(stat) as f:
            ticks = [int(v) for v in f.readline().split()[1:9]]
        return sum(ticks) - ticks[3] - ticks[4], sum(ticks)  # all but idle and iowait

    try:
        busy0, total0 = sample()
        time.sleep(interval)
        busy1, total1 = sample()
    except (OSError, ValueError, IndexError):
        return None
    return (busy1 - busy0) / max(total1 - total0, 1) * (os.cpu_count() or 1)


def choose_wait_policy(busy) -> str:
    """OMP_WAIT_POLICY unless the user set it: sleeping threads (PASSIVE) when other jobs
    hold half a core or more (or it cannot be told), since spinning threads then steal the
    cores their own process waits for; otherwise OpenMP's own default, faster alone
    (docs/GETTING_STARTED.md, "A busy machine")."""
    if "OMP_WAIT_POLICY" in os.environ:
        return os.environ["OMP_WAIT_POLICY"]
    return "PASSIVE" if busy is None or busy >= 0.5 else ""


# Read when torch loads its OpenMP runtime, so decided before any import of it.
WAIT_POLICY = choose_wait_policy(None if "OMP_WAIT_POLICY" in os.environ else busy_cores())
if WAIT_POLICY:
    os.environ["OMP_WAIT_POLICY"] = WAIT_POLICY

from detectron2.engine import default_argument_parser, launch

from instunique import load_config
from instunique.data.prepare import prepare_datasets
from instunique.engine.run_logging import setup_run
from instunique.engine.trainer import Trainer, check_device, load_for_evaluation


def setup(args):
    cfg = load_config(args.config_file, args.opts)
    check_device(cfg)
    # Registers DATASETS.REGISTER, generates built-in data, validates it; may set NUM_CLASSES.
    prepare_datasets(cfg, train=not args.eval_only)
    cfg.freeze()
    setup_run(cfg, args)  # detectron2's default_setup, our logger too, each line once
    logging.getLogger("instunique").info(
        "OMP_WAIT_POLICY: %s", os.environ.get("OMP_WAIT_POLICY", "OpenMP's default"))
    return cfg


def main(args):
    cfg = setup(args)
    if args.eval_only:
        model = Trainer.build_model(cfg)
        load_for_evaluation(cfg, model, resume=args.resume)
        return Trainer.test(cfg, model)
    trainer = Trainer(cfg)
    trainer.resume_or_load(resume=args.resume)
    return trainer.train()


if __name__ == "__main__":
    args = default_argument_parser().parse_args()
    if args.num_gpus > 1 and load_config(args.config_file, args.opts).MODEL.DEVICE == "cpu":
        # detectron2's launcher takes NCCL whenever CUDA is visible; CPU processes need gloo.
        os.environ["CUDA_VISIBLE_DEVICES"] = ""
    launch(
        main,
        args.num_gpus,
        num_machines=args.num_machines,
        machine_rank=args.machine_rank,
        dist_url=args.dist_url,
        args=(args,),
    )
