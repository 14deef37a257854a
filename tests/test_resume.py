"""Exact resume: a run preempted and resumed repeats the uninterrupted run's losses; the
data stream seeks instead of replaying; damaged or stale checkpoint files do not block
``--resume``."""
import contextlib
import logging
import os
import sys

import numpy as np
import pytest
import torch
from detectron2.engine import HookBase, default_argument_parser

from instunique.checkpoint import AtomicCheckpointer
from instunique.data.sampler import ResumableTrainingSampler
from instunique.data.synthetic.shapes import register_shapes

from utils import CONFIGS, ROOT, tiny_opts

sys.path.insert(0, ROOT)
import train_net  # noqa: E402

CONFIG = os.path.join(CONFIGS, "shapes/instunique_mask2former_shapes.yaml")


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # Exactness is claimed for one thread; intra-op threads would only add scheduling
    # noise to runs this small (and spin on a busy machine).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tiny_shapes(tmp_path_factory):
    register_shapes(str(tmp_path_factory.mktemp("resume")), prefix="resume_shapes",
                    num_train=8, num_val=2)


def _cfg(out_dir, *opts, resume=False):
    # 64-pixel images and no test set (DefaultTrainer evaluates after the last iteration):
    # the runs of these tests only train.
    argv = ["--config-file", CONFIG, *(["--resume"] if resume else []),
            "DATASETS.TRAIN", "('resume_shapes_train',)", "DATASETS.TEST", "()",
            "INPUT.MIN_SIZE_TRAIN", "(64,)", "INPUT.MAX_SIZE_TRAIN", "64",
            "SOLVER.IMS_PER_BATCH", "2", "DATALOADER.NUM_WORKERS", "0", "OUTPUT_DIR", str(out_dir),
            "MODEL.INST_UNIQUE.CROSS_IMAGE.MEMORY_PIXELS", "1000", "TEST.EVAL_PERIOD", "0",
            "MODEL.DEVICE", "cpu", *[str(o) for o in tiny_opts()], *[str(o) for o in opts]]
    return train_net.setup(default_argument_parser().parse_args(argv))


class Preempted(Exception):
    pass


class RecordLosses(HookBase):
    """Every step's losses, as the step logged them; raises Preempted after ``stop_after``
    (the checkpointer, an earlier hook, has saved by then)."""

    def __init__(self, stop_after=None):
        self.losses = {}
        self.stop_after = stop_after

    def after_step(self):
        it = self.trainer.iter
        self.losses[it] = {k: v for k, (v, i) in self.trainer.storage.latest().items()
                           if "loss" in k and i == it}
        if it == self.stop_after:
            raise Preempted


def _train(cfg, resume=False, stop_after=None):
    trainer = train_net.Trainer(cfg)
    record = RecordLosses(stop_after)
    trainer.register_hooks([record])
    trainer.resume_or_load(resume=resume)
    try:
        trainer.train()
    except Preempted:
        pass
    return record.losses


@pytest.mark.parametrize("clip", [(), (
    # Resumed at iteration 2 of 0 (exact), 1, 2 (one pass each), 3 (exact): the step it
    # redoes needs the clip factors measured at iteration 0, from the checkpoint.
    "MODEL.INST_UNIQUE.TERMS_CLIP_VALUE", 0.1, "MODEL.INST_UNIQUE.TERMS_CLIP_PERIOD", 3)],
    ids=["clip the sum", "clip the terms apart every 3 steps"])
def test_preempted_and_resumed_run_repeats_the_uninterrupted_losses(tiny_shapes, tmp_path,
                                                                    clip):
    opts = ("SOLVER.MAX_ITER", 4, "SOLVER.CHECKPOINT_PERIOD", 2, *clip)
    full = _train(_cfg(tmp_path / "full", *opts))
    first = _train(_cfg(tmp_path / "cut", *opts), stop_after=2)
    # Iteration 2 ran but was not saved: the resumed run redoes it from model_0000001.
    assert sorted(first) == [0, 1, 2]
    rest = _train(_cfg(tmp_path / "cut", *opts, resume=True), resume=True)
    assert sorted(rest) == [2, 3]

    assert sorted(full) == list(range(4))
    keys = set(full[0])
    assert {"loss_ce", "loss_mask", "loss_dice", "loss_cross_image", "loss_equi_ce",
            "total_loss"} <= keys
    for it, losses in [*first.items(), *rest.items()]:
        assert set(losses) == keys, it
        for k in keys:
            assert losses[k] == pytest.approx(full[it][k], rel=1e-5, abs=1e-7), (it, k)
    # The comparison can fail: every step trains on other data with other draws.
    assert all(full[it]["total_loss"] != full[0]["total_loss"] for it in range(1, 4))
    # On one thread the resumed run is the uninterrupted one, bit for bit.
    a, b = (torch.load(tmp_path / run / "model_final.pth", weights_only=False)["model"]
            for run in ("full", "cut"))
    assert [k for k in a if not torch.equal(a[k], b[k])] == []


def _batches(loader, n):
    it = iter(loader)
    return [[(d["image_id"], d["image"], d["paired_view"]["image"]) for d in next(it)]
            for _ in range(n)]


def _assert_same_batches(a, b):
    assert len(a) == len(b)
    for batch_a, batch_b in zip(a, b):
        assert [x[0] for x in batch_a] == [x[0] for x in batch_b]
        for (_, *views_a), (_, *views_b) in zip(batch_a, batch_b):
            for va, vb in zip(views_a, views_b):
                assert torch.equal(va, vb)


def test_loader_seeks_to_an_iteration_with_the_same_views_for_any_worker_count(
        tiny_shapes, tmp_path):
    opts = ("INPUT.DATASET_MAPPER_NAME", "coco_instance_lsj", "INPUT.IMAGE_SIZE", 64,
            "MODEL.INST_UNIQUE.EQUIVARIANCE.TRANSFORMS", "['flip', 'crop', 'rotation']")
    loader = train_net.Trainer.build_train_loader(_cfg(tmp_path, *opts))
    reference = _batches(loader, 5)[2:]
    for workers in (0, 2):
        loader = train_net.Trainer.build_train_loader(
            _cfg(tmp_path, *opts, "DATALOADER.NUM_WORKERS", workers))
        loader.resumable_sampler.start_at(2)
        _assert_same_batches(_batches(loader, 3), reference)
    # Another seed: other images or other views.
    loader = train_net.Trainer.build_train_loader(_cfg(tmp_path, *opts, "SEED", 1))
    loader.resumable_sampler.start_at(2)
    with pytest.raises(AssertionError):
        _assert_same_batches(_batches(loader, 3), reference)


def _stream(sampler, iterations):
    return [sampler.batch(it) for it in range(iterations)]


def test_sampler_is_a_function_of_seed_and_iteration_and_shards_by_rank():
    groups = np.zeros(10, dtype=int)
    whole = _stream(ResumableTrainingSampler(groups, 4, seed=3, rank=0, world_size=1), 20)
    # Every epoch a permutation of the whole set.
    flat = [i for batch in whole for i, _ in batch]
    for epoch in range(8):
        assert sorted(flat[epoch * 10:(epoch + 1) * 10]) == list(range(10))
    assert flat[:10] != flat[10:20]
    # Two processes of 2 images each: the same 4 items per iteration, split by rank.
    ranks = [_stream(ResumableTrainingSampler(groups, 2, seed=3, rank=r, world_size=2), 20)
             for r in (0, 1)]
    assert [a + b for a, b in zip(*ranks)] == whole
    # Starting at an iteration continues the stream there.
    sampler = ResumableTrainingSampler(groups, 4, seed=3, rank=0, world_size=1)
    sampler.start_at(7)
    stream = iter(sampler)
    assert [next(stream) for _ in range(8)] == whole[7] + whole[8]
    # The keys that seed the augmentations are unique along the stream.
    keys = [key for batch in whole for _, key in batch]
    assert len(set(keys)) == len(keys)


def test_grouped_sampler_keeps_orientations_apart_in_proportion():
    groups = np.array([0] * 9 + [1] * 3)  # 9 landscape images, 3 portrait
    sampler = ResumableTrainingSampler(groups, 2, seed=0, rank=0, world_size=1)
    batches = _stream(sampler, 640)
    kinds = [{int(groups[i]) for i, _ in batch} for batch in batches]
    assert all(len(k) == 1 for k in kinds)
    portrait = sum(k == {1} for k in kinds)
    assert portrait == 640 * 3 // 12  # exactly its share over whole blocks
    assert kinds[:32] != kinds[32:64]  # the order within blocks is drawn
    seen = {i for batch in batches for i, _ in batch}
    assert seen == set(range(12))
    # Seeking lands on the same batch, grouping included.
    for it in (0, 31, 32, 100, 639):
        assert ResumableTrainingSampler(groups, 2, seed=0, rank=0, world_size=1).batch(it) \
            == batches[it]


def _checkpoints(out_dir, iterations=(1, 3)):
    """model_0000001 and model_0000003 of a tiny trainer state, tagged as the last."""
    model = torch.nn.Linear(2, 2)
    checkpointer = AtomicCheckpointer(model, save_dir=str(out_dir))
    for it in iterations:
        with torch.no_grad():
            model.weight.fill_(it)
        checkpointer.save(f"model_{it:07d}", iteration=it)
    return checkpointer


class _Warnings(logging.Handler):
    """Collects the warnings of one logger (detectron2's loggers do not propagate to
    pytest's caplog)."""

    def __init__(self):
        super().__init__(logging.WARNING)
        self.text = ""

    def emit(self, record):
        self.text += self.format(record) + "\n"


@contextlib.contextmanager
def _warnings(logger):
    handler = _Warnings()
    logger.addHandler(handler)
    try:
        yield handler
    finally:
        logger.removeHandler(handler)


def test_unreadable_last_checkpoint_falls_back_to_the_previous_one(tmp_path):
    checkpointer = _checkpoints(tmp_path)
    newest = tmp_path / "model_0000003.pth"
    newest.write_bytes(newest.read_bytes()[:100])  # cut short
    with _warnings(checkpointer.logger) as log:
        extra = checkpointer.resume_or_load("", resume=True)
    assert extra["iteration"] == 1
    assert torch.equal(checkpointer.model.weight, torch.ones(2, 2))
    assert "model_0000003.pth: not a readable checkpoint" in log.text

    (tmp_path / "model_0000001.pth").write_bytes(b"")
    with pytest.raises(ValueError, match="last_checkpoint: no checkpoint of .* is readable "
                                         r"\(tried model_0000003.pth, model_0000001.pth\)"):
        checkpointer.resume_or_load("", resume=True)


def test_trainer_resumes_past_a_truncated_checkpoint(tiny_shapes, tmp_path):
    trainer = train_net.Trainer(_cfg(tmp_path, "SOLVER.MAX_ITER", 8))
    for trainer.iter in (1, 3):
        trainer.checkpointer.save(f"model_{trainer.iter:07d}")
    newest = tmp_path / "model_0000003.pth"
    newest.write_bytes(newest.read_bytes()[:1000])
    (tmp_path / "model_0000005.pth.tmp.77").write_bytes(b"a save that died")
    resumed = train_net.Trainer(_cfg(tmp_path, "SOLVER.MAX_ITER", 8, resume=True))
    with _warnings(resumed.checkpointer.logger) as log:
        resumed.resume_or_load(resume=True)
    assert resumed.start_iter == 2 and resumed._sampler.start_iter == 2
    assert "model_0000003.pth: not a readable checkpoint" in log.text
    assert not (tmp_path / "model_0000005.pth.tmp.77").exists()


def test_stale_temporary_files_are_removed_when_training_starts(tmp_path):
    checkpointer = _checkpoints(tmp_path)
    stale = ["model_0000005.pth.tmp.4242", "last_checkpoint.tmp.4242",
             f"model_final.pth.tmp.{os.getpid()}"]
    for name in stale:
        (tmp_path / name).write_bytes(b"partial")
    (tmp_path / "notes.tmp.1").write_text("not ours")
    removed = checkpointer.remove_stale_temporaries()
    assert sorted(os.path.basename(p) for p in removed) == sorted(stale)
    assert sorted(os.listdir(tmp_path)) == ["last_checkpoint", "model_0000001.pth",
                                            "model_0000003.pth", "notes.tmp.1"]
    # Only the process that saves cleans up.
    (tmp_path / stale[0]).write_bytes(b"partial")
    other = AtomicCheckpointer(checkpointer.model, save_dir=str(tmp_path), save_to_disk=False)
    assert other.remove_stale_temporaries() == []
    assert (tmp_path / stale[0]).exists()


def test_last_checkpoint_naming_a_missing_file_is_reported_as_such(tiny_shapes, tmp_path):
    checkpointer = _checkpoints(tmp_path)
    os.remove(tmp_path / "model_0000003.pth")
    match = r"last_checkpoint names 'model_0000003.pth', which is not in"
    with pytest.raises(FileNotFoundError, match=match):
        checkpointer.resume_or_load("", resume=True)
    # Training and --eval-only --resume both say so; neither blames MODEL.WEIGHTS.
    cfg = _cfg(tmp_path, "SOLVER.MAX_ITER", 1, resume=True)
    with pytest.raises(FileNotFoundError, match=match) as error:
        train_net.Trainer(cfg).resume_or_load(resume=True)
    assert "MODEL.WEIGHTS:" not in str(error.value)
    model = train_net.Trainer.build_model(cfg)
    with pytest.raises(FileNotFoundError, match=match):
        train_net.load_for_evaluation(cfg, model, resume=True)


def test_the_seed_of_the_first_run_is_kept_on_resume(tiny_shapes, tmp_path):
    first = train_net.Trainer(_cfg(tmp_path, "SEED", -1))  # a random seed
    first.checkpointer.save("model_0000000")
    saved = torch.load(tmp_path / "model_0000000.pth", weights_only=False)["trainer"]["seed"]
    assert saved == first.seed >= 0
    resumed = train_net.Trainer(_cfg(tmp_path, "SEED", -1, resume=True))
    assert resumed.seed != first.seed  # drawn again...
    resumed.resume_or_load(resume=True)
    assert resumed.seed == first.seed  # ...and replaced by the first run's
    assert resumed._sampler.seed == first.seed and resumed._sampler.start_iter == 1

    # A checkpoint from before seeds were saved still resumes, with the seed of SEED.
    state = torch.load(tmp_path / "model_0000000.pth", weights_only=False)
    del state["trainer"]["seed"]
    torch.save(state, tmp_path / "model_0000000.pth")
    old = train_net.Trainer(_cfg(tmp_path, "SEED", 5, resume=True))
    with _warnings(logging.getLogger("instunique.engine.trainer")) as log:
        old.resume_or_load(resume=True)
    assert old.start_iter == 1 and old.seed == old._sampler.seed == 5
    assert "The checkpoint has no seed" in log.text


def test_warm_start_continues_another_runs_checkpoint(tiny_shapes, tmp_path):
    terms_off = ("MODEL.INST_UNIQUE.CROSS_IMAGE.ENABLED", False,
                 "MODEL.INST_UNIQUE.EQUIVARIANCE.ENABLED", False)
    full = _train(_cfg(tmp_path / "baseline", "SOLVER.MAX_ITER", 4, "SOLVER.CHECKPOINT_PERIOD", 2,
                       *terms_off))
    half = str(tmp_path / "baseline" / "model_0000001.pth")
    # The baseline's own config warm-started at the half repeats its second half exactly:
    # weights, optimizer, schedule and data order all continue.
    same = _train(_cfg(tmp_path / "same", "SOLVER.MAX_ITER", 4, "SOLVER.WARM_START", half,
                       *terms_off))
    assert sorted(same) == [2, 3] and same == {k: full[k] for k in (2, 3)}
    # With the terms on, the first step sees the baseline's weights and images: the same
    # base losses, and the terms beside them.
    terms = _train(_cfg(tmp_path / "terms", "SOLVER.MAX_ITER", 4, "SOLVER.WARM_START", half))
    assert sorted(terms) == [2, 3]
    for key in ("loss_ce", "loss_mask", "loss_dice"):
        assert terms[2][key] == full[2][key], key
    assert "loss_cross_image" in terms[2] and "loss_equi_mask" in terms[2]
    with pytest.raises(FileNotFoundError, match="SOLVER.WARM_START"):
        _train(_cfg(tmp_path / "bad", "SOLVER.WARM_START", str(tmp_path / "none.pth")))
