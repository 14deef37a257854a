"""
Files and registration shared by the built-in synthetic datasets (``shapes``, ``blobs``,
``shapes_crowd``, ``shapes_panoptic``): each is a :class:`SyntheticSpec` whose ``render``
draws one image.

Layout under ``root`` (a spec with ``stuff_classes`` is written in COCO-panoptic format
instead, see :mod:`.panoptic_files`)::

    {folder}/{split}/000000.png ...
    {folder}/annotations/instances_{split}.json

Image ``i`` of a split depends only on ``(seed, i, image_size)``. Every file is written to
a temporary name and moved into place; the json goes last, so its presence marks a
complete split and a half-written split is regenerated.
"""

import contextlib
import json
import os
from dataclasses import dataclass
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import cv2
import numpy as np
import pycocotools.mask as mask_util
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.datasets import load_coco_json

from ..atomic_io import NOISE_PNG_PARAMS, atomic_write, write_png
from .panoptic_files import (
    load_panoptic_split,
    panoptic_metadata,
    panoptic_paths,
    write_panoptic_split,
)

__all__ = [
    "SyntheticSpec",
    "dataset_paths",
    "generate_split",
    "ensure_splits",
    "register_synthetic",
    "materialize_synthetic",
    "visible_masks",
]

# One image: (image (S, S, 3) uint8 BGR, [(0-based category, (S, S) bool mask), ...]).
Rendered = Tuple[np.ndarray, List[Tuple[int, np.ndarray]]]
SPLIT_SEEDS = {"train": 0, "val": 1}


@dataclass(frozen=True)
class SyntheticSpec:
    """What makes one synthetic dataset: its folder, classes and image renderer."""

    folder: str  # under the root, and the default name prefix
    description: str
    version: int  # bumped when the renderer's output changes; stored in the json "info"
    classes: Sequence[str]  # thing classes
    colors: Sequence[Sequence[int]]  # one per class, stuff included; for visualization only
    # Categories of ``render`` index classes, then stuff_classes.
    render: Callable[[np.random.Generator, int], Rendered]
    num_images: Dict[str, int]  # default images per split
    image_size: int
    min_image_size: int
    # Non-empty: a panoptic dataset (COCO-panoptic files, evaluator "coco_panoptic_seg").
    stuff_classes: Sequence[str] = ()


def visible_masks(full: List[np.ndarray]) -> List[np.ndarray]:
    """Masks painted back to front (first is farthest) -> each minus all painted after it."""
    if not full:
        return []
    covered = np.zeros_like(full[0])
    visible = []
    for mask in reversed(full):
        visible.append(mask & ~covered)
        covered |= mask
    return visible[::-1]


def _default_root() -> str:
    return os.path.expanduser(os.environ.get("DETECTRON2_DATASETS", "datasets"))


def _root_or_default(root: Optional[str]) -> str:
    return _default_root() if root is None else os.fspath(root)


def dataset_paths(spec: SyntheticSpec, root: Optional[str], split: str) -> Tuple[str, str]:
    """Return ``(json_file, image_root)`` of a split (the panoptic JSON for a panoptic
    spec); nothing is read or written."""
    base = os.path.join(_root_or_default(root), spec.folder)
    if spec.stuff_classes:
        return panoptic_paths(base, split)[:2]
    return (
        os.path.join(base, "annotations", f"instances_{split}.json"),
        os.path.join(base, split),
    )


def _annotation(mask: np.ndarray, category: int, image_id: int, ann_id: int) -> Dict:
    mask = mask.astype(np.uint8)
    rle = mask_util.encode(np.asfortranarray(mask))
    # Tight pixel box: a mask covering columns x0..x1 has width x1 - x0 + 1.
    x0, y0, w, h = cv2.boundingRect(mask)
    return {
        "id": ann_id,
        "image_id": image_id,
        "category_id": category + 1,
        "segmentation": {"size": [int(v) for v in rle["size"]], "counts": rle["counts"].decode()},
        "area": int(np.count_nonzero(mask)),
        "bbox": [x0, y0, w, h],
        "iscrowd": 0,
    }


def generate_split(
    spec: SyntheticSpec, root: Optional[str], split: str, num_images: int, seed: int,
    image_size: Optional[int] = None,
) -> str:
    """Write ``num_images`` images of one split and its json (COCO instances, or COCO
    panoptic for a spec with stuff classes); return the json path.

    The same arguments give byte-identical files and a longer split extends a shorter one.
    """
    image_size = spec.image_size if image_size is None else image_size
    if num_images < 1:
        raise ValueError(f"num_images must be >= 1, got {num_images}")
    if image_size < spec.min_image_size:
        raise ValueError(f"image_size must be >= {spec.min_image_size}, got {image_size}")
    # Lazy: each image is written before the next one is drawn.
    rendered = (
        spec.render(np.random.default_rng([seed, index]), image_size)
        for index in range(num_images)
    )
    info = {
        "description": f"{spec.description}, split {split}",
        "version": spec.version,
        "seed": seed,
        "num_images": num_images,
        "image_size": image_size,
    }
    if spec.stuff_classes:
        base = os.path.join(_root_or_default(root), spec.folder)
        return write_panoptic_split(spec, panoptic_paths(base, split), rendered, info)
    return _write_instance_split(spec, *dataset_paths(spec, root, split), rendered, info)


def _write_instance_split(spec: SyntheticSpec, json_file: str, image_root: str, rendered,
                          info: Dict) -> str:
    os.makedirs(image_root, exist_ok=True)
    os.makedirs(os.path.dirname(json_file), exist_ok=True)
    images, annotations = [], []
    for index, (image, instances) in enumerate(rendered):
        file_name = f"{index:06d}.png"
        write_png(os.path.join(image_root, file_name), image, NOISE_PNG_PARAMS)
        # 1-based ids: pycocotools treats annotation id 0 as "unmatched".
        image_id = index + 1
        height, width = image.shape[:2]
        images.append({"id": image_id, "file_name": file_name, "height": height, "width": width})
        for category, mask in instances:
            annotations.append(_annotation(mask, category, image_id, len(annotations) + 1))

    coco = {
        "info": info,
        "images": images,
        "annotations": annotations,
        "categories": [
            {"id": i + 1, "name": name, "supercategory": spec.folder}
            for i, name in enumerate(spec.classes)
        ],
    }
    atomic_write(json_file, json.dumps(coco, separators=(",", ":")).encode())
    return json_file


@contextlib.contextmanager
def _file_lock(path: str) -> Iterator[None]:
    """Exclusive inter-process lock; a no-op where ``fcntl`` is missing (writes stay atomic)."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows
        yield
        return
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "a") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def ensure_splits(
    spec: SyntheticSpec, root: Optional[str] = None, num_train: Optional[int] = None,
    num_val: Optional[int] = None, image_size: Optional[int] = None,
) -> None:
    """Generate the train (seed 0) and val (seed 1) splits under ``root`` unless present.

    A split counts as present when its json exists (it is written last). Concurrent
    callers (e.g. one per GPU process) serialize on a lock file; the loser finds the json
    and returns.
    """
    counts = {
        "train": spec.num_images["train"] if num_train is None else num_train,
        "val": spec.num_images["val"] if num_val is None else num_val,
    }
    if all(os.path.isfile(dataset_paths(spec, root, s)[0]) for s in counts):
        return
    lock = os.path.join(os.path.dirname(dataset_paths(spec, root, "train")[1]), ".lock")
    with _file_lock(lock):
        for split, num in counts.items():
            if not os.path.isfile(dataset_paths(spec, root, split)[0]):
                generate_split(spec, root, split, num, SPLIT_SEEDS[split], image_size)


# name -> (spec, arguments of ensure_splits), so that a registered name can be materialized.
_REGISTERED: Dict[str, Tuple[SyntheticSpec, Dict]] = {}


def materialize_synthetic(name: str) -> bool:
    """Generate the files of a registered synthetic dataset if missing; False if not one."""
    if name not in _REGISTERED:
        return False
    spec, args = _REGISTERED[name]
    ensure_splits(spec, **args)
    return True


def register_synthetic(
    spec: SyntheticSpec, root: Optional[str] = None, prefix: Optional[str] = None,
    num_train: Optional[int] = None, num_val: Optional[int] = None,
    image_size: Optional[int] = None,
) -> List[str]:
    """Register ``{prefix}_train`` and ``{prefix}_val`` in DatasetCatalog and MetadataCatalog.

    Nothing touches the disk here: files are generated by the first load (or by
    :func:`materialize_synthetic`). ``root`` defaults to ``$DETECTRON2_DATASETS`` (or
    ``datasets``), read now; ``prefix`` to the spec's folder. Returns the registered names.
    """
    root = _root_or_default(root)
    prefix = spec.folder if prefix is None else prefix
    args = {"root": root, "num_train": num_train, "num_val": num_val, "image_size": image_size}
    names = [f"{prefix}_{split}" for split in SPLIT_SEEDS]
    taken = [n for n in names if n in DatasetCatalog.list()]
    if taken:
        raise ValueError(f"dataset(s) {taken} already registered; pick another prefix")

    register = _register_panoptic_split if spec.stuff_classes else _register_instance_split
    for split, name in zip(SPLIT_SEEDS, names):
        register(spec, name, split, args)
        _REGISTERED[name] = (spec, args)
    return names


def _register_instance_split(spec: SyntheticSpec, name: str, split: str, args: Dict) -> None:
    json_file, image_root = dataset_paths(spec, args["root"], split)

    def load():
        ensure_splits(spec, **args)
        return load_coco_json(json_file, image_root, name)

    DatasetCatalog.register(name, load)
    MetadataCatalog.get(name).set(
        json_file=json_file,
        image_root=image_root,
        evaluator_type="coco",
        thing_classes=list(spec.classes),
        thing_colors=[list(c) for c in spec.colors],
        # Known without reading the json; evaluators need it to map class ids back.
        thing_dataset_id_to_contiguous_id={i + 1: i for i in range(len(spec.classes))},
    )


def _register_panoptic_split(spec: SyntheticSpec, name: str, split: str, args: Dict) -> None:
    paths = panoptic_paths(os.path.join(args["root"], spec.folder), split)
    metadata = panoptic_metadata(spec, paths)

    def load():
        ensure_splits(spec, **args)
        return load_panoptic_split(paths, metadata)

    DatasetCatalog.register(name, load)
    MetadataCatalog.get(name).set(**metadata)
