"""tools/gradient_dilution_runs.py: the per-category accounting against a brute-force loop, the
closed-form focal derivative against finite differences, and the tool on two tiny trained runs
(CQ-DINO and DINO): its tapped gradients match the closed form, and bad folders are one-line
errors before anything is built."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from .conftest import ROOT, TINY_CATEGORIES, TINY_OVERRIDES, run_train_net

sys.path.insert(0, str(ROOT / "tools"))
from gradient_dilution_runs import column_sums, focal_grad  # noqa: E402

TOOL = ROOT / "tools" / "gradient_dilution_runs.py"


@pytest.mark.parametrize("mapped", [False, True])
def test_column_sums_against_a_loop(mapped):
    g = torch.Generator().manual_seed(3)
    B, Q, N, C = 3, 5, 4, 7
    grad = torch.randn(B, Q, N, generator=g)
    positive = torch.rand(B, Q, N, generator=g) < 0.2
    # columns of the same category in several images (CQ-DINO); identity for DINO (N = C)
    indices = torch.randint(0, C, (B, N), generator=g) if mapped else None
    if not mapped:
        grad, positive = torch.randn(B, Q, C, generator=g), torch.rand(B, Q, C, generator=g) < 0.2
    pos, neg = column_sums(grad, positive, indices, C)
    ref_pos, ref_neg = [0.0] * C, [0.0] * C
    for b in range(B):
        for q in range(Q):
            for n in range(grad.shape[-1]):
                c = int(indices[b, n]) if mapped else n
                v = abs(float(grad[b, q, n]))
                if positive[b, q, n]:
                    ref_pos[c] += v
                else:
                    ref_neg[c] += v
    assert pos.tolist() == pytest.approx(ref_pos, rel=1e-6, abs=1e-9)
    assert neg.tolist() == pytest.approx(ref_neg, rel=1e-6, abs=1e-9)


def test_column_sums_rejects_a_column_count_mismatch():
    with pytest.raises(ValueError, match="3 columns for 4 categories"):
        column_sums(torch.zeros(1, 2, 3), torch.zeros(1, 2, 3, dtype=torch.bool), None, 4)


def test_focal_grad_against_finite_differences():
    x = torch.linspace(-6, 6, 25, dtype=torch.float64)
    for t in (0.0, 1.0):
        target = torch.full_like(x, t)
        alpha, gamma, h = 0.25, 2.0, 1e-6

        def loss(z):  # the focal loss written from its definition, float64
            p = torch.sigmoid(z)
            p_t = p if t else 1 - p
            a = alpha if t else 1 - alpha
            return -a * (1 - p_t) ** gamma * torch.log(p_t)

        numeric = (loss(x + h) - loss(x - h)) / (2 * h)
        got = focal_grad(x, target > 0, alpha, gamma)
        assert torch.allclose(got, numeric, rtol=1e-5, atol=1e-9)


@pytest.fixture(scope="module")
def tiny_dino_run(tiny_datasets, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("tiny_dino_train")
    over = [o for o in TINY_OVERRIDES if not o.startswith("model.class_head.")]
    over.append(f"model.class_head.num_classes={TINY_CATEGORIES}")
    args = ["--config-file", str(ROOT / "configs" / "demo_dino.py"), *over]
    args += [f"train.output_dir={out}", "train.max_iter=2", "train.checkpointer.period=1"]
    proc = run_train_net(tiny_datasets, args)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return out


def _tool(datasets: Path, *args: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, str(TOOL), "--data-root", str(datasets), *args]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_tool_on_tiny_runs(tiny_datasets, tiny_checkpoint, tiny_dino_run, tmp_path):
    out = tmp_path / "dilution.json"
    runs = [str(tiny_checkpoint.parent), str(tiny_dino_run)]
    proc = _tool(tiny_datasets, *runs, "--images", "6", "--batch", "3", "--json", str(out))
    assert proc.returncode == 0, proc.stderr[-4000:]
    rows = json.loads(out.read_text())["rows"]
    by = {}
    for r in rows:
        by.setdefault((r["head"], r["checkpoint"], r["loss"]), []).append(r)
    # DINO: init, the periodic checkpoints in iteration order, the final one, then the pooled
    # "run" rows
    dino_ckpts = [c for h, c, lo in by if h == "DINO" and lo == "final"]
    assert dino_ckpts == [
        "init",
        "model_0000000.pth",
        "model_0000001.pth",
        "model_final.pth",
        "run",
    ]
    assert not any(h == "DINO" and lo == "selection" for h, _, lo in by)
    assert ("CQ-DINO", "model_final.pth", "selection") in by
    for r in rows:
        assert [r["group"] for r in by[(r["head"], r["checkpoint"], r["loss"])]] == [
            "rare",
            "common",
            "frequent",
        ]
        if r["checkpoint"] != "run":
            # the tapped gradients are the loss's whole gradient: the closed form agrees
            assert r["tap_rel_err"] is not None and r["tap_rel_err"] < 1e-4
        if r["head"] == "DINO":
            # every DINO column is every category in every image: each one has negatives
            assert r["defined"] == r["categories"]
    # every category of the tiny vocabulary is in exactly one group (or has no image)
    for key, group_rows in by.items():
        assert sum(r["categories"] for r in group_rows) <= TINY_CATEGORIES
    assert "pooled_ratio" in proc.stdout


def test_tool_bad_inputs_are_one_line_errors(tiny_datasets, tmp_path):
    proc = _tool(tiny_datasets, str(tmp_path))
    assert proc.returncode == 2
    assert (
        proc.stderr.strip() == f"error: {tmp_path}: no config.yaml (not a train_net.py run folder)"
    )
    (tmp_path / "config.yaml").write_text("{}\n")
    proc = _tool(tiny_datasets, str(tmp_path), "--checkpoints", "model_0000099.pth")
    assert proc.returncode == 2
    assert proc.stderr.strip() == f"error: {tmp_path / 'model_0000099.pth'}: no such checkpoint"
    mine = tmp_path / "mine.json"
    mine.write_text("mine")
    proc = _tool(tiny_datasets, str(tmp_path), "--json", str(mine))
    assert proc.returncode == 2 and "exists: add --overwrite" in proc.stderr
    assert mine.read_text() == "mine"


@pytest.mark.slow
def test_tool_refuses_data_of_another_vocabulary(tiny_checkpoint, tmp_path):
    other = tmp_path / "data"
    cmd = [sys.executable, "-m", "cqdino.data.synthetic", "--out", str(other / "synthetic_vocab")]
    cmd += ["--num-categories=30", "--num-train-images=4", "--num-val-images=2"]
    cmd += ["--image-size", "64", "80"]
    subprocess.run(cmd, check=True, capture_output=True, cwd=ROOT)
    proc = _tool(other, str(tiny_checkpoint.parent))
    assert proc.returncode == 2, proc.stderr[-2000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and "trained with 40 categories" in last and "30" in last


def test_summarise_over_runs():
    from gradient_dilution_runs import summarise

    def row(run, ratio, group="rare"):
        return dict(
            run=run,
            head="DINO",
            C=5,
            checkpoint="init",
            loss="final",
            group=group,
            pooled_ratio=ratio,
        )

    rows = [row("a", 1.0), row("b", 3.0), row("a", None, "common"), row("b", 2.0, "common")]
    got = summarise(rows)
    assert [
        (r["group"], r["runs"], r["pooled_mean"], r["pooled_min"], r["pooled_max"]) for r in got
    ] == [("rare", 2, 2.0, 1.0, 3.0), ("common", 1, 2.0, 2.0, 2.0)]
