"""A DetectionCheckpointer that never leaves a half-written file behind and says what it
could not load."""
import os
from typing import List

import torch
from detectron2.checkpoint import DetectionCheckpointer


def _atomic_write(path: str, write, mode: str):
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, mode) as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


class AtomicCheckpointer(DetectionCheckpointer):
    """Writes checkpoints and ``last_checkpoint`` to a temporary file, then renames it.

    A crash while saving leaves the previous checkpoint and tag intact, so ``--resume``
    always finds a complete file.
    """

    def save(self, name: str, **kwargs) -> None:
        if not self.save_dir or not self.save_to_disk:
            return
        data = {"model": self.model.state_dict()}
        data.update({key: obj.state_dict() for key, obj in self.checkpointables.items()})
        data.update(kwargs)
        basename = f"{name}.pth"
        path = os.path.join(self.save_dir, basename)
        self.logger.info(f"Saving checkpoint to {path}")
        _atomic_write(path, lambda f: torch.save(data, f), "wb")
        self.tag_last_checkpoint(basename)

    def tag_last_checkpoint(self, last_filename_basename: str) -> None:
        path = os.path.join(self.save_dir, "last_checkpoint")
        _atomic_write(path, lambda f: f.write(last_filename_basename), "w")

    def load(self, path: str, *args, **kwargs):
        # A missing local file would otherwise be skipped with only a log line. A query
        # ("x.pth?matching_heuristics=True") is an option for detectron2's loader.
        local = path.split("?", 1)[0]
        if path and "://" not in path and not os.path.isfile(local):
            raise FileNotFoundError(f"MODEL.WEIGHTS: checkpoint file not found: {local}")
        return super().load(path, *args, **kwargs)

    def _load_file(self, f: str):
        try:
            return super()._load_file(f)
        except Exception as e:  # torch, pickle and zipfile each raise their own types
            raise ValueError(
                f"MODEL.WEIGHTS: {f} is not a readable checkpoint (truncated, corrupt, or not "
                f"a PyTorch / detectron2 file): {type(e).__name__}: {str(e).splitlines()[0]}"
            ) from e

    def _load_model(self, checkpoint):
        # Kept so that evaluation can refuse weights that leave parameters at random.
        self.incompatible = super()._load_model(checkpoint)
        return self.incompatible

    def unloaded_keys(self, ignore_modules=()) -> List[str]:
        """Model state the last :meth:`load` left untouched (missing or of another shape),
        except entries of modules of the ``ignore_modules`` types."""
        incompatible = getattr(self, "incompatible", None)
        if incompatible is None:
            return []
        ignored = tuple(
            f"{name}." for name, m in self.model.named_modules()
            if name and isinstance(m, tuple(ignore_modules))
        )
        keys = list(incompatible.missing_keys)
        keys += [k for k, *_ in incompatible.incorrect_shapes if k not in keys]
        return [k for k in keys if not k.startswith(ignored)]
