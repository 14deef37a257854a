"""Mask2Former's optimizer recipe: AdamW, per-group lr/decay, full-model gradient clipping."""
import itertools
from typing import Any, Dict, List

import torch
from detectron2.solver.build import maybe_add_gradient_clipping
from torch import nn

_NORMS = (
    nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm, nn.GroupNorm,
    nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d, nn.LayerNorm, nn.LocalResponseNorm,
)

# Swin's position tables: Mask2Former's build_optimizer exempts them from decay by name, as
# the Swin authors do (their no_weight_decay keywords).
_NO_DECAY_NAMES = ("relative_position_bias_table", "absolute_pos_embed")


def _param_groups(cfg, model: nn.Module) -> List[Dict[str, Any]]:
    """One group per parameter: backbone lr x BACKBONE_MULTIPLIER, decay WEIGHT_DECAY_NORM on
    norms, WEIGHT_DECAY_EMBED on embedding tables and none on Swin's position tables."""
    solver = cfg.SOLVER
    groups, seen = [], set()
    for module_name, module in model.named_modules():
        for name, param in module.named_parameters(recurse=False):
            if not param.requires_grad or param in seen:
                continue
            seen.add(param)
            group = {"params": [param], "lr": solver.BASE_LR, "weight_decay": solver.WEIGHT_DECAY}
            if "backbone" in module_name.split("."):
                group["lr"] *= solver.BACKBONE_MULTIPLIER
            if isinstance(module, _NORMS):
                group["weight_decay"] = solver.WEIGHT_DECAY_NORM
            if isinstance(module, nn.Embedding) or name == "level_embed":
                group["weight_decay"] = solver.WEIGHT_DECAY_EMBED
            if name in _NO_DECAY_NAMES:
                group["weight_decay"] = 0.0
            groups.append(group)
    return groups


def _with_full_model_clipping(optim_cls, clip_value: float, norm_type: float):
    class FullModelClipping(optim_cls):
        """Clips the gradient norm of all parameters together before each step."""

        def step(self, closure=None):
            params = itertools.chain(*(g["params"] for g in self.param_groups))
            torch.nn.utils.clip_grad_norm_(params, clip_value, norm_type)
            return super().step(closure=closure)

    return FullModelClipping


def clips_terms_separately(cfg) -> bool:
    """Whether the training loop clips the terms' gradient apart from the base loss's
    (MODEL.INST_UNIQUE.TERMS_CLIP_VALUE > 0; engine/term_clipping.py): the optimizer then
    clips nothing itself."""
    return cfg.MODEL.INST_UNIQUE.TERMS_CLIP_VALUE > 0


def build_optimizer(cfg, model: nn.Module) -> torch.optim.Optimizer:
    """SOLVER.OPTIMIZER "ADAMW" or "SGD"; SOLVER.CLIP_GRADIENTS with CLIP_TYPE "full_model"
    (Mask2Former's recipe) or detectron2's "value"/"norm"."""
    name = cfg.SOLVER.OPTIMIZER
    if name == "ADAMW":
        optim_cls, extra = torch.optim.AdamW, {}
    elif name == "SGD":
        optim_cls, extra = torch.optim.SGD, {"momentum": cfg.SOLVER.MOMENTUM,
                                             "nesterov": cfg.SOLVER.NESTEROV}
    else:
        raise ValueError(f"SOLVER.OPTIMIZER must be 'ADAMW' or 'SGD', got {name!r}")
    clip = cfg.SOLVER.CLIP_GRADIENTS
    if clip.ENABLED and clip.CLIP_TYPE == "full_model":
        # With TERMS_CLIP_VALUE the training loop clips instead (engine/term_clipping.py).
        if not clips_terms_separately(cfg):
            optim_cls = _with_full_model_clipping(optim_cls, clip.CLIP_VALUE, clip.NORM_TYPE)
    else:
        optim_cls = maybe_add_gradient_clipping(cfg, optim_cls)
    return optim_cls(_param_groups(cfg, model), lr=cfg.SOLVER.BASE_LR, **extra)
