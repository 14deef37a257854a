"""Shared pieces of the benchmarks: configs, a fixed batch, timing."""
import os
import sys
import time

import numpy as np
import torch
from detectron2.config import get_cfg
from detectron2.data import DatasetCatalog

from instunique import add_instunique_config
from instunique.data import PairedViewMapper
from instunique.data.datasets import prepare_dataset

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_config(path: str, opts=()):
    cfg = get_cfg()
    add_instunique_config(cfg)
    cfg.merge_from_file(path if os.path.isabs(path) else os.path.join(ROOT, path))
    cfg.merge_from_list(list(opts))
    return cfg


def paired_batch(cfg, num_pairs: int, seed: int = 0):
    """``num_pairs`` mapped training pairs of the config's first training set, fixed by seed."""
    name = cfg.DATASETS.TRAIN[0]
    prepare_dataset(name)
    dicts = DatasetCatalog.get(name)
    mapper = PairedViewMapper(cfg, is_train=True)
    np.random.seed(seed)
    return [mapper(dicts[i % len(dicts)]) for i in range(num_pairs)]


def sync(device: str):
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed(fn, device: str) -> float:
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - start


def machine() -> str:
    cpu = "unknown CPU"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if "model name" in line)
    except (OSError, StopIteration):
        pass
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU"
    return (f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__} "
            f"({torch.get_num_threads()} threads), {gpu}, python {sys.version.split()[0]}")
