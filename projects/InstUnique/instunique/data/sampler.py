"""A training data stream that is a pure function of (seed, iteration), so that a resumed
run continues it where it stopped instead of starting it again.

detectron2's TrainingSampler draws each epoch's permutation from one generator, its
loader groups images by aspect ratio in buffers filled as the stream goes, and the
augmentations draw from generators that each loader worker seeds once: the batch of
iteration k, and its augmentations, depend on everything drawn before k. Here:

* items are drawn per aspect group (landscape, and portrait or square, as detectron2's
  grouping; one group without DATALOADER.ASPECT_RATIO_GROUPING); group g's stream is the
  concatenation of permutations of its images, epoch e drawn from a generator seeded by
  (seed, g, e);
* every batch takes ``batch_size`` consecutive items of one group's stream; which group
  the j-th batch comes from is fixed per block of batches: the count per group in
  proportion to the group's size, their order within the block shuffled by (seed, block);
* batch j of the stream goes to iteration j // world_size on rank j % world_size;
* every item carries a key (seed, group, position in the group's stream); the dataset
  seeds the random generators of the mapper from it, so the augmentations do not depend
  on which loader worker, or which run, maps the item.

Seeking to an iteration is therefore O(1), whatever the iteration, and the batches of
an iteration do not depend on the number of loader workers.
"""
import logging
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
from detectron2.data import (
    DatasetFromList,
    build_detection_train_loader,
    get_detection_dataset_dicts,
)
from detectron2.utils import comm
from torch.utils.data import Dataset, Sampler

from ..rng import ORDER, PERMUTATION, SAMPLE, resolve_seed, seeded

__all__ = ["KeyedMapDataset", "ResumableTrainingSampler", "aspect_groups",
           "build_resumable_train_loader"]

Key = Tuple[int, ...]

# Batches per block of the group schedule. Within a block the order of the groups is
# random; across blocks each group gets its share of batches to within one.
BLOCK = 32


def aspect_groups(dataset_dicts: Sequence[Dict]) -> np.ndarray:
    """Per image, 0 where it is wider than high, 1 otherwise (detectron2's two groups)."""
    groups = np.zeros(len(dataset_dicts), dtype=np.int64)
    for i, d in enumerate(dataset_dicts):
        if "width" not in d or "height" not in d:
            raise ValueError(
                f"DATALOADER.ASPECT_RATIO_GROUPING needs the 'width' and 'height' of every "
                f"training image; image id {d.get('image_id')} ({d.get('file_name')}) lacks "
                f"them. Add them to the dataset, or set DATALOADER.ASPECT_RATIO_GROUPING False"
            )
        groups[i] = 0 if d["width"] > d["height"] else 1
    return groups


class ResumableTrainingSampler(Sampler):
    """Infinite stream of ``(dataset index, key)``, ``batch_size`` items per iteration of
    this process, from iteration :attr:`start_iter` on; see the module docstring.

    Consecutive runs of ``batch_size`` items form one batch of one group, so a loader
    must batch them as they come (``aspect_ratio_grouping=False``).
    """

    def __init__(self, groups: Sequence[int], batch_size: int, seed: int, *,
                 shuffle: bool = True, rank: Optional[int] = None,
                 world_size: Optional[int] = None):
        """
        Args:
            groups: the group of each dataset item, of at most two values (all equal: no
                grouping).
            batch_size: images per batch of one process.
            seed: the same in every process.
            rank, world_size: this process among those training; by default from
                torch.distributed.
        """
        super().__init__()
        groups = np.asarray(groups)
        if groups.size == 0:
            raise ValueError("ResumableTrainingSampler: the training set is empty")
        if batch_size <= 0:
            raise ValueError(f"ResumableTrainingSampler: batch_size must be > 0, got {batch_size}")
        self._members = [np.flatnonzero(groups == g) for g in np.unique(groups)]
        if len(self._members) > 2:
            raise ValueError(f"ResumableTrainingSampler: at most two groups (detectron2's "
                             f"aspect ratio groups), got {len(self._members)}")
        self._size = int(groups.size)
        self.batch_size = int(batch_size)
        self.shuffle = shuffle
        self.rank = comm.get_rank() if rank is None else rank
        self.world_size = comm.get_world_size() if world_size is None else world_size
        self.seed = int(seed)
        self.start_iter = 0
        self._perms: Dict[Tuple[int, int], np.ndarray] = {}

    def start_at(self, iteration: int, seed: Optional[int] = None) -> None:
        """Make the stream begin with the batch of ``iteration`` (and, if given, follow
        ``seed``). Takes effect at the next ``iter()``."""
        self.start_iter = int(iteration)
        if seed is not None and int(seed) != self.seed:
            self.seed = int(seed)
            self._perms.clear()

    def __iter__(self):
        iteration = self.start_iter
        while True:
            yield from self.batch(iteration)
            iteration += 1

    def batch(self, iteration: int) -> List[Tuple[int, Key]]:
        """The ``(dataset index, key)`` pairs of this process's batch of ``iteration``."""
        group, ordinal = self._locate(iteration * self.world_size + self.rank)
        first = ordinal * self.batch_size
        return [self._item(group, q) for q in range(first, first + self.batch_size)]

    def _locate(self, j: int) -> Tuple[int, int]:
        # Batch j of the whole stream -> (its group, how many batches of that group precede).
        if len(self._members) == 1:
            return 0, j
        block, i = divmod(j, BLOCK)
        before = self._group0_batches(block * BLOCK)
        in_block = self._group0_batches((block + 1) * BLOCK) - before
        order = np.repeat([0, 1], [in_block, BLOCK - in_block])
        np.random.default_rng([ORDER, self.seed, block]).shuffle(order)
        group = int(order[i])
        earlier = int(np.count_nonzero(order[:i] == group))
        return group, earlier + (before if group == 0 else block * BLOCK - before)

    def _group0_batches(self, batches: int) -> int:
        # Of the first ``batches`` batches, those of group 0: its share of the images,
        # rounded down, so that both groups' counts only ever grow.
        return batches * len(self._members[0]) // self._size

    def _item(self, group: int, q: int) -> Tuple[int, Key]:
        members = self._members[group]
        epoch, offset = divmod(q, len(members))
        index = members[self._perm(group, epoch)[offset]] if self.shuffle else members[offset]
        return int(index), (SAMPLE, self.seed, group, q)

    def _perm(self, group: int, epoch: int) -> np.ndarray:
        key = (group, epoch)
        if key not in self._perms:
            if len(self._perms) >= 4:  # a batch spans at most two epochs of one group
                self._perms.pop(next(iter(self._perms)))
            rng = np.random.default_rng([PERMUTATION, self.seed, group, epoch])
            self._perms[key] = rng.permutation(len(self._members[group]))
        return self._perms[key]


class KeyedMapDataset(Dataset):
    """Dataset dicts mapped by ``mapper`` under generators seeded by the sampler's key:
    ``dataset[(index, key)]`` is ``mapper(dicts[index])`` with random draws that depend on
    ``key`` alone."""

    def __init__(self, dataset_dicts: Sequence[Dict], mapper):
        # Serialised like detectron2's loaders do, so that forked workers share the dicts
        # instead of copying them page by page as Python touches reference counts.
        self._dicts = DatasetFromList(list(dataset_dicts), copy=False)
        self._mapper = mapper

    def __len__(self) -> int:
        return len(self._dicts)

    def __getitem__(self, item: Tuple[int, Key]) -> Dict:
        index, key = item
        with seeded(key):
            mapped = self._mapper(self._dicts[index])
        if mapped is None:
            # detectron2's MapDataset would retry another image drawn at random, which a
            # resumed run could not repeat.
            raise ValueError(f"the training mapper returned None for dataset item {index}")
        return mapped


def build_resumable_train_loader(cfg, mapper):
    """detectron2's training loader over DATASETS.TRAIN, fed by a
    :class:`ResumableTrainingSampler` (seeded by cfg.SEED, or a shared random seed where
    it is negative) and a :class:`KeyedMapDataset`. The sampler is the loader's
    ``resumable_sampler``: move it with ``start_at`` before the loader is iterated."""
    dicts = get_detection_dataset_dicts(
        cfg.DATASETS.TRAIN,
        filter_empty=cfg.DATALOADER.FILTER_EMPTY_ANNOTATIONS,
        min_keypoints=cfg.MODEL.ROI_KEYPOINT_HEAD.MIN_KEYPOINTS_PER_IMAGE
        if cfg.MODEL.KEYPOINT_ON else 0,
        proposal_files=cfg.DATASETS.PROPOSAL_FILES_TRAIN if cfg.MODEL.LOAD_PROPOSALS else None,
    )
    world_size = comm.get_world_size()
    if cfg.SOLVER.IMS_PER_BATCH % world_size:
        raise ValueError(f"SOLVER.IMS_PER_BATCH ({cfg.SOLVER.IMS_PER_BATCH}) must be a "
                         f"multiple of the number of processes ({world_size})")
    batch_size = cfg.SOLVER.IMS_PER_BATCH // world_size
    grouping = cfg.DATALOADER.ASPECT_RATIO_GROUPING
    groups = aspect_groups(dicts) if grouping else np.zeros(len(dicts), dtype=np.int64)
    sampler = ResumableTrainingSampler(groups, batch_size, resolve_seed(cfg))
    logging.getLogger(__name__).info(
        f"Training data: {len(dicts)} images, seed {sampler.seed}, "
        f"{'grouped by aspect ratio, ' if grouping else ''}{batch_size} per batch and process"
    )
    loader = build_detection_train_loader(
        KeyedMapDataset(dicts, mapper), mapper=None, sampler=sampler,
        total_batch_size=cfg.SOLVER.IMS_PER_BATCH, aspect_ratio_grouping=False,
        num_workers=cfg.DATALOADER.NUM_WORKERS,
        # A generator of the loader's own: without one, starting the loader draws from the
        # global generator, at iteration 0 in one run and at the resumed iteration in
        # the other.
        seed=sampler.seed,
    )
    loader.resumable_sampler = sampler
    return loader

