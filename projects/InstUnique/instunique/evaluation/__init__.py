from .builders import build_dataset_evaluators, model_outputs
from .uniqueness import (
    QueryUniquenessEvaluator,
    count_duplicates,
    count_merges_and_splits,
    external_firing,
)

__all__ = [
    "QueryUniquenessEvaluator",
    "build_dataset_evaluators",
    "count_duplicates",
    "count_merges_and_splits",
    "external_firing",
    "model_outputs",
]
