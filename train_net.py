#!/usr/bin/env python
"""Train and evaluate InstUnique and its base segmenters with detectron2's standard CLI.

    python train_net.py --config-file configs/shapes/instunique_mask2former_shapes.yaml
    python train_net.py --config-file ... --eval-only MODEL.WEIGHTS output/model_final.pth
"""
import os

from detectron2.config import get_cfg
from detectron2.data import build_detection_train_loader
from detectron2.engine import DefaultTrainer, default_argument_parser, default_setup, launch
from detectron2.evaluation import COCOEvaluator, DatasetEvaluators

from instunique import add_instunique_config
from instunique.checkpoint import AtomicCheckpointer
from instunique.data import InstanceViewMapper, PairedViewMapper
from instunique.data.datasets import check_dataset, prepare_dataset
from instunique.data.user_datasets import setup_user_datasets
from instunique.evaluation import QueryUniquenessEvaluator
from instunique.solver import build_optimizer


class Trainer(DefaultTrainer):
    @classmethod
    def build_train_loader(cls, cfg):
        paired = cfg.MODEL.META_ARCHITECTURE == "InstUnique"
        mapper = (PairedViewMapper if paired else InstanceViewMapper)(cfg, is_train=True)
        for name in cfg.DATASETS.TRAIN:
            prepare_dataset(name)
        return build_detection_train_loader(cfg, mapper=mapper)

    @classmethod
    def build_evaluator(cls, cfg, dataset_name, output_folder=None, model=None):
        prepare_dataset(dataset_name)
        evaluator_type = check_dataset(dataset_name).evaluator_type
        if evaluator_type != "coco":
            raise ValueError(
                f"dataset {dataset_name!r} has evaluator_type {evaluator_type!r}; "
                f"train_net.py evaluates 'coco' instance segmentation"
            )
        output_folder = output_folder or os.path.join(cfg.OUTPUT_DIR, "inference")
        coco = COCOEvaluator(dataset_name, output_dir=output_folder)
        if not cfg.TEST.UNIQUENESS.ENABLED:
            return coco
        if model is None:
            raise ValueError("TEST.UNIQUENESS.ENABLED: the uniqueness evaluator needs the model")
        uniqueness = QueryUniquenessEvaluator(cfg, dataset_name, model, output_folder)
        return DatasetEvaluators([coco, uniqueness])

    @classmethod
    def test(cls, cfg, model, evaluators=None):
        # The uniqueness evaluator reads the model's embeddings: hand it the model.
        if evaluators is None:
            evaluators = [cls.build_evaluator(cfg, name, model=model) for name in cfg.DATASETS.TEST]
        return super().test(cfg, model, evaluators)

    @classmethod
    def build_optimizer(cls, cfg, model):
        return build_optimizer(cfg, model)

    def build_hooks(self):
        # DefaultTrainer makes its checkpointer just before asking for hooks; swap in the
        # atomic one here so the periodic checkpointer and resume both use it.
        self.checkpointer = AtomicCheckpointer(
            self.checkpointer.model, self.cfg.OUTPUT_DIR, **self.checkpointer.checkpointables
        )
        return super().build_hooks()


def setup(args):
    cfg = get_cfg()
    add_instunique_config(cfg)
    cfg.merge_from_file(args.config_file)
    cfg.merge_from_list(args.opts)
    # DATASETS.REGISTER: the user's COCO-format data; also checks or sets NUM_CLASSES.
    setup_user_datasets(cfg)
    cfg.freeze()
    for name in (*cfg.DATASETS.TRAIN, *cfg.DATASETS.TEST):
        check_dataset(name)
    default_setup(cfg, args)
    return cfg


def main(args):
    cfg = setup(args)
    if args.eval_only:
        model = Trainer.build_model(cfg)
        AtomicCheckpointer(model, save_dir=cfg.OUTPUT_DIR).resume_or_load(
            cfg.MODEL.WEIGHTS, resume=args.resume
        )
        return Trainer.test(cfg, model)
    trainer = Trainer(cfg)
    trainer.resume_or_load(resume=args.resume)
    return trainer.train()


if __name__ == "__main__":
    args = default_argument_parser().parse_args()
    launch(
        main,
        args.num_gpus,
        num_machines=args.num_machines,
        machine_rank=args.machine_rank,
        dist_url=args.dist_url,
        args=(args,),
    )
