"""The evidence tools' ``--quick`` modes run end to end and write well-formed outputs.

``benchmarks/vocab_scaling.py`` (CQ-DINO vs DINO classification path, time and memory against
C) and ``tools/gradient_dilution.py`` (positive/negative gradient ratio per frequency group).
Structure and finiteness only: timings and ratios are what the tools report, not asserted.
"""

import importlib.util
import json
import math
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _load(relpath: str):
    spec = importlib.util.spec_from_file_location(Path(relpath).stem, ROOT / relpath)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _finite(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)


def _check_png(path: Path) -> None:
    assert path.stat().st_size > 1000
    assert path.read_bytes()[:8] == PNG_MAGIC


@pytest.mark.slow  # about 16 s on one core: C in {80, 1000}, both models, one child process
def test_vocab_scaling_quick(tmp_path, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    out, png = tmp_path / "vs.json", tmp_path / "vs.png"
    bench = _load("benchmarks/vocab_scaling.py")
    assert bench.main(["--quick", "--json", str(out), "--plot", str(png)]) == 0
    payload = json.loads(out.read_text())
    assert {"info", "config", "results", "per_class", "memory_ratio"} <= set(payload)
    rows = payload["results"]
    assert {(r["model"], r["C"]) for r in rows} == {
        (m, C) for m in ("DINO", "CQ-DINO") for C in (80, 1000)
    }
    for r in rows:
        assert r["status"] == "measured" and r["finite"]
        for key in ("train_ms", "infer_ms", "train_total_mib", "train_peak_mib", "params_m"):
            assert _finite(r[key]) and r[key] > 0, (r["model"], r["C"], key)
        assert r["columns"] == (r["C"] if r["model"] == "DINO" else min(100, r["C"]))
    per_class = {r["model"]: r for r in payload["per_class"]}
    # parameters per class follow from the module shapes: DINO 7 linears x (256 + 1) + one DN
    # label row (256); CQ-DINO (recipe widths, C > K) one 768-wide category-query row
    assert per_class["DINO"]["params_per_class"] == pytest.approx(7 * 257 + 256)
    assert per_class["DINO"]["params_per_class_recipe_widths"] == pytest.approx(7 * 257 + 256)
    assert per_class["CQ-DINO"]["params_per_class_recipe_widths"] == pytest.approx(768)
    for r in payload["per_class"]:
        assert _finite(r["train_total_kib_per_class"])
    assert all(_finite(r["ratio"]) for r in payload["memory_ratio"])
    _check_png(png)


@pytest.mark.slow  # about 7 s on one core: two tiny datasets, 6 iterations per head
def test_gradient_dilution_quick(tmp_path, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    out, png = tmp_path / "gd.json", tmp_path / "gd.png"
    tool = _load("tools/gradient_dilution.py")
    argv = ["--quick", "--data-root", str(tmp_path / "data"), "--json", str(out)]
    assert tool.main(argv + ["--plot", str(png)]) == 0
    payload = json.loads(out.read_text())
    assert {"info", "config", "results", "runs"} <= set(payload)
    rows = payload["results"]
    keys = {(r["model"], r["C"], r["loss"], r["group"]) for r in rows}
    for C in (100, 300):
        for g in ("rare", "common", "frequent"):
            assert ("DINO", C, "focal", g) in keys
            assert ("CQ-DINO", C, "focal", g) in keys
            assert ("CQ-DINO", C, "selection", g) in keys
    for r in rows:
        assert 0 <= r["defined"] <= r["categories"]
        for key in ("mean_ratio", "median_ratio", "pooled_ratio", "early_mean_ratio"):
            assert r[key] is None or (_finite(r[key]) and r[key] >= 0)
    assert any(r["mean_ratio"] is not None for r in rows)
    for run in payload["runs"]:
        assert _finite(run["loss_first"]) and _finite(run["loss_last"])
        assert 0 <= run["train_top1"] <= 1 and 0 <= run["gt_selected"] <= 1
    _check_png(png)
