#!/usr/bin/env python
"""Pictures of InstUnique / Mask2Former predictions, in detectron2's demo conventions.

    # overlays of one model
    python demo/demo.py --config-file CFG --input a.jpg 'images/*.png' folder/ \
        --output out/ --opts MODEL.WEIGHTS model.pth
    # [image | baseline | InstUnique | ground truth] rows over a registered dataset
    python demo/demo.py --config-file CFG --dataset shapes_val --max-images 8 \
        --compare-weights baseline.pth --output out/ --opts MODEL.WEIGHTS instunique.pth
    # one query's mask logits on its image and on two others
    python demo/demo.py ... --query-response [--query 3] [--num-others 2]
    # f(x) next to T^-1 f(T(x))
    python demo/demo.py ... --equivariance [--transform flip|crop|family]
    # a video, frame by frame
    python demo/demo.py --config-file CFG --video-input clip.mp4 --output out.mp4 --opts ...

--opts are trailing KEY VALUE pairs for the config. With a baseline, they apply to both
models except MODEL.WEIGHTS, which names the InstUnique model's checkpoint.
"""
import argparse
import glob
import logging
import os
import sys
import time
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import cv2
import numpy as np
import tqdm
from detectron2.config import get_cfg
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.utils.logger import setup_logger

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from instunique import add_instunique_config  # noqa: E402
from instunique.data.datasets import prepare_dataset  # noqa: E402
from instunique.transforms import AffineWarp, TransformFamily  # noqa: E402
from instunique.transforms.build import build_transform_family  # noqa: E402
from instunique.visualization import (  # noqa: E402
    comparison_row,
    draw_outputs,
    equivariance_row,
    query_response,
    render_query_response,
    stack_rows,
)

from predictor import Predictor, read_image  # noqa: E402

logger = logging.getLogger("instunique.demo")

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")
# Small images (e.g. 128 px shapes) are enlarged so that labels stay legible.
AUTO_SCALE_SIDE = 320


def get_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description="InstUnique demo: overlays, baseline comparison, query responses, "
        "equivariance", formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--config-file", required=True, metavar="FILE", help="path to config file")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--input", nargs="+", help="image files, glob patterns or folders")
    src.add_argument("--video-input", help="a video file, processed frame by frame")
    src.add_argument("--dataset", help="a registered dataset (e.g. shapes_val): its images, "
                     "with ground truth drawn next to the predictions")
    p.add_argument("--output", required=True,
                   help="a file (one picture) or a folder (created; one picture per input)")
    p.add_argument("--max-images", type=int, default=None,
                   help="pictures of the first N images only")
    p.add_argument("--confidence-threshold", type=float, default=0.5,
                   help="minimum score of the instances drawn")
    p.add_argument("--scale", type=float, default=None, help="picture size relative to the "
                   f"image; default enlarges images to {AUTO_SCALE_SIDE} px on the short side")

    cmp = p.add_argument_group("comparison with a baseline")
    cmp.add_argument("--compare-weights", metavar="PTH",
                     help="baseline checkpoint, same config as the main model")
    cmp.add_argument("--baseline-config", metavar="FILE",
                     help="baseline config (weights: --baseline-weights or its MODEL.WEIGHTS)")
    cmp.add_argument("--baseline-weights", metavar="PTH", help="baseline checkpoint")
    cmp.add_argument("--names", nargs=2, default=("baseline", "InstUnique"),
                     metavar=("BASELINE", "MODEL"), help="captions of the two models")

    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--query-response", action="store_true",
                      help="heat maps of one query of each image on it and on other images")
    mode.add_argument("--equivariance", action="store_true",
                      help="f(x) next to T^-1 f(T(x))")
    p.add_argument("--query", type=int, default=None,
                   help="with --query-response: query index (default: the top-scoring one)")
    p.add_argument("--num-others", type=int, default=2,
                   help="with --query-response: other images per picture (the next images)")
    p.add_argument("--transform", choices=("flip", "crop", "family"), default="flip",
                   help="with --equivariance: T is a flip, a random crop within "
                   "MODEL.INST_UNIQUE.EQUIVARIANCE.CROP_RANGE, or drawn from the config's family")
    p.add_argument("--seed", type=int, default=0, help="seed of random transforms")
    p.add_argument("--opts", default=[], nargs=argparse.REMAINDER,
                   help="modify config options using the command-line 'KEY VALUE' pairs")
    return p


def _check_args(args: argparse.Namespace) -> None:
    if args.compare_weights and (args.baseline_config or args.baseline_weights):
        raise ValueError("give either --compare-weights or --baseline-config/--baseline-weights")
    if args.baseline_weights and not args.baseline_config:
        raise ValueError("--baseline-weights needs --baseline-config (or use --compare-weights)")
    if args.max_images is not None and args.max_images < 1:
        raise ValueError(f"--max-images must be >= 1, got {args.max_images}")
    if args.num_others < 0:
        raise ValueError(f"--num-others must be >= 0, got {args.num_others}")
    if args.scale is not None and not args.scale > 0:
        raise ValueError(f"--scale must be > 0, got {args.scale}")
    if args.video_input and args.query_response:
        raise ValueError("--query-response needs images (--input or --dataset), not a video")
    if len(args.opts) % 2:
        raise ValueError(f"--opts takes KEY VALUE pairs, got an odd count: {args.opts}")


def load_config(config_file: str, opts: Sequence[str]):
    if not os.path.isfile(config_file):
        raise FileNotFoundError(f"config file not found: {config_file}")
    cfg = get_cfg()
    add_instunique_config(cfg)
    cfg.merge_from_file(config_file)
    cfg.merge_from_list(list(opts))
    cfg.freeze()
    return cfg


def _without_weights(opts: Sequence[str]) -> List[str]:
    pairs = zip(opts[0::2], opts[1::2])
    return [v for k, value in pairs if k != "MODEL.WEIGHTS" for v in (k, value)]


def build_predictors(args: argparse.Namespace) -> List[Tuple[str, Predictor]]:
    """[(caption, predictor)]: the main model, preceded by the baseline when one is given."""
    cfg = load_config(args.config_file, args.opts)
    main = Predictor(cfg)
    if not (args.compare_weights or args.baseline_config):
        return [("", main)]
    opts = _without_weights(args.opts)
    if args.compare_weights:
        base_cfg = load_config(args.config_file, opts + ["MODEL.WEIGHTS", args.compare_weights])
    else:
        weights = ["MODEL.WEIGHTS", args.baseline_weights] if args.baseline_weights else []
        base_cfg = load_config(args.baseline_config, opts + weights)
    return [(args.names[0], Predictor(base_cfg)), (args.names[1], main)]


def expand_inputs(patterns: Sequence[str]) -> List[str]:
    """Files, glob patterns and folders (their images, sorted) -> image paths.

    Raises FileNotFoundError naming a path or pattern that gives no file.
    """
    paths = []
    for pattern in patterns:
        if os.path.isdir(pattern):
            found = sorted(
                os.path.join(pattern, f) for f in os.listdir(pattern)
                if f.lower().endswith(IMAGE_EXTENSIONS)
            )
            if not found:
                raise FileNotFoundError(f"no image files ({', '.join(IMAGE_EXTENSIONS)}) in "
                                        f"folder {pattern}")
        elif glob.has_magic(pattern):
            found = sorted(f for f in glob.glob(os.path.expanduser(pattern)) if os.path.isfile(f))
            if not found:
                raise FileNotFoundError(f"no file matches the pattern {pattern}")
        elif os.path.isfile(pattern):
            found = [pattern]
        else:
            raise FileNotFoundError(f"input not found: {pattern}")
        paths.extend(found)
    return paths


@dataclass
class Item:
    path: str
    dataset_dict: Optional[Dict] = None


def _picture_paths(output: str, items: Sequence[Item]) -> List[str]:
    """One output file per item: ``output`` itself for a single picture named like an image,
    else files named after the inputs in the folder ``output``."""
    if output.lower().endswith(IMAGE_EXTENSIONS) and not os.path.isdir(output):
        if len(items) != 1:
            raise ValueError(f"--output {output} names one file but there are {len(items)} "
                             "pictures to write; give a folder")
        return [output]
    paths, used = [], set()
    for item in items:
        stem = os.path.splitext(os.path.basename(item.path))[0]
        name, k = stem, 1
        while name in used:  # same file name from different folders
            name, k = f"{stem}_{k}", k + 1
        used.add(name)
        paths.append(os.path.join(output, name + ".png"))
    return paths


def _scale(args: argparse.Namespace, image: np.ndarray) -> float:
    if args.scale is not None:
        return args.scale
    return max(1.0, AUTO_SCALE_SIDE / min(image.shape[:2]))


def make_warp(kind: str, h: int, w: int, rng: np.random.Generator, cfg) -> AffineWarp:
    """T for the equivariance view of an (h, w) image."""
    if kind == "flip":
        return AffineWarp.hflip(h, w)
    if kind == "crop":
        crop_range = cfg.MODEL.INST_UNIQUE.EQUIVARIANCE.CROP_RANGE
        return TransformFamily(("crop",), crop_range=crop_range).sample(h, w, rng)
    if kind == "family":
        return build_transform_family(cfg).sample(h, w, rng)
    raise ValueError(f"unknown transform {kind!r}; use flip, crop or family")


class Renderer:
    """Turns one image (and its context) into the picture of the chosen mode."""

    def __init__(self, args: argparse.Namespace, predictors, metadata):
        self.args = args
        self.predictors = predictors
        self.metadata = metadata
        self.compare = len(predictors) > 1

    def _prefix(self, name: str) -> str:
        return f"{name}: " if name else ""

    def overlay(self, image: np.ndarray, dataset_dict: Optional[Dict] = None) -> np.ndarray:
        a, scale = self.args, _scale(self.args, image)
        if not self.compare and dataset_dict is None:
            _, predictor = self.predictors[0]
            return draw_outputs(image, predictor(image), self.metadata,
                                a.confidence_threshold, scale)
        predictions = [(name or "prediction", p(image)) for name, p in self.predictors]
        return comparison_row(image, predictions, self.metadata, dataset_dict,
                              a.confidence_threshold, scale)

    def equivariance(self, image: np.ndarray, index: int) -> np.ndarray:
        a, scale = self.args, _scale(self.args, image)
        rng = np.random.default_rng([a.seed, index])
        warp = make_warp(a.transform, *image.shape[:2], rng, self.predictors[-1][1].cfg)
        moved = warp.apply_image(image)
        rows = [
            equivariance_row(image, p(image), warp, p(moved), self.metadata,
                             a.confidence_threshold, scale, self._prefix(name))
            for name, p in self.predictors
        ]
        return stack_rows(rows)

    def query_response(self, images: Sequence[np.ndarray]) -> np.ndarray:
        scale = _scale(self.args, images[0])
        classes = self.metadata.get("thing_classes", None)
        rows = []
        for name, p in self.predictors:
            response = query_response(p.model, [p.inputs(im) for im in images], self.args.query)
            rows.append(render_query_response(images, response, classes, scale,
                                              self._prefix(name)))
        return stack_rows(rows)


def _write(path: str, picture: np.ndarray) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    if not cv2.imwrite(path, np.ascontiguousarray(picture[:, :, ::-1])):
        raise OSError(f"could not write the picture {path}")


def _items(args: argparse.Namespace) -> List[Item]:
    """Every image of the source, in order (--max-images limits the pictures, not these)."""
    if args.dataset:
        prepare_dataset(args.dataset)
        dicts = DatasetCatalog.get(args.dataset)
        if not dicts:
            raise ValueError(f"dataset {args.dataset!r} has no images")
        return [Item(d["file_name"], d) for d in dicts]
    return [Item(p) for p in expand_inputs(args.input)]


def run_images(args, renderer: Renderer, items: List[Item]) -> List[str]:
    """One picture per item (the first --max-images); with --query-response, B, C, ... are
    the items that follow A, wrapping around."""
    shown = items[: args.max_images] if args.max_images is not None else items
    outputs = _picture_paths(args.output, shown)
    num_others = min(args.num_others, len(items) - 1)
    written = []
    for i, (item, out) in enumerate(
        tqdm.tqdm(list(zip(shown, outputs)), desc="demo", unit="image", disable=len(shown) < 2)
    ):
        start = time.perf_counter()
        image = read_image(item.path)
        if args.query_response:
            others = [items[(i + k) % len(items)].path for k in range(1, num_others + 1)]
            picture = renderer.query_response([image] + [read_image(p) for p in others])
        elif args.equivariance:
            picture = renderer.equivariance(image, i)
        else:
            picture = renderer.overlay(image, item.dataset_dict)
        _write(out, picture)
        written.append(out)
        logger.info(f"{item.path}: {out} in {time.perf_counter() - start:.2f}s")
    return written


def run_video(args, renderer: Renderer) -> List[str]:
    path = args.video_input
    if not os.path.isfile(path):
        raise FileNotFoundError(f"video not found: {path}")
    capture = cv2.VideoCapture(path)
    if not capture.isOpened():
        raise ValueError(f"cannot read {path} as a video")
    out = args.output
    if os.path.isdir(out) or not os.path.splitext(out)[1]:
        out = os.path.join(out, os.path.splitext(os.path.basename(path))[0] + ".mp4")
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    fps = capture.get(cv2.CAP_PROP_FPS) or 25.0
    total = int(capture.get(cv2.CAP_PROP_FRAME_COUNT)) or None
    writer = None
    try:
        for index in tqdm.tqdm(range(total) if total else iter(int, 1), total=total,
                               desc="demo", unit="frame"):
            ok, frame = capture.read()
            if not ok:
                break
            image = np.ascontiguousarray(frame[:, :, ::-1])
            if args.equivariance:
                picture = renderer.equivariance(image, index)
            else:
                picture = renderer.overlay(image)
            if writer is None:
                size = (picture.shape[1], picture.shape[0])
                writer = cv2.VideoWriter(out, cv2.VideoWriter_fourcc(*"mp4v"), fps, size)
                if not writer.isOpened():
                    raise OSError(f"could not open {out} for writing a video")
            writer.write(np.ascontiguousarray(picture[:, :, ::-1]))
    finally:
        capture.release()
        if writer is not None:
            writer.release()
    if writer is None:
        raise ValueError(f"{path} holds no frame")
    return [out]


def main(argv: Optional[Sequence[str]] = None) -> List[str]:
    """Run the demo; returns the paths written."""
    args = get_parser().parse_args(argv)
    _check_args(args)
    items = None if args.video_input else _items(args)
    predictors = build_predictors(args)
    metadata = (
        MetadataCatalog.get(args.dataset) if args.dataset else predictors[-1][1].metadata
    )
    renderer = Renderer(args, predictors, metadata)
    if args.video_input:
        return run_video(args, renderer)
    return run_images(args, renderer, items)


if __name__ == "__main__":
    setup_logger(name="instunique")
    setup_logger(name="fvcore")
    main()
