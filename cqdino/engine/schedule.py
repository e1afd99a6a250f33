"""The learning-rate schedule of the DINO / CQ-DINO recipes, written so a command-line change of
``train.max_iter`` moves the steps with it (milestones are fractions of ``max_iter``)."""

from typing import Sequence

from fvcore.common.param_scheduler import MultiStepParamScheduler

from detectron2.solver import WarmupParamScheduler

__all__ = ["step_schedule"]


def step_schedule(
    max_iter: int,
    milestones: Sequence[float] = (0.5, 0.75),
    gamma: float = 0.1,
    warmup_iters: int = 1000,
    warmup_factor: float = 0.1,
) -> WarmupParamScheduler:
    """LR multiplier: ``gamma**i`` after the ``i``-th milestone, linear warm-up from
    ``warmup_factor`` over ``warmup_iters`` iterations.

    Args:
        max_iter: training length (``"${train.max_iter}"`` in configs).
        milestones: step points as fractions of ``max_iter`` (24 epochs with steps at epochs 12
            and 18: ``(0.5, 0.75)``), strictly increasing in (0, 1).
    """
    max_iter = int(max_iter)
    if max_iter <= 0:
        raise ValueError(f"train.max_iter must be > 0, got {max_iter}")
    fracs = [float(m) for m in milestones]
    if any(not 0 < m < 1 for m in fracs) or fracs != sorted(set(fracs)):
        raise ValueError(
            f"lr_multiplier.milestones must be increasing fractions in (0, 1), got {milestones}"
        )
    steps = [max(1, round(m * max_iter)) for m in fracs]
    steps = [s for i, s in enumerate(steps) if s < max_iter and (i == 0 or s > steps[i - 1])]
    scheduler = MultiStepParamScheduler(
        values=[gamma**i for i in range(len(steps) + 1)],
        milestones=steps,
        num_updates=max_iter,
    )
    warmup = min(max(int(warmup_iters), 0), max_iter) / max_iter
    return WarmupParamScheduler(scheduler, warmup_factor, warmup, warmup_method="linear")
