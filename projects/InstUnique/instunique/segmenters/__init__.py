"""Base segmenters InstUnique can train, each with its adapter."""
from . import (
    condinst,  # noqa: F401
    mask2former,  # noqa: F401
    sparseinst,  # noqa: F401
)
