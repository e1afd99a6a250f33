"""tools/feature_probe.py on a 2-iteration tiny CQ-DINO: the probed boxes are exactly the
four-attribute GT boxes of the probed images (counted here from the COCO json), the majority
baseline matches the labels' own counts, and bad inputs fail in one line before any work.

The weights are set so that the answers are known without the code under test: every backbone
map is zero and so is every decoder hidden state (features without any attribute: a probe
answers the most frequent training label), and every decoder box is the image's lower-right
quadrant (the IoU of each GT box with it is computed here from the json)."""

import json
import os
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from cqdino.data.synthetic import category_attributes

from .conftest import ROOT, TINY_CATEGORIES, TINY_OVERRIDES

pytestmark = pytest.mark.slow

CONFIG = ["--config-file", str(ROOT / "configs" / "demo.py")]
TOOL = str(ROOT / "tools" / "feature_probe.py")


@pytest.fixture(scope="module")
def checkpoint(tiny_checkpoint, tmp_path_factory) -> Path:
    """The tiny run's weights (and EMA weights, when saved) with known features and boxes:

    * every backbone tensor zero: every map the backbone outputs is zero;
    * the decoder's output norm with weight and bias zero: every hidden state is zero;
    * the last layer of each decoder box MLP with weight 0 and bias 1e3: every box is
      ``sigmoid(1e3 + logit(previous box)) = 1`` in cx, cy, w, h, i.e. ``[W/2, H/2, 3W/2, 3H/2]``
      in the pixels of a W x H image, whatever the reference box.
    """
    ckpt = torch.load(tiny_checkpoint, map_location="cpu", weights_only=False)
    states = [ckpt["model"]]
    ema = ckpt.get("trainer", {}).get("ema", {})
    if isinstance(ema, dict) and isinstance(ema.get("state"), dict):
        states.append(ema["state"])
    box_layer = re.compile(r"^transformer\.decoder\.bbox_embed\.\d+\.layers\.2\.(weight|bias)$")
    for state in states:
        backbone = [k for k in state if k.startswith("backbone.")]
        norm = ["transformer.decoder.norm.weight", "transformer.decoder.norm.bias"]
        boxes = [k for k in state if box_layer.match(k)]
        assert backbone and boxes and all(k in state for k in norm), sorted(state)
        for k in backbone + norm + boxes:
            if state[k].is_floating_point():
                state[k] = torch.zeros_like(state[k])
        for k in boxes:
            if k.endswith(".bias"):
                assert state[k].shape == (4,)
                state[k] = torch.full_like(state[k], 1e3)
    path = tmp_path_factory.mktemp("known_features") / "model_final.pth"
    torch.save(ckpt, path)
    return path


def _run(datasets: Path, *args):
    env = {**os.environ, "DETECTRON2_DATASETS": str(datasets), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, TOOL, *args]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


def _four_attribute_boxes(datasets: Path, split: str, images: int):
    """The GT boxes with four attributes of the first ``images`` images of the split, in the
    order the registered dataset lists them (its json's image order): their attribute labels
    ``[N, 4]`` (shape, colour, texture, border) and their IoU with the lower-right quadrant of
    their image (float64)."""
    attrs = category_attributes(TINY_CATEGORIES, 0)
    with open(datasets / "synthetic_vocab" / "annotations" / f"synthetic_vocab_{split}.json") as f:
        d = json.load(f)
    labels, ious = [], []
    for im in d["images"][:images]:
        W, H = im["width"], im["height"]
        for a in d["annotations"]:
            if a["image_id"] == im["id"] and len(attrs[a["category_id"]]) == 4:
                labels.append(attrs[a["category_id"]])
                x, y, w, h = a["bbox"]
                inter = max(0.0, min(x + w, 1.5 * W) - max(x, 0.5 * W)) * max(
                    0.0, min(y + h, 1.5 * H) - max(y, 0.5 * H)
                )
                ious.append(inter / (w * h + W * H - inter))
    return np.array(labels), np.array(ious)


def _majority_answer(train: np.ndarray, val: np.ndarray) -> float:
    """Accuracy (%) on ``val`` of always answering the most frequent ``train`` label (the
    smallest such label on a tie, as argmax over equal biases answers)."""
    counts = np.bincount(train)
    return 100.0 * float(np.mean(val == int(np.argmax(counts))))


def test_probe_counts_and_baseline(tiny_datasets, checkpoint, tmp_path):
    out = tmp_path / "probe.json"
    args = CONFIG + ["--weights", str(checkpoint), "--images", "4", "--json", str(out)]
    proc = _run(tiny_datasets, *args, *TINY_OVERRIDES)
    assert proc.returncode == 0, proc.stderr[-4000:]
    res = json.loads(out.read_text())
    train, _ = _four_attribute_boxes(tiny_datasets, "train", 4)
    val, val_iou = _four_attribute_boxes(tiny_datasets, "val", 4)
    assert res["boxes"] == {"train": len(train), "val": len(val)}
    majority = 100 * Counter(val[:, 1].tolist()).most_common(1)[0][1] / len(val)
    for source in ("decoder", "backbone"):
        assert list(res[source]) == ["shape", "colour", "texture", "border"]
        assert res[source]["colour"]["majority"] == pytest.approx(majority)
        # features without the attribute: the probe answers the training split's majority
        for k, name in enumerate(res[source]):
            expected = _majority_answer(train[:, k], val[:, k])
            assert res[source][name]["val"] == pytest.approx(expected), (source, name)
    # every query's box is the lower-right quadrant: the best IoU of a GT box is its IoU with it
    assert 0 < np.median(val_iou) < 1  # the check tells a right median from 0 and 1
    assert res["median_iou"] == pytest.approx(np.median(val_iou), rel=1e-5)
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
