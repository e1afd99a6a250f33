"""tools/compare_heads.py --quick: both heads trained and evaluated through train_net.py for two
seeds; the JSON has every run, the summary per (C, head) and CQ-DINO's selector recall."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_compare_heads_quick(tmp_path):
    out = tmp_path / "results.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, str(ROOT / "tools" / "compare_heads.py"), "--quick"]
    cmd += ["--work-dir", str(tmp_path / "work"), "--json", str(out), "--threads", "1"]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    res = json.loads(out.read_text())
    runs = res["runs"]
    assert sorted((r["head"], r["seed"]) for r in runs) == [
        ("CQ-DINO", 0),
        ("CQ-DINO", 1),
        ("DINO", 0),
        ("DINO", 1),
    ]
    for r in runs:
        assert r["categories"] == 40
        for k in ("AP", "AP50"):
            assert math.isfinite(r[k]) and 0 <= r[k] <= 100
        if r["head"] == "CQ-DINO":
            assert 0 <= r["ARC"] <= 100
        else:
            assert "ARC" not in r
    assert {s["head"] for s in res["summary"]} == {"CQ-DINO", "DINO"}
    for s in res["summary"]:
        assert s["seeds"] == [0, 1]
        ap = s["AP"]
        assert ap["min"] <= ap["mean"] <= ap["max"]
    assert "| 40 | CQ-DINO | 2 |" in proc.stdout
    # the two heads really are different models trained from the same config family
    cfgs = {
        r: (tmp_path / "work" / f"c40_{r}_s0" / "config.yaml").read_text()
        for r in ("cq-dino", "dino")
    }
    assert "CQDINO" in cfgs["cq-dino"] and "CQDINO" not in cfgs["dino"]
