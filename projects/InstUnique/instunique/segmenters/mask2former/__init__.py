from . import adapter  # noqa: F401  (registers Mask2FormerAdapter)
from .config import add_mask2former_config
from .head import MaskFormerHead
from .meta_arch import Mask2Former

__all__ = ["Mask2Former", "MaskFormerHead", "add_mask2former_config"]
