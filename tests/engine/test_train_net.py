"""projects/train_net.py end to end on a tiny synthetic vocabulary: outputs, exact resume after
SIGKILL (during and right after a checkpoint write), non-finite-loss stop, 2-process CPU DDP,
eval-only, and the clear error for a missing dataset."""

import json
import math
import os
import shutil
import stat

import pytest
import torch

from .conftest import ROOT, TINY_OVERRIDES, metrics_by_iter, run_train_net

pytestmark = pytest.mark.slow

CONFIG = ["--config-file", str(ROOT / "configs" / "demo.py")]


def _args(out, *extra):
    return CONFIG + TINY_OVERRIDES + [f"train.output_dir={out}", *extra]


def _ok(proc):
    assert (
        proc.returncode == 0
    ), f"exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    return proc


@pytest.fixture(scope="module")
def reference_run(tiny_datasets, tmp_path_factory):
    """An uninterrupted 12-iteration run, checkpoints every 4 iterations."""
    out = tmp_path_factory.mktemp("reference")
    args = _args(
        out, "train.max_iter=12", "train.checkpointer.period=4", "train.checkpointer.max_to_keep=10"
    )
    old = os.umask(0o022)
    try:
        proc = _ok(run_train_net(tiny_datasets, args))
    finally:
        os.umask(old)
    (out.parent / f"{out.name}.output.txt").write_text(proc.stdout + proc.stderr)
    return out, metrics_by_iter(out)


def test_outputs(reference_run, tiny_datasets):
    out, metrics = reference_run
    for name in ("config.yaml", "log.txt", "metrics.json", "last_checkpoint", "model_final.pth"):
        assert (out / name).is_file(), name
    assert any(p.name.startswith("events.out.tfevents") for p in out.iterdir())
    assert (out / "last_checkpoint").read_text() == "model_final.pth"
    assert sorted(p.name for p in out.glob("model_*.pth")) == [
        "model_0000003.pth",
        "model_0000007.pth",
        "model_0000011.pth",
        "model_final.pth",
    ]
    assert not list(out.glob(".*.tmp"))
    assert sorted(metrics) == list(range(12))
    assert all(math.isfinite(m["total_loss"]) for m in metrics.values())
    log = (out / "log.txt").read_text()
    assert "eta:" in log and "loss_class" in log
    # plain text, no colour codes; no CUDA_HOME guess from torch.utils.cpp_extension
    assert "\x1b[" not in log
    console = (out.parent / f"{out.name}.output.txt").read_text()
    assert "No CUDA runtime is found" not in console + log
    # outputs get the umask's permissions (0644 under 022), not tempfile's 0600
    for name in ("model_final.pth", "model_0000003.pth", "last_checkpoint", "config.yaml"):
        assert stat.S_IMODE(os.stat(out / name).st_mode) == 0o644, name
    # the training dataset's class names travel with the weights
    names = (tiny_datasets / "synthetic_vocab" / "category_names.txt").read_text()
    final = torch.load(out / "model_final.pth", map_location="cpu", weights_only=True)
    assert final["class_names"] == names.splitlines()
    # configs/demo.py: lr 1.2e-3, x0.1 at 0.9 of max_iter (round(10.8) = 11); linear warm-up
    # from 0.1x over 50 iterations, cut to end at the step
    for i in range(12):
        mult = 0.1 + 0.9 * i / 11 if i < 11 else 0.1
        assert metrics[i]["lr"] == pytest.approx(1.2e-3 * mult, rel=1e-6), i
    ckpt = torch.load(out / "model_0000007.pth", map_location="cpu", weights_only=True)
    assert ckpt["iteration"] == 7 and "optimizer" in ckpt["trainer"]
    # after 8 iterations of batch 2: 16 stream items went into batches, the rest of what was
    # consumed waits in the aspect-ratio buckets
    loader = ckpt["trainer"]["ranks"][0]["data_loader"]
    assert loader["consumed"] == 16 + sum(len(b) for b in loader["pending"])
    assert all(len(b) < 2 for b in loader["pending"])


@pytest.mark.parametrize("mode", ["kill_during_write", "kill_before_tag", "kill_after_save"])
def test_sigkill_then_resume_matches_uninterrupted(mode, reference_run, tiny_datasets, tmp_path):
    ref_dir, ref = reference_run
    args = _args(
        tmp_path,
        "train.max_iter=12",
        "train.checkpointer.period=4",
        "train.checkpointer.max_to_keep=10",
    )
    killed = run_train_net(tiny_datasets, args, harness=[mode, "7"])
    assert killed.returncode == -9, killed.stderr[-3000:]
    last = (tmp_path / "last_checkpoint").read_text()
    # the checkpoint of iteration 7 is only used once it is complete and tagged
    expected = "model_0000007.pth" if mode == "kill_after_save" else "model_0000003.pth"
    assert last == expected
    resumed = _ok(run_train_net(tiny_datasets, ["--resume"] + args))
    start = 8 if mode == "kill_after_save" else 4
    assert f"Resuming at iteration {start}" in resumed.stdout + resumed.stderr
    assert not list(tmp_path.glob(".*.tmp"))  # the half-written file was cleaned up
    got = metrics_by_iter(tmp_path)
    # killed after saving iteration 7, before the writer (the last hook) logged it
    lost = {7} if mode == "kill_after_save" else set()
    assert sorted(got) == sorted(set(range(12)) - lost)
    for i in range(start, 12):
        assert got[i]["lr"] == pytest.approx(ref[i]["lr"], rel=1e-9), i
        for k in ref[i]:
            if k.startswith("loss_") or k == "total_loss":
                assert got[i][k] == pytest.approx(ref[i][k], rel=1e-5, abs=1e-6), (i, k)
    final = torch.load(tmp_path / "model_final.pth", map_location="cpu", weights_only=True)
    ref_final = torch.load(ref_dir / "model_final.pth", map_location="cpu", weights_only=True)
    for k, v in ref_final["model"].items():
        torch.testing.assert_close(final["model"][k], v, rtol=1e-4, atol=1e-5, msg=k)


def test_resume_falls_back_past_a_corrupt_checkpoint(reference_run, tiny_datasets, tmp_path):
    """--resume from a copy of the finished reference run whose two newest checkpoints are
    corrupt: a warning, then the run continues from model_0000007.pth; metrics.json keeps one
    row per iteration (the rows written after that checkpoint are replaced, not duplicated),
    and the result is the uninterrupted run's."""
    ref_dir, ref = reference_run
    out = tmp_path / "run"
    shutil.copytree(ref_dir, out)
    for name in ("model_final.pth", "model_0000011.pth"):
        data = (out / name).read_bytes()
        (out / name).write_bytes(data[: len(data) // 2])  # cut short, as by a full disk
    args = _args(
        out, "train.max_iter=12", "train.checkpointer.period=4", "train.checkpointer.max_to_keep=10"
    )
    proc = _ok(run_train_net(tiny_datasets, ["--resume"] + args))
    text = proc.stdout + proc.stderr
    assert "cannot read checkpoint" in text and "model_final.pth" in text
    assert "Resuming at iteration 8" in text and "Traceback" not in text
    rows = [json.loads(line) for line in (out / "metrics.json").read_text().splitlines()]
    train_rows = [r["iteration"] for r in rows if "total_loss" in r]
    assert train_rows == list(range(12))
    got = metrics_by_iter(out)
    for i in range(8, 12):
        assert got[i]["total_loss"] == pytest.approx(ref[i]["total_loss"], rel=1e-5), i


def test_resume_restores_ema(tiny_datasets, tmp_path):
    """EMA on: its state is checkpointed and restored (resumed EMA == uninterrupted EMA)."""
    ema = ["train.ema.enabled=True", "train.ema.decay=0.9"]
    ref_dir = tmp_path / "ref"
    _ok(run_train_net(tiny_datasets, _args(ref_dir, "train.max_iter=6", *ema)))
    out = tmp_path / "resumed"
    args = _args(out, "train.max_iter=6", "train.checkpointer.period=3", *ema)
    assert run_train_net(tiny_datasets, args, harness=["kill_after_save", "2"]).returncode == -9
    _ok(run_train_net(tiny_datasets, ["--resume"] + args))
    a = torch.load(out / "model_final.pth", map_location="cpu", weights_only=True)
    b = torch.load(ref_dir / "model_final.pth", map_location="cpu", weights_only=True)
    assert a["trainer"]["ema"]["decay"] == 0.9
    for k, v in b["trainer"]["ema"]["state"].items():
        torch.testing.assert_close(a["trainer"]["ema"]["state"][k], v, rtol=1e-4, atol=1e-5)
    # the EMA differs from the raw weights (it is really averaged)
    k = next(k for k, v in b["model"].items() if v.dtype.is_floating_point and v.numel() > 100)
    assert not torch.equal(b["trainer"]["ema"]["state"][k], b["model"][k])


def test_nonfinite_loss_stops_with_the_loss_named(tiny_datasets, tmp_path):
    proc = run_train_net(
        tiny_datasets, _args(tmp_path, "train.max_iter=10"), harness=["nan_loss", "3"]
    )
    assert proc.returncode != 0
    text = proc.stdout + proc.stderr
    assert "Non-finite loss at iteration 3" in text and "loss_giou_0" in text
    assert sorted(metrics_by_iter(tmp_path)) == [0, 1, 2]


DDP_OVERRIDES = [
    # rank-independent model: no batch statistics, no DN (its group count follows the
    # largest GT count of each rank's own batch)
    "model.backbone.norm=FrozenBN",
    "model.dn_number=0",
    "dataloader.train.total_batch_size=4",
    "dataloader.train.aspect_ratio_grouping=False",
    "train.max_iter=4",
]


def test_ddp_two_cpu_processes_match_one(tiny_datasets, tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    _ok(run_train_net(tiny_datasets, _args(one, *DDP_OVERRIDES)))
    proc = _ok(run_train_net(tiny_datasets, ["--num-gpus", "2"] + _args(two, *DDP_OVERRIDES)))
    assert "World size: 2" in proc.stdout + proc.stderr
    a, b = metrics_by_iter(one), metrics_by_iter(two)
    assert sorted(a) == sorted(b) == [0, 1, 2, 3]
    # Iteration 0 (same weights): the losses (mean over ranks) and the gradient (averaged by
    # DDP; its norm before clipping) equal one process up to float32 summation order. Later
    # iterations drift slightly: AdamW's first steps move near-zero gradients by ~lr whatever
    # their size, so rounding differences of the all-reduce grow.
    for i, rel in ((0, 1e-5), (1, 2e-2), (2, 2e-2), (3, 2e-2)):
        keys = [k for k in a[i] if k.startswith("loss_") or k == "total_loss"]
        assert "loss_select" in keys and "loss_class" in keys
        for k in keys:
            assert b[i][k] == pytest.approx(a[i][k], rel=rel, abs=1e-6), (i, k)
    assert b[0]["grad_norm"] == pytest.approx(a[0]["grad_norm"], rel=1e-4)


def test_eval_only_prints_the_ap_table(reference_run, tiny_datasets, tmp_path):
    ref_dir, _ = reference_run
    ckpt = ref_dir / "model_final.pth"
    (tmp_path / "config.yaml").write_text("the training run's config\n")
    proc = _ok(
        run_train_net(
            tiny_datasets, ["--eval-only"] + _args(tmp_path, f"train.init_checkpoint={ckpt}")
        )
    )
    text = proc.stdout + proc.stderr
    assert "Evaluation results" in text
    for key in ("AP", "AP50", "APr", "APc", "APf"):
        assert f"| {key}" in text or f" {key} " in text, key
    # evaluating into a run's folder keeps the run's config.yaml: the evaluation has its own
    assert (tmp_path / "config.yaml").read_text() == "the training run's config\n"
    assert (tmp_path / "eval" / "1" / "config.yaml").is_file()


def test_missing_dataset_is_one_clear_message(tmp_path):
    empty = tmp_path / "no_datasets"
    empty.mkdir()
    env_root = str(empty)
    proc = run_train_net(
        empty,
        ["--config-file", str(ROOT / "configs" / "v3det.py"), f"train.output_dir={tmp_path}"],
    )
    assert proc.returncode != 0
    err = proc.stderr.strip().splitlines()
    assert "v3det_train" in err[-1] and env_root in err[-1] and "DETECTRON2_DATASETS" in err[-1]
    assert "Traceback" not in proc.stderr
    assert not os.path.exists(tmp_path / "model_final.pth")
