"""train_net.py end to end on a tiny shapes set: train, log, checkpoint, resume, evaluate,
and the errors a user sees for bad input."""
import json
import math
import os
import subprocess
import sys

import pytest
import torch
from detectron2.engine import default_argument_parser

from instunique.data.synthetic.shapes import register_shapes

from utils import CONFIGS, ROOT, get_config, tiny_opts

sys.path.insert(0, ROOT)
import train_net  # noqa: E402

CONFIG = os.path.join(CONFIGS, "shapes/instunique_mask2former_shapes.yaml")


@pytest.fixture(scope="module")
def tiny_shapes(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("train_net"))
    register_shapes(root, prefix="tiny_shapes", num_train=8, num_val=3)
    return root


def _args(out_dir, *opts, eval_only=False, resume=False, config=CONFIG):
    argv = ["--config-file", config]
    argv += ["--eval-only"] if eval_only else []
    argv += ["--resume"] if resume else []
    argv += [
        "DATASETS.TRAIN", "('tiny_shapes_train',)", "DATASETS.TEST", "('tiny_shapes_val',)",
        "SOLVER.IMS_PER_BATCH", "2", "DATALOADER.NUM_WORKERS", "0", "OUTPUT_DIR", str(out_dir),
        "MODEL.INST_UNIQUE.CROSS_IMAGE.MEMORY_PIXELS", "1000",
        *[str(o) for o in tiny_opts()], *[str(o) for o in opts],
    ]
    return default_argument_parser().parse_args(argv)


def _metrics(out_dir):
    with open(os.path.join(out_dir, "metrics.json")) as f:
        return [json.loads(line) for line in f]


def test_only_the_newest_periodic_checkpoints_are_kept(tiny_shapes, tmp_path):
    train_net.main(_args(tmp_path, "SOLVER.MAX_ITER", 5, "SOLVER.CHECKPOINT_PERIOD", 1,
                         "SOLVER.CHECKPOINT_MAX_TO_KEEP", 2, "TEST.EVAL_PERIOD", 0,
                         "MODEL.INST_UNIQUE.CROSS_IMAGE.ENABLED", False,
                         "MODEL.INST_UNIQUE.EQUIVARIANCE.ENABLED", False))
    kept = sorted(f for f in os.listdir(tmp_path) if f.endswith(".pth"))
    assert kept == ["model_0000003.pth", "model_0000004.pth", "model_final.pth"]
    with open(os.path.join(tmp_path, "last_checkpoint")) as f:
        assert f.read().strip() == "model_final.pth"
    with pytest.raises(ValueError, match="SOLVER.CHECKPOINT_MAX_TO_KEEP"):
        train_net.main(_args(tmp_path / "bad", "SOLVER.MAX_ITER", 1,
                             "SOLVER.CHECKPOINT_MAX_TO_KEEP", -1))


def test_trains_with_all_terms_logs_them_and_resumes(tiny_shapes, tmp_path):
    train_net.main(_args(tmp_path, "SOLVER.MAX_ITER", 4, "SOLVER.CHECKPOINT_PERIOD", 2,
                         "TEST.EVAL_PERIOD", 0))
    rows = [r for r in _metrics(tmp_path) if "loss_cross_image" in r]
    assert rows, "no loss rows logged"
    for key in ("loss_ce", "loss_mask", "loss_dice", "loss_cross_image", "loss_equi_ce",
                "loss_equi_mask", "loss_equi_dice", "total_loss"):
        assert all(key in r and torch.isfinite(torch.tensor(r[key])) for r in rows), key
    assert rows[-1]["iteration"] == 3
    assert not [f for f in os.listdir(tmp_path) if ".tmp." in f]

    ckpt = torch.load(os.path.join(tmp_path, "model_final.pth"), weights_only=False)
    assert int(ckpt["model"]["memory.size"]) > 0 and ckpt["iteration"] == 3

    # Resume from model_0000001 (iteration 1): training continues at iteration 2 with the
    # memory it had then.
    with open(os.path.join(tmp_path, "last_checkpoint"), "w") as f:
        f.write("model_0000001.pth")
    cfg = train_net.setup(_args(tmp_path, "SOLVER.MAX_ITER", 4, resume=True))
    trainer = train_net.Trainer(cfg)
    trainer.resume_or_load(resume=True)
    assert trainer.start_iter == 2
    saved = torch.load(os.path.join(tmp_path, "model_0000001.pth"), weights_only=False)["model"]
    memory = trainer.model.memory
    assert torch.equal(memory.feats, saved["memory.feats"])
    assert int(memory.size) == int(saved["memory.size"]) > 0


def test_eval_only_reports_coco_mask_ap(tiny_shapes, tmp_path):
    train_net.main(_args(tmp_path, "SOLVER.MAX_ITER", 1, "TEST.EVAL_PERIOD", 0))
    results = train_net.main(
        _args(tmp_path, "MODEL.WEIGHTS", os.path.join(tmp_path, "model_final.pth"),
              eval_only=True)
    )
    segm = results["segm"]
    assert {"AP", "AP50", "AP75"} <= set(segm)
    assert all(0.0 <= segm[k] <= 100.0 for k in ("AP", "AP50", "AP75"))


def test_unknown_dataset_lists_registered_names(tmp_path):
    with pytest.raises(KeyError, match="shapes_train"):
        train_net.setup(_args(tmp_path, "DATASETS.TEST", "('no_such_dataset',)"))


def test_missing_weights_file_names_the_path(tiny_shapes, tmp_path):
    missing = str(tmp_path / "nowhere" / "model.pth")
    with pytest.raises(FileNotFoundError, match="nowhere/model.pth"):
        train_net.main(_args(tmp_path, "MODEL.WEIGHTS", missing, eval_only=True))


def test_unknown_config_key_is_refused(tmp_path):
    with pytest.raises((KeyError, AssertionError), match="Non-existent"):
        train_net.setup(_args(tmp_path, "MODEL.INST_UNIQUE.NO_SUCH_KEY", 1))


@pytest.mark.parametrize(
    "key, value",
    [
        ("EQUIVARIANCE.CROP_RANGE", "(0.0, 1.0)"),
        ("EQUIVARIANCE.CROP_RANGE", "(0.6, 1.2)"),
        ("EQUIVARIANCE.ROTATION_RANGE", "(60.0, 0.0)"),
        ("EQUIVARIANCE.TRANSFORMS", "['flip', 'shear']"),
        ("EQUIVARIANCE.TRANSFORMS", "[]"),
        ("EQUIVARIANCE.WEIGHT", "-1.0"),
        ("CROSS_IMAGE.WEIGHT", "-0.5"),
        ("CROSS_IMAGE.MEMORY_PIXELS", "-10"),
        ("EQUIVARIANCE.MATCHING", "nearest"),
    ],
)
def test_out_of_range_values_fail_at_model_build_naming_the_key(key, value):
    from detectron2.modeling import build_model

    cfg = get_config("shapes/instunique_mask2former_shapes.yaml",
                     f"MODEL.INST_UNIQUE.{key}", value)
    with pytest.raises(ValueError, match=f"MODEL.INST_UNIQUE.{key}"):
        build_model(cfg)


def test_eval_only_refuses_weights_that_leave_parameters_unloaded(tiny_shapes, tmp_path):
    train_net.main(_args(tmp_path, "SOLVER.MAX_ITER", 1, "TEST.EVAL_PERIOD", 0))
    state = torch.load(tmp_path / "model_final.pth", weights_only=False)
    # Dropping the memory is fine (a training queue); dropping a head weight is not.
    state["model"] = {k: v for k, v in state["model"].items() if not k.startswith("memory.")}
    torch.save(state, tmp_path / "no_memory.pth")
    train_net.main(_args(tmp_path, "MODEL.WEIGHTS", tmp_path / "no_memory.pth", eval_only=True))
    del state["model"]["sem_seg_head.predictor.class_embed.weight"]
    torch.save(state, tmp_path / "partial.pth")
    with pytest.raises(ValueError, match="partial.pth leaves 1 entries.*class_embed.weight"):
        train_net.main(_args(tmp_path, "MODEL.WEIGHTS", tmp_path / "partial.pth",
                             eval_only=True))


def test_eval_only_refuses_random_weights_unless_asked(tiny_shapes, tmp_path):
    with pytest.raises(ValueError, match="MODEL.WEIGHTS '' would evaluate a randomly"):
        train_net.main(_args(tmp_path, eval_only=True))
    # Asked for, and with no training set registered: --eval-only reads DATASETS.TEST only.
    results = train_net.main(_args(tmp_path, "TEST.ALLOW_RANDOM_WEIGHTS", True,
                                   "DATASETS.TRAIN", "('no_such_train_set',)", eval_only=True))
    assert "segm" in results


def test_unreadable_weights_name_the_file(tiny_shapes, tmp_path):
    (tmp_path / "noise.pth").write_bytes(os.urandom(4096))
    with pytest.raises(ValueError, match="MODEL.WEIGHTS: .*noise.pth is not a readable"):
        train_net.main(_args(tmp_path, "MODEL.WEIGHTS", tmp_path / "noise.pth", eval_only=True))


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_unavailable_device_fails_in_setup_naming_the_key(tmp_path):
    with pytest.raises(ValueError, match="MODEL.DEVICE is 'cuda'.*0 CUDA"):
        train_net.setup(_args(tmp_path, "MODEL.DEVICE", "cuda"))
    with pytest.raises(ValueError, match="MODEL.DEVICE: 'gpu' is not a device"):
        train_net.setup(_args(tmp_path, "MODEL.DEVICE", "gpu"))


def test_panoptic_shapes_trains_and_eval_only_reports_pq(tmp_path):
    from instunique.data.synthetic.shapes_panoptic import SHAPES_PANOPTIC
    from instunique.data.synthetic.spec import register_synthetic

    register_synthetic(SHAPES_PANOPTIC, str(tmp_path / "data"), prefix="tiny_pan",
                       num_train=4, num_val=2)
    config = os.path.join(CONFIGS, "shapes/instunique_mask2former_panoptic_shapes.yaml")
    data = ("DATASETS.TRAIN", "('tiny_pan_train',)", "DATASETS.TEST", "('tiny_pan_val',)")
    train_net.main(_args(tmp_path, *data, "SOLVER.MAX_ITER", 2, config=config))
    rows = [r for r in _metrics(tmp_path) if "loss_cross_image" in r]
    assert rows and all(r["loss_cross_image"] >= 0 for r in rows)
    results = train_net.main(_args(tmp_path, *data, "MODEL.WEIGHTS",
                                   tmp_path / "model_final.pth", eval_only=True, config=config))
    assert {"PQ", "PQ_th", "PQ_st"} <= set(results["panoptic_seg"])
    assert "mIoU" in results["sem_seg"]


@pytest.mark.parametrize("config", ["shapes/instunique_mask2former_shapes.yaml",
                                    "shapes/instunique_sparseinst_shapes.yaml"])
def test_amp_on_the_cpu_trains_in_bfloat16_with_finite_losses(tiny_shapes, tmp_path, config):
    clip = ["MODEL.INST_UNIQUE.TERMS_CLIP_VALUE", 0.0] if "sparseinst" in config else []
    cfg = train_net.setup(_args(tmp_path, "SOLVER.MAX_ITER", 3, "SOLVER.AMP.ENABLED", True,
                                "TEST.EVAL_PERIOD", 0, "DATASETS.TEST", "()", *clip,
                                config=os.path.join(CONFIGS, config)))
    trainer = train_net.Trainer(cfg)
    seen = []
    model = trainer.model
    model.register_forward_hook(lambda m, i, o: seen.append(torch.get_autocast_dtype("cpu")
                                                            if torch.is_autocast_enabled("cpu")
                                                            else None))
    trainer.train()
    assert seen == [torch.bfloat16] * 3
    rows = [r for r in _metrics(tmp_path) if "total_loss" in r]
    assert rows and all(math.isfinite(r["total_loss"]) for r in rows)


@pytest.mark.parametrize("preset", [None, "ACTIVE"])
def test_openmp_threads_sleep_on_a_busy_machine_unless_the_user_says_otherwise(
        tmp_path, preset):
    """train_net decides OMP_WAIT_POLICY before torch loads: PASSIVE when other processes
    hold half a core or more (or /proc/stat cannot be read), else OpenMP's default (unset);
    a user's setting stays. The busy cores come from the change of /proc/stat's counters."""
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    if preset is not None:
        env["OMP_WAIT_POLICY"] = preset
    stat = tmp_path / "stat"
    stat.write_text("cpu 100 0 0 1000 0 0 0 0 0 0\ncpu0 1 2 3\n")
    # 0.25 s later: 300 busy ticks of 1,000 (user, nice, system, irq, steal), so 0.3 of the
    # machine; iowait counts as idle.
    later = "cpu 200 50 100 1600 100 20 20 10 7 7\n"
    code = (
        "import json, os, runpy, sys, threading\n"
        "sys.argv = ['train_net.py']\n"
        f"ns = runpy.run_path({os.path.join(ROOT, 'train_net.py')!r}, run_name='not_main')\n"
        "policy = os.environ.get('OMP_WAIT_POLICY')\n"
        f"os.environ.pop('OMP_WAIT_POLICY') if {preset is None} and policy else None\n"
        f"threading.Timer(0.25, lambda: open({str(stat)!r}, 'w').write({later!r})).start()\n"
        f"busy = ns['busy_cores'](1.0, stat={str(stat)!r})\n"
        "policies = [ns['choose_wait_policy'](b) for b in (0.49, 0.5, None)]\n"
        f"print(json.dumps([busy / os.cpu_count(), ns['busy_cores'](0.0, {str(tmp_path)!r}),"
        " policies, policy]))\n"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env=env, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    share, unreadable, policies, policy = json.loads(run.stdout.strip().splitlines()[-1])
    assert share == pytest.approx(0.3) and unreadable is None
    if preset is None:
        assert policies == ["", "PASSIVE", "PASSIVE"]
        assert policy in (None, "PASSIVE")  # this machine's own load decides
    else:
        assert policies == [preset] * 3 and policy == preset


def test_each_log_line_once_and_the_project_logger_reaches_the_log(tiny_shapes, tmp_path):
    """Three runs set up in one process (a notebook, a benchmark): each line is printed and
    written once, and the project's own logger (the uniqueness table) is heard too."""
    import logging

    for k in range(3):
        out = tmp_path / f"run{k}"
        train_net.setup(_args(out, "SOLVER.MAX_ITER", 1))
    for name in ("detectron2", "instunique"):
        # One to the terminal, one to this run's log.txt (detectron2 writes both as streams).
        files = [getattr(h.stream, "name", "") for h in logging.getLogger(name).handlers]
        assert len(files) == 2 and str(out / "log.txt") in files, (name, files)
    logging.getLogger("detectron2.test").info("detectron2 line")
    logging.getLogger("instunique.test").info("instunique line")
    for handler in logging.getLogger("detectron2").handlers:
        handler.flush()
    with open(out / "log.txt") as f:
        text = f.read()
    assert text.count("detectron2 line") == 1 and text.count("instunique line") == 1
    with open(tmp_path / "run0" / "log.txt") as f:
        assert "detectron2 line" not in f.read()
