"""
Dataset registration and early, readable checks.

Importing this module registers the built-in synthetic datasets ``shapes``, ``blobs``,
``shapes_crowd``, ``shapes_diverse`` and ``shapes_panoptic`` (``{name}_train`` /
``{name}_val``, see :mod:`.synthetic`) under ``$DETECTRON2_DATASETS`` without touching the
disk. COCO and the other builtin datasets are registered by detectron2 itself
(``detectron2.data.datasets.builtin``) under the same root, read once when detectron2 is
imported; COCO panoptic with semantic PNGs (Mask2Former's names, ``coco_2017_*_panoptic_
with_sem_seg``) by :mod:`.coco_panoptic_semseg` when :func:`check_dataset` first meets them
and no one else (the official mask2former package) has registered them.

Training and evaluation should call :func:`check_dataset` on every dataset they use
before building loaders or evaluators: it turns "file not found deep inside a worker"
into one message naming the dataset and the expected layout, and it materializes the
synthetic data (COCOEvaluator opens ``metadata.json_file`` when it is built).
"""

import difflib
import os
import textwrap
from collections import defaultdict
from typing import List

from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.catalog import Metadata

from .coco_panoptic_semseg import COCO_SEMSEG_SPLITS, register_coco_panoptic_with_sem_seg
from .synthetic.blobs import BLOBS
from .synthetic.shapes import SHAPES, SHAPES_CROWD
from .synthetic.shapes_diverse import SHAPES_DIVERSE
from .synthetic.shapes_panoptic import SHAPES_PANOPTIC
from .synthetic.spec import materialize_synthetic, register_synthetic

__all__ = ["DatasetNotRegisteredError", "check_dataset", "register_all",
           "register_on_first_use"]

# Metadata fields that detectron2's builtin datasets use for files and folders.
_PATH_FIELDS = (
    "json_file",
    "image_root",
    "panoptic_json",
    "panoptic_root",
    "sem_seg_root",
    "image_dir",
    "gt_dir",
    "dirname",
)


class DatasetNotRegisteredError(KeyError):
    """A dataset name that is not in DatasetCatalog."""

    def __str__(self) -> str:
        # KeyError would show the repr of the message, quotes and escaped newlines included.
        return str(self.args[0]) if self.args else ""


def register_all(root=None) -> None:
    """Register the project's datasets; names already in DatasetCatalog are left alone."""
    for spec in (SHAPES, BLOBS, SHAPES_CROWD, SHAPES_DIVERSE, SHAPES_PANOPTIC):
        names = [f"{spec.folder}_{split}" for split in ("train", "val")]
        if not any(n in DatasetCatalog.list() for n in names):
            register_synthetic(spec, root)


def _builtin_root() -> str:
    """The root detectron2 used for its builtin datasets (env read at its import)."""
    from detectron2.data.datasets import builtin

    return getattr(builtin, "_root", os.path.expanduser("datasets"))


def _grouped_names(names: List[str], width: int = 100) -> str:
    groups = defaultdict(list)
    for name in sorted(names):
        groups[name.split("_")[0]].append(name)
    lines = []
    for family, members in sorted(groups.items()):
        text = f"{family}: " + ", ".join(members)
        lines.append(textwrap.fill(text, width, initial_indent="  ", subsequent_indent="    "))
    return "\n".join(lines)


def _unknown_dataset_message(name: str) -> str:
    names = DatasetCatalog.list()
    close = difflib.get_close_matches(name, names, n=3, cutoff=0.6)
    hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
    return (
        f"Dataset {name!r} is not registered.{hint} Registered datasets:\n"
        f"{_grouped_names(names)}\n"
        "Register your own with DatasetCatalog.register / register_coco_instances."
    )


def _missing_files_message(name: str, meta: Metadata, missing: List[str]) -> str:
    root = _builtin_root()
    prefix = os.path.join(root, "")

    def as_layout(path: str) -> str:
        if path.startswith(prefix):
            path = "$DETECTRON2_DATASETS/" + path[len(prefix) :]
        return path if os.path.splitext(path)[1] else path.rstrip("/") + "/"

    lines = [f"Dataset {name!r} is registered but its files are missing:"]
    lines += [f"  {field} = {getattr(meta, field)}" for field in missing]
    paths = [getattr(meta, f) for f in _PATH_FIELDS if isinstance(getattr(meta, f, None), str)]
    lines.append("Expected layout: " + " and ".join(as_layout(p) for p in paths))
    if getattr(meta, "prepare_hint", None):
        lines.append(f"Files derived from the dataset's own are made by: {meta.prepare_hint}")
    if any(p.startswith(prefix) for p in paths):
        lines.append(
            f"DETECTRON2_DATASETS was {root!r} when detectron2 registered {name!r}; "
            "set DETECTRON2_DATASETS before starting Python to point at your dataset root "
            "(see detectron2's datasets/README.md for the layout)."
        )
        now = os.environ.get("DETECTRON2_DATASETS")
        if now is not None and os.path.expanduser(now) != root:
            lines.append(f"Note: it is {now!r} now, too late for the builtin registration.")
    return "\n".join(lines)


def register_on_first_use(name: str) -> None:
    """Register the project's COCO panoptic-with-semantic names (Mask2Former's) when one is
    first asked for and no one else has registered it. Not at import: the official
    mask2former package registers the same names at its import and fails on names taken."""
    if name in COCO_SEMSEG_SPLITS and name not in DatasetCatalog.list():
        register_coco_panoptic_with_sem_seg(_builtin_root())


def check_dataset(name: str) -> Metadata:
    """
    Make sure ``name`` is registered and its files are where its metadata says.

    Built-in synthetic datasets are generated if missing. Returns the metadata.

    Raises:
        DatasetNotRegisteredError: unknown name; the message lists the registered names.
        FileNotFoundError: a registered dataset whose files are missing; the message names
            the dataset, the missing paths and the expected layout.
    """
    if not isinstance(name, str):
        raise ValueError(f"dataset name must be a str, got {type(name).__name__}: {name!r}")
    register_on_first_use(name)
    if name not in DatasetCatalog.list():
        raise DatasetNotRegisteredError(_unknown_dataset_message(name))
    materialize_synthetic(name)
    meta = MetadataCatalog.get(name)
    missing = [
        field
        for field in _PATH_FIELDS
        if isinstance(getattr(meta, field, None), str) and not os.path.exists(getattr(meta, field))
    ]
    if missing:
        raise FileNotFoundError(_missing_files_message(name, meta, missing))
    return meta


register_all()
