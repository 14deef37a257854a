#!/usr/bin/env python
"""Pictures of InstUnique / Mask2Former predictions, in detectron2's demo conventions.

    # overlays of one model, one picture per image, same size and format as the image
    python demo/demo.py --config-file CFG --input a.jpg 'images/**/*.png' folder/ \
        --output out/ --opts MODEL.WEIGHTS model.pth
    # [image | baseline | InstUnique | ground truth] rows over a registered dataset
    python demo/demo.py --config-file CFG --dataset shapes_val --max-images 8 \
        --compare-weights baseline.pth --output out/ --opts MODEL.WEIGHTS instunique.pth
    # more checkpoints of the same config: one panel (or query-response row) each
    python demo/demo.py ... --compare-weights a.pth b.pth --names A B C --opts MODEL.WEIGHTS c.pth
    # one query's mask logits on its image and on two others; a file name for --output
    # puts the rows of all images into that one figure
    python demo/demo.py ... --query-response [--query 3] [--num-others 2] --output fig.png
    # f(x) next to T^-1 f(T(x))
    python demo/demo.py ... --equivariance [--transform flip|crop|family]
    # a video, frame by frame, written in the input's size and container
    python demo/demo.py --config-file CFG --video-input clip.mp4 --output out/ --opts ...

--opts are trailing KEY VALUE pairs for the config. With a baseline, they apply to both
models except MODEL.WEIGHTS, which names the InstUnique model's checkpoint. Every argument
(configs, checkpoints, inputs, outputs) is checked before a model is built.
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
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.detection_utils import read_image
from detectron2.utils.logger import setup_logger
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import instunique  # noqa: E402
from instunique.data.datasets import check_dataset  # noqa: E402
from instunique.data.user_datasets import setup_user_datasets  # noqa: E402
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

from predictor import Predictor, check_weights  # noqa: E402

logger = logging.getLogger("instunique.demo")

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")
# Video container -> a codec (fourcc) OpenCV's FFmpeg backend writes into it.
VIDEO_CODECS = {".mp4": "mp4v", ".m4v": "mp4v", ".mov": "mp4v", ".mkv": "mp4v", ".avi": "MJPG"}
# Figures (several captioned panels) enlarge smaller images to this short side, so that
# their captions stay legible; overlays and videos keep the input's size.
FIGURE_MIN_SIDE = 320


def get_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description="InstUnique demo: overlays, baseline comparison, query responses, "
        "equivariance", formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--config-file", required=True, metavar="FILE", help="path to config file")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--input", nargs="+", help="image files, glob patterns ('**' recurses) "
                     "or folders")
    src.add_argument("--video-input", help="a video file, processed frame by frame")
    src.add_argument("--dataset", help="a registered dataset (e.g. shapes_val): its images, "
                     "with ground truth drawn next to the predictions")
    p.add_argument("--output", required=True,
                   help="a folder (created; one picture per image, named and formatted like "
                   "it), or a file: one picture, or one figure holding the rows of every "
                   "image (--query-response, --equivariance, comparisons)")
    p.add_argument("--max-images", type=int, default=None,
                   help="pictures of the first N images (or video frames) only")
    p.add_argument("--confidence-threshold", type=float, default=0.5,
                   help="minimum score of the instances drawn")
    p.add_argument("--scale", type=float, default=None, help="picture size relative to the "
                   "image; default 1 for overlays and videos, while figures enlarge images to "
                   f"{FIGURE_MIN_SIDE} px on the short side")

    cmp = p.add_argument_group("comparison with a baseline")
    cmp.add_argument("--compare-weights", metavar="PTH", nargs="+",
                     help="baseline checkpoint(s), same config as the main model; shown "
                     "before it, in this order")
    cmp.add_argument("--baseline-config", metavar="FILE",
                     help="baseline config (weights: --baseline-weights or its MODEL.WEIGHTS)")
    cmp.add_argument("--baseline-weights", metavar="PTH", help="baseline checkpoint")
    cmp.add_argument("--names", nargs="+", default=None, metavar="NAME",
                     help="captions of the models, baselines first and the main model last "
                     "(default with one baseline: baseline InstUnique)")

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
    models = 1 + (len(args.compare_weights) if args.compare_weights else
                  1 if args.baseline_config else 0)
    if args.names is not None and len(args.names) != models:
        raise ValueError(f"--names gives {len(args.names)} captions for {models} models "
                         "(the baselines, then the main model)")
    if args.names is None and models > 2:
        raise ValueError(f"--names: {models} models need a caption each (the baselines, then "
                         "the main model)")
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


# ---------------------------------------------------------------------------- configs


def load_config(config_file: str, opts: Sequence[str]):
    cfg = instunique.load_config(config_file, opts)
    # DATASETS.REGISTER: a user's own data names its classes (and may set NUM_CLASSES -1).
    setup_user_datasets(cfg)
    cfg.freeze()
    return cfg


def _without_weights(opts: Sequence[str]) -> List[str]:
    pairs = zip(opts[0::2], opts[1::2])
    return [v for k, value in pairs if k != "MODEL.WEIGHTS" for v in (k, value)]


def model_configs(args: argparse.Namespace) -> List[Tuple[str, object]]:
    """[(caption, cfg)]: the main model, preceded by the baseline when one is given. Their
    checkpoints are checked here, before any model is built."""
    cfg = load_config(args.config_file, args.opts)
    check_weights(cfg)
    if not (args.compare_weights or args.baseline_config):
        return [((args.names or [""])[0], cfg)]
    opts = _without_weights(args.opts)
    bases = []
    if args.compare_weights:
        for weights in args.compare_weights:
            bases.append(load_config(args.config_file, opts + ["MODEL.WEIGHTS", weights]))
            check_weights(bases[-1], "--compare-weights")
    else:
        weights = ["MODEL.WEIGHTS", args.baseline_weights] if args.baseline_weights else []
        bases.append(load_config(args.baseline_config, opts + weights))
        check_weights(bases[-1], "--baseline-weights" if weights else "baseline MODEL.WEIGHTS")
    names = args.names or ("baseline", "InstUnique")
    return list(zip(names, [*bases, cfg]))


# ----------------------------------------------------------------------------- inputs


@dataclass
class Item:
    """An image to draw; ``name`` is its output file name relative to an output folder."""

    path: str
    name: str
    dataset_dict: Optional[Dict] = None


def _glob_root(pattern: str) -> str:
    """The folder a glob pattern starts from: its components before the first wildcard."""
    parts = pattern.split(os.sep)
    head = []
    for part in parts[:-1]:
        if glob.has_magic(part):
            break
        head.append(part)
    return os.sep.join(head) or (os.sep if pattern.startswith(os.sep) else ".")


def _is_image_name(path: str) -> bool:
    return path.lower().endswith(IMAGE_EXTENSIONS)


def expand_inputs(patterns: Sequence[str]) -> List[Item]:
    """Files, glob patterns ('**' matches any depth) and folders (their images, sorted) ->
    items named by their path below the folder or the pattern's fixed part.

    Raises FileNotFoundError naming a path or pattern that gives no file.
    """
    items = []
    for pattern in patterns:
        pattern = os.path.expanduser(pattern)
        if os.path.isdir(pattern):
            root = pattern
            found = sorted(os.path.join(pattern, f) for f in os.listdir(pattern)
                           if _is_image_name(f) and os.path.isfile(os.path.join(pattern, f)))
            if not found:
                raise FileNotFoundError(f"no image files ({', '.join(IMAGE_EXTENSIONS)}) in "
                                        f"folder {pattern}")
        elif glob.has_magic(pattern):
            root = _glob_root(pattern)
            found = sorted(f for f in glob.glob(pattern, recursive=True)
                           if os.path.isfile(f) and _is_image_name(f))
            if not found:
                raise FileNotFoundError(f"no image file matches the pattern {pattern}")
        elif os.path.isfile(pattern):
            root, found = os.path.dirname(pattern), [pattern]
        else:
            raise FileNotFoundError(f"input not found: {pattern}")
        items.extend(Item(f, os.path.relpath(f, root or ".")) for f in found)
    return items


def _check_readable(path: str) -> None:
    """ValueError naming ``path`` unless its header is that of an image (cheap: the pixels
    are not decoded)."""
    try:
        with Image.open(path):
            pass
    except (OSError, SyntaxError) as e:
        raise ValueError(f"cannot read {path} as an image: {e}") from None


def _read(path: str) -> np.ndarray:
    """(H, W, 3) uint8 BGR, EXIF orientation applied (detectron2's read_image)."""
    try:
        return read_image(path, format="BGR")
    except (OSError, SyntaxError) as e:
        raise ValueError(f"cannot read {path} as an image: {e}") from None


def _items(args: argparse.Namespace) -> List[Item]:
    """Every image of the source, in order (--max-images limits the pictures, not these)."""
    if args.dataset:
        check_dataset(args.dataset)
        dicts = DatasetCatalog.get(args.dataset)
        if not dicts:
            raise ValueError(f"dataset {args.dataset!r} has no images")
        return [Item(d["file_name"], os.path.basename(d["file_name"]), d) for d in dicts]
    items = expand_inputs(args.input)
    for item in items:
        _check_readable(item.path)
    return items


def _open_video(path: str) -> cv2.VideoCapture:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"video not found: {path}")
    capture = cv2.VideoCapture(path)
    if not capture.isOpened():
        raise ValueError(f"cannot read {path} as a video")
    return capture


def _check_video(path: str) -> None:
    """ValueError naming ``path`` unless its first frame decodes (OpenCV opens some files
    that are not videos, e.g. a lone image file)."""
    capture = _open_video(path)
    try:
        if not capture.read()[0]:
            raise ValueError(f"cannot read {path} as a video: no frame decodes")
    finally:
        capture.release()


# ---------------------------------------------------------------------------- outputs


def _is_figure(args: argparse.Namespace) -> bool:
    """Pictures made of captioned panels rather than one overlay of the image."""
    comparing = bool(args.compare_weights or args.baseline_config)
    return bool(args.query_response or args.equivariance or args.dataset or comparing)


def _names_file(output: str) -> bool:
    return bool(os.path.splitext(output)[1]) and not os.path.isdir(output)


def _unique(paths: Sequence[str]) -> List[str]:
    """The paths, later duplicates renamed 'x_1.png', 'x_2.png', ..."""
    out, used = [], set()
    for path in paths:
        stem, ext = os.path.splitext(path)
        name, k = path, 1
        while name in used:
            name, k = f"{stem}_{k}{ext}", k + 1
        used.add(name)
        out.append(name)
    return out


def picture_paths(args: argparse.Namespace, shown: Sequence[Item]) -> List[str]:
    """Where the pictures of ``shown`` go: one path per item, or a single path when
    --output names a file (a figure then stacks the rows of every item).

    Raises ValueError for a file name with an unknown extension, or that cannot hold
    several overlays.
    """
    output = args.output
    if _names_file(output):
        if not _is_image_name(output):
            raise ValueError(f"--output {output}: unknown image extension; use one of "
                             f"{', '.join(IMAGE_EXTENSIONS)}, or a folder (a trailing / "
                             "makes a name with a dot one)")
        if len(shown) > 1 and not _is_figure(args):
            raise ValueError(f"--output {output} names one file but there are {len(shown)} "
                             "pictures to write; give a folder")
        return [output]
    if os.path.isfile(output):
        raise ValueError(f"--output {output} is a file; give a folder for {len(shown)} pictures")
    names = []
    for item in shown:
        stem, ext = os.path.splitext(item.name)
        names.append(item.name if _is_image_name(item.name) else stem + ".png")
    return [os.path.join(output, n) for n in _unique(names)]


def video_path(args: argparse.Namespace) -> str:
    """--output as a video file: a file named there (of a known container), or the input's
    name in that folder (as .mp4 when OpenCV cannot write the input's container)."""
    output, source = args.output, args.video_input
    if _names_file(output):
        if os.path.splitext(output)[1].lower() not in VIDEO_CODECS:
            raise ValueError(f"--output {output}: cannot write a video of that extension; use "
                             f"one of {', '.join(VIDEO_CODECS)}, or a folder (a trailing / "
                             "makes a name with a dot one)")
        return output
    if os.path.isfile(output):
        raise ValueError(f"--output {output} is a file without a video extension")
    stem, ext = os.path.splitext(os.path.basename(source))
    if ext.lower() not in VIDEO_CODECS:
        logger.info(f"OpenCV cannot write {ext or 'extension-less'} videos; writing .mp4")
        ext = ".mp4"
    return os.path.join(output, stem + ext)


# Figures are flat colour: zlib level 6 makes them ~3x smaller than cv2's default (RLE)
# for ~0.1 s more per megapixel.
_PNG_PARAMS = [cv2.IMWRITE_PNG_COMPRESSION, 6]


def _write(path: str, picture: np.ndarray) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    params = _PNG_PARAMS if path.lower().endswith(".png") else []
    if not cv2.imwrite(path, np.ascontiguousarray(picture[:, :, ::-1]), params):
        raise OSError(f"could not write the picture {path}")


# ---------------------------------------------------------------------------- drawing


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


def describe(outputs: Dict, threshold: float) -> str:
    """What an overlay of ``outputs`` shows, for the log."""
    if "instances" in outputs:
        scores = outputs["instances"].scores if outputs["instances"].has("scores") else None
        if scores is None:
            return f"{len(outputs['instances'])} instances drawn"
        count = int((scores >= threshold).sum())
        if count:
            return f"{count} instance{'s' if count > 1 else ''} drawn"
        if not len(scores):
            return "nothing drawn: no instance predicted"
        return (f"nothing drawn: no instance scores >= {threshold:.2f} "
                f"(highest {float(scores.max()):.2f})")
    if "panoptic_seg" in outputs:
        return f"{len(outputs['panoptic_seg'][1])} segments drawn"
    return f"{len(outputs['sem_seg'].argmax(0).unique())} classes drawn"


def _shrunk(image: np.ndarray, size: Tuple[int, int]) -> np.ndarray:
    if image.shape[:2] == tuple(size):
        return image
    return cv2.resize(image, (size[1], size[0]), interpolation=cv2.INTER_AREA)


class Renderer:
    """Turns one BGR image (and its context) into the RGB picture of the chosen mode.

    The models answer at ``Predictor.prediction_size``: the image's size, or their input's
    when the image is larger. Overlays paint such outputs on the full image one mask at a
    time; the equivariance and query-response views work on the image shrunk to that size.
    """

    def __init__(self, args: argparse.Namespace, predictors, metadata):
        self.args = args
        self.predictors = predictors
        self.metadata = metadata
        self.compare = len(predictors) > 1

    def _scale(self, image: np.ndarray, figure: bool) -> float:
        if self.args.scale is not None:
            return self.args.scale
        return max(1.0, FIGURE_MIN_SIDE / min(image.shape[:2])) if figure else 1.0

    def _prefix(self, name: str) -> str:
        return f"{name}: " if name else ""

    def _predict(self, predictor: Predictor, image: np.ndarray) -> Dict:
        return predictor(image, predictor.prediction_size(*image.shape[:2]))

    def overlay(self, image: np.ndarray, dataset_dict: Optional[Dict] = None):
        a, rgb = self.args, image[:, :, ::-1]
        predictions = [(name or "prediction", self._predict(p, image))
                       for name, p in self.predictors]
        if not self.compare and dataset_dict is None:
            outputs = predictions[0][1]
            picture = draw_outputs(rgb, outputs, self.metadata, a.confidence_threshold,
                                   self._scale(image, figure=False))
            return picture, describe(outputs, a.confidence_threshold)
        picture = comparison_row(rgb, predictions, self.metadata, dataset_dict,
                                 a.confidence_threshold, self._scale(image, figure=True))
        note = "; ".join(f"{self._prefix(name)}{describe(out, a.confidence_threshold)}"
                         for name, out in predictions)
        return picture, note

    def equivariance(self, image: np.ndarray, index: int):
        a = self.args
        rows, notes = [], []
        for name, p in self.predictors:
            x = _shrunk(image, p.prediction_size(*image.shape[:2]))
            rng = np.random.default_rng([a.seed, index])
            warp = make_warp(a.transform, *x.shape[:2], rng, p.cfg)
            moved = warp.apply_image(x)
            on_x, on_moved = p(x), p(moved)
            rows.append(equivariance_row(x[:, :, ::-1], on_x, warp, on_moved, self.metadata,
                                         a.confidence_threshold, self._scale(x, figure=True),
                                         self._prefix(name)))
            notes.append(f"{self._prefix(name)}f(x) {describe(on_x, a.confidence_threshold)}, "
                         f"f(T(x)) {describe(on_moved, a.confidence_threshold)}")
        return stack_rows(rows), "; ".join(notes)

    def query_response(self, images: Sequence[np.ndarray]):
        classes = self.metadata.get("thing_classes", None)
        rows, notes = [], []
        for name, p in self.predictors:
            shown = [_shrunk(x, p.prediction_size(*x.shape[:2])) for x in images]
            response = query_response(p.model, [p.inputs(x) for x in shown], self.args.query)
            rgb = [x[:, :, ::-1] for x in shown]
            rows.append(render_query_response(rgb, response, classes,
                                              self._scale(shown[0], figure=True),
                                              self._prefix(name)))
            label = (classes[response.class_id] if classes and response.class_id < len(classes)
                     else f"class {response.class_id}")
            notes.append(f"{self._prefix(name)}query {response.query} ({label} "
                         f"{response.score:.2f})")
        return stack_rows(rows), "; ".join(notes)


# -------------------------------------------------------------------------------- run


def run_images(args, renderer: Renderer, items: List[Item], outputs: List[str]) -> List[str]:
    """One picture per item (the first --max-images), or one figure of all their rows when
    ``outputs`` is a single file; with --query-response, B, C, ... are the items that follow
    A, wrapping around."""
    shown = items[: args.max_images] if args.max_images is not None else items
    num_others = min(args.num_others, len(items) - 1)
    single = len(outputs) == 1 and len(shown) > 1
    rows = []
    for i, item in enumerate(shown):
        start = time.perf_counter()
        image = _read(item.path)
        if args.query_response:
            others = [items[(i + k) % len(items)].path for k in range(1, num_others + 1)]
            picture, note = renderer.query_response([image] + [_read(p) for p in others])
        elif args.equivariance:
            picture, note = renderer.equivariance(image, i)
        else:
            picture, note = renderer.overlay(image, item.dataset_dict)
        out = outputs[0] if single else outputs[i]
        if single:
            rows.append(picture)
        else:
            _write(out, picture)
        logger.info(f"[{i + 1}/{len(shown)}] {item.path}: {note} -> {out} "
                    f"({time.perf_counter() - start:.2f}s)")
    if single:
        _write(outputs[0], stack_rows(rows))
    return outputs


def run_video(args, renderer: Renderer, out: str) -> List[str]:
    """Every frame (the first --max-images) drawn and written to ``out``, at the frame's
    size unless the picture is a figure or --scale is given."""
    capture = _open_video(args.video_input)
    fps = capture.get(cv2.CAP_PROP_FPS) or 25.0
    total = int(capture.get(cv2.CAP_PROP_FRAME_COUNT)) or None
    if args.max_images is not None:
        total = min(total or args.max_images, args.max_images)
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    writer, index = None, 0
    try:
        while total is None or index < total:
            ok, frame = capture.read()
            if not ok:
                break
            start = time.perf_counter()
            if args.equivariance:
                picture, note = renderer.equivariance(frame, index)
            else:
                picture, note = renderer.overlay(frame)
            if writer is None:
                size = (picture.shape[1], picture.shape[0])
                fourcc = cv2.VideoWriter_fourcc(*VIDEO_CODECS[os.path.splitext(out)[1].lower()])
                writer = cv2.VideoWriter(out, fourcc, fps, size)
                if not writer.isOpened():
                    raise OSError(f"could not open {out} for writing a video")
            writer.write(np.ascontiguousarray(picture[:, :, ::-1]))
            index += 1
            logger.info(f"{args.video_input} frame {index}/{total or '?'}: {note} "
                        f"({time.perf_counter() - start:.2f}s)")
    finally:
        capture.release()
        if writer is not None:
            writer.release()
    if writer is None:
        raise ValueError(f"{args.video_input} holds no frame")
    logger.info(f"{index} frames -> {out}")
    return [out]


def main(argv: Optional[Sequence[str]] = None) -> List[str]:
    """Run the demo; returns the paths written."""
    args = get_parser().parse_args(argv)
    _check_args(args)
    # Everything a user can get wrong is checked before the (slow) models are built.
    configs = model_configs(args)
    if args.video_input:
        _check_video(args.video_input)
        out = video_path(args)
    else:
        items = _items(args)
        shown = items[: args.max_images] if args.max_images is not None else items
        outputs = picture_paths(args, shown)

    predictors = [(name, Predictor(cfg)) for name, cfg in configs]
    metadata = (
        MetadataCatalog.get(args.dataset) if args.dataset else predictors[-1][1].metadata
    )
    renderer = Renderer(args, predictors, metadata)
    if args.video_input:
        return run_video(args, renderer, out)
    return run_images(args, renderer, items, outputs)


if __name__ == "__main__":
    setup_logger(name="instunique")
    setup_logger(name="fvcore")
    main()
