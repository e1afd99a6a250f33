"""Shared fixtures: the read-only test data folder, the GPU skip and the training entry point
as a module."""

from pathlib import Path

import pytest
import torch

from tests.helpers import load_script

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


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
