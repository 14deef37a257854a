#!/usr/bin/env python
"""Train and evaluate InstUnique and its base segmenters with detectron2's standard CLI.

    python train_net.py --config-file configs/shapes/instunique_mask2former_shapes.yaml
    python train_net.py --config-file ... --eval-only MODEL.WEIGHTS output/model_final.pth
"""
import os

# Idle OpenMP threads sleep instead of spinning: on a machine whose cores other jobs share,
# spinning threads steal the cores their own process waits for (docs/GETTING_STARTED.md,
# "A busy machine"). Read when torch loads its OpenMP runtime, so before any import of it.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

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
