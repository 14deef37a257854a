from . import adapter  # noqa: F401  (registers Mask2FormerAdapter)
from .config import add_mask2former_config
from .head import HEAD_ALIASES, InstUniqueMaskFormerHead, build_mask2former_head
from .meta_arch import Mask2Former

__all__ = [
    "HEAD_ALIASES",
    "InstUniqueMaskFormerHead",
    "Mask2Former",
    "add_mask2former_config",
    "build_mask2former_head",
]
