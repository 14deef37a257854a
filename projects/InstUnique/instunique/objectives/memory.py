"""The external pixel memory of cross-image querying (paper Eq. 5, supp. Table S4)."""
from typing import Tuple

import torch
import torch.distributed as dist
from torch import nn


class PixelMemory(nn.Module):
    """A FIFO queue of detached pixel embeddings with their semantic labels and image ids.

    Capacity is counted in pixels. The queue is model state: its buffers are saved in
    checkpoints and restored on resume, so training continues on the same queue.
    Under torch.distributed every process enqueues the pixels of all processes, so the
    replicas hold identical queues.
    """

    #: state a run builds while it trains, not weights: a checkpoint without it still loads
    #: for evaluation (``AtomicCheckpointer.unloaded_keys``).
    is_training_state = True

    def __init__(self, capacity: int, dim: int):
        super().__init__()
        if capacity < 0:
            raise ValueError(f"memory capacity must be >= 0, got {capacity}")
        self.capacity = capacity
        self.register_buffer("feats", torch.zeros(capacity, dim))
        # -1: no label / no image.
        self.register_buffer("labels", torch.full((capacity,), -1, dtype=torch.long))
        self.register_buffer("image_ids", torch.full((capacity,), -1, dtype=torch.long))
        # Next slot to write and number of filled slots.
        self.register_buffer("ptr", torch.zeros((), dtype=torch.long))
        self.register_buffer("size", torch.zeros((), dtype=torch.long))

    def __len__(self) -> int:
        return int(self.size)

    def contents(self) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Stored entries, oldest first: feats (N, C), labels (N,), image_ids (N,)."""
        n = len(self)
        order = (self.ptr - n + torch.arange(n, device=self.ptr.device)) % max(self.capacity, 1)
        return self.feats[order], self.labels[order], self.image_ids[order]

    @torch.no_grad()
    def enqueue(self, feats: torch.Tensor, labels: torch.Tensor, image_ids: torch.Tensor):
        """Append (N, C) feats with (N,) labels and image ids, dropping the oldest entries.

        Call it after the loss that reads the memory has been computed, with the same
        arguments on every process.
        """
        dim = self.feats.shape[1]
        if feats.dim() != 2 or feats.shape[1] != dim:
            raise ValueError(
                f"PixelMemory.enqueue: feats must have shape (N, {dim}), got {tuple(feats.shape)}"
            )
        for name, t in (("labels", labels), ("image_ids", image_ids)):
            if tuple(t.shape) != (feats.shape[0],):
                raise ValueError(
                    f"PixelMemory.enqueue: {name} must have shape ({feats.shape[0]},) like the "
                    f"rows of feats, got {tuple(t.shape)}"
                )
        if self.capacity == 0:
            return
        feats, labels, image_ids = (
            _all_gather_rows(t.detach()) for t in (feats.float(), labels, image_ids)
        )
        n = feats.shape[0]
        if n >= self.capacity:
            feats, labels, image_ids = (t[-self.capacity:] for t in (feats, labels, image_ids))
            n = self.capacity
        slots = (self.ptr + torch.arange(n, device=self.ptr.device)) % self.capacity
        self.feats[slots] = feats.to(self.feats.dtype)
        self.labels[slots] = labels.to(self.labels)
        self.image_ids[slots] = image_ids.to(self.image_ids)
        self.ptr.copy_((self.ptr + n) % self.capacity)
        self.size.copy_(torch.clamp(self.size + n, max=self.capacity))

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        keys = {name: prefix + name for name in ("feats", "labels", "image_ids", "ptr", "size")}
        saved = state_dict.get(keys["feats"])
        if saved is None:
            # A loader that drops shape-mismatched buffers (detectron2's checkpointer does,
            # when MEMORY_PIXELS changed) would leave ptr/size describing a queue that is
            # not there -- possibly longer than this one. Start empty instead.
            state_dict.pop(keys["ptr"], None)
            state_dict.pop(keys["size"], None)
        elif saved.shape[0] != self.capacity and all(k in state_dict for k in keys.values()):
            self._repack(state_dict, keys)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def _repack(self, state_dict, keys):
        """Rewrite a queue saved with another capacity into this one's: newest entries kept."""
        old_capacity = state_dict[keys["feats"]].shape[0]
        old_size, old_ptr = int(state_dict[keys["size"]]), int(state_dict[keys["ptr"]])
        n = min(old_size, self.capacity)
        order = (old_ptr - n + torch.arange(n)) % max(old_capacity, 1)  # oldest first
        for name, fill in (("feats", 0), ("labels", -1), ("image_ids", -1)):
            old = state_dict[keys[name]]
            new = torch.full((self.capacity, *old.shape[1:]), fill, dtype=old.dtype)
            new[:n] = old[order.to(old.device)].cpu()
            state_dict[keys[name]] = new
        state_dict[keys["ptr"]] = torch.tensor(n % max(self.capacity, 1))
        state_dict[keys["size"]] = torch.tensor(n)

    def extra_repr(self) -> str:
        return f"capacity={self.capacity}, dim={self.feats.shape[1]}"


def _all_gather_rows(t: torch.Tensor) -> torch.Tensor:
    """Concatenate the rows of ``t`` from every process, in rank order."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return t
    world = dist.get_world_size()
    count = torch.tensor([t.shape[0]], device=t.device)
    counts = [torch.zeros_like(count) for _ in range(world)]
    dist.all_gather(counts, count)
    counts = [int(c) for c in counts]
    padded = t.new_zeros((max(counts), *t.shape[1:]))
    padded[: t.shape[0]] = t
    gathered = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(gathered, padded)
    return torch.cat([g[:c] for g, c in zip(gathered, counts)])
