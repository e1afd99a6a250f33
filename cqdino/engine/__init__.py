"""Training engine: the trainer (AMP, clipping, EMA, exact resume), atomic checkpoints, a
CPU-capable multi-process launcher, evaluation with a progress bar, and the LR schedule.
``projects/train_net.py`` puts them together."""

from .checkpoint import (
    AtomicCheckpointer,
    CheckpointError,
    PeriodicCheckpointer,
    atomic_write,
    check_resumable,
    checkpoint_ema_state,
    load_weights_strict,
    use_ema_weights,
)
from .device import resolve_device
from .evaluation import format_results, inference_on_dataset, read_metrics
from .launch import launch
from .schedule import StepWithWarmup, step_schedule
from .trainer import ModelEMA, Trainer, unwrap_model

__all__ = [
    "AtomicCheckpointer",
    "CheckpointError",
    "PeriodicCheckpointer",
    "atomic_write",
    "check_resumable",
    "checkpoint_ema_state",
    "load_weights_strict",
    "resolve_device",
    "use_ema_weights",
    "format_results",
    "inference_on_dataset",
    "read_metrics",
    "launch",
    "step_schedule",
    "StepWithWarmup",
    "ModelEMA",
    "Trainer",
    "unwrap_model",
]
