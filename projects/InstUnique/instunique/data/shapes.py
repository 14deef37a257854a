"""
``shapes``: a small deterministic synthetic instance-segmentation dataset in COCO format.

It exists so that training, evaluation and the tests can run end to end without COCO.
Its content is chosen to need what the method is about, telling instances apart:

* the class is a geometric shape (circle, square, triangle, ring) with a colour family of its
  own (one hue band per class, shade drawn per image), so class is easy to see and the
  hard part is the method's: telling apart instances that look alike;
* inside one image, all instances of a class share one colour and a similar size, so
  two touching circles differ only by where they are, not by how they look;
* instances touch and overlap; they are painted back to front and each mask is the
  *visible* part, so masks within an image never overlap;
* the background is textured and noisy.

Layout under ``root``::

    shapes/{split}/000000.png ...
    shapes/annotations/instances_{split}.json

Every file is written to a temporary name and moved into place; the json goes last, so
its presence marks a complete split and a half-written split is regenerated.
"""

import contextlib
import json
import os
import threading
from dataclasses import dataclass
from typing import Dict, Iterator, List, Optional, Tuple

import cv2
import numpy as np
import pycocotools.mask as mask_util
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.datasets import load_coco_json

__all__ = [
    "SHAPES_CLASSES",
    "SHAPES_COLORS",
    "generate_shapes",
    "ensure_shapes",
    "register_shapes",
    "shapes_paths",
    "materialize_shapes",
]

SHAPES_CLASSES = ["circle", "square", "triangle", "ring"]
# Only for visualization; image colours are random per image.
SHAPES_COLORS = [[220, 20, 60], [0, 130, 200], [60, 180, 75], [245, 130, 48]]

# Bumped when the generator's output changes; stored in the json "info".
_VERSION = 3
_SPLIT_SEEDS = {"train": 0, "val": 1}
_DEFAULT_NUM_IMAGES = {"train": 2000, "val": 200}

_MIN_INSTANCES, _MAX_INSTANCES = 2, 6
# Characteristic size (diameter) in pixels at 128x128: large enough that the shape, hence the
# class, is visible at the decoder's coarsest attention levels (strides 8-32).
_MIN_SIZE, _MAX_SIZE = 24, 60
_MIN_VISIBLE_PX = 80
_MIN_VISIBLE_FRAC = 0.3
_PNG_PARAMS = [
    cv2.IMWRITE_PNG_COMPRESSION, 1,
    cv2.IMWRITE_PNG_STRATEGY, cv2.IMWRITE_PNG_STRATEGY_HUFFMAN_ONLY,
]  # fmt: skip


def _default_root() -> str:
    return os.path.expanduser(os.environ.get("DETECTRON2_DATASETS", "datasets"))


def shapes_paths(root: Optional[str], split: str) -> Tuple[str, str]:
    """Return ``(json_file, image_root)`` of a split; nothing is read or written."""
    root = _default_root() if root is None else os.fspath(root)
    base = os.path.join(root, "shapes")
    return (
        os.path.join(base, "annotations", f"instances_{split}.json"),
        os.path.join(base, split),
    )


# ---------------------------------------------------------------------------------------
# Drawing
# ---------------------------------------------------------------------------------------


@dataclass
class _Shape:
    category: int  # index into SHAPES_CLASSES
    center: Tuple[float, float]  # (x, y)
    radius: float  # half the characteristic size
    angle: float  # radians; squares and triangles only
    shade: np.ndarray  # (3,) uint8 BGR


def _polygon(shape: _Shape, sides: int, circumradius: float) -> np.ndarray:
    angles = shape.angle + np.arange(sides) * (2 * np.pi / sides)
    cx, cy = shape.center
    pts = np.stack([cx + circumradius * np.cos(angles), cy + circumradius * np.sin(angles)], 1)
    return np.round(pts).astype(np.int32)


def _full_mask(shape: _Shape, size: int) -> np.ndarray:
    """(size, size) bool mask of the whole shape, clipped to the image."""
    canvas = np.zeros((size, size), np.uint8)
    center = (int(round(shape.center[0])), int(round(shape.center[1])))
    r = shape.radius
    name = SHAPES_CLASSES[shape.category]
    # Circumradii are scaled so the four shapes have roughly equal area at equal size.
    if name == "circle":
        cv2.circle(canvas, center, int(round(r)), 1, -1)
    elif name == "ring":
        cv2.circle(canvas, center, int(round(r * 1.05)), 1, -1)
        cv2.circle(canvas, center, int(round(r * 0.55)), 0, -1)
    elif name == "square":
        cv2.fillPoly(canvas, [_polygon(shape, 4, r * 1.25)], 1)
    elif name == "triangle":
        cv2.fillPoly(canvas, [_polygon(shape, 3, r * 1.45)], 1)
    else:  # pragma: no cover - SHAPES_CLASSES is fixed
        raise ValueError(f"unknown shape {name!r}")
    return canvas.astype(bool)


def _random_palette(rng: np.random.Generator, n: int) -> Tuple[np.ndarray, np.ndarray]:
    """A muted background colour (3,) and one saturated colour per class (n, 3): class c's
    hue stays within a band of its own, its saturation and brightness vary per image."""
    hues = (np.arange(n) * (180 / n) + rng.uniform(-10, 10, n)) % 180
    hsv = np.stack([hues, rng.uniform(150, 255, n), rng.uniform(140, 255, n)], 1)
    colours = cv2.cvtColor(hsv.astype(np.uint8)[None], cv2.COLOR_HSV2BGR)[0]
    bg_hsv = np.array([[[rng.uniform(0, 180), rng.uniform(0, 60), rng.uniform(60, 150)]]])
    background = cv2.cvtColor(bg_hsv.astype(np.uint8), cv2.COLOR_HSV2BGR)[0, 0]
    return background.astype(np.int16), colours.astype(np.int16)


def _background(rng: np.random.Generator, size: int, colour: np.ndarray) -> np.ndarray:
    """(size, size, 3) uint8 textured background: smooth blotches plus faint strokes."""
    coarse = np.clip(colour + rng.normal(0, 28, (5, 5, 3)), 0, 255).astype(np.uint8)
    image = cv2.resize(coarse, (size, size), interpolation=cv2.INTER_CUBIC)
    for _ in range(int(rng.integers(3, 9))):
        p0 = tuple(int(v) for v in rng.integers(0, size, 2))
        p1 = tuple(int(v) for v in rng.integers(0, size, 2))
        stroke = np.clip(colour + int(rng.integers(-35, 36)), 0, 255)
        cv2.line(image, p0, p1, tuple(int(c) for c in stroke), int(rng.integers(1, 3)))
    return image


def _sample_layout(rng: np.random.Generator, size: int, colours: np.ndarray) -> List[_Shape]:
    """Shapes in depth order (first is farthest); placed so that many touch or overlap."""
    n = int(rng.integers(_MIN_INSTANCES, _MAX_INSTANCES + 1))
    # Fewer classes than instances: at least one class repeats in every image.
    num_classes = int(rng.integers(1, min(len(SHAPES_CLASSES), n - 1) + 1))
    classes = rng.choice(len(SHAPES_CLASSES), num_classes, replace=False)
    cats = np.concatenate([classes, rng.choice(classes, n - num_classes)])
    rng.shuffle(cats)
    base_size = {int(c): rng.uniform(_MIN_SIZE, _MAX_SIZE) for c in classes}
    colour_of = {int(c): colours[int(c)] for c in classes}

    shapes: List[_Shape] = []
    # One row of uniforms per shape (fewer generator calls: generation speed matters).
    for cat, u in zip((int(c) for c in cats), rng.random((n, 11))):
        diameter = min(max(base_size[cat] * (0.9 + 0.2 * u[0]), _MIN_SIZE), _MAX_SIZE)
        r = diameter / 2
        if shapes and u[1] < 0.75:
            # Put it against an earlier shape, preferring one of its own class: distance from
            # "just touching" to "half overlapped".
            same = [s for s in shapes if s.category == cat]
            pool = same if same and u[2] < 0.6 else shapes
            anchor = pool[int(u[3] * len(pool))]
            theta = 2 * np.pi * u[4]
            dist = (anchor.radius + r) * (0.6 + 0.42 * u[5])
            cx = anchor.center[0] + dist * np.cos(theta)
            cy = anchor.center[1] + dist * np.sin(theta)
        else:
            cx, cy = size * u[4], size * u[5]
        # Keep most of the shape inside the image.
        cx, cy = (min(max(float(v), 0.6 * r), size - 0.6 * r) for v in (cx, cy))
        jitter = np.floor(u[7:10] * 21).astype(np.int16) - 10
        shade = np.clip(colour_of[cat] + jitter, 0, 255).astype(np.uint8)
        shapes.append(_Shape(cat, (cx, cy), float(r), float(2 * np.pi * u[10]), shade))
    return shapes


def _visible_masks(full: List[np.ndarray]) -> List[np.ndarray]:
    """Each mask minus everything painted after it."""
    if not full:
        return []
    covered = np.zeros_like(full[0])
    visible = []
    for mask in reversed(full):
        visible.append(mask & ~covered)
        covered |= mask
    return visible[::-1]


def _render_image(
    rng: np.random.Generator, size: int
) -> Tuple[np.ndarray, List[Tuple[int, np.ndarray]]]:
    """Return a (size, size, 3) uint8 BGR image and its (category, visible mask) pairs."""
    background_colour, colours = _random_palette(rng, len(SHAPES_CLASSES))
    while True:
        shapes = _sample_layout(rng, size, colours)
        full = [_full_mask(s, size) for s in shapes]
        # Removing a shape only uncovers the others, so one filtering pass is enough.
        areas = [np.count_nonzero(v) for v in _visible_masks(full)]
        keep = [
            i
            for i, area in enumerate(areas)
            if area >= max(_MIN_VISIBLE_PX, _MIN_VISIBLE_FRAC * np.count_nonzero(full[i]))
        ]
        if len(keep) >= _MIN_INSTANCES:
            break
    shapes = [shapes[i] for i in keep]
    full = [full[i] for i in keep]

    image = _background(rng, size, background_colour)
    for shape, mask in zip(shapes, full):
        image[mask] = shape.shade
    # Integer sensor noise: as good as Gaussian here and several times cheaper to draw.
    noise = rng.integers(-3, 4, image.shape, dtype=np.int8)
    image = cv2.add(image, noise, dtype=cv2.CV_8U)  # saturating
    return image, [(s.category, m) for s, m in zip(shapes, _visible_masks(full))]


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


# ---------------------------------------------------------------------------------------
# Files
# ---------------------------------------------------------------------------------------


def _atomic_write(path: str, data: bytes) -> None:
    # Unique per writer, so racing writers never share a temporary file.
    tmp = f"{path}.tmp{os.getpid()}-{threading.get_ident()}"
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def _write_png(path: str, image: np.ndarray) -> None:
    # Huffman-only: the noise defeats LZ matching; this is both faster and smaller.
    ok, png = cv2.imencode(".png", image, _PNG_PARAMS)
    if not ok:  # pragma: no cover - cv2 failure
        raise RuntimeError(f"could not encode {path}")
    _atomic_write(path, png.tobytes())


def generate_shapes(
    root: Optional[str], split: str, num_images: int, seed: int, image_size: int = 128
) -> str:
    """
    Write ``num_images`` images of one split and its COCO json; return the json path.

    Image ``i`` depends only on ``(seed, i, image_size)``, so the same arguments give
    byte-identical files and a longer split extends a shorter one.
    """
    if num_images < 1:
        raise ValueError(f"num_images must be >= 1, got {num_images}")
    if image_size < 2 * _MAX_SIZE:
        raise ValueError(f"image_size must be >= {2 * _MAX_SIZE}, got {image_size}")
    json_file, image_root = shapes_paths(root, split)
    os.makedirs(image_root, exist_ok=True)
    os.makedirs(os.path.dirname(json_file), exist_ok=True)

    images, annotations = [], []
    for index in range(num_images):
        image, instances = _render_image(np.random.default_rng([seed, index]), image_size)
        file_name = f"{index:06d}.png"
        _write_png(os.path.join(image_root, file_name), image)
        # 1-based ids: pycocotools treats annotation id 0 as "unmatched".
        image_id = index + 1
        images.append(
            {"id": image_id, "file_name": file_name, "height": image_size, "width": image_size}
        )
        for category, mask in instances:
            annotations.append(_annotation(mask, category, image_id, len(annotations) + 1))

    coco = {
        "info": {
            "description": f"InstUnique synthetic shapes, split {split}",
            "version": _VERSION,
            "seed": seed,
            "num_images": num_images,
            "image_size": image_size,
        },
        "images": images,
        "annotations": annotations,
        "categories": [
            {"id": i + 1, "name": name, "supercategory": "shape"}
            for i, name in enumerate(SHAPES_CLASSES)
        ],
    }
    _atomic_write(json_file, json.dumps(coco, separators=(",", ":")).encode())
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


def ensure_shapes(
    root: Optional[str] = None,
    num_train: int = _DEFAULT_NUM_IMAGES["train"],
    num_val: int = _DEFAULT_NUM_IMAGES["val"],
    image_size: int = 128,
) -> None:
    """
    Generate the train (seed 0) and val (seed 1) splits under ``root`` unless present.

    A split counts as present when its json exists (it is written last). Concurrent
    callers (e.g. one per GPU process) serialize on a lock file; the loser finds the json
    and returns.
    """
    counts = {"train": num_train, "val": num_val}
    if all(os.path.isfile(shapes_paths(root, s)[0]) for s in counts):
        return
    lock = os.path.join(os.path.dirname(shapes_paths(root, "train")[1]), ".lock")
    with _file_lock(lock):
        for split, num in counts.items():
            if not os.path.isfile(shapes_paths(root, split)[0]):
                generate_shapes(root, split, num, _SPLIT_SEEDS[split], image_size)


# ---------------------------------------------------------------------------------------
# Registration
# ---------------------------------------------------------------------------------------

# name -> arguments of ensure_shapes, so that a registered name can be materialized.
_REGISTERED: Dict[str, Dict] = {}


def materialize_shapes(name: str) -> bool:
    """Generate the files of a registered shapes dataset if missing; False if not shapes."""
    if name not in _REGISTERED:
        return False
    ensure_shapes(**_REGISTERED[name])
    return True


def register_shapes(
    root: Optional[str] = None,
    prefix: str = "shapes",
    num_train: int = _DEFAULT_NUM_IMAGES["train"],
    num_val: int = _DEFAULT_NUM_IMAGES["val"],
    image_size: int = 128,
) -> List[str]:
    """
    Register ``{prefix}_train`` and ``{prefix}_val`` in DatasetCatalog and MetadataCatalog.

    Nothing touches the disk here: files are generated by the first load (or by
    :func:`materialize_shapes`). ``root`` defaults to ``$DETECTRON2_DATASETS`` (or
    ``datasets``), read now. Returns the registered names.
    """
    root = _default_root() if root is None else os.fspath(root)
    args = {"root": root, "num_train": num_train, "num_val": num_val, "image_size": image_size}
    names = [f"{prefix}_{split}" for split in _SPLIT_SEEDS]
    taken = [n for n in names if n in DatasetCatalog.list()]
    if taken:
        raise ValueError(f"dataset(s) {taken} already registered; pick another prefix")

    for split, name in zip(_SPLIT_SEEDS, names):
        json_file, image_root = shapes_paths(root, split)

        def load(json_file=json_file, image_root=image_root, name=name):
            ensure_shapes(**args)
            return load_coco_json(json_file, image_root, name)

        DatasetCatalog.register(name, load)
        MetadataCatalog.get(name).set(
            json_file=json_file,
            image_root=image_root,
            evaluator_type="coco",
            thing_classes=list(SHAPES_CLASSES),
            thing_colors=[list(c) for c in SHAPES_COLORS],
            # Known without reading the json; evaluators need it to map class ids back.
            thing_dataset_id_to_contiguous_id={i + 1: i for i in range(len(SHAPES_CLASSES))},
        )
        _REGISTERED[name] = args
    return names
