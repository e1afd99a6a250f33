"""Keeping image-independent results between inference calls.

CQ-DINO computes several things from its category queries alone (the queries themselves, their
projections for the selector's scores); at C = 13,204 they are a third of a forward's work and
the same for every image. :class:`InferenceCache` keeps one such result while nothing it was
computed from has changed. It is used only in eager inference (eval mode, no grad); training,
autograd, tracing and export always recompute.
"""

from typing import Callable, Dict, Iterable, Optional, Tuple

import torch
from torch import Tensor, nn

__all__ = ["InferenceCache"]


def _state(tensors: Iterable[Tensor]) -> Optional[Tuple]:
    """Storage and in-place version of each tensor (what an in-place update, a weight load or
    a device move changes), or None where they cannot be read (inference-mode or fake
    tensors)."""
    try:
        return tuple((t.device, t.dtype, t.shape, t.data_ptr(), t._version) for t in tensors)
    except RuntimeError:
        return None


class InferenceCache:
    """Named results of ``module``, each kept with the state of the module's parameters and
    buffers and of its inputs (held, so their storage cannot be reused meanwhile)."""

    def __init__(self) -> None:
        self._entries: Dict[str, Tuple[Tuple, Tuple[Tensor, ...], Tensor]] = {}

    @staticmethod
    def active(module: nn.Module) -> bool:
        """Whether results of ``module`` may be kept now (eager inference)."""
        if module.training or torch.is_grad_enabled():
            return False
        return not (torch.compiler.is_compiling() or torch.jit.is_tracing())

    def get(
        self, name: str, module: nn.Module, inputs: Tuple[Tensor, ...], fn: Callable[[], Tensor]
    ) -> Tensor:
        """``fn()``, or the result kept under ``name`` when neither ``module``'s parameters and
        buffers nor ``inputs`` (the very same tensors, unmodified) have changed since."""
        if not self.active(module):
            self._entries.pop(name, None)
            return fn()
        key = _state(list(module.parameters()) + list(module.buffers()) + list(inputs))
        hit = self._entries.get(name)
        if key is not None and hit is not None and hit[0] == key:
            if all(a is b for a, b in zip(hit[1], inputs)):
                return hit[2]
        out = fn()
        if key is None:
            self._entries.pop(name, None)
        else:
            self._entries[name] = (key, tuple(inputs), out)
        return out

    def clear(self) -> None:
        self._entries.clear()
