"""tools/compare_heads.py --arc on a tiny trained CQ-DINO run: with K = C every GT category is
selected (ARC 100 %), and with K = 3 on weights whose selector ranks the categories in the same
order in every image (by their number of val pairs), ARC is the share of the val (image, GT
category) pairs of the first three (both known without the code under test); the file it writes
is never overwritten, and a run that is not CQ-DINO is refused."""

import json
import shutil
import subprocess
import sys

import pytest
import torch

from .conftest import ROOT, TINY_CATEGORIES

TOOL = ROOT / "tools" / "compare_heads.py"


def _arc(datasets, run, topk):
    cmd = [sys.executable, str(TOOL), "--arc", str(run), "--topk", str(topk)]
    cmd += ["--data-root", str(datasets)]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)


def _val_pairs(datasets) -> set:
    """The (image id, contiguous category) pairs of the val split's GT boxes, from its json
    (contiguous = position of the category id among the sorted ids)."""
    json_file = datasets / "synthetic_vocab" / "annotations" / "synthetic_vocab_val.json"
    d = json.loads(json_file.read_text())
    contiguous = {c: i for i, c in enumerate(sorted(c["id"] for c in d["categories"]))}
    return {(a["image_id"], contiguous[a["category_id"]]) for a in d["annotations"]}


def _selector_ranks(checkpoint, order) -> None:
    """Rewrite ``checkpoint`` so that the selector ranks the categories in ``order`` (all of
    them, best first) in every image: the image terms of its score (the
    ``score_query``/``dense_query`` weights of the dense+bilinear form) are zero and the
    per-category bias alone decides (``-i`` for ``order[i]``); in the model weights and the EMA
    weights, when the checkpoint has them."""
    ckpt = torch.load(checkpoint, map_location="cpu", weights_only=False)
    states = [ckpt["model"]]
    ema = ckpt.get("trainer", {}).get("ema", {})
    if isinstance(ema, dict) and isinstance(ema.get("state"), dict):
        states.append(ema["state"])
    for state in states:
        (bias_key,) = [k for k in state if k.endswith("selector.category_bias")]
        zeroed = [k for k in state if k.endswith(("score_query.weight", "dense_query.weight"))]
        assert len(zeroed) == 2, sorted(state)
        for k in zeroed:
            state[k] = torch.zeros_like(state[k])
        assert sorted(order) == list(range(len(state[bias_key])))
        bias = torch.empty_like(state[bias_key])
        bias[torch.tensor(order)] = -torch.arange(len(order), dtype=bias.dtype)
        state[bias_key] = bias
    torch.save(ckpt, checkpoint)


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
    # K = 3, every image ranking the categories by their number of val pairs (then by index)
    pairs = _val_pairs(tiny_datasets)
    counts = [0] * TINY_CATEGORIES
    for _, c in pairs:
        counts[c] += 1
    order = sorted(range(TINY_CATEGORIES), key=lambda c: (-counts[c], c))
    expected = 100.0 * len([p for p in pairs if p[1] in order[:3]]) / len(pairs)
    # the check tells a right ARC from 0 % and 100 %, and K = 3 from K = 2 or 4
    assert 0 < expected < 100 and counts[order[2]] > 0 and counts[order[3]] > 0
    _selector_ranks(run / "model_final.pth", order)
    proc = _arc(tiny_datasets, run, 3)
    assert proc.returncode == 0, proc.stderr[-3000:]
    arc = json.loads((run / "arc.json").read_text())["ARC"]
    assert arc == pytest.approx(expected, rel=1e-12)


def test_arc_refuses_other_runs(tiny_datasets, tmp_path):
    proc = _arc(tiny_datasets, tmp_path, 10)
    assert proc.returncode == 1 and "no config.yaml" in proc.stderr
    (tmp_path / "config.yaml").write_text("model:\n  _target_: cqdino.modeling.DINO\n")
    (tmp_path / "model_final.pth").write_bytes(b"")
    proc = _arc(tiny_datasets, tmp_path, 10)
    assert proc.returncode == 1 and "not a CQ-DINO run" in proc.stderr
