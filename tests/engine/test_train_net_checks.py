"""projects/train_net.py refuses, in one line and before building anything, what would lose a
run or silently do something else than asked (issue 20): a folder holding a run without
``--resume``/``--overwrite``, misspelt override keys, bad values, unwritable outputs, missing or
corrupt checkpoints, a class count that does not match the dataset; evaluation loads strictly."""

import hashlib
import json
import logging
import socket

import pytest
import torch
from detectron2.config import instantiate

from cqdino.engine import AtomicCheckpointer, Trainer
from tests.helpers import cli_error

from .conftest import CONFIG, ROOT, TINY_CATEGORIES, TINY_OVERRIDES, run_train_net, tiny_args


def _digest(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _fake_run(folder):
    folder.mkdir(parents=True, exist_ok=True)
    files = {
        "model_final.pth": b"weeks of GPU time",
        "model_0000003.pth": b"an older checkpoint",
        "last_checkpoint": b"model_final.pth",
        "config.yaml": b"train: {}\n",
        "metrics.json": b'{"iteration": 0, "total_loss": 1.0}\n',
    }
    for name, data in files.items():
        (folder / name).write_bytes(data)
    return {name: _digest(folder / name) for name in files}


def test_folder_holding_a_run_is_refused(tiny_datasets, tmp_path):
    out = tmp_path / "run"
    before = _fake_run(out)
    proc = run_train_net(tiny_datasets, tiny_args(out))
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert "already holds a run" in last and "--resume" in last and "--overwrite" in last
    assert {name: _digest(out / name) for name in before} == before


def test_overwrite_is_an_explicit_opt_in(tiny_datasets, tmp_path):
    out = tmp_path / "run"
    before = _fake_run(out)
    proc = run_train_net(tiny_datasets, ["--overwrite"] + tiny_args(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert _digest(out / "model_final.pth") != before["model_final.pth"]
    rows = [json.loads(line) for line in (out / "metrics.json").read_text().splitlines()]
    assert [r["iteration"] for r in rows if "total_loss" in r] == [0, 1]  # the new run only


@pytest.mark.parametrize(
    "override, named",
    [
        ("train.max_itr=3", "did you mean train.max_iter"),
        ("model.class_head.topkk=5", "did you mean model.class_head.topk"),
        ("train.max_iter=abc", "train.max_iter must be a positive integer"),
        ("train.max_iter=0", "train.max_iter must be a positive integer"),
        ("dataloader.train.total_batch_size=0", "dataloader.train.total_batch_size must be"),
        ("dataloader.train.total_batch_size=-2", "dataloader.train.total_batch_size must be"),
        ("optimizer.lr=nan", "optimizer.lr must be a finite number"),
    ],
)
def test_bad_overrides_are_one_line(train_net, synthetic_vocab, tmp_path, override, named):
    assert named in cli_error(train_net.cli, tiny_args(tmp_path / "out", override))
    assert not (tmp_path / "out").exists()


def test_unknown_argument_in_a_config_file_is_one_line(tmp_path):
    from cqdino.engine.config_check import load_config, validate_config
    from cqdino.utils.io import InputError

    cfg = load_config(str(ROOT / "configs" / "demo.py"))
    cfg.model.class_head.topkk = 5  # as a config file of one's own could say
    with pytest.raises(InputError, match=r"model.class_head.topkk: .*did you mean .*topk\b"):
        validate_config(cfg)


def test_output_dir_that_is_a_file(train_net, synthetic_vocab, tmp_path):
    path = tmp_path / "a_file"
    path.write_text("x")
    assert "is a file" in cli_error(train_net.cli, tiny_args(path))
    assert path.read_text() == "x"


def test_missing_init_checkpoint_is_one_line(train_net, synthetic_vocab, tmp_path):
    missing = tmp_path / "nope.pth"
    message = cli_error(
        train_net.cli, tiny_args(tmp_path / "out", f"train.init_checkpoint={missing}")
    )
    assert "train.init_checkpoint" in message and str(missing) in message


def test_last_checkpoint_naming_a_missing_file(train_net, synthetic_vocab, tmp_path):
    out = tmp_path / "run"
    _fake_run(out)
    (out / "model_final.pth").unlink()
    message = cli_error(train_net.cli, ["--resume"] + tiny_args(out))
    assert "last_checkpoint names 'model_final.pth', which does not exist" in message
    assert "model_0000003.pth" in message


def test_flag_after_the_overrides(train_net):
    args = train_net.parse_args(CONFIG + ["train.max_iter=3", "--resume", "--num-gpus", "2"])
    assert args.resume and args.num_gpus == 2 and args.opts == ["train.max_iter=3"]


def test_dist_url_is_a_free_port_on_one_machine(train_net):
    from detectron2.engine import default_argument_parser

    fixed = default_argument_parser().get_default("dist_url")
    port = int(fixed.rsplit(":", 1)[1])
    with socket.socket() as busy:  # another run holds detectron2's fixed port
        try:
            busy.bind(("127.0.0.1", port))
        except OSError:
            pass
        assert train_net.parse_args(CONFIG + ["--num-gpus", "2"]).dist_url == "auto"
    several = train_net.parse_args(CONFIG + ["--num-machines", "2", "--machine-rank", "1"])
    assert several.dist_url == fixed  # several machines: the address is the user's to give


def test_eval_only_checks_the_class_count(train_net, synthetic_vocab, tmp_path):
    more = TINY_CATEGORIES + 1
    args = ["--eval-only"] + tiny_args(tmp_path / "out")
    args += [f"model.class_head.num_categories={more}"]
    args += [f"dataloader.{s}.mapper.num_classes={more}" for s in ("train", "test")]
    message = cli_error(train_net.cli, args)
    assert f"{more} classes" in message and f"{TINY_CATEGORIES} categories" in message


def _tiny_model(*overrides):
    from cqdino.engine.config_check import load_config

    cfg = load_config(str(ROOT / "configs" / "demo.py"), TINY_OVERRIDES + list(overrides))
    torch.manual_seed(0)
    return instantiate(cfg.model)


def test_strict_loading_names_the_differences(synthetic_vocab, tmp_path):
    from cqdino.engine import CheckpointError, load_weights_strict

    path = tmp_path / "other_config.pth"
    torch.save({"model": _tiny_model().state_dict()}, path)
    model = _tiny_model("model.transformer.num_queries=30")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(CheckpointError, match=r"does not fit.*tgt_embed.weight \[20, 128\]"):
        load_weights_strict(model, str(path))
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())  # untouched
    state = _tiny_model().state_dict()
    state.pop("class_head.logit_bias", None) or state.pop(next(iter(state)))
    state["extra.weight"] = torch.zeros(1)
    torch.save({"model": state}, path)
    with pytest.raises(CheckpointError, match=r"1 missing .*1 unexpected \(extra.weight\)"):
        load_weights_strict(_tiny_model(), str(path))


def test_eval_only_with_a_checkpoint_of_another_config(synthetic_vocab, tmp_path):
    path = tmp_path / "other_config.pth"
    torch.save({"model": _tiny_model().state_dict()}, path)
    args = ["--eval-only"] + tiny_args(tmp_path / "out", f"train.init_checkpoint={path}")
    proc = run_train_net(synthetic_vocab, args + ["model.transformer.num_queries=30"])
    text = proc.stdout + proc.stderr
    assert proc.returncode == 1 and "Traceback" not in text
    errors = [line for line in text.splitlines() if "ERROR" in line]
    assert len(errors) == 1 and "does not fit the model of this config" in errors[0]
    assert "Evaluation results" not in text


def test_corrupt_checkpoint_is_one_line(tmp_path):
    from cqdino.engine import CheckpointError, load_weights_strict

    path = tmp_path / "model_final.pth"
    path.write_bytes(b"PK\x03\x04 not really a checkpoint")
    with pytest.raises(CheckpointError, match=r"^cannot read checkpoint .*model_final.pth"):
        load_weights_strict(torch.nn.Linear(2, 2), str(path))


def test_partial_init_checkpoint_says_what_it_skipped(tmp_path):
    source = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2))
    path = tmp_path / "pretrained.pth"
    torch.save({"model": source.state_dict()}, path)
    target = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 5), torch.nn.ReLU())
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    log = logging.getLogger("cqdino.engine.checkpoint")
    log.addHandler(handler)
    try:
        AtomicCheckpointer(target).resume_or_load(str(path), resume=False)
    finally:
        log.removeHandler(handler)
    summary = [r.getMessage() for r in records if r.getMessage().startswith("Loaded 2 of 4")]
    assert summary and "2 of another shape (1.weight, 1.bias)" in summary[0], records
    assert torch.equal(target[0].weight, source[0].weight)


def test_nonfinite_error_inside_the_model_names_the_iteration():
    class Model(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.ones(1))

        def forward(self, batch):
            if batch == "bad":
                raise FloatingPointError("HungarianMatcher: non-finite matching cost")
            return {"loss": self.w.sum()}

    model = Model()
    trainer = Trainer(model, ["ok", "ok", "bad"], torch.optim.SGD(model.parameters(), lr=0.1))
    with pytest.raises(FloatingPointError, match=r"at iteration 2: HungarianMatcher"):
        trainer.train(0, 3)


def test_help_is_quiet():
    import subprocess
    import sys

    proc = subprocess.run(
        [sys.executable, str(ROOT / "projects" / "train_net.py"), "--help"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0 and "--overwrite" in proc.stdout
    assert "Warning" not in proc.stderr, proc.stderr


def test_checkpointer_removes_only_its_own_temporary_files(tmp_path):
    """A killed run's temporary checkpoint files are removed at the next start; a user's
    hidden ``.tmp`` files in the output folder are not."""
    (tmp_path / ".notes.tmp").write_text("mine")
    (tmp_path / ".model_0000007.pth.x1y2.tmp").write_bytes(b"partial")
    (tmp_path / ".last_checkpoint.z3.tmp").write_text("model_0000007.pth")
    AtomicCheckpointer(torch.nn.Linear(2, 2), str(tmp_path))
    assert sorted(p.name for p in tmp_path.iterdir()) == [".notes.tmp"]
