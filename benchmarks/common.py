"""Shared pieces of the benchmarks: configs, a fixed batch, timing."""
import itertools
import multiprocessing as mp
import os
import resource
import sys
import time

import numpy as np
import torch
from detectron2.data import DatasetCatalog
from detectron2.data import detection_utils as utils
from detectron2.data import transforms as T
from detectron2.evaluation import COCOEvaluator
from detectron2.modeling import build_model
from detectron2.utils.events import EventStorage

import instunique
from instunique.data import PairedViewMapper
from instunique.data.datasets import check_dataset
from instunique.engine import term_clipping

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_config(path: str, opts=()):
    """instunique.load_config with ``path`` relative to the repository root."""
    return instunique.load_config(path if os.path.isabs(path) else os.path.join(ROOT, path),
                                  opts)


def dataset_dicts(name: str):
    """The dataset dicts of ``name``, generating the built-in data on first use."""
    check_dataset(name)
    return DatasetCatalog.get(name)


def coco_mask_ap(dataset: str, inputs, instances, figures=("AP", "AP50", "AP75")) -> dict:
    """COCO mask AP ``figures`` of per-image ``instances`` (on the CPU) for ``inputs``
    (dicts with "image_id") of ``dataset``."""
    evaluator = COCOEvaluator(dataset, tasks=("segm",), output_dir=None)
    evaluator.reset()
    evaluator.process(inputs, [{"instances": i} for i in instances])
    segm = evaluator.evaluate()["segm"]
    return {k: segm[k] for k in figures}


def test_inputs(cfg, count: int):
    """Model inputs of the first ``count`` images of the config's first test set, resized
    as at test time, with their "height"/"width"."""
    resize = T.ResizeShortestEdge(cfg.INPUT.MIN_SIZE_TEST, cfg.INPUT.MAX_SIZE_TEST)
    inputs = []
    for d in dataset_dicts(cfg.DATASETS.TEST[0])[:count]:
        image = utils.read_image(d["file_name"], format=cfg.INPUT.FORMAT)
        image = resize.get_transform(image).apply_image(image)
        inputs.append({"image": torch.as_tensor(image.transpose(2, 0, 1).copy()),
                       "height": d["height"], "width": d["width"]})
    return inputs


def paired_batch(cfg, num_pairs: int, seed: int = 0):
    """``num_pairs`` mapped training pairs of the config's first training set, fixed by seed."""
    dicts = dataset_dicts(cfg.DATASETS.TRAIN[0])
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


def build_step(config, device, pairs, cross, memory, equi, opts=()):
    """One optimizer step of an InstUnique model (terms switched by ``cross``/``equi``) on a
    fixed batch of ``pairs`` paired views, as a closure. ``memory`` None keeps the config's
    capacity. A non-empty memory starts full: the cost measured is the steady state."""
    capacity = [] if memory is None else ["MODEL.INST_UNIQUE.CROSS_IMAGE.MEMORY_PIXELS", memory]
    cfg = load_config(config, [
        "MODEL.DEVICE", device,
        "MODEL.INST_UNIQUE.CROSS_IMAGE.ENABLED", cross,
        *capacity,
        "MODEL.INST_UNIQUE.EQUIVARIANCE.ENABLED", equi,
        *opts,
    ])
    torch.manual_seed(0)
    model = build_model(cfg).train()
    if model.memory is not None:
        m = model.memory
        m.enqueue(torch.randn(m.capacity, m.feats.shape[1], device=m.feats.device),
                  torch.randint(-1, 4, (m.capacity,), device=m.feats.device),
                  torch.full((m.capacity,), -7, device=m.feats.device))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
    params = list(model.parameters())
    batch = paired_batch(cfg, pairs)
    clip = cfg.SOLVER.CLIP_GRADIENTS
    clip_sum = clip.ENABLED and clip.CLIP_TYPE == "full_model"
    clipper = (term_clipping.build_term_clipper(cfg, params)
               if term_clipping.clips_terms_separately(cfg) else None)
    calls = itertools.count()  # the clipper's iteration number

    def step():
        # The gradient is clipped as the trainer would: the sum, or base and terms apart.
        with EventStorage():
            losses = model(batch)
        optimizer.zero_grad(set_to_none=True)
        if clipper is not None:
            clipper.backward(losses, next(calls))
        else:
            sum(losses.values()).backward()
            if clip_sum:
                torch.nn.utils.clip_grad_norm_(params, clip.CLIP_VALUE, clip.NORM_TYPE)
        optimizer.step()

    return step


def interleaved_times(steps, reps: int, warmup: int, device: str):
    """{key: step} -> {key: [seconds of each of ``reps`` calls]}, after ``warmup`` untimed
    calls of each; the repetitions go round all keys, so drifts of the machine hit every
    step alike and repetition i of two keys is a paired measurement."""
    for step in steps.values():
        for _ in range(warmup):
            step()
    times = {k: [] for k in steps}
    for _ in range(reps):
        for k, step in steps.items():
            times[k].append(timed(step, device))
    return times


def peaks_in_children(jobs):
    """{key: arguments of peak_memory_mb after its queue} -> {key: peak MiB}, each measured
    in a fresh child process of its own."""
    ctx = mp.get_context("spawn")
    peaks = {}
    for key, job in jobs.items():
        queue = ctx.Queue()
        proc = ctx.Process(target=peak_memory_mb, args=(queue, *job))
        proc.start()
        peaks[key] = queue.get()
        proc.join()
    return peaks


def reset_peak_rss() -> bool:
    """Reset the kernel's high-water mark of this process's RSS (Linux >= 4.0)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_rss_mb() -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM")) / 1024


def peak_memory_mb(queue, config, device, pairs, cross, memory, equi, opts, steps):
    """Put on ``queue`` the peak memory of training steps alone (run it in a fresh child
    process): max allocated on CUDA, peak RSS on the CPU. Model building and the first
    step (lazy allocations, imports) are excluded."""
    step = build_step(config, device, pairs, cross, memory, equi, opts)
    step()
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    exact = reset_peak_rss()
    for _ in range(steps):
        step()
    if device.startswith("cuda"):
        queue.put(torch.cuda.max_memory_allocated() / 2**20)
    elif exact:
        queue.put(peak_rss_mb())
    else:
        queue.put(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
