"""Quantities that every process of a distributed run must agree on."""
from typing import Dict, List

import torch
from detectron2.utils import comm


def average_num_masks(targets: List[Dict], device) -> float:
    """Target masks per process, averaged over processes, at least 1: the divisor of a set
    criterion's mask losses (and of Eq. 5's "per_query" normalisation, to weigh alike)."""
    count = torch.tensor(float(sum(len(t["labels"]) for t in targets)), device=device)
    world = comm.get_world_size()
    if world > 1:
        torch.distributed.all_reduce(count)
    return max(count.item() / world, 1.0)
