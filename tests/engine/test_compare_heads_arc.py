"""tools/compare_heads.py --arc on a tiny trained CQ-DINO run: with K = C every GT category is
selected (ARC 100 %, known without the code under test), with K < C it is a percentage; the
file it writes is never overwritten, and a run that is not CQ-DINO is refused."""

import json
import shutil
import subprocess
import sys

import pytest

from .conftest import ROOT, TINY_CATEGORIES

TOOL = ROOT / "tools" / "compare_heads.py"


def _arc(datasets, run, topk):
    cmd = [sys.executable, str(TOOL), "--arc", str(run), "--topk", str(topk)]
    cmd += ["--data-root", str(datasets)]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_arc_of_a_run(tiny_datasets, tiny_checkpoint, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    for name in ("config.yaml", "model_final.pth"):
        shutil.copy(tiny_checkpoint.parent / name, run / name)
    proc = _arc(tiny_datasets, run, TINY_CATEGORIES)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads((run / "arc.json").read_text()) == {"ARC": 100.0, "topk": TINY_CATEGORIES}
    # an existing arc.json is kept, and the refusal says how to measure again
    proc = _arc(tiny_datasets, run, 3)
    assert proc.returncode == 1 and "exists; remove it" in proc.stderr
    assert json.loads((run / "arc.json").read_text())["ARC"] == 100.0
    (run / "arc.json").unlink()
    proc = _arc(tiny_datasets, run, 3)
    assert proc.returncode == 0, proc.stderr[-3000:]
    arc = json.loads((run / "arc.json").read_text())["ARC"]
    assert 0 <= arc <= 100


def test_arc_refuses_other_runs(tiny_datasets, tmp_path):
    proc = _arc(tiny_datasets, tmp_path, 10)
    assert proc.returncode == 1 and "no config.yaml" in proc.stderr
    (tmp_path / "config.yaml").write_text("model:\n  _target_: cqdino.modeling.DINO\n")
    (tmp_path / "model_final.pth").write_bytes(b"")
    proc = _arc(tiny_datasets, tmp_path, 10)
    assert proc.returncode == 1 and "not a CQ-DINO run" in proc.stderr
