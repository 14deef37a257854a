"""
A user's own COCO-format datasets, registered from the config (``DATASETS.REGISTER``).

Each entry is ``"NAME=JSON:IMAGE_ROOT"``: NAME becomes usable in ``DATASETS.TRAIN`` /
``DATASETS.TEST``; it is registered with detectron2's ``register_coco_instances``. Paths are
taken relative to the working directory. The separator between JSON and IMAGE_ROOT is the
only ``:`` of the rest, or else the ``:`` that follows ``.json`` (so ``C:\\...`` paths work).

Everything a spec can get wrong is found in :func:`setup_user_datasets`, before a model or
loader is built, and named with the spec: its syntax, a missing JSON, an image root that is
not a folder, a JSON that is not COCO (no ``images`` or ``categories``), images the JSON
lists but the root lacks, a name already registered with other files.

The class count of the segmenter (the key in :data:`NUM_CLASSES_KEYS`) is checked against
the categories of the datasets used, or taken from them when it is :data:`AUTO` (-1).
"""

import json
import os
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence

from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.datasets import register_coco_instances

from .datasets import check_dataset

__all__ = [
    "AUTO",
    "NUM_CLASSES_KEYS",
    "DatasetSpec",
    "num_classes_key",
    "parse_spec",
    "register_spec",
    "setup_user_datasets",
]

# A NUM_CLASSES value that asks for the count of the datasets' categories.
AUTO = -1

# Meta-architecture -> config key of its number of (thing) classes. InstUnique itself is
# looked up through MODEL.INST_UNIQUE.BASE_META_ARCHITECTURE.
NUM_CLASSES_KEYS = {
    "Mask2Former": "MODEL.SEM_SEG_HEAD.NUM_CLASSES",
    "SparseInst": "MODEL.SPARSE_INST.DECODER.NUM_CLASSES",
    "CondInst": "MODEL.FCOS.NUM_CLASSES",
    "GeneralizedRCNN": "MODEL.ROI_HEADS.NUM_CLASSES",
}

_SYNTAX = "NAME=JSON:IMAGE_ROOT"
_SHOWN_MISSING = 3  # missing images quoted in an error


@dataclass(frozen=True)
class DatasetSpec:
    """One ``DATASETS.REGISTER`` entry; ``text`` is the entry as written, for messages."""

    name: str
    json_file: str
    image_root: str
    text: str


def _fail(text: str, problem: str, error=ValueError) -> Exception:
    return error(f"DATASETS.REGISTER entry {text!r}: {problem}")


def _split_paths(text: str, rest: str):
    if rest.count(":") == 1:
        return rest.split(":")
    at = rest.lower().find(".json:")
    if at < 0:
        raise _fail(
            text,
            f"cannot tell where JSON ends and IMAGE_ROOT begins; expected {_SYNTAX} with "
            "one ':' between the paths, or a JSON path ending in '.json'",
        )
    return rest[: at + len(".json")], rest[at + len(".json:") :]


def parse_spec(text) -> DatasetSpec:
    """Parse ``"NAME=JSON:IMAGE_ROOT"``; paths are made absolute. Reads no file."""
    if not isinstance(text, str):
        raise ValueError(
            f"DATASETS.REGISTER entries are strings {_SYNTAX}, got {type(text).__name__}: "
            f"{text!r}"
        )
    name, eq, rest = text.partition("=")
    name = name.strip()
    if not eq or not name:
        raise _fail(text, f"expected {_SYNTAX} (a dataset name, then '=')")
    json_file, image_root = (p.strip() for p in _split_paths(text, rest))
    if not json_file or not image_root:
        raise _fail(text, f"expected {_SYNTAX} (both paths non-empty)")
    return DatasetSpec(name, os.path.abspath(json_file), os.path.abspath(image_root), text)


def _read_coco(spec: DatasetSpec) -> Dict:
    if not os.path.isfile(spec.json_file):
        raise _fail(spec.text, f"JSON file not found: {spec.json_file}", FileNotFoundError)
    if not os.path.exists(spec.image_root):
        raise _fail(spec.text, f"image root not found: {spec.image_root}", FileNotFoundError)
    if not os.path.isdir(spec.image_root):
        raise _fail(spec.text, f"image root is not a folder: {spec.image_root}",
                    NotADirectoryError)
    try:
        with open(spec.json_file) as f:
            coco = json.load(f)
    except (ValueError, UnicodeDecodeError) as e:
        raise _fail(spec.text, f"{spec.json_file} is not valid JSON ({e})") from e
    for field in ("images", "categories"):
        if not isinstance(coco, dict) or not isinstance(coco.get(field), list):
            raise _fail(spec.text, f"{spec.json_file} is not COCO instances JSON: no {field!r} "
                        "list")
    if not coco["categories"]:
        raise _fail(spec.text, f"{spec.json_file} lists no categories")
    for cat in coco["categories"]:
        if not (isinstance(cat, dict) and isinstance(cat.get("id"), int)
                and isinstance(cat.get("name"), str)):
            raise _fail(spec.text, f"{spec.json_file}: a category needs an integer 'id' and a "
                        f"'name', got {cat!r}")
    ids = [c["id"] for c in coco["categories"]]
    if len(set(ids)) != len(ids):
        raise _fail(spec.text, f"{spec.json_file}: category ids repeat: {sorted(ids)}")
    return coco


def _check_images(spec: DatasetSpec, images: List[Dict]) -> None:
    missing = []
    for image in images:
        if not isinstance(image, dict) or "file_name" not in image or "id" not in image:
            raise _fail(spec.text, f"{spec.json_file}: an image needs 'id' and 'file_name', "
                        f"got {image!r}")
        if not os.path.isfile(os.path.join(spec.image_root, image["file_name"])):
            missing.append(image)
    if missing:
        shown = ", ".join(f"{m['file_name']!r} (image id {m['id']})"
                          for m in missing[:_SHOWN_MISSING])
        extra = len(missing) - _SHOWN_MISSING
        more = f" and {extra} more" if extra > 0 else ""
        raise _fail(
            spec.text,
            f"{len(missing)} of {len(images)} images listed in {spec.json_file} are not under "
            f"{spec.image_root}: {shown}{more}",
            FileNotFoundError,
        )


def _registered_paths(name: str):
    meta = MetadataCatalog.get(name)
    # validation.py re-registers a dataset with a cleaned copy of its JSON; the entry
    # naming the original file is still the same entry.
    json_field = "source_json_file" if hasattr(meta, "source_json_file") else "json_file"
    paths = [getattr(meta, f, None) for f in (json_field, "image_root")]
    return tuple(os.path.abspath(p) if isinstance(p, str) else p for p in paths)


def register_spec(spec: DatasetSpec) -> None:
    """Check ``spec``'s files and register it (a no-op if already registered with them).

    Metadata gets ``thing_classes`` and ``thing_dataset_id_to_contiguous_id`` now, equal to
    what ``load_coco_json`` sets later (categories in id order).

    Raises:
        ValueError: the name is registered with other files; the JSON is not COCO.
        FileNotFoundError: missing JSON, image root or listed images.
        NotADirectoryError: the image root is a file.
    """
    if spec.name in DatasetCatalog.list():
        if _registered_paths(spec.name) == (spec.json_file, spec.image_root):
            return
        json_file, image_root = _registered_paths(spec.name)
        where = (f"with json_file={json_file}, image_root={image_root}" if json_file
                 else "(not from a COCO json)")
        raise _fail(spec.text, f"dataset name {spec.name!r} is already registered {where}; "
                    "pick another name")
    coco = _read_coco(spec)
    _check_images(spec, coco["images"])
    categories = sorted(coco["categories"], key=lambda c: c["id"])
    register_coco_instances(spec.name, {}, spec.json_file, spec.image_root)
    MetadataCatalog.get(spec.name).set(
        thing_classes=[c["name"] for c in categories],
        thing_dataset_id_to_contiguous_id={c["id"]: i for i, c in enumerate(categories)},
    )


def num_classes_key(cfg) -> Optional[str]:
    """The config key holding the segmenter's class count, or None for an unknown one."""
    arch = cfg.MODEL.META_ARCHITECTURE
    if arch == "InstUnique":
        arch = cfg.MODEL.INST_UNIQUE.BASE_META_ARCHITECTURE
    return NUM_CLASSES_KEYS.get(arch)


def _node_and_leaf(cfg, key: str):
    *path, leaf = key.split(".")
    node = cfg
    for part in path:
        node = getattr(node, part)
    return node, leaf


def _categories_from_json(json_file: str) -> List[str]:
    with open(json_file) as f:
        categories = json.load(f)["categories"]
    return [c["name"] for c in sorted(categories, key=lambda c: c["id"])]


def _dataset_classes(name: str, read_json: bool) -> Optional[List[str]]:
    """Category names in class-id order, from the metadata; from the JSON if ``read_json``."""
    if name not in DatasetCatalog.list():
        check_dataset(name)  # raises, listing the registered names
    meta = MetadataCatalog.get(name)
    if hasattr(meta, "thing_classes"):
        return list(meta.thing_classes)
    json_file = getattr(meta, "json_file", None)
    if read_json and isinstance(json_file, str) and os.path.isfile(json_file):
        return _categories_from_json(json_file)
    return None


def _resolve_num_classes(cfg, names: Sequence[str]) -> None:
    key = num_classes_key(cfg)
    if key is None:
        return
    node, leaf = _node_and_leaf(cfg, key)
    value = node[leaf]
    if value != AUTO and (not isinstance(value, int) or value < 1):
        raise ValueError(f"{key} must be >= 1, or {AUTO} to take it from the datasets; "
                         f"got {value!r}")
    known = {}
    for name in dict.fromkeys(names):
        classes = _dataset_classes(name, read_json=value == AUTO)
        if classes is not None:
            known[name] = classes
    items = list(known.items())
    for other, classes in items[1:]:
        first, first_classes = items[0]
        if classes != first_classes:
            raise ValueError(
                f"datasets {first!r} ({len(first_classes)} categories: {first_classes}) and "
                f"{other!r} ({len(classes)} categories: {classes}) list different "
                "categories; a model trained on one would be scored on the other with the "
                "wrong class ids"
            )
    if not items:
        if value == AUTO:
            raise ValueError(f"{key} is {AUTO} (take it from the datasets), but none of "
                             f"{list(names)} lists its categories; set {key}")
        return
    name, classes = items[0]
    if value == AUTO:
        node[leaf] = len(classes)
    elif value != len(classes):
        raise ValueError(
            f"{key} is {value} but dataset {name!r} has {len(classes)} categories "
            f"({classes}); set {key} to {len(classes)}, or to {AUTO} to take it from the data"
        )


def setup_user_datasets(cfg, eval_only: bool = False) -> None:
    """Register ``cfg.DATASETS.REGISTER`` and check or fill in the class count (in place).

    The class count (see :func:`num_classes_key`) is compared with the categories of every
    dataset in DATASETS.TRAIN (unless ``eval_only``) and DATASETS.TEST whose categories are
    known without loading it; at :data:`AUTO` it is set to their number. ``cfg`` must not
    be frozen.
    """
    specs = [parse_spec(text) for text in cfg.DATASETS.REGISTER]
    seen = {}
    for spec in specs:
        before = seen.setdefault(spec.name, spec)
        if (before.json_file, before.image_root) != (spec.json_file, spec.image_root):
            raise _fail(spec.text, f"dataset name {spec.name!r} is also given by "
                        f"{before.text!r}, with other files")
    for spec in specs:
        register_spec(spec)
    _resolve_num_classes(cfg, [*(() if eval_only else cfg.DATASETS.TRAIN), *cfg.DATASETS.TEST])
