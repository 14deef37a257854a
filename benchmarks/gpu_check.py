#!/usr/bin/env python
"""The prepared GPU benchmark: one command, one JSON and one markdown table, < 8 minutes.

1. Multi-scale deformable attention sampling at the COCO R50 pixel decoder's shapes (2
   images of 1024 px; levels of stride 8, 16, 32; 8 heads of 32 channels, 4 points, one
   query per position): our PyTorch path against our Triton kernels, forward and forward +
   backward, float32 and bfloat16 values, peak ``max_memory_allocated``.
2. A full training step of Mask2Former R50 at 1024 px, batch 2 (random images and
   instances: no data set is needed), AMP off and on (float16 autocast with a gradient
   scaler, as detectron2's AMPTrainer), with either kernel.
3. The InstUnique / paired-view step ratio there, with the COCO config's terms (one pair =
   2 images).

    python benchmarks/gpu_check.py --output benchmarks/results/gpu_check

It refuses to run without CUDA.
"""
import argparse
import json
import os
import statistics
import sys

import torch

from common import ROOT, load_config, machine, timed

SIZE = 1024
COCO = os.path.join(ROOT, "configs/coco/instance-segmentation")


def _peak_mib(fn) -> float:
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() / 2**20


def _median_s(fn, reps: int, warmup: int = 2) -> float:
    for _ in range(warmup):
        fn()
    return statistics.median(timed(fn, "cuda") for _ in range(reps))


def sampling_rows(reps: int):
    from instunique.segmenters.mask2former.ms_deform_attn import ms_deform_attn_sample
    from instunique.segmenters.mask2former.ms_deform_attn_triton import (
        ms_deform_attn_sample_triton,
    )

    shapes = [(SIZE // s, SIZE // s) for s in (8, 16, 32)]
    b, heads, d_head, points = 2, 8, 32, 4
    q = s = sum(h * w for h, w in shapes)
    rows = []
    for dtype in (torch.float32, torch.bfloat16):
        value = torch.randn(b, s, heads, d_head, device="cuda", dtype=dtype, requires_grad=True)
        loc = torch.rand(b, q, heads, len(shapes), points, 2, device="cuda", requires_grad=True)
        weights = torch.rand(b, q, heads, len(shapes), points, device="cuda",
                             requires_grad=True)
        for name, fn in (("pytorch", ms_deform_attn_sample),
                         ("triton", ms_deform_attn_sample_triton)):
            args = (value, shapes, loc, weights)

            def forward(fn=fn, args=args):
                with torch.no_grad():
                    fn(*args)

            def both(fn=fn, args=args):
                fn(*args).float().sum().backward()

            rows.append({"values": str(dtype).split(".")[1], "impl": name,
                         "forward_ms": 1e3 * _median_s(forward, reps),
                         "forward_backward_ms": 1e3 * _median_s(both, reps),
                         "peak_mib": _peak_mib(both)})
    return rows


def _batch(num_images: int, paired: bool, size: int = SIZE):
    from detectron2.structures import BitMasks, Instances

    from instunique.transforms import AffineWarp

    g = torch.Generator().manual_seed(0)

    def view(i):
        masks = torch.zeros(6, size, size, dtype=torch.bool)
        for k in range(6):
            y, x = (int(v) for v in torch.randint(0, size * 3 // 4, (2,), generator=g))
            masks[k, y:y + size // 5 + k, x:x + size // 4] = True
        inst = Instances((size, size))
        inst.gt_masks = BitMasks(masks)
        inst.gt_boxes = inst.gt_masks.get_bounding_boxes()
        inst.gt_classes = torch.randint(0, 80, (6,), generator=g)
        image = torch.randint(0, 256, (3, size, size), generator=g, dtype=torch.uint8)
        return {"image": image, "instances": inst, "image_id": i, "height": size,
                "width": size}

    if not paired:
        return [view(i) for i in range(num_images)]
    batch = []
    for i in range(num_images // 2):
        x, x2 = view(i), view(i)
        x2["image"] = x["image"].flip(-1)
        inst = Instances((size, size))
        inst.gt_masks = BitMasks(x["instances"].gt_masks.tensor.flip(-1))
        inst.gt_boxes = inst.gt_masks.get_bounding_boxes()
        inst.gt_classes = x["instances"].gt_classes
        x2["instances"] = inst
        x["paired_view"], x["warp"] = x2, AffineWarp.hflip(size, size)
        batch.append(x)
    return batch


def _step(config: str, impl: str, amp: bool, paired: bool, device: str = "cuda",
          size: int = SIZE):
    """One optimizer step of ``config`` on a fixed random batch of 2 images, as a closure."""
    from detectron2.modeling import build_model
    from detectron2.utils.events import EventStorage

    cfg = load_config(config, ["MODEL.DEVICE", device, "MODEL.WEIGHTS", "",
                               "MODEL.SEM_SEG_HEAD.DEFORM_ATTN_IMPL", impl])
    torch.manual_seed(0)
    model = build_model(cfg).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
    scaler = torch.amp.GradScaler(device, enabled=amp)
    batch = _batch(2, paired, size)

    def step():
        with EventStorage(), torch.autocast(device, dtype=torch.float16, enabled=amp):
            losses = model(batch)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(sum(losses.values())).backward()
        scaler.step(optimizer)
        scaler.update()

    step.model = model
    return step


def training_rows(reps: int):
    rows = []
    for label, config, paired in (
        ("Mask2Former R50", "mask2former_R50_bs16_50ep.yaml", False),
        ("paired views", "paired_views_mask2former_R50_bs16_50ep.yaml", True),
        ("InstUnique", "instunique_mask2former_R50_bs16_50ep.yaml", True),
    ):
        for amp in (False, True):
            for impl in ("pytorch", "triton"):
                step = _step(os.path.join(COCO, config), impl, amp, paired)
                rows.append({"model": label, "amp": amp, "impl": impl,
                             "step_s": _median_s(step, reps), "peak_mib": _peak_mib(step)})
                del step
                torch.cuda.empty_cache()
    return rows


def _ratio(rows, amp: bool, impl: str) -> float:
    by = {r["model"]: r["step_s"] for r in rows if r["amp"] == amp and r["impl"] == impl}
    return by["InstUnique"] / by["paired views"]


def markdown(result) -> str:
    lines = [f"GPU check on {result['machine']}", "",
             "| values | impl | forward (ms) | forward + backward (ms) | peak (MiB) |",
             "|---|---|---|---|---|"]
    lines += [f"| {r['values']} | {r['impl']} | {r['forward_ms']:.2f} | "
              f"{r['forward_backward_ms']:.2f} | {r['peak_mib']:.0f} |"
              for r in result["sampling"]]
    lines += ["", "| model | AMP | impl | step (s) | peak (MiB) |", "|---|---|---|---|---|"]
    lines += [f"| {r['model']} | {'on' if r['amp'] else 'off'} | {r['impl']} | "
              f"{r['step_s']:.3f} | {r['peak_mib']:.0f} |" for r in result["training"]]
    lines += ["", "| InstUnique / paired views | AMP off | AMP on |", "|---|---|---|"]
    lines += [f"| {impl} | {_ratio(result['training'], False, impl):.3f} | "
              f"{_ratio(result['training'], True, impl):.3f} |" for impl in ("pytorch", "triton")]
    return "\n".join(lines) + "\n"


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--reps", type=int, default=10, help="timed repetitions of each case")
    p.add_argument("--output", default="benchmarks/results/gpu_check",
                   help="folder of gpu_check.json and gpu_check.md")
    args = p.parse_args()
    if not torch.cuda.is_available():
        sys.exit("gpu_check.py measures CUDA kernels and steps: this machine has no CUDA "
                 "device (torch.cuda.is_available() is False); run it where a GPU is")
    result = {"machine": machine(), "sampling": sampling_rows(args.reps),
              "training": training_rows(args.reps)}
    os.makedirs(args.output, exist_ok=True)
    with open(os.path.join(args.output, "gpu_check.json"), "w") as f:
        json.dump(result, f, indent=1)
    table = markdown(result)
    with open(os.path.join(args.output, "gpu_check.md"), "w") as f:
        f.write(table)
    print(table)


if __name__ == "__main__":
    main()
