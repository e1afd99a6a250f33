"""tools/compare_heads.py --quick: both heads trained and evaluated through train_net.py for two
seeds; the JSON has every run, the summary per (C, head) and CQ-DINO's selector recall (equal to
the ARC@K that the run's own evaluation computed from the selector's ranking)."""

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
        # the run's last evaluation, read from its metrics.json here
        folder = tmp_path / "work" / f"c40_{r['head'].lower()}_s{r['seed']}"
        records = [json.loads(line) for line in (folder / "metrics.json").read_text().splitlines()]
        last = [rec for rec in records if "bbox/AP" in rec][-1]
        for k in ("AP", "AP50"):
            assert math.isfinite(r[k]) and r[k] == last[f"bbox/{k}"]
        if r["head"] == "CQ-DINO":
            # measured by the tool from the selector's top-K (K = 10 in --quick); the
            # evaluator's ARC@10 comes from the ranking of the same weights on the same images
            assert r["ARC"] == pytest.approx(last["bbox/ARC@10"], rel=1e-12, abs=1e-12)
        else:
            assert "ARC" not in r and not any(k.startswith("bbox/ARC@") for k in last)
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


def _fake_run(folder: Path, ap: float, apr: float, s_per_iter=None, arc=None) -> str:
    """A finished run folder as train_net.py leaves it: a training record and, at the last
    iteration, an evaluation record (an earlier, worse evaluation must not be the one read)."""
    folder.mkdir(parents=True)
    recs = [
        {"iteration": 9, "total_loss": 3.0},
        {"iteration": 4, "bbox/AP": 0.5, "bbox/AP50": 1.0, "bbox/APr": 0.1},
        {"iteration": 9, "bbox/AP": ap, "bbox/AP50": 2 * ap, "bbox/APr": apr, "bbox/APc": ap},
    ]
    (folder / "metrics.json").write_text("".join(json.dumps(r) + "\n" for r in recs))
    if s_per_iter is not None:
        line = f"d2.engine.hooks INFO: Overall training speed: 8 iterations in 0:00:0{s_per_iter}"
        (folder / "log.txt").write_text(f"x\n{line} ({s_per_iter:.4f} s / it)\n")
    if arc is not None:
        (folder / "arc.json").write_text(json.dumps({"ARC": arc}))
    return str(folder)


def test_compare_heads_from_runs(tmp_path):
    runs = [
        ("CQ-DINO", 1000, 0, _fake_run(tmp_path / "a", 10.0, 8.0, 0.5, arc=20.0)),
        ("CQ-DINO", 1000, 1, _fake_run(tmp_path / "b", 14.0, 9.0, 0.7, arc=30.0)),
        ("DINO", 1000, 0, _fake_run(tmp_path / "c", 6.0, 3.0, 0.4)),
        ("DINO", 5000, 0, _fake_run(tmp_path / "d", 2.0, 1.0)),
    ]
    manifest = tmp_path / "runs.json"
    keys = ("head", "categories", "seed", "run")
    manifest.write_text(json.dumps([dict(zip(keys, r)) for r in runs]))
    out, png = tmp_path / "summary.json", tmp_path / "fig" / "ap_vs_c.png"
    cmd = [sys.executable, str(ROOT / "tools" / "compare_heads.py"), "--from-runs", str(manifest)]
    proc = subprocess.run(
        cmd + ["--json", str(out), "--plot", str(png)], capture_output=True, text=True, cwd=ROOT
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = {(s["categories"], s["head"]): s for s in json.loads(out.read_text())["summary"]}
    cq = summary[(1000, "CQ-DINO")]
    assert cq["seeds"] == [0, 1]
    assert cq["AP"] == {"mean": 12.0, "min": 10.0, "max": 14.0}  # hand-computed
    assert cq["APr"]["mean"] == 8.5 and cq["ARC"]["mean"] == 25.0
    assert cq["s_per_iter"]["mean"] == pytest.approx(0.6)
    assert summary[(1000, "DINO")]["AP50"]["mean"] == 12.0
    assert "ARC" not in summary[(5000, "DINO")] and "s_per_iter" not in summary[(5000, "DINO")]
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| 1000 | CQ-DINO | 2 | 12.00 (10.00-14.00) |" in proc.stdout
    # existing outputs: refused without --overwrite (left as they were), replaced with it
    out.write_text("mine")
    proc = subprocess.run(cmd + ["--json", str(out)], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 1 and "exists: add --overwrite" in proc.stderr
    assert out.read_text() == "mine"
    proc = subprocess.run(
        cmd + ["--json", str(out), "--plot", str(png), "--overwrite"],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads(out.read_text())["summary"]


@pytest.mark.parametrize(
    "entry, message",
    [
        ({"head": "YOLO", "categories": 1, "seed": 0, "run": "."}, "head 'YOLO' is not one of"),
        ({"head": "DINO", "categories": 1, "seed": 0}, "entry 0 must have exactly the keys"),
        ({"head": "DINO", "categories": 1, "seed": 0, "run": "/nonexistent"}, "no such file"),
    ],
)
def test_compare_heads_bad_manifest(tmp_path, entry, message):
    manifest = tmp_path / "runs.json"
    manifest.write_text(json.dumps([entry]))
    cmd = [sys.executable, str(ROOT / "tools" / "compare_heads.py"), "--from-runs", str(manifest)]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 1
    assert message in proc.stderr and proc.stderr.count("\n") <= 1


def test_from_runs_settings_are_the_runs_own(tmp_path):
    """The summary's ``settings`` come from the runs (config.yaml, log.txt), not from the
    tool's defaults (400 iterations, 2,000 images, C 1,000 / 5,000)."""
    runs = []
    for name, c, iters, images in (("a", 1000, 950, 4000), ("b", 13204, 950, 4000)):
        folder = Path(_fake_run(tmp_path / name, 10.0, 8.0))
        (folder / "config.yaml").write_text(
            f"train:\n  max_iter: {iters}\nmodel:\n  class_head:\n    num_categories: {c}\n"
            "    topk: 100\n"
        )
        (folder / "log.txt").write_text(
            f"cqdino.data.build INFO: Training loader: {images} images, batch 4 per rank x 1 "
            "ranks, 2 workers\n"
        )
        runs.append({"head": "CQ-DINO", "categories": c, "seed": 0, "run": str(folder)})
    manifest = tmp_path / "runs.json"
    manifest.write_text(json.dumps(runs))
    out = tmp_path / "summary.json"
    cmd = [sys.executable, str(ROOT / "tools" / "compare_heads.py"), "--from-runs", str(manifest)]
    proc = subprocess.run(cmd + ["--json", str(out)], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    settings = json.loads(out.read_text())["settings"]
    assert settings["from_runs"] == str(manifest)
    assert settings["iterations"] == [950] and settings["train_images"] == [4000]
    assert settings["categories"] == [1000, 13204] and settings["topk"] == [100]
    assert [r["run"] for r in settings["runs"]] == [r["run"] for r in runs]
    assert "iters" not in settings and "seeds" not in settings  # no argparse defaults
