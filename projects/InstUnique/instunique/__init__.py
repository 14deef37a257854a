"""InstUnique: instance-unique querying (NeurIPS 2022) for query-based segmenters.

Importing the package registers the meta-architectures, heads, adapters and datasets.
"""
from . import (
    backbones,  # noqa: F401  (registers the EfficientNet-Lite0 and timm backbones)
    data,  # noqa: F401  (registers the built-in datasets)
    segmenters,  # noqa: F401  (registers the base segmenters and their adapters)
)
from .config import add_instunique_config, load_config
from .meta_arch import InstUnique

__all__ = ["InstUnique", "add_instunique_config", "load_config"]
