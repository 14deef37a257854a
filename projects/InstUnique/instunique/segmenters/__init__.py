"""Base segmenters InstUnique can train, each with its adapter."""
from . import (
    mask2former,  # noqa: F401
    sparseinst,  # noqa: F401
)
