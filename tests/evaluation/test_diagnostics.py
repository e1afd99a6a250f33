"""Diagnostics of the synthetic demo: attribute accuracy and boxes per category, on
hand-made ground truth and detections with hand-computed answers."""

import json

import numpy as np
import pytest

from cqdino.data import synthetic
from cqdino.evaluation.diagnostics import attribute_accuracy, boxes_per_category, linear_probe

ATTRS = {1: (0,), 20: (0, 1, 2, 3), 21: (0, 1, 5, 3), 22: (1, 1, 5, 3)}


def _gt(tmp_path):
    anns = [
        dict(id=1, image_id=1, category_id=20, bbox=[10, 10, 40, 40]),
        dict(id=2, image_id=1, category_id=21, bbox=[100, 100, 30, 20]),
        dict(id=3, image_id=2, category_id=1, bbox=[0, 0, 50, 50]),
    ]
    cats = [dict(id=i, name=str(i)) for i in (1, 20, 21, 22, 23)]
    path = tmp_path / "gt.json"
    path.write_text(json.dumps(dict(images=[], annotations=anns, categories=cats)))
    return str(path)


def test_attribute_accuracy_hand_computed(tmp_path):
    preds = dict(
        image_id=np.array([1, 1, 1, 2]),
        category_id=np.array([20, 21, 22, 1]),
        bbox=np.array(
            [
                [12, 10, 40, 40],  # on box 1 (IoU 0.905), right category, best score
                [10, 10, 40, 40],  # on box 1, lower score: not the one that counts
                [101, 100, 30, 20],  # on box 2 (IoU 0.935): shape wrong, the rest right
                [60, 60, 10, 10],  # misses box 3
            ],
            np.float64,
        ),
        score=np.array([0.9, 0.5, 0.8, 0.99]),
    )
    acc = attribute_accuracy(_gt(tmp_path), preds, ATTRS)
    assert acc["boxes"] == 3
    assert acc["found"] == pytest.approx(200 / 3)
    assert acc["category"] == pytest.approx(50.0)
    assert acc["shape"] == pytest.approx(50.0)
    assert acc["colour"] == acc["texture"] == acc["border"] == pytest.approx(100.0)


def test_boxes_per_category_hand_computed(tmp_path):
    # categories 1, 20, 21 have one box each; 22 and 23 none
    assert boxes_per_category(_gt(tmp_path)) == dict(
        categories=5, boxes=3, min=0, median=1.0, max=1, empty=2
    )


def test_category_attributes_follow_the_names():
    attrs = synthetic.category_attributes(40, 0)
    colours = list(synthetic.COLOURS)
    for c in synthetic.vocabulary(40, 0):
        a = attrs[c["id"]]
        assert (
            c["name"].startswith(synthetic.SHAPES[a[0]])
            if len(a) == 1
            else (c["name"].startswith(f"{colours[a[1]]} {synthetic.TEXTURES[a[2]]}"))
        )


# ----------------------------------------------------------------------------- linear probe
def _probe_data(rng, n, signal):
    """Labels 0..3; 6-d features, the first two encode the label (angle on a circle) with
    strength ``signal``, the rest noise."""
    y = rng.integers(0, 4, size=n)
    angle = y * np.pi / 2
    x = rng.standard_normal((n, 6))
    x[:, 0] += signal * np.cos(angle)
    x[:, 1] += signal * np.sin(angle)
    return x, y


def test_linear_probe_finds_a_linearly_coded_attribute():
    rng = np.random.default_rng(0)
    xt, yt = _probe_data(rng, 400, signal=6.0)
    xv, yv = _probe_data(rng, 400, signal=6.0)
    out = linear_probe(xt, yt, xv, yv)
    # classes 6 apart with unit noise: the Bayes error is tiny
    assert out["val"] > 95 and out["train"] > 95
    assert out["n_train"] == 400 and out["n_val"] == 400
    assert out["majority"] == pytest.approx(100 * np.bincount(yv).max() / 400)


def test_linear_probe_at_majority_without_signal():
    rng = np.random.default_rng(1)
    xt, yt = _probe_data(rng, 300, signal=0.0)
    xv, yv = _probe_data(rng, 2000, signal=0.0)
    out = linear_probe(xt, yt, xv, yv)
    # 4 balanced classes: chance is 25 %; 2,000 val draws keep the probe within a few points
    assert abs(out["val"] - 25) < 5


def test_linear_probe_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="linear_probe"):
        linear_probe(np.zeros((3, 2)), np.zeros(3), np.zeros((3, 4)), np.zeros(3))
    with pytest.raises(ValueError, match="linear_probe"):
        linear_probe(np.zeros((3, 2)), np.zeros(2), np.zeros((3, 2)), np.zeros(3))


def test_selector_baselines_hand_computed(tmp_path):
    from cqdino.evaluation.diagnostics import selector_baselines

    cats = [dict(id=i, name=str(i)) for i in (1, 2, 3, 4)]
    # training images per category: 1 -> 3 images (4 boxes), 2 -> 2, 3 -> 1, 4 -> 0
    train = [(10, 1), (10, 1), (11, 1), (12, 1), (10, 2), (11, 2), (13, 3)]
    # val (image, category) pairs: (20, 1), (20, 3), (21, 2), (21, 4); box 2 repeats (20, 1)
    val = [(20, 1), (20, 1), (20, 3), (21, 2), (21, 4)]
    for name, rows in (("train", train), ("val", val)):
        anns = [
            dict(id=i, image_id=im, category_id=c, bbox=[0, 0, 1, 1])
            for i, (im, c) in enumerate(rows)
        ]
        (tmp_path / f"{name}.json").write_text(
            json.dumps(dict(images=[], annotations=anns, categories=cats))
        )
    train_json, val_json = str(tmp_path / "train.json"), str(tmp_path / "val.json")
    # top-1 = {1}: 1 of 4 pairs; top-2 = {1, 2}: 2 of 4; top-3 = {1, 2, 3}: 3 of 4
    for k, prior in ((1, 25.0), (2, 50.0), (3, 75.0), (4, 100.0)):
        got = selector_baselines(train_json, val_json, k)
        assert got == {"prior": pytest.approx(prior), "random": pytest.approx(100.0 * k / 4)}
