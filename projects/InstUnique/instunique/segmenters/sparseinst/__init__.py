"""SparseInst as an InstUnique base segmenter."""
from . import (
    adapter,  # noqa: F401  (registers SparseInstAdapter)
    resnet_vd,  # noqa: F401  (registers build_resnet_vd_backbone)
)
from .config import add_sparseinst_config
from .criterion import SPARSE_INST_CRITERION_REGISTRY, SparseInstCriterion
from .decoder import SPARSE_INST_DECODER_REGISTRY, GroupIAMDecoder
from .encoder import SPARSE_INST_ENCODER_REGISTRY, InstanceContextEncoder
from .matcher import SPARSE_INST_MATCHER_REGISTRY, SparseInstMatcher
from .meta_arch import SparseInst

__all__ = [
    "SPARSE_INST_CRITERION_REGISTRY",
    "SPARSE_INST_DECODER_REGISTRY",
    "SPARSE_INST_ENCODER_REGISTRY",
    "SPARSE_INST_MATCHER_REGISTRY",
    "GroupIAMDecoder",
    "InstanceContextEncoder",
    "SparseInst",
    "SparseInstCriterion",
    "SparseInstMatcher",
    "add_sparseinst_config",
]
