"""The project's trainer: detectron2's DefaultTrainer with our data, evaluators and
checkpointer, and data-parallel training that also runs on CPU processes."""
import logging
import os
import weakref

import torch
from detectron2.data import build_detection_train_loader
from detectron2.engine import AMPTrainer, DefaultTrainer, SimpleTrainer, create_ddp_model
from detectron2.evaluation import COCOEvaluator, DatasetEvaluators
from detectron2.utils import comm
from detectron2.utils.logger import setup_logger

from ..checkpoint import AtomicCheckpointer
from ..data import InstanceViewMapper, PairedViewMapper
from ..data.datasets import check_dataset, prepare_dataset
from ..evaluation import QueryUniquenessEvaluator
from ..objectives.memory import PixelMemory
from ..solver import build_optimizer
from .sync_bn import convert_sync_batchnorm


class Trainer(DefaultTrainer):
    def __init__(self, cfg):
        # DefaultTrainer.__init__ without its two single-GPU assumptions: DDP gets device_ids
        # only on CUDA, and BatchNorm statistics are synchronised so replicas stay equal.
        super(DefaultTrainer, self).__init__()
        if not logging.getLogger("detectron2").isEnabledFor(logging.INFO):
            setup_logger()
        cfg = self.auto_scale_workers(cfg, comm.get_world_size())
        model = self.build_model(cfg)
        optimizer = self.build_optimizer(cfg, model)
        data_loader = self.build_train_loader(cfg)
        if comm.get_world_size() > 1:
            model = convert_sync_batchnorm(model)
            on_cuda = next(model.parameters()).device.type == "cuda"
            model = create_ddp_model(
                model, broadcast_buffers=False,
                device_ids=[comm.get_local_rank()] if on_cuda else None,
            )
        loop = AMPTrainer if cfg.SOLVER.AMP.ENABLED else SimpleTrainer
        self._trainer = loop(model, data_loader, optimizer)
        self.scheduler = self.build_lr_scheduler(cfg, optimizer)
        self.checkpointer = AtomicCheckpointer(model, cfg.OUTPUT_DIR, trainer=weakref.proxy(self))
        self.start_iter = 0
        self.max_iter = cfg.SOLVER.MAX_ITER
        self.cfg = cfg
        self.register_hooks(self.build_hooks())

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


def load_for_evaluation(cfg, model, resume: bool = False) -> None:
    """Load MODEL.WEIGHTS (or, with ``resume``, the last checkpoint of OUTPUT_DIR) into
    ``model`` for ``--eval-only``, refusing what would evaluate a partly random model.

    Raises:
        ValueError: MODEL.WEIGHTS is empty (unless TEST.ALLOW_RANDOM_WEIGHTS), or the file
            leaves model parameters unloaded (they are listed; the pixel memory, a training
            queue, is not needed).
    """
    checkpointer = AtomicCheckpointer(model, save_dir=cfg.OUTPUT_DIR)
    if resume and checkpointer.has_checkpoint():
        path = checkpointer.get_checkpoint_file()
    elif cfg.MODEL.WEIGHTS:
        path = cfg.MODEL.WEIGHTS
    elif cfg.TEST.ALLOW_RANDOM_WEIGHTS:
        logging.getLogger(__name__).warning("Evaluating a randomly initialised model")
        return
    else:
        raise ValueError(
            "--eval-only with MODEL.WEIGHTS '' would evaluate a randomly initialised model; "
            "set MODEL.WEIGHTS to a checkpoint (or TEST.ALLOW_RANDOM_WEIGHTS True)"
        )
    checkpointer.load(path)
    unloaded = checkpointer.unloaded_keys(ignore_modules=(PixelMemory,))
    if unloaded:
        shown = ", ".join(unloaded[:10]) + (f", ... ({len(unloaded)} in all)"
                                            if len(unloaded) > 10 else "")
        raise ValueError(
            f"MODEL.WEIGHTS: {path} leaves {len(unloaded)} entries of the model's state "
            f"unloaded (missing or of another shape): {shown}. Is it a checkpoint of this "
            f"config's architecture ({cfg.MODEL.META_ARCHITECTURE})?"
        )


def check_device(cfg) -> None:
    """Fail in setup, naming MODEL.DEVICE, when the device does not exist here."""
    try:
        device = torch.device(cfg.MODEL.DEVICE)
    except RuntimeError as e:
        raise ValueError(f"MODEL.DEVICE: {cfg.MODEL.DEVICE!r} is not a device ({e})") from None
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0 or (device.index is not None and device.index >= count):
            raise ValueError(
                f"MODEL.DEVICE is {cfg.MODEL.DEVICE!r}, but this machine has {count} CUDA "
                f"device(s); use MODEL.DEVICE cpu"
            )
