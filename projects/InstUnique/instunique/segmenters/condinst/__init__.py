"""CondInst (Tian et al., ECCV 2020) as an InstUnique base segmenter, in pure PyTorch.

Importing it registers the CondInst meta-architecture and the
build_fcos_resnet_fpn_backbone / build_fcos_efficientnet_lite0_fpn_backbone backbones.
"""
from . import (
    adapter,  # noqa: F401  (registers CondInstAdapter)
    backbone,  # noqa: F401  (registers the FCOS FPN backbones)
)
from .config import add_condinst_config
from .dynamic_head import (
    DynamicMaskHead,
    dynamic_mask_logits,
    mask_logits_on_grid,
    relative_coords,
    split_dynamic_params,
)
from .fcos_head import FCOS, FCOSHead
from .mask_branch import MaskBranch, aligned_bilinear
from .meta_arch import CONDINST_PROPOSAL_GENERATOR_REGISTRY, CondInst

__all__ = [
    "CONDINST_PROPOSAL_GENERATOR_REGISTRY",
    "FCOS",
    "CondInst",
    "DynamicMaskHead",
    "FCOSHead",
    "MaskBranch",
    "add_condinst_config",
    "aligned_bilinear",
    "dynamic_mask_logits",
    "mask_logits_on_grid",
    "relative_coords",
    "split_dynamic_params",
]
