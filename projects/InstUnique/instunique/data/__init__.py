from . import datasets  # noqa: F401  (registers shapes_train / shapes_val)
from .instance_mapper import InstanceViewMapper
from .paired_mapper import PairedViewMapper

__all__ = ["InstanceViewMapper", "PairedViewMapper"]
