"""tools/feature_probe.py on a 2-iteration tiny CQ-DINO: the probed boxes are exactly the
four-attribute GT boxes of the probed images (counted here from the COCO json), the majority
baseline matches the labels' own counts, and bad inputs fail in one line before any work."""

import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from cqdino.data.synthetic import category_attributes

from .conftest import ROOT, TINY_CATEGORIES, TINY_OVERRIDES

pytestmark = pytest.mark.slow

CONFIG = ["--config-file", str(ROOT / "configs" / "demo.py")]
TOOL = str(ROOT / "tools" / "feature_probe.py")


@pytest.fixture(scope="module")
def checkpoint(tiny_checkpoint) -> Path:
    return tiny_checkpoint


def _run(datasets: Path, *args):
    env = {**os.environ, "DETECTRON2_DATASETS": str(datasets), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, TOOL, *args]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


def _four_attribute_labels(datasets: Path, split: str, images: int):
    """Colour labels of the GT boxes of the first ``images`` images of the split, in the
    order the registered dataset lists them (its json's image order)."""
    attrs = category_attributes(TINY_CATEGORIES, 0)
    with open(datasets / "synthetic_vocab" / "annotations" / f"synthetic_vocab_{split}.json") as f:
        d = json.load(f)
    ids = [im["id"] for im in d["images"]][:images]
    out = []
    for image_id in ids:
        for a in d["annotations"]:
            if a["image_id"] == image_id and len(attrs[a["category_id"]]) == 4:
                out.append(attrs[a["category_id"]][1])
    return out


def test_probe_counts_and_baseline(tiny_datasets, checkpoint, tmp_path):
    out = tmp_path / "probe.json"
    args = CONFIG + ["--weights", str(checkpoint), "--images", "4", "--json", str(out)]
    proc = _run(tiny_datasets, *args, *TINY_OVERRIDES)
    assert proc.returncode == 0, proc.stderr[-4000:]
    res = json.loads(out.read_text())
    train = _four_attribute_labels(tiny_datasets, "train", 4)
    val = _four_attribute_labels(tiny_datasets, "val", 4)
    assert res["boxes"] == {"train": len(train), "val": len(val)}
    majority = 100 * Counter(val).most_common(1)[0][1] / len(val)
    for source in ("decoder", "backbone"):
        assert set(res[source]) == {"shape", "colour", "texture", "border"}
        assert res[source]["colour"]["majority"] == pytest.approx(majority)
        assert 0 <= res[source]["colour"]["val"] <= 100
    assert 0 <= res["median_iou"] <= 1
    assert "colour" in proc.stdout and "majority" in proc.stdout
    # an existing --json is refused (the results above are kept)
    again = _run(tiny_datasets, *args, *TINY_OVERRIDES)
    assert again.returncode == 2 and "exists" in again.stderr
    assert json.loads(out.read_text()) == res


def test_bad_inputs(tiny_datasets, tmp_path):
    proc = _run(tiny_datasets, *CONFIG, "--weights", str(tmp_path / "none.pth"))
    assert proc.returncode == 2 and "--weights" in proc.stderr and "Traceback" not in proc.stderr
    (tmp_path / "w.pth").write_bytes(b"")
    proc = _run(tiny_datasets, *CONFIG, "--weights", str(tmp_path / "w.pth"), "--images", "0")
    assert proc.returncode == 2 and "--images" in proc.stderr
    proc = _run(
        tiny_datasets, *CONFIG, "--weights", str(tmp_path / "w.pth"), "--val-split", "coco_2017_val"
    )
    assert proc.returncode == 2 and "coco_2017_val" in proc.stderr
