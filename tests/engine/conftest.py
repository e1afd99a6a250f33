"""A tiny synthetic vocabulary and the command line that trains on it (``configs/demo.py`` at
test size), shared by the training-entry-point tests."""

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Dict, List

import pytest

ROOT = Path(__file__).resolve().parents[2]
TINY_CATEGORIES = 40

# configs/demo.py shrunk to seconds per run: 64-80 px images, 1 + 2 layers, 20 queries.
TINY_OVERRIDES = [
    f"model.class_head.num_categories={TINY_CATEGORIES}",
    f"dataloader.train.mapper.num_classes={TINY_CATEGORIES}",
    f"dataloader.test.mapper.num_classes={TINY_CATEGORIES}",
    "dataloader.train.mapper.min_sizes=[64]",
    "dataloader.train.mapper.max_size=80",
    "dataloader.test.mapper.test_size=64",
    "dataloader.test.mapper.max_size=80",
    "dataloader.train.total_batch_size=2",
    "model.class_head.topk=10",
    "model.transformer.num_queries=20",
    "model.transformer.encoder.num_layers=1",
    "model.transformer.decoder.num_layers=2",
    "model.transformer.encoder.ffn_dim=128",
    "model.transformer.decoder.ffn_dim=128",
    "model.dn_number=10",
    "train.eval_period=0",
    "train.log_period=1",
    "train.seed=0",
]


# configs/demo.py at test size for 2 iterations (train_net.py's command line)
CONFIG = ["--config-file", str(ROOT / "configs" / "demo.py")]


def tiny_args(out, *extra) -> List[str]:
    """``train_net.py`` arguments: CONFIG with TINY_OVERRIDES, 2 iterations into ``out``."""
    return CONFIG + TINY_OVERRIDES + [f"train.output_dir={out}", "train.max_iter=2", *extra]


@pytest.fixture(scope="session")
def tiny_datasets(tmp_path_factory) -> Path:
    """``$DETECTRON2_DATASETS`` holding a 40-category synthetic vocabulary (24 train / 6 val)."""
    root = tmp_path_factory.mktemp("datasets")
    cmd = [sys.executable, "-m", "cqdino.data.synthetic", "--out", str(root / "synthetic_vocab")]
    cmd += [f"--num-categories={TINY_CATEGORIES}", "--num-train-images=24"]
    cmd += ["--num-val-images=6", "--image-size", "64", "80"]
    subprocess.run(cmd, check=True, capture_output=True, cwd=ROOT)
    return root


@pytest.fixture(scope="session")
def tiny_checkpoint(tiny_datasets, tmp_path_factory) -> Path:
    """``model_final.pth`` of configs/demo.py with TINY_OVERRIDES after 2 iterations (shared by
    the tools' tests that only need some trained weights of the demo's architecture)."""
    out = tmp_path_factory.mktemp("tiny_demo_train")
    args = ["--config-file", str(ROOT / "configs" / "demo.py"), *TINY_OVERRIDES]
    proc = run_train_net(tiny_datasets, args + [f"train.output_dir={out}", "train.max_iter=2"])
    assert proc.returncode == 0, proc.stderr[-4000:]
    return out / "model_final.pth"


@pytest.fixture
def synthetic_vocab(tiny_datasets):
    """``synthetic_vocab_{train,val}`` registered on the tiny dataset in this process for one
    test, then back under the root they had (registration reads ``$DETECTRON2_DATASETS``)."""
    from cqdino.data import register_synthetic_vocab

    old = os.environ.get("DETECTRON2_DATASETS")
    os.environ["DETECTRON2_DATASETS"] = str(tiny_datasets)
    register_synthetic_vocab()
    yield tiny_datasets
    if old is None:
        del os.environ["DETECTRON2_DATASETS"]
    else:
        os.environ["DETECTRON2_DATASETS"] = old
    register_synthetic_vocab()


def run_train_net(
    datasets: Path, args: List[str], harness: List[str] = (), timeout: int = 600
) -> subprocess.CompletedProcess:
    """``projects/train_net.py args`` (or through ``tests/engine/harness.py``) in a fresh
    process with one intra-op thread per process (repeatable numbers)."""
    env = {**os.environ, "DETECTRON2_DATASETS": str(datasets), "OMP_NUM_THREADS": "1"}
    if harness:
        cmd = [sys.executable, "-m", "tests.engine.harness", *harness, "--"]
    else:
        cmd = [sys.executable, str(ROOT / "projects" / "train_net.py")]
    return subprocess.run(
        cmd + args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout
    )


def metrics_by_iter(output_dir: Path) -> Dict[int, dict]:
    """metrics.json as {iteration: record}; a re-run iteration keeps its last record."""
    out = {}
    for line in (output_dir / "metrics.json").read_text().splitlines():
        rec = json.loads(line)
        if "total_loss" in rec:
            out[rec["iteration"]] = rec
    return out
