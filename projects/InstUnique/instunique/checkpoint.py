"""A DetectionCheckpointer that never leaves a half-written file behind, resumes from the
newest checkpoint it can read, and says what it could not load."""
import os
import re
from typing import Any, Dict, List

import torch
from detectron2.checkpoint import DetectionCheckpointer

# What _atomic_write leaves behind when the process dies mid-write.
_TEMPORARY = re.compile(r"^(?:.+\.pth|last_checkpoint)\.tmp\.\d+$")
# The files DefaultTrainer's PeriodicCheckpointer writes: the candidates of a fallback.
_PERIODIC = re.compile(r"^model_(?:\d+|final)\.pth$")


class UnreadableCheckpointError(ValueError):
    """A checkpoint file that torch cannot read; raised before any state is loaded."""


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
    finds a complete file; a file damaged otherwise (a full disk, a copy cut short) is
    passed over by :meth:`resume_or_load` for the newest one that reads.
    """

    # What a message blames for the file being loaded; :meth:`load` sets it.
    _source = "MODEL.WEIGHTS"

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

    def load(self, path: str, *args, source: str = "MODEL.WEIGHTS", **kwargs):
        """detectron2's load; ``source``, where ``path`` comes from, heads the messages of
        a missing or unreadable file."""
        # A missing local file would otherwise be skipped with only a log line. A query
        # ("x.pth?matching_heuristics=True") is an option for detectron2's loader.
        local = path.split("?", 1)[0]
        if path and "://" not in path and not os.path.isfile(local):
            raise FileNotFoundError(f"{source}: checkpoint file not found: {local}")
        self._source = source
        try:
            return super().load(path, *args, **kwargs)
        finally:
            self._source = type(self)._source
            # detectron2 clears this only after a load that succeeded, and asserts it is
            # clear when the next one starts: the fallback's next try would fail.
            self._parsed_url_during_load = None

    def _load_file(self, f: str):
        try:
            return super()._load_file(f)
        except Exception as e:  # torch, pickle and zipfile each raise their own types
            first_line = (str(e).splitlines() or [""])[0]
            raise UnreadableCheckpointError(
                f"{self._source}: {f} is not a readable checkpoint (truncated, corrupt, or not "
                f"a PyTorch / detectron2 file): {type(e).__name__}: {first_line}"
            ) from e

    def last_checkpoint_file(self) -> str:
        """The checkpoint ``save_dir/last_checkpoint`` names.

        Raises:
            FileNotFoundError: naming ``last_checkpoint``, if that file is not there.
        """
        tag = os.path.join(self.save_dir, "last_checkpoint")
        path = self.get_checkpoint_file()
        if not os.path.isfile(path):
            name = os.path.basename(path)
            what = f"names {name!r}, which is not in {self.save_dir}" if name else "is empty"
            raise FileNotFoundError(f"{tag} {what}. Point it at a checkpoint there, or "
                                    f"delete it to start from MODEL.WEIGHTS")
        return path

    def resume_or_load(self, path: str, *, resume: bool = True) -> Dict[str, Any]:
        """detectron2's resume_or_load, except that a last checkpoint torch cannot read is
        passed over, with a warning naming it, for the newest readable checkpoint of
        ``save_dir`` (by modification time).

        Raises:
            FileNotFoundError: ``last_checkpoint`` names a file that is not there.
            UnreadableCheckpointError: no checkpoint of ``save_dir`` is readable.
        """
        if not (resume and self.has_checkpoint()):
            return self.load(path, checkpointables=[])
        source = os.path.join(self.save_dir, "last_checkpoint")
        tagged = self.last_checkpoint_file()
        tried = []
        for candidate in [tagged, *self._previous_checkpoints(tagged)]:
            try:
                return self.load(candidate, source=source)
            except UnreadableCheckpointError as e:
                # Raised before anything was loaded: the next candidate starts clean.
                tried.append(candidate)
                cause = e.__cause__ if e.__cause__ is not None else e
                self.logger.warning(
                    f"Cannot resume from {candidate}: not a readable checkpoint "
                    f"({type(cause).__name__}: {(str(cause).splitlines() or [''])[0]}); "
                    f"trying the previous checkpoint"
                )
        raise UnreadableCheckpointError(
            f"{source}: no checkpoint of {self.save_dir} is readable (tried "
            f"{', '.join(os.path.basename(p) for p in tried)}); delete {source} to start "
            f"from MODEL.WEIGHTS"
        )

    def _previous_checkpoints(self, tagged: str) -> List[str]:
        # Newest first. Ties (a coarse file system clock) go by name, descending: a later
        # iteration first, and model_final, written last, before all.
        names = [n for n in os.listdir(self.save_dir)
                 if _PERIODIC.match(n) and n != os.path.basename(tagged)]
        paths = [os.path.join(self.save_dir, n) for n in names]
        return sorted(paths, key=lambda p: (os.path.getmtime(p), p), reverse=True)

    def remove_stale_temporaries(self) -> List[str]:
        """Delete the temporary files of saves that died mid-write (``*.pth.tmp.<pid>``,
        ``last_checkpoint.tmp.<pid>``) from ``save_dir``; only in the process that saves,
        and only when no other process is saving there (at the start of training).
        Returns the deleted paths."""
        if not self.save_dir or not self.save_to_disk or not os.path.isdir(self.save_dir):
            return []
        removed = []
        for name in sorted(os.listdir(self.save_dir)):
            # This process's own pid is no exception: it saves nothing yet, and a restarted
            # container may well reuse the pid of the one that died.
            if _TEMPORARY.match(name):
                try:
                    os.remove(os.path.join(self.save_dir, name))
                except FileNotFoundError:  # removed by someone else meanwhile
                    continue
                removed.append(os.path.join(self.save_dir, name))
        if removed:
            self.logger.warning(f"Removed temporary files of interrupted checkpoint saves: "
                                f"{', '.join(removed)}")
        return removed

    def _load_model(self, checkpoint):
        # Kept so that evaluation can refuse weights that leave parameters at random.
        self.incompatible = super()._load_model(checkpoint)
        return self.incompatible

    def unloaded_keys(self) -> List[str]:
        """Model state the last :meth:`load` left untouched (missing or of another shape),
        except entries of modules that say they are training state (``is_training_state``:
        the pixel memory, the cross-scene bank), which a run rebuilds as it trains."""
        incompatible = getattr(self, "incompatible", None)
        if incompatible is None:
            return []
        modules = [(name, m) for name, m in self.model.named_modules()
                   if name and getattr(m, "is_training_state", False)]
        # By module path, and by tensor: a model may save a module's state under other
        # names (InstUnique saves cross_image.memory.* as memory.*).
        prefixes = tuple(f"{name}." for name, _ in modules)
        tensors = {id(t) for _, m in modules for t in m.state_dict(keep_vars=True).values()
                   if isinstance(t, torch.Tensor)}
        renamed = {k for k, t in self.model.state_dict(keep_vars=True).items()
                   if id(t) in tensors}
        keys = list(incompatible.missing_keys)
        keys += [k for k, *_ in incompatible.incorrect_shapes if k not in keys]
        return [k for k in keys if not k.startswith(prefixes) and k not in renamed]
