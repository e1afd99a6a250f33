"""No host sync in the training step: one DINO and one CQ-DINO step read data back from the
device exactly once, the Hungarian matcher's single transfer of all cost matrices.

On the CPU a read-back is counted by intercepting the operations that would block on an
accelerator: scalar reads (``.item()``, ``bool()``/``int()``/``float()`` of a tensor, Python
indexing with a tensor), ``.tolist()``, ``.cpu()``, and data-dependent shapes (``nonzero``,
``masked_select``, boolean-mask indexing, ``unique``). ``.numpy()`` is not counted: it only
works on host tensors, which on an accelerator have been through a counted ``.cpu()``. The CUDA
twin runs the same step under ``torch.cuda.set_sync_debug_mode("error")``.
"""

import os
import traceback
from typing import List, Tuple

import pytest
import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

import cqdino
from cqdino import _ext
from cqdino.modeling import HungarianMatcher
from tests.modeling.cqdino_utils import tiny_cqdino
from tests.modeling.utils import batch, tiny_dino

aten = torch.ops.aten
_SCALAR_OR_SHAPE = {
    aten._local_scalar_dense.default,
    aten.nonzero.default,
    aten.masked_select.default,
    aten._unique2.default,
    aten.unique_dim.default,
    aten.unique_consecutive.default,
}
_INDEXING = {aten.index.Tensor, aten.index_put.default, aten.index_put_.default}
_METHODS = {"cpu", "tolist"}

C = 10
_BUILDERS = {
    "DINO": lambda: tiny_dino(C, embed_dim=64, width=32, num_queries=20, dn_number=10),
    "CQDINO": lambda: tiny_cqdino(C, topk=3, num_queries=20, dn_number=10),
}


_PACKAGE = os.path.dirname(os.path.abspath(cqdino.__file__)) + os.sep


def _caller() -> str:
    """``file:line`` (relative to the package) of the innermost frame inside the cqdino package:
    where the read happens."""
    frames = [f for f in traceback.extract_stack() if f.filename.startswith(_PACKAGE)]
    if not frames:
        return "?"
    return f"{frames[-1].filename[len(_PACKAGE):].replace(os.sep, '/')}:{frames[-1].lineno}"


class _Methods(TorchFunctionMode):
    def __init__(self, reads):
        super().__init__()
        self.reads = reads

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if getattr(func, "__name__", "") in _METHODS:
            self.reads.append((func.__name__, _caller()))
        return func(*args, **(kwargs or {}))


class _Ops(TorchDispatchMode):
    def __init__(self, reads):
        super().__init__()
        self.reads = reads

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in _SCALAR_OR_SHAPE:
            self.reads.append((str(func), _caller()))
        elif func in _INDEXING and any(
            isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in args[1] if i is not None
        ):
            self.reads.append((f"{func} with a bool mask", _caller()))
        return func(*args, **(kwargs or {}))


def count_host_reads(fn) -> List[Tuple[str, str]]:
    """Run ``fn()`` and return the ``(operation, file:line)`` of every device-to-host read."""
    reads: List[Tuple[str, str]] = []
    with _Methods(reads), _Ops(reads):
        fn()
    return reads


def _step(model, inputs):
    losses = model(inputs)
    sum(losses.values()).backward()


def test_counter_sees_the_usual_syncs():
    """The counter itself: each kind of read-back is seen once, plain device work is not."""
    x = torch.arange(6.0)
    mask = x > 2
    for fn, expected in [
        (lambda: x[1].item(), 1),
        (lambda: bool(x.sum() > 0), 1),
        (lambda: x.tolist(), 1),
        (lambda: x.cpu(), 1),
        (lambda: x[mask], 1),
        (lambda: x.nonzero(), 1),
        (lambda: (x * 2).sum(), 0),
        (lambda: x[torch.tensor([0, 2])], 0),
    ]:
        assert len(count_host_reads(fn)) == expected


@pytest.mark.skipif(
    not _ext.has_ext(), reason="the pure-PyTorch ms_deform_attn fallback reads the level table back"
)
@pytest.mark.parametrize("name", ["DINO", "CQDINO"])
def test_training_step_reads_back_only_the_matcher_costs(name):
    torch.manual_seed(0)
    model = _BUILDERS[name]()
    inputs = batch([(64, 96, 3), (64, 64, 2)], C)
    reads = count_host_reads(lambda: _step(model, inputs))
    assert len(reads) == 1, reads
    assert reads[0][0] == "cpu" and reads[0][1].startswith("modeling/dino/matcher.py"), reads
    # an image without GT and a batch without any GT add none
    for counts in [(3, 0), (0, 0)]:
        inputs = batch([(64, 96, counts[0]), (64, 64, counts[1])], C)
        reads = count_host_reads(lambda: _step(model, inputs))
        assert len(reads) == (1 if sum(counts) else 0), (counts, reads)


@pytest.mark.cuda
@pytest.mark.parametrize("name", ["DINO", "CQDINO"])
def test_cuda_training_step_has_no_sync_but_the_matcher(name, monkeypatch):
    torch.manual_seed(0)
    model = _BUILDERS[name]().cuda()
    inputs = batch([(64, 96, 3), (64, 64, 2)], C)
    for x in inputs:  # the loader's host-to-device copies are not part of the step
        x["image"] = x["image"].cuda()
        x["instances"] = x["instances"].to("cuda")
    _step(model, inputs)  # warm-up: lazy CUDA initialisation syncs once
    model.zero_grad(set_to_none=True)

    match_sets = HungarianMatcher.match_sets
    calls = []

    def allowed(self, *args, **kwargs):  # the matcher's one transfer is the allowed sync
        calls.append(1)
        torch.cuda.set_sync_debug_mode(0)
        try:
            return match_sets(self, *args, **kwargs)
        finally:
            torch.cuda.set_sync_debug_mode("error")

    monkeypatch.setattr(HungarianMatcher, "match_sets", allowed)
    torch.cuda.set_sync_debug_mode("error")
    try:
        _step(model, inputs)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    torch.cuda.synchronize()
    assert len(calls) == 1
