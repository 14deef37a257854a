"""timm's Swin (v1) set up to compute what the official Swin of Mask2Former computes, at any size.

Facts relied on (timm 1.0.31 ``timm/models/swin_transformer.py``; Mask2Former
``mask2former/modeling/backbone/swin.py``, the ``D2SwinTransformer`` of its Swin configs):

* Official blocks pad their normalized input with zeros at the bottom and right to a multiple of
  the window, then roll by minus the shift, and mask the 3 x 3 shift regions of the padded grid.
  timm rolls the unpadded map first and pads after it, yet cuts its regions on the padded grid
  too. Unless the padding is 0 or exactly the shift, the regions then miss the rolled rows:
  rows wrapped from the top share a region with rows from the bottom and attend to them. That
  is every stage of Swin-B on COCO's 1024 x 1024 crops (256, 128, 64, 32 rows; window 12,
  shift 6). The official checkpoints were trained in the official order, so the blocks here
  compute in it (``_OfficialOrderBlock``).
* The official blocks always use the full window, shifting every second block by half of it.
  timm shrinks the window and drops the shift where the map built from ``img_size`` is no larger
  than the window, unless ``always_partition=True``.
* The official patch embedding pads the image at the bottom and right to a multiple of the
  patch size; timm's ``PatchEmbed`` does so with ``dynamic_img_pad=True``, which
  ``SwinTransformer`` does not forward, hence a partial as its ``embed_layer``.
* ``dynamic_img_size=True`` lifts timm's input size check and builds the shift masks on each
  forward from the actual size, as the official code does; ``img_size`` then matters nowhere.
* Patch merging concatenates the 2 x 2 neighbours in the same order in both (rows 0/1 of
  column 0, then of column 1), and both index the relative position bias table alike, so
  official weights need no reordering (tests/test_timm_backbone.py checks both).
"""
import functools
from typing import Any, Dict

import torch
import torch.nn.functional as F
from timm.layers import PatchEmbed
from timm.models import model_entrypoint
from timm.models.swin_transformer import SwinTransformerBlock, window_partition, window_reverse
from torch import nn

__all__ = ["is_swin", "swin_create_kwargs", "use_official_window_order"]


def is_swin(name: str) -> bool:
    """Whether timm builds ``name`` (tags allowed) with its Swin v1 ``SwinTransformer``."""
    return model_entrypoint(name).__module__ == "timm.models.swin_transformer"


def swin_create_kwargs() -> Dict[str, Any]:
    """Extra ``timm.create_model`` arguments for official behaviour at any input size."""
    return {
        "dynamic_img_size": True,
        "always_partition": True,
        "embed_layer": functools.partial(PatchEmbed, dynamic_img_pad=True),
    }


class _OfficialOrderBlock(SwinTransformerBlock):
    """A timm Swin block whose window attention pads before the cyclic shift."""

    def _attn(self, x: torch.Tensor) -> torch.Tensor:
        """(B, H, W, C) -> (B, H, W, C)."""
        _, h, w, c = x.shape
        win_h, win_w = self.window_size
        x = F.pad(x, (0, 0, 0, -w % win_w, 0, -h % win_h))
        padded_h, padded_w = x.shape[1], x.shape[2]
        shift = tuple(self.shift_size)
        mask = None
        if any(shift):
            x = torch.roll(x, shifts=(-shift[0], -shift[1]), dims=(1, 2))
            mask = self.get_attn_mask(x)  # the regions of the padded grid, as official
        windows = window_partition(x, self.window_size).view(-1, self.window_area, c)
        windows = self.attn(windows, mask=mask).view(-1, win_h, win_w, c)
        x = window_reverse(windows, self.window_size, padded_h, padded_w)
        if any(shift):
            x = torch.roll(x, shifts=shift, dims=(1, 2))
        return x[:, :h, :w].contiguous()


def use_official_window_order(model: nn.Module) -> int:
    """Switch every timm Swin block of ``model`` to the official pad-then-shift order, in place.

    Only the forward changes (parameters, buffers and names stay), and the swapped class lives
    at module level, so the model still pickles and deep-copies. Returns the number of blocks.
    """
    count = 0
    for module in model.modules():
        if type(module) is SwinTransformerBlock:
            module.__class__ = _OfficialOrderBlock
            count += 1
    return count
