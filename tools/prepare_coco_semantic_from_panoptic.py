#!/usr/bin/env python
"""Semantic PNGs of COCO panoptic (133 classes), for ``coco_2017_*_panoptic_with_sem_seg``.

    python tools/prepare_coco_semantic_from_panoptic.py --root $DETECTRON2_DATASETS/coco

Reads ``annotations/panoptic_{split}.json`` and ``panoptic_{split}/*.png`` under ROOT and
writes ``panoptic_semseg_{split}/*.png``: per pixel the contiguous class of its segment,
255 where void or crowd. The panoptic configs evaluate on
``coco_2017_val_panoptic_with_sem_seg``, whose mIoU needs them. A rerun skips the PNGs
already written. What a PNG holds: instunique/data/coco_panoptic_semseg.py.
"""
import argparse
import os
import sys
from typing import Optional, Sequence

from instunique.data.coco_panoptic_semseg import write_semantic_pngs


def get_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--root", required=True, help="the COCO folder (holds annotations/)")
    p.add_argument("--splits", nargs="+", default=["val2017", "train2017"])
    p.add_argument("--workers", type=int, default=os.cpu_count(), help="processes")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = get_parser().parse_args(argv)
    for split in args.splits:
        panoptic_json = os.path.join(args.root, "annotations", f"panoptic_{split}.json")
        panoptic_root = os.path.join(args.root, f"panoptic_{split}")
        for path in (panoptic_json, panoptic_root):
            if not os.path.exists(path):
                sys.exit(f"{path} does not exist: --root must be the COCO folder with "
                         f"annotations/panoptic_{split}.json and panoptic_{split}/ (split "
                         f"{split!r})")
        out = os.path.join(args.root, f"panoptic_semseg_{split}")
        written = write_semantic_pngs(panoptic_json, panoptic_root, out, args.workers)
        print(f"{split}: wrote {written} semantic PNGs to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
