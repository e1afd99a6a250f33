"""Shared fixtures: the read-only test data folder, the GPU skip and the training entry point
as a module."""

import os
from pathlib import Path

import pytest
import torch

from tests.helpers import load_script

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def _share_the_cores_between_workers() -> None:
    """Under pytest-xdist (``make test`` runs one worker per core) each worker gets its share
    of the cores as torch threads, and so do the processes its tests start (``OMP_NUM_THREADS``),
    unless the caller set a thread count: two workers with a thread per core each would run
    four busy threads on two cores, and OpenMP threads that wait for a busy core make a step
    several times slower (e.g. 0.4 against 2-3 s per iteration of the overfit tests)."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "0") or 0)
    if workers < 2 or "OMP_NUM_THREADS" in os.environ:
        return
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    share = max(1, (cores or 1) // workers)
    os.environ["OMP_NUM_THREADS"] = str(share)
    torch.set_num_threads(share)


_share_the_cores_between_workers()


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """``../shared/data`` next to the repository (real COCO images, category lists, trees)."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"test data folder {SHARED_DATA} is absent (it ships beside the repository)")
    return SHARED_DATA


@pytest.fixture
def rng_seed(request) -> int:
    """A fresh seed per test, printed on failure so a failing draw can be replayed."""
    seed = int.from_bytes(__import__("os").urandom(4), "little")
    torch.manual_seed(seed)
    request.node.user_properties.append(("seed", seed))
    return seed


@pytest.fixture(scope="module")
def train_net():
    """``projects/train_net.py`` imported as a module (its ``cli``, ``parse_args``, ...), one
    per test module."""
    return load_script("projects/train_net.py", "train_net")
