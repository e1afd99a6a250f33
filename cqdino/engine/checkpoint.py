"""Checkpoints that are never half-written, and a periodic hook that saves every rank's state.

``AtomicCheckpointer`` writes ``<name>.pth`` and ``last_checkpoint`` to a temporary file in the
same folder, flushes it to disk and renames it into place, so a run killed at any moment leaves
``last_checkpoint`` naming a complete file (at worst the previous one). Checkpoints load with
``torch.load(weights_only=True)``; a foreign file that needs more (pickled objects) is loaded
with ``weights_only=False`` after a warning.
"""

import glob
import io
import logging
import os
import pickle
from typing import Any, Callable

import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.engine import hooks
from detectron2.utils import comm

from cqdino.utils.io import atomic_write

__all__ = ["AtomicCheckpointer", "PeriodicCheckpointer", "atomic_write"]

logger = logging.getLogger(__name__)


class AtomicCheckpointer(DetectionCheckpointer):
    """``DetectionCheckpointer`` with atomic writes of the checkpoint and ``last_checkpoint``."""

    def __init__(self, model, save_dir: str = "", *, save_to_disk=None, **checkpointables):
        super().__init__(model, save_dir, save_to_disk=save_to_disk, **checkpointables)
        if self.save_to_disk and save_dir:
            for stale in glob.glob(os.path.join(save_dir, ".*.tmp")):  # from a killed run
                os.remove(stale)

    def save(self, name: str, **kwargs: Any) -> None:
        if not self.save_dir or not self.save_to_disk:
            return
        data = {"model": self.model.state_dict()}
        for key, obj in self.checkpointables.items():
            data[key] = obj.state_dict()
        data.update(kwargs)
        basename = f"{name}.pth"
        save_file = os.path.join(self.save_dir, basename)
        self.logger.info(f"Saving checkpoint to {save_file}")
        atomic_write(save_file, lambda f: torch.save(data, f))
        self.tag_last_checkpoint(basename)

    def tag_last_checkpoint(self, last_filename_basename: str) -> None:
        path = os.path.join(self.save_dir, "last_checkpoint")
        atomic_write(path, lambda f: f.write(last_filename_basename), mode="w")

    def _load_file(self, filename: str):
        if filename.endswith(".pkl"):
            return super()._load_file(filename)
        try:
            return torch.load(filename, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as e:
            logger.warning(
                f"{filename} holds objects other than tensors ({str(e).splitlines()[0]}); "
                "loading it with weights_only=False. Only load checkpoints you trust."
            )
            return torch.load(filename, map_location="cpu", weights_only=False)
        except (RuntimeError, EOFError, OSError) as e:
            raise RuntimeError(f"cannot read checkpoint {filename}: {e}") from e


def _gather_states(state: Any) -> list:
    """Every rank's ``state`` on every rank. States travel as ``torch.save`` bytes (detectron2
    0.6's ``all_gather`` pickles tensors in a way recent torch cannot unpickle) and come back
    through ``torch.load(weights_only=True)``, as they will from the checkpoint."""
    buf = io.BytesIO()
    torch.save(state, buf)
    return [
        torch.load(io.BytesIO(b), map_location="cpu", weights_only=True)
        for b in comm.all_gather(buf.getvalue())
    ]


class PeriodicCheckpointer(hooks.PeriodicCheckpointer):
    """detectron2's periodic checkpoint hook, registered on every rank: before a save it
    gathers each rank's RNG and data-loader state (``trainer.rank_state()``) so the checkpoint
    resumes every rank exactly; rank 0 writes the file and prunes old ones."""

    def after_step(self):
        it = self.trainer.iter
        due = (it + 1) % self.period == 0 or (self.max_iter is not None and it >= self.max_iter - 1)
        if due and hasattr(self.trainer, "rank_state"):
            self.trainer._gathered_rank_states = _gather_states(self.trainer.rank_state())
        try:
            if comm.is_main_process():
                self.step(it)
        finally:
            self.trainer.__dict__.pop("_gathered_rank_states", None)
        if due:
            comm.synchronize()  # no rank runs ahead while rank 0 writes
