"""The gradient-dilution tools group categories with the V3Det evaluator's frequency groups
(one definition, ``cqdino.evaluation.v3det_evaluation.frequency_groups``), leaving out the
categories without training images (no positives)."""

import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))
from gradient_dilution import group_stats  # noqa: E402


def test_group_stats_uses_the_evaluator_groups():
    # image counts at every boundary: 0 (left out), 1 and 10 (rare), 11 and 100 (common),
    # 101 (frequent)
    count = torch.tensor([0, 1, 10, 11, 100, 101])
    pos = [5.0, 1.0, 2.0, 3.0, 4.0, 6.0]
    neg = [1.0, 2.0, 2.0, 3.0, 1.0, 4.0]
    rows = {r["group"]: r for r in group_stats(pos, neg, count)}
    assert list(rows) == ["rare", "common", "frequent"]
    assert [rows[g]["categories"] for g in rows] == [2, 2, 1]
    assert rows["rare"]["pooled_ratio"] == pytest.approx((1 + 2) / (2 + 2))
    assert rows["rare"]["mean_ratio"] == pytest.approx((0.5 + 1.0) / 2)
    assert rows["common"]["pooled_ratio"] == pytest.approx(7 / 4)
    assert rows["frequent"]["mean_ratio"] == pytest.approx(1.5)
