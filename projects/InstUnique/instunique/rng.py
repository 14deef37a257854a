"""Random number generators seeded from keys, so that a draw depends on what it is for
(a training step, a sample of the data stream) and not on how many draws came before.

That is what makes a resumed run repeat an uninterrupted one: a key can be recomputed
from the seed and a position, while a generator's history cannot.
"""
import contextlib
import random
from typing import Iterator, Sequence

import numpy as np
import torch
from detectron2.utils import comm

__all__ = ["STEP", "SAMPLE", "ORDER", "PERMUTATION", "resolve_seed", "seed_all", "seeded"]

# First word of a key: what the draws are for, so that the generators of a step, of a
# sample, of the order of groups and of an epoch's permutation are unrelated even where
# the other words coincide (SeedSequence reads a missing word as a zero).
STEP, SAMPLE, ORDER, PERMUTATION = 1, 2, 3, 4


def resolve_seed(cfg) -> int:
    """cfg.SEED, or where it is negative (detectron2's "random") a random seed that every
    process shares."""
    if cfg.SEED >= 0:
        return int(cfg.SEED)
    return int(comm.shared_random_seed())


def _seed(key: Sequence[int], seed_torch) -> None:
    # SeedSequence hashes the key: neighbouring keys give unrelated generators.
    words = np.random.SeedSequence([int(k) for k in key]).generate_state(6, np.uint32)
    random.seed(int(words[0]) << 32 | int(words[1]))
    np.random.seed(words[2:4])
    seed_torch(int(words[4]) << 32 | int(words[5]))


def seed_all(key: Sequence[int]) -> None:
    """Seed python's ``random``, numpy's global generator and torch (CPU and every CUDA
    device) from the integers of ``key``."""
    _seed(key, torch.manual_seed)


@contextlib.contextmanager
def seeded(key: Sequence[int]) -> Iterator[None]:
    """Within the block, python's ``random``, numpy's global generator and torch's CPU
    generator are seeded from ``key``; afterwards they are back where they were.

    Restoring matters when the block runs in the training process (a loader without
    workers): the data must not move the generators the training step draws from. CUDA
    generators are left alone, as data code does not use them.
    """
    states = random.getstate(), np.random.get_state(), torch.get_rng_state()
    _seed(key, torch.default_generator.manual_seed)
    try:
        yield
    finally:
        random.setstate(states[0])
        np.random.set_state(states[1])
        torch.set_rng_state(states[2])
