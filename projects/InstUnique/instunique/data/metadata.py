"""
Which contiguous class ids are things and which are stuff, from a dataset's metadata alone
(no file is read; models and objectives look classes up here).

Class-id convention (detectron2's "standard" COCO panoptic metadata, which Mask2Former
also trains with): things and stuff share one contiguous space ``[0, K)``, the index of
each category in the dataset's category list, so ``MODEL.SEM_SEG_HEAD.NUM_CLASSES`` is K
(133 for COCO). ``thing_dataset_id_to_contiguous_id`` maps the thing categories into it;
``stuff_dataset_id_to_contiguous_id`` maps the stuff categories (detectron2's builtin
COCO) or every category (Mask2Former's own registration and ``shapes_panoptic``, so that
SemSegEvaluator can map any predicted class back). A class is a thing iff it is in the
thing mapping. ``stuff_classes`` and ``thing_classes`` both name all K classes (things
come first in both datasets, so the official Mask2Former's things-only ``thing_classes``
indexes the same).
"""
from typing import Dict, Iterable, List, Tuple

from detectron2.data import MetadataCatalog

__all__ = [
    "class_metadata",
    "dataset_metadata",
    "stuff_contiguous_ids",
    "thing_contiguous_ids",
    "training_stuff_classes",
]


def class_metadata(categories: List[Dict]) -> Dict:
    """The class fields of standard panoptic metadata (the convention above) for COCO-style
    ``categories`` (dicts with "id", "name", "color", "isthing"), in their list order."""
    names = [c["name"] for c in categories]
    colors = [[int(v) for v in c["color"]] for c in categories]
    return {
        "thing_classes": names,
        "thing_colors": colors,
        "stuff_classes": names,
        "stuff_colors": colors,
        "thing_dataset_id_to_contiguous_id": {
            c["id"]: i for i, c in enumerate(categories) if c["isthing"]},
        # Every category, as Mask2Former's registration: SemSegEvaluator maps each
        # predicted class back through it.
        "stuff_dataset_id_to_contiguous_id": {c["id"]: i for i, c in enumerate(categories)},
    }


def dataset_metadata(name: str):
    """MetadataCatalog.get(name), the names registered on first use included
    (:func:`.datasets.register_on_first_use`)."""
    from .datasets import register_on_first_use

    register_on_first_use(name)
    return MetadataCatalog.get(name)


def thing_contiguous_ids(metadata) -> Tuple[int, ...]:
    """Sorted contiguous ids of the thing classes (empty if the metadata has none)."""
    mapping = getattr(metadata, "thing_dataset_id_to_contiguous_id", None) or {}
    return tuple(sorted(set(mapping.values())))


def stuff_contiguous_ids(metadata) -> Tuple[int, ...]:
    """Sorted contiguous ids of the stuff classes (the classes that are not things; see
    the convention above). Instance datasets have no stuff mapping: empty."""
    mapping = getattr(metadata, "stuff_dataset_id_to_contiguous_id", None) or {}
    return tuple(sorted(set(mapping.values()) - set(thing_contiguous_ids(metadata))))


def training_stuff_classes(dataset_names: Iterable[str]) -> Tuple[int, ...]:
    """The stuff classes of a run's training datasets (union; empty for instance data)."""
    ids = set()
    for name in dataset_names:
        ids.update(stuff_contiguous_ids(dataset_metadata(name)))
    return tuple(sorted(ids))
