from .uniqueness import (
    QueryUniquenessEvaluator,
    count_duplicates,
    count_merges_and_splits,
    external_firing,
)

__all__ = [
    "QueryUniquenessEvaluator",
    "count_duplicates",
    "count_merges_and_splits",
    "external_firing",
]
