"""The project's trainer: detectron2's DefaultTrainer with our data, evaluators and
checkpointer, data-parallel training that also runs on CPU processes, and exact resume."""
import logging
import os
import weakref

import torch
from detectron2.data import build_detection_train_loader
from detectron2.engine import (
    AMPTrainer,
    DefaultTrainer,
    HookBase,
    SimpleTrainer,
    create_ddp_model,
    hooks,
)
from detectron2.evaluation import DatasetEvaluators
from detectron2.utils import comm
from detectron2.utils.logger import setup_logger

from ..checkpoint import AtomicCheckpointer
from ..data import InstanceViewMapper, PairedViewMapper
from ..data.datasets import check_dataset
from ..data.sampler import build_resumable_train_loader
from ..evaluation import QueryUniquenessEvaluator, build_dataset_evaluators
from ..rng import STEP, resolve_seed, seed_all
from ..solver import build_optimizer
from .finite import at_iteration, install_nonfinite_checks
from .sync_bn import convert_sync_batchnorm
from .term_clipping import (
    TermClippingTrainer,
    build_term_clipper,
    check_term_clipping,
    clips_terms_separately,
)


class SeedEachStep(HookBase):
    """Seeds python, numpy and torch from (seed, rank, iteration) before every step.

    The draws of a step (random points of the losses, dropout) then depend on its
    iteration alone, not on what ran before it: a resumed run repeats them without the
    generators' states in the checkpoint, every process of a data-parallel run included,
    and evaluation or logging between steps cannot shift them.
    """

    def before_step(self):
        seed_all((STEP, self.trainer.seed, comm.get_rank(), self.trainer.iter))


class Trainer(DefaultTrainer):
    """DefaultTrainer whose ``--resume`` continues the run exactly: model, optimizer,
    scheduler and pixel memory from the checkpoint, and the data stream, augmentations and
    random draws of every step from the run's seed and the iteration (see
    :mod:`instunique.data.sampler` and :class:`SeedEachStep`).

    The seed is cfg.SEED, or a random one where it is negative; it is saved in every
    checkpoint (``trainer.seed``) and a resumed run takes it from there.
    """

    def __init__(self, cfg):
        # DefaultTrainer.__init__ (detectron2 0.6 to upstream main, as sal-detectron2 0.7.2
        # ships it) without its two single-GPU assumptions: DDP gets device_ids only on
        # CUDA, and BatchNorm statistics are synchronised so replicas stay equal. It sets
        # the same attributes, so DefaultTrainer's other methods work on it unchanged.
        super(DefaultTrainer, self).__init__()
        if not logging.getLogger("detectron2").isEnabledFor(logging.INFO):
            setup_logger()
        cfg = self.auto_scale_workers(cfg, comm.get_world_size())
        check_term_clipping(cfg)
        model = self.build_model(cfg)
        optimizer = self.build_optimizer(cfg, model)
        data_loader = self.build_train_loader(cfg)
        # None where the loader cannot seek (another DATALOADER.SAMPLER_TRAIN).
        self._sampler = getattr(data_loader, "resumable_sampler", None)
        self.seed = self._sampler.seed if self._sampler is not None else resolve_seed(cfg)
        if comm.get_world_size() > 1:
            model = convert_sync_batchnorm(model)
            on_cuda = next(model.parameters()).device.type == "cuda"
            model = create_ddp_model(
                model, broadcast_buffers=False,
                device_ids=[comm.get_local_rank()] if on_cuda else None,
            )
        if clips_terms_separately(cfg):
            params = [p for g in optimizer.param_groups for p in g["params"]]
            self._trainer = TermClippingTrainer(model, data_loader, optimizer,
                                                build_term_clipper(cfg, params))
        else:
            self._trainer = _training_loop(cfg)(model, data_loader, optimizer)
        # A diverging run stops naming the first non-finite loss term or gradient.
        install_nonfinite_checks(model, optimizer)
        self.scheduler = self.build_lr_scheduler(cfg, optimizer)
        self.checkpointer = AtomicCheckpointer(model, cfg.OUTPUT_DIR, trainer=weakref.proxy(self))
        self.start_iter = 0
        self.max_iter = cfg.SOLVER.MAX_ITER
        self.cfg = cfg
        self.register_hooks(self.build_hooks())

    def run_step(self):
        with at_iteration(self.iter):
            super().run_step()

    def build_hooks(self):
        built = super().build_hooks()
        keep = self.cfg.SOLVER.CHECKPOINT_MAX_TO_KEEP
        if keep < 0:
            raise ValueError(f"SOLVER.CHECKPOINT_MAX_TO_KEEP = {keep} must be >= 0 (0: all)")
        for hook in built:
            if isinstance(hook, hooks.PeriodicCheckpointer) and keep:
                hook.max_to_keep = keep
        # First, so that no other hook's before_step draws from unseeded generators.
        return [SeedEachStep(), *built]

    @classmethod
    def build_train_loader(cls, cfg):
        paired = cfg.MODEL.META_ARCHITECTURE == "InstUnique"
        mapper = (PairedViewMapper if paired else InstanceViewMapper)(cfg, is_train=True)
        # For callers that skip train_net's prepare_datasets (benchmarks, tests): generates
        # built-in data on first use; a no-op once the files exist.
        for name in cfg.DATASETS.TRAIN:
            check_dataset(name)
        if cfg.DATALOADER.SAMPLER_TRAIN == "TrainingSampler":
            return build_resumable_train_loader(cfg, mapper)
        logging.getLogger(__name__).warning(
            f"DATALOADER.SAMPLER_TRAIN {cfg.DATALOADER.SAMPLER_TRAIN}: a resumed run starts "
            f"this sampler's data stream again (only TrainingSampler can be resumed exactly)"
        )
        return build_detection_train_loader(cfg, mapper=mapper)

    def resume_or_load(self, resume: bool = True):
        """detectron2's resume_or_load, and: SOLVER.WARM_START continues another run's
        checkpoint (unless this run resumes its own), stale temporary files of interrupted
        saves are removed, an unreadable newest checkpoint is passed over for the newest
        readable one (with a warning), and the data stream continues at the resumed
        iteration."""
        self.checkpointer.remove_stale_temporaries()
        warm = self.cfg.SOLVER.WARM_START
        if warm and not (resume and self.checkpointer.has_checkpoint()):
            if not os.path.isfile(warm):
                raise FileNotFoundError(f"SOLVER.WARM_START = {warm!r}: no such checkpoint")
            # Everything a resume restores (weights, optimizer, scheduler, iteration, seed),
            # from another run's checkpoint; this run's own checkpoints then take over.
            self.checkpointer.load(warm)
            self.start_iter = self.iter + 1
        else:
            super().resume_or_load(resume=resume)
        if self._sampler is not None:
            self._sampler.start_at(self.start_iter, seed=self.seed)
            # The sampler is read when the loader's iterator is made (by the first step);
            # one made before this point would go on where it was: drop it (public API of
            # SimpleTrainer, which makes the next iterator from the same loader).
            loader = self._trainer.data_loader
            self._trainer.reset_data_loader(lambda: loader)
        elif self.start_iter:
            logging.getLogger(__name__).warning(
                f"Resuming at iteration {self.start_iter}: the data stream starts again"
            )

    def state_dict(self):
        state = super().state_dict()
        state["seed"] = self.seed
        return state

    def load_state_dict(self, state_dict):
        super().load_state_dict(state_dict)
        logger = logging.getLogger(__name__)
        seed = state_dict.get("seed")
        if seed is None:
            # A checkpoint written before seeds were saved.
            logger.warning(f"The checkpoint has no seed: the resumed run uses seed {self.seed}, "
                           f"so its data and random draws do not continue the earlier run's")
            return
        if self.cfg.SEED >= 0 and int(seed) != self.cfg.SEED:
            logger.warning(f"Resuming a run of seed {seed}: SEED {self.cfg.SEED} is ignored")
        self.seed = int(seed)

    @classmethod
    def build_evaluator(cls, cfg, dataset_name, output_folder=None, model=None):
        check_dataset(dataset_name)  # as in build_train_loader
        output_folder = output_folder or os.path.join(cfg.OUTPUT_DIR, "inference")
        # COCO instances, COCO panoptic or semantic, by the dataset's evaluator_type.
        evaluators = build_dataset_evaluators(cfg, dataset_name, output_folder)
        if cfg.TEST.UNIQUENESS.ENABLED:
            if model is None:
                raise ValueError(
                    "TEST.UNIQUENESS.ENABLED: the uniqueness evaluator needs the model")
            evaluators.append(QueryUniquenessEvaluator(cfg, dataset_name, model, output_folder))
        return evaluators[0] if len(evaluators) == 1 else DatasetEvaluators(evaluators)

    @classmethod
    def test(cls, cfg, model, evaluators=None):
        # The uniqueness evaluator reads the model's embeddings: hand it the model.
        if evaluators is None:
            evaluators = [cls.build_evaluator(cfg, name, model=model) for name in cfg.DATASETS.TEST]
        return super().test(cfg, model, evaluators)

    @classmethod
    def build_optimizer(cls, cfg, model):
        return build_optimizer(cfg, model)


class CPUAutocastTrainer(SimpleTrainer):
    """SimpleTrainer with its step under bfloat16 autocast on the CPU: SOLVER.AMP.ENABLED
    there (detectron2's AMPTrainer needs CUDA). bfloat16 keeps float32's exponent range, so
    no gradient scaler is needed; parameters and optimizer state stay float32."""

    def run_step(self):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            super().run_step()


def _training_loop(cfg):
    if not cfg.SOLVER.AMP.ENABLED:
        return SimpleTrainer
    return AMPTrainer if torch.device(cfg.MODEL.DEVICE).type == "cuda" else CPUAutocastTrainer


def load_for_evaluation(cfg, model, resume: bool = False, command: str = "--eval-only") -> None:
    """Load MODEL.WEIGHTS (or, with ``resume``, the last checkpoint of OUTPUT_DIR) into
    ``model`` for ``--eval-only`` (or ``command``, named in the errors: the demo), refusing
    what would evaluate a partly random model.

    Raises:
        ValueError: MODEL.WEIGHTS is empty (unless TEST.ALLOW_RANDOM_WEIGHTS), or the file
            leaves model parameters unloaded (they are listed; the pixel memory, a training
            queue, is not needed).
    """
    checkpointer = AtomicCheckpointer(model, save_dir=cfg.OUTPUT_DIR)
    source = "MODEL.WEIGHTS"
    if resume and checkpointer.has_checkpoint():
        path = checkpointer.last_checkpoint_file()
        source = os.path.join(cfg.OUTPUT_DIR, "last_checkpoint")
    elif cfg.MODEL.WEIGHTS:
        path = cfg.MODEL.WEIGHTS
    elif cfg.TEST.ALLOW_RANDOM_WEIGHTS:
        logging.getLogger(__name__).warning("Evaluating a randomly initialised model")
        return
    else:
        raise ValueError(
            f"{command} with MODEL.WEIGHTS '' would evaluate a randomly initialised model; "
            "set MODEL.WEIGHTS to a checkpoint (or TEST.ALLOW_RANDOM_WEIGHTS True)"
        )
    checkpointer.load(path, source=source)
    unloaded = checkpointer.unloaded_keys()
    if unloaded:
        shown = ", ".join(unloaded[:10]) + (f", ... ({len(unloaded)} in all)"
                                            if len(unloaded) > 10 else "")
        raise ValueError(
            f"{source}: {path} leaves {len(unloaded)} entries of the model's state "
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
