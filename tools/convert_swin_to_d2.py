#!/usr/bin/env python
"""Official Swin weights -> a detectron2 .pkl for MODEL.BACKBONE.NAME "build_timm_backbone".

    python tools/convert_swin_to_d2.py swin_base_patch4_window12_384_22k.pth \
        pretrained_models/swin_base_patch4_window12_384_22k.pkl

INPUT is Microsoft's Swin .pth (github.com/microsoft/Swin-Transformer releases), Mask2Former's
.pkl of it (its tools/convert-pretrained-swin-model-to-d2.py), a trained Mask2Former Swin model
(.pkl or .pth, the backbone under "backbone.") or timm's Swin weights. OUTPUT is detectron2's
model zoo format, a pickle of {"model": numpy arrays, "__author__", "matching_heuristics":
False}: the keys are the model's own, so MODEL.WEIGHTS loads it by name, without detectron2's
suffix matching. The key mapping and the facts behind it: instunique/backbones/swin_checkpoint.py.
"""
import argparse
import os
import pickle
from typing import Any, Dict, Optional, Sequence

import numpy as np
import torch

from instunique.backbones.swin_checkpoint import convert_swin_state_dict, unwrap_state_dict

AUTHOR = "official Swin weights via tools/convert_swin_to_d2.py"


def get_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("input", help="official Swin .pth / .pkl, or a Mask2Former Swin model")
    p.add_argument("output", help=".pkl file to write")
    return p


def load_checkpoint(path: str) -> Dict[str, Any]:
    """The tensors of ``path``: a pickle (.pkl, detectron2's and Mask2Former's format) or a
    torch file of tensors only (anything else)."""
    if path.endswith(".pkl"):
        with open(path, "rb") as f:
            obj = pickle.load(f, encoding="latin1")  # Python 2 pickles in older model zoos
    else:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    return dict(unwrap_state_dict(obj))


def _to_numpy(key: str, value: Any) -> np.ndarray:
    if isinstance(value, torch.Tensor):
        return value.detach().cpu().numpy()
    if isinstance(value, np.ndarray):
        return value
    raise ValueError(f"checkpoint entry {key!r} is a {type(value).__name__}, not a tensor")


def convert(input_path: str, output_path: str) -> Dict[str, np.ndarray]:
    """Convert ``input_path`` and write ``output_path``; returns the converted arrays."""
    state = load_checkpoint(input_path)
    converted, dropped = convert_swin_state_dict(state)
    arrays = {k: _to_numpy(k, v) for k, v in converted.items()}
    os.makedirs(os.path.dirname(os.path.abspath(output_path)), exist_ok=True)
    with open(output_path, "wb") as f:
        pickle.dump({"model": arrays, "__author__": AUTHOR, "matching_heuristics": False}, f)
    backbone = sum(k.startswith("backbone.") for k in arrays)
    print(f"{output_path}: {len(arrays)} tensors ({backbone} of the backbone); dropped "
          f"{len(dropped)} (recomputed buffers, ImageNet classifier): {', '.join(dropped[:4])}"
          f"{', ...' if len(dropped) > 4 else ''}")
    return arrays


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, np.ndarray]:
    args = get_parser().parse_args(argv)
    return convert(args.input, args.output)


if __name__ == "__main__":
    main()
