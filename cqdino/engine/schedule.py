"""The learning-rate schedule of the DINO / CQ-DINO recipes, written so a command-line change of
``train.max_iter`` moves the steps with it (milestones are fractions of ``max_iter``)."""

import bisect
from typing import Sequence

from fvcore.common.param_scheduler import ParamScheduler

__all__ = ["StepWithWarmup", "step_schedule"]


class StepWithWarmup(ParamScheduler):
    """LR multiplier at iteration ``i``: ``warmup_factor + (1 - warmup_factor) * i / warmup``
    during the warm-up, then ``gamma ** (number of steps <= i)``."""

    def __init__(
        self, max_iter: int, steps: Sequence[int], gamma: float, warmup: int, factor: float
    ):
        self.max_iter, self.steps, self.gamma = max_iter, list(steps), gamma
        self.warmup, self.factor = warmup, factor

    def __call__(self, where: float) -> float:
        it = round(where * self.max_iter, 6)  # detectron2 passes iteration / max_iter
        if it < self.warmup:
            return self.factor + (1.0 - self.factor) * it / self.warmup
        return self.gamma ** bisect.bisect_right(self.steps, it)


def step_schedule(
    max_iter: int,
    milestones: Sequence[float] = (0.5, 0.75),
    gamma: float = 0.1,
    warmup_iters: int = 1000,
    warmup_factor: float = 0.1,
) -> StepWithWarmup:
    """LR multiplier: ``gamma**i`` after the ``i``-th milestone, linear warm-up from
    ``warmup_factor`` to 1 over ``warmup_iters`` iterations (ending at the first step at the
    latest, for short runs).

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
    if not 0 < warmup_factor <= 1:
        raise ValueError(f"lr_multiplier.warmup_factor must be in (0, 1], got {warmup_factor}")
    steps = sorted({max(1, round(m * max_iter)) for m in fracs})
    warmup = min(max(int(warmup_iters), 0), steps[0] if steps else max_iter)
    return StepWithWarmup(max_iter, steps, gamma, warmup, warmup_factor)
