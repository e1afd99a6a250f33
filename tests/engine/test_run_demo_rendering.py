"""tools/run_demo.py evaluates the second rendering as the training runs: ``train_net.py
--eval-only`` in as many processes, the trained weights, the other val split, its own
inference folder; the AP comes from that folder's ``results.json``; a failed evaluation is
reported, not read from a stale file."""

import importlib.util
import json
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _load_run_demo():
    spec = importlib.util.spec_from_file_location("run_demo", ROOT / "tools" / "run_demo.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_rendering_eval_command_and_results(monkeypatch, tmp_path):
    run_demo = _load_run_demo()
    folder = tmp_path / f"inference_{run_demo.RENDERING}"
    calls = []

    def fake_run(cmd, cwd=None):
        calls.append(cmd)
        folder.mkdir(exist_ok=True)
        record = {"dataset": run_demo.RENDERING, "bbox": {"AP": 12.5, "AP50": 20.0}}
        (folder / "results.json").write_text(json.dumps(record))
        return subprocess.CompletedProcess(cmd, 0)

    monkeypatch.setattr(run_demo.subprocess, "run", fake_run)
    out = run_demo.evaluate_rendering(tmp_path, [f"train.output_dir={tmp_path}", "a.b=1"], 2)
    assert out == {"bbox/AP": 12.5, "bbox/AP50": 20.0}
    (cmd,) = calls
    assert cmd[1].endswith("train_net.py") and cmd[cmd.index("--num-gpus") + 1] == "2"
    assert "--eval-only" in cmd and "--overwrite" not in cmd and "a.b=1" in cmd
    assert f"dataloader.test.dataset.names={run_demo.RENDERING}" in cmd
    assert f"dataloader.evaluator.output_dir={folder}" in cmd
    assert f"train.init_checkpoint={tmp_path / 'model_final.pth'}" in cmd

    # a failed evaluation: no AP, even with a results.json of an earlier run in the folder
    monkeypatch.setattr(
        run_demo.subprocess, "run", lambda cmd, cwd=None: subprocess.CompletedProcess(cmd, 1)
    )
    assert run_demo.evaluate_rendering(tmp_path, [], 2) == {}


def test_config_file_names_the_synthetic_folder_and_its_name_style(monkeypatch, tmp_path):
    """--config-file: demo.py trains on synthetic_vocab, demo_opaque.py on
    synthetic_vocab_opaque (generated with --names opaque); a config on other data, or an
    existing folder of the other name style, is one clear error before any work."""
    import pytest

    run_demo = _load_run_demo()
    assert run_demo.config_folder(ROOT / "configs" / "demo.py") == "synthetic_vocab"
    assert run_demo.config_folder(ROOT / "configs" / "demo_opaque.py") == "synthetic_vocab_opaque"
    with pytest.raises(SystemExit, match=r"coco\.py: trains on 'coco_2017_train'"):
        run_demo.config_folder(ROOT / "configs" / "coco.py")

    calls = []
    monkeypatch.setattr(run_demo.subprocess, "run", lambda cmd, check: calls.append(cmd))
    monkeypatch.setenv("DETECTRON2_DATASETS", str(tmp_path))
    run_demo.generate_data("synthetic_vocab_opaque")
    (cmd,) = calls
    assert cmd[cmd.index("--out") + 1] == str(tmp_path / "synthetic_vocab_opaque")
    assert cmd[cmd.index("--names") + 1] == "opaque"
    # an existing folder of the other style
    from cqdino.data import synthetic

    tiny = ["--num-categories", "20", "--num-train-images", "2", "--num-val-images", "1"]
    synthetic.main(["--out", str(tmp_path / "synthetic_vocab_opaque")] + tiny)
    with pytest.raises(SystemExit, match="holds descriptive names, synthetic_vocab_opaque needs"):
        run_demo.generate_data("synthetic_vocab_opaque")
