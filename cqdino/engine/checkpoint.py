"""Checkpoints that are never half-written, and a periodic hook that saves every rank's state.

``AtomicCheckpointer`` writes ``<name>.pth`` and ``last_checkpoint`` to a temporary file in the
same folder, flushes it to disk and renames it into place, so a run killed at any moment leaves
``last_checkpoint`` naming a complete file (at worst the previous one). Checkpoints load with
``torch.load(weights_only=True)``; a foreign file that needs more (pickled objects) is loaded
with ``weights_only=False`` after a warning. An unreadable file is a :class:`CheckpointError`
(one line); ``--resume`` then falls back to the newest older checkpoint that reads.

Evaluation and inference load with :func:`load_weights_strict` (every tensor of the model, of
the same shape, nothing else): a checkpoint of another config is an error naming a few of the
keys that differ; :func:`use_ema_weights` is the one rule for loading the EMA weights instead.
Training's ``init_checkpoint`` may load partially (pretrained backbones); a
summary line says how many tensors were loaded and which were not.
"""

import errno
import glob
import hashlib
import io
import json
import logging
import os
import pickle
import re
from typing import Any, Dict, List, Optional, Sequence

import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.engine import hooks
from detectron2.utils import comm

from cqdino.utils.io import InputError, atomic_write

__all__ = [
    "AtomicCheckpointer",
    "CheckpointError",
    "PeriodicCheckpointer",
    "atomic_write",
    "check_resumable",
    "check_vocabulary",
    "checkpoint_ema_state",
    "load_weights_strict",
    "newest_checkpoint",
    "read_checkpoint_meta",
    "resume_checkpoint_file",
    "tree_sha256",
    "use_ema_weights",
]

logger = logging.getLogger(__name__)


class CheckpointError(InputError):
    """A checkpoint that cannot be read or does not fit the model (the message names it)."""


_CKPT_NAME = re.compile(r"^model_(\d+|final)\.pth$")


def _short(keys, n: int = 3) -> str:
    keys = list(keys)
    more = f", ... ({len(keys)} in all)" if len(keys) > n else ""
    return ", ".join(map(str, keys[:n])) + more


class AtomicCheckpointer(DetectionCheckpointer):
    """``DetectionCheckpointer`` with atomic writes of the checkpoint and ``last_checkpoint``.

    Args:
        extra: saved into every checkpoint besides the model and checkpointables (e.g. the
            training dataset's ``class_names``, which inference uses).
    """

    def __init__(
        self,
        model,
        save_dir: str = "",
        *,
        save_to_disk=None,
        extra: Optional[Dict[str, Any]] = None,
        **checkpointables,
    ):
        super().__init__(model, save_dir, save_to_disk=save_to_disk, **checkpointables)
        self.extra = dict(extra or {})
        if self.save_to_disk and save_dir:
            # temporary files of a killed run (only ours: ".model_*.pth.*.tmp" and
            # ".last_checkpoint.*.tmp"; other hidden files in the folder are the user's)
            for pattern in (".model_*.pth.*.tmp", ".last_checkpoint.*.tmp"):
                for stale in glob.glob(os.path.join(save_dir, pattern)):
                    os.remove(stale)

    def save(self, name: str, **kwargs: Any) -> None:
        if not self.save_dir or not self.save_to_disk:
            return
        data = {"model": self.model.state_dict(), **self.extra}
        for key, obj in self.checkpointables.items():
            data[key] = obj.state_dict()
        data.update(kwargs)
        basename = f"{name}.pth"
        save_file = os.path.join(self.save_dir, basename)
        self.logger.info(f"Saving checkpoint to {save_file}")
        try:
            atomic_write(save_file, lambda f: torch.save(data, f))
        except (OSError, RuntimeError) as e:  # torch's zip writer wraps some OSErrors
            raise _write_error(e, save_file, self.save_dir) from None
        self.tag_last_checkpoint(basename)

    def has_checkpoint(self) -> bool:
        """``last_checkpoint`` exists, or (a run killed after writing its first checkpoint,
        before naming it) the folder holds a complete ``model_*.pth``."""
        return super().has_checkpoint() or newest_checkpoint(self.save_dir) is not None

    def get_checkpoint_file(self) -> str:
        if super().has_checkpoint():
            return super().get_checkpoint_file()
        name = newest_checkpoint(self.save_dir)
        if name is None:
            return ""
        logger.warning(
            f"{self.save_dir} has no last_checkpoint (a run killed before naming its first "
            f"checkpoint): resuming from the newest checkpoint, {name}"
        )
        return os.path.join(self.save_dir, name)

    def tag_last_checkpoint(self, last_filename_basename: str) -> None:
        path = os.path.join(self.save_dir, "last_checkpoint")
        atomic_write(path, lambda f: f.write(last_filename_basename), mode="w")

    def _load_file(self, filename: str):
        if not os.path.isfile(filename):
            raise CheckpointError(f"checkpoint {filename}: no such file")
        if filename.endswith(".pkl"):
            return super()._load_file(filename)
        try:
            try:
                loaded = torch.load(filename, map_location="cpu", weights_only=True)
            except pickle.UnpicklingError as e:
                first = str(e).strip().splitlines()[0] if str(e).strip() else ""
                if "weights_only" not in str(e) and "Weights only load failed" not in str(e):
                    raise
                logger.warning(
                    f"{filename} holds objects other than tensors ({first}); "
                    "loading it with weights_only=False. Only load checkpoints you trust."
                )
                loaded = torch.load(filename, map_location="cpu", weights_only=False)
        except Exception as e:  # corrupt, truncated or not a torch file
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise CheckpointError(f"cannot read checkpoint {filename}: {first}") from None
        if isinstance(loaded, dict) and "model" not in loaded:  # a bare state dict
            loaded = {"model": loaded}
        return loaded

    def _log_incompatible_keys(self, incompatible) -> None:
        """fvcore's warnings, then one line: how much of the model the file initialised."""
        super()._log_incompatible_keys(incompatible)
        model_keys = self.model.state_dict().keys()
        missing = list(incompatible.missing_keys)
        shapes = [k for k, *_ in incompatible.incorrect_shapes]
        skipped = set(missing) | set(shapes)
        loaded = len([k for k in model_keys if k not in skipped])
        if not (missing or shapes or incompatible.unexpected_keys):
            return
        parts = []
        if missing:
            parts.append(f"{len(missing)} absent from the file ({_short(missing)})")
        if shapes:
            parts.append(f"{len(shapes)} of another shape ({_short(shapes)})")
        unexpected = list(incompatible.unexpected_keys)
        tail = f"; {len(unexpected)} tensors of the file are not in the model" if unexpected else ""
        logger.warning(
            f"Loaded {loaded} of {len(model_keys)} model tensors from the checkpoint; not "
            f"loaded (left as initialised): {', '.join(parts) or 'none'}{tail}"
        )

    def resume_or_load(self, path: str, *, resume: bool = True) -> Dict[str, Any]:
        """detectron2's ``resume_or_load``; on resume, ``last_checkpoint`` must name an existing
        file, and an unreadable newest checkpoint falls back (with a warning) to the newest
        older one that reads."""
        if not (resume and self.has_checkpoint()):
            return self.load(path, checkpointables=[]) if path else {}
        check_resumable(self.save_dir)
        last = self.get_checkpoint_file()
        base = os.path.basename(last)
        older = sorted(
            (f for f in os.listdir(self.save_dir) if _CKPT_NAME.match(f) and f != base),
            reverse=True,  # model_final first, then by decreasing iteration
        )
        if base != "model_final.pth":
            older = [f for f in older if f != "model_final.pth" and f < base]
        for name in [base] + older:
            try:
                return self.load(os.path.join(self.save_dir, name))
            except CheckpointError as e:
                logger.warning(f"{e}; trying the previous checkpoint")
        raise CheckpointError(f"no readable checkpoint in {self.save_dir} to resume from")


def _write_error(e: Exception, path: str, save_dir: str) -> CheckpointError:
    """One line for a checkpoint that could not be written (the previous one is untouched:
    the file is written to a temporary name and only renamed into place once complete)."""
    text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    full = isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT)
    if full or "No space left on device" in str(e) or "Disk quota exceeded" in str(e):
        return CheckpointError(
            f"no space left on device in {save_dir}: {os.path.basename(path)} was not written "
            "(the previous checkpoint and last_checkpoint are unchanged); free some space, then "
            "continue with --resume"
        )
    return CheckpointError(f"cannot write checkpoint {path}: {text}")


def newest_checkpoint(save_dir: str) -> Optional[str]:
    """The basename of the newest ``model_*.pth`` in ``save_dir`` (``model_final.pth`` first,
    then the highest iteration), None when there is none."""
    if not save_dir or not os.path.isdir(save_dir):
        return None
    found = sorted(f for f in os.listdir(save_dir) if _CKPT_NAME.match(f))
    return found[-1] if found else None  # "model_final" sorts after "model_<digits>"


def resume_checkpoint_file(save_dir: str) -> Optional[str]:
    """The checkpoint ``--resume`` starts from: the one ``last_checkpoint`` names, else the
    newest ``model_*.pth``; None when the folder holds neither."""
    tag = os.path.join(save_dir, "last_checkpoint")
    if os.path.isfile(tag):
        with open(tag) as f:
            return os.path.join(save_dir, f.read().strip())
    name = newest_checkpoint(save_dir)
    return os.path.join(save_dir, name) if name else None


def check_resumable(save_dir: str) -> None:
    """Raise :class:`CheckpointError` when ``save_dir/last_checkpoint`` names a file that does
    not exist (one line, naming the checkpoints that do)."""
    tag = os.path.join(save_dir, "last_checkpoint")
    if not os.path.isfile(tag):
        return
    with open(tag) as f:
        name = f.read().strip()
    if not os.path.isfile(os.path.join(save_dir, name)):
        found = sorted((f for f in os.listdir(save_dir) if _CKPT_NAME.match(f)), reverse=True)
        have = f"; the folder holds {_short(found)}" if found else ""
        raise CheckpointError(
            f"{tag} names {name!r}, which does not exist{have}: write the name of a complete "
            "checkpoint into it, or start without --resume"
        )


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


def use_ema_weights(cfg) -> bool:
    """The one rule for "evaluate / infer with the EMA weights?": ``train.ema.enabled`` and
    ``train.ema.eval_with_ema`` (default true). A checkpoint without EMA weights then loads its
    model weights (see :func:`load_weights_strict`)."""
    train = cfg.get("train", None) if hasattr(cfg, "get") else None
    ema = (train.get("ema", None) if train is not None else None) or {}
    return bool(ema.get("enabled", False) and ema.get("eval_with_ema", True))


def checkpoint_ema_state(checkpoint: Any) -> Optional[Dict[str, Any]]:
    """The EMA weights a checkpoint dict of ``train_net.py`` holds (``trainer.ema.state``), or
    None when it has none."""
    trainer = checkpoint.get("trainer") if isinstance(checkpoint, dict) else None
    ema = trainer.get("ema") if isinstance(trainer, dict) else None
    state = ema.get("state") if isinstance(ema, dict) else None
    return state if isinstance(state, dict) else None


def load_weights_strict(model: torch.nn.Module, path: str, use_ema: bool = False) -> Dict[str, Any]:
    """Load the weights of checkpoint ``path`` into ``model``: every tensor of the model must be
    in the file with the same shape, and the file must hold nothing else. Returns the
    checkpoint dict (e.g. its ``trainer`` state, ``class_names``).

    ``use_ema``: load the checkpoint's EMA weights (``trainer.ema.state``) when it has them,
    else its model weights (decide with :func:`use_ema_weights`; a caller can tell which were
    loaded with :func:`checkpoint_ema_state` of the returned dict).

    Raises:
        CheckpointError naming a few missing, unexpected and shape-mismatched keys.
    """
    checkpoint = AtomicCheckpointer(model)._load_file(path)
    if not isinstance(checkpoint, dict):
        raise CheckpointError(f"checkpoint {path} is not a dict of weights")
    state = checkpoint.get("model", checkpoint)
    if use_ema and checkpoint_ema_state(checkpoint) is not None:
        state = checkpoint_ema_state(checkpoint)
    if not isinstance(state, dict) or not state:
        raise CheckpointError(f"checkpoint {path} holds no model weights")
    if all(k.startswith("module.") for k in state):  # saved from a DDP-wrapped model
        state = {k[len("module.") :]: v for k, v in state.items()}
    state = {k: torch.as_tensor(v) for k, v in state.items()}
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [
        f"{k} {list(state[k].shape)} in the file, {list(own[k].shape)} in the model"
        for k in own
        if k in state and state[k].shape != own[k].shape
    ]
    if missing or unexpected or shapes:
        parts = []
        if shapes:
            parts.append(f"{len(shapes)} of another shape ({_short(shapes, 2)})")
        if missing:
            parts.append(f"{len(missing)} missing ({_short(missing)})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected ({_short(unexpected)})")
        raise CheckpointError(
            f"checkpoint {path} does not fit the model of this config: {'; '.join(parts)}. "
            "Use the config (and model.* overrides) it was trained with."
        )
    model.load_state_dict(state)
    return checkpoint


# --------------------------------------------------------------------------- vocabulary
# A checkpoint of train_net.py carries the vocabulary its model was built from: the class names
# in model order (``class_names``) and a digest of the category tree (``category_tree_sha256``,
# when the model has one). Using it with another vocabulary is an error (or a loud warning).


def tree_sha256(path: Optional[str]) -> Optional[str]:
    """A digest of the category tree json ``path`` that ignores formatting and key order
    (None for no tree). An unreadable file is hashed byte for byte."""
    if not path:
        return None
    with open(path, "rb") as f:
        data = f.read()
    try:
        data = json.dumps(json.loads(data), sort_keys=True, separators=(",", ":")).encode()
    except ValueError:
        pass
    return hashlib.sha256(data).hexdigest()


def read_checkpoint_meta(path: str) -> Dict[str, Any]:
    """The entries of checkpoint ``path`` other than its weights and trainer state (e.g.
    ``class_names``, ``category_tree_sha256``, ``iteration``), read without loading the
    tensors when the file allows (memory-mapped); {} for a file that cannot be read this way
    (the strict loader reports it later in one line)."""
    if not os.path.isfile(path) or path.endswith(".pkl"):
        return {}
    for mmap in (True, False):
        try:
            data = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
            break
        except Exception:
            continue
    else:
        return {}
    if not isinstance(data, dict):
        return {}
    return {k: v for k, v in data.items() if k not in ("model", "trainer")}


def _first_difference(a: Sequence[str], b: Sequence[str]) -> str:
    if len(a) != len(b):
        return f"{len(a)} classes in the checkpoint, {len(b)} in the dataset"
    if sorted(a) == sorted(b):
        return f"the same {len(a)} names in another order"
    diff = [i for i, (x, y) in enumerate(zip(a, b)) if x != y]
    i = diff[0]
    return (
        f"{len(diff)} of {len(a)} names differ (class {i}: {a[i]!r} in the checkpoint, "
        f"{b[i]!r} in the dataset)"
    )


def check_vocabulary(
    meta: Dict[str, Any],
    class_names: Optional[Sequence[str]],
    tree: Optional[str],
    *,
    what: str,
    dataset: str,
    allow: bool = False,
) -> List[str]:
    """Compare the vocabulary a checkpoint was trained on (``meta`` of
    :func:`read_checkpoint_meta`) with the one of this run (``class_names`` and the tree
    digest ``tree`` of dataset ``dataset``). What cannot be compared (a checkpoint without
    names, e.g. a pretrained backbone) passes. Returns the differences (empty when none).

    Raises:
        CheckpointError naming ``what`` (e.g. ``"train.init_checkpoint=x.pth"``) and the first
        difference, unless ``allow`` (then each difference is logged as a warning).
    """
    problems = []
    saved = meta.get("class_names")
    if saved is not None and class_names is not None and list(saved) != list(class_names):
        problems.append(_first_difference(list(saved), list(class_names)))
    saved_tree = meta.get("category_tree_sha256")
    if saved_tree is not None and tree is not None and saved_tree != tree:
        problems.append(
            f"its category tree differs from the dataset's (sha256 {saved_tree[:12]} vs "
            f"{tree[:12]})"
        )
    if not problems:
        return []
    message = (
        f"{what} was trained on another vocabulary than dataset {dataset!r}: "
        f"{'; '.join(problems)}"
    )
    if not allow:
        raise CheckpointError(
            message + ". Use the dataset it was trained on, or add --allow-other-vocabulary "
            "(e.g. to fine-tune on a new vocabulary)"
        )
    logger.warning("!" * 20 + f" {message} (--allow-other-vocabulary) " + "!" * 20)
    return problems
