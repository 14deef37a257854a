"""A readable error for a matching cost with NaN or inf, shared by the segmenters' matchers.

scipy's ``linear_sum_assignment`` rejects such a matrix with "matrix contains invalid
numeric entries", which names neither the prediction nor the cause. The check runs on the
numpy matrix the matcher hands to scipy anyway, so it costs no extra device sync; only
after a failure are the outputs searched for the culprit.
"""
from typing import Dict

import numpy as np
import torch
from torch import Tensor

__all__ = ["check_cost_finite"]


def _nonfinite_outputs(outputs: Dict[str, Tensor], image: int) -> str:
    found = []
    for key, value in outputs.items():
        if not isinstance(value, Tensor) or value.dim() == 0 or image >= value.shape[0]:
            continue
        value = value[image]
        if torch.isnan(value).any():
            found.append(f"{key!r} has NaN")
        elif torch.isinf(value).any():
            found.append(f"{key!r} has inf")
    return ", ".join(found)


def check_cost_finite(cost: np.ndarray, outputs: Dict[str, Tensor], image: int) -> None:
    """Raise FloatingPointError if ``cost`` (image ``image`` of the batch) is not finite,
    naming the model outputs with NaN or inf in that image."""
    if np.isfinite(cost).all():
        return
    culprits = _nonfinite_outputs(outputs, image)
    cause = (f"model output {culprits}" if culprits
             else "the model outputs are finite, but the costs computed from them are not")
    raise FloatingPointError(
        f"matching cost of image {image} of the batch is not finite: {cause}; training "
        "has diverged (a too high SOLVER.BASE_LR is the usual cause) or the input is broken"
    )
