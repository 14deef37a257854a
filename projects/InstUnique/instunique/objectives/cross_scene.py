"""Cross-scene decoding: the cross-image term as the paper's released Mask2Former code has it.

JamesLiang819/Instance_Unique_Querying, commit 6ab0740 ("first update mm based", deleted in
05d3324 the same day), ``mm/mmdet/models/dense_heads/mask2former_head_contrast.py`` and
``maskformer_head_contrast.py``: image b's queries are decoded on the detached features of
image b of the *previous* training batch (a bank of one batch; at the first step, the
batch's own), and the base set loss supervises those predictions with that image's ground
truth: Hungarian matching as the base matcher does it, mask BCE and dice on sampled points,
the class loss dropped; the last prediction weighted 1/3, auxiliary prediction i by
(i + 1) / 50. Nothing pushes towards zero: a query must find the objects of any image it
reads, from what it learned on its own.

The base segmenter's adapter does the decoding (``scene``, ``decode_across``), so this
module knows no model.
"""
from typing import Dict, List, Optional

import torch
from torch import nn

from ..adapter import SegmenterAdapter, SegmenterOutputs

__all__ = ["CrossSceneLoss"]

_AUX_WEIGHT_DIVISOR = 50.0  # aux prediction i: (i + 1) / 50 (released code)
_LAST_WEIGHT = 1.0 / 3.0  # last prediction (released code)


class CrossSceneLoss(nn.Module):
    """The term and its bank of one batch (checkpointed with the model, so a resumed run
    decodes on what the uninterrupted one would have)."""

    is_training_state = True  # the bank (see PixelMemory)

    def __init__(self, *, weight: float):
        super().__init__()
        self.weight = weight
        self._bank: Optional[Dict] = None  # {"scene": ..., "targets": [...]} of one batch

    @staticmethod
    def check_adapter(adapter: SegmenterAdapter) -> None:
        if not adapter.decodes_across_scenes:
            raise ValueError(
                'MODEL.INST_UNIQUE.CROSS_IMAGE.MODE "cross_scene" needs a base segmenter whose '
                f"adapter decodes one batch's queries on another's features; "
                f"{type(adapter).__name__} does not (Mask2Former's does)"
            )

    def forward(self, adapter: SegmenterAdapter, outputs: SegmenterOutputs,
                targets: List[Dict]) -> Dict[str, torch.Tensor]:
        """
        Args:
            outputs, targets: this batch's forward and its targets ({"labels", "masks"}).
        Returns:
            {"loss_cross_image_mask": ..., "loss_cross_image_dice": ..., and per auxiliary
            prediction i "..._{i}"}, weighted; then this batch becomes the bank.
        """
        scene = adapter.scene(outputs.raw)
        if self._bank is None:  # the first step: the batch's own features, as released
            self._bank = {"scene": scene, "targets": _detached(targets)}
        device = outputs.pixel_embeds.device
        bank_targets = [_to(t, device) for t in self._bank["targets"]]
        raw = adapter.decode_across(outputs.raw, _to(self._bank["scene"], device))
        n = raw["pred_logits"].shape[0]
        losses, _ = adapter.base_losses(raw, bank_targets[:n], mask_only=True)
        out = {}
        for key, value in losses.items():
            stem, _, layer = key.rpartition("_")
            if layer.isdigit():
                weight = (int(layer) + 1) / _AUX_WEIGHT_DIVISOR
                name = f"loss_cross_image_{stem[len('loss_'):]}_{layer}"
            else:
                weight, name = _LAST_WEIGHT, f"loss_cross_image_{key[len('loss_'):]}"
            out[name] = value * (weight * self.weight)
        self._bank = {"scene": scene, "targets": _detached(targets)}
        return out

    def get_extra_state(self):
        return self._bank

    def set_extra_state(self, state):
        self._bank = state


def _detached(targets: List[Dict]) -> List[Dict]:
    return [{k: v.detach() for k, v in t.items()} for t in targets]


def _to(tensors: Dict[str, torch.Tensor], device) -> Dict[str, torch.Tensor]:
    # A bank restored from a checkpoint lies on the CPU.
    return {k: v.to(device) for k, v in tensors.items()}
