"""projects/train_net.py keeps runs apart and whole (issue 28): one run per output folder (a
lock, taken over from a killed run), ``--resume`` only with the run's own config, ``--eval-only``
results beside a run's own, ``--overwrite`` without stale TensorBoard events, a resume after a
kill before ``last_checkpoint`` was written, a full disk, a checkpoint of another vocabulary,
config keys no callable takes, non-positive sizes and a batch that does not split over the
processes, each one line before anything is built or written."""

import errno
import hashlib
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from detectron2.config import LazyConfig

from cqdino.engine import AtomicCheckpointer, CheckpointError
from cqdino.engine.checkpoint import check_vocabulary, tree_sha256
from cqdino.engine.run_lock import LOCK_NAME, RunLock, RunLockedError
from tests.helpers import cli_error, load_script

from .conftest import CONFIG, ROOT, TINY_OVERRIDES, run_train_net, tiny_args


@pytest.fixture
def preflight(train_net, synthetic_vocab):
    """``train_net.preflight`` of a command line (nothing is launched); the lock it takes is
    released after the test."""

    def run(argv):
        args = train_net.parse_args([str(a) for a in argv])
        train_net.preflight(args)
        return args

    yield run
    while train_net._RUN_LOCK:
        train_net._RUN_LOCK.pop().release()


def _digests(folder):
    """The run's files (the lock file, empty between runs, is not run data)."""
    return {
        p.name: hashlib.sha256(p.read_bytes()).hexdigest()
        for p in folder.iterdir()
        if p.is_file() and p.name != LOCK_NAME
    }


def _fake_run(folder, *overrides):
    """A run's folder: its config.yaml (configs/demo.py with TINY_OVERRIDES), checkpoints,
    last_checkpoint, metrics and TensorBoard events."""
    from cqdino.engine.config_check import load_config

    folder.mkdir(parents=True, exist_ok=True)
    cfg = load_config(str(ROOT / "configs" / "demo.py"), TINY_OVERRIDES + list(overrides))
    cfg.train.output_dir = str(folder)
    LazyConfig.save(cfg, str(folder / "config.yaml"))
    (folder / "model_0000001.pth").write_bytes(b"an older checkpoint")
    (folder / "model_final.pth").write_bytes(b"weeks of GPU time")
    (folder / "last_checkpoint").write_text("model_final.pth")
    (folder / "metrics.json").write_text('{"iteration": 0, "total_loss": 1.0}\n')
    (folder / "events.out.tfevents.123.host.1.0").write_bytes(b"old curves")
    return _digests(folder)


# ----------------------------------------------------------------------------- the lock
def test_second_run_into_a_folder_in_use_is_refused(train_net, synthetic_vocab, tmp_path):
    out = tmp_path / "run"
    with RunLock(str(out)):  # a live run holds the folder
        before = _digests(out)
        message = cli_error(train_net.cli, tiny_args(out))
        assert "is in use by another run" in message and f"pid {os.getpid()}" in message
        assert _digests(out) == before
        # --overwrite does not take a live run's folder either
        assert "is in use by another run" in cli_error(
            train_net.cli, ["--overwrite"] + tiny_args(out)
        )


def test_lock_is_released_on_exit_and_taken_over_after_kill(tmp_path):
    out = tmp_path / "run"
    code = (
        "import os, signal, sys\n"
        "from cqdino.engine.run_lock import RunLock\n"
        f"RunLock({str(out)!r}).acquire()\n"
        "if sys.argv[1] == 'kill': os.kill(os.getpid(), signal.SIGKILL)\n"
    )
    clean = subprocess.run([sys.executable, "-c", code, "exit"], cwd=ROOT, timeout=120)
    assert clean.returncode == 0
    lock = RunLock(str(out)).acquire()  # released at the holder's exit
    assert lock.previous == ""  # ... and emptied: not a killed run's
    lock.release()
    killed = subprocess.run([sys.executable, "-c", code, "kill"], cwd=ROOT, timeout=120)
    assert killed.returncode == -9
    lock = RunLock(str(out)).acquire()  # the kernel released the killed holder's lock
    assert lock.previous.startswith("pid ") and "on " in lock.previous  # the stale holder
    with pytest.raises(RunLockedError, match="in use by another run"):
        RunLock(str(out)).acquire()  # held now: a second one is refused
    lock.release()


def test_preflight_takes_the_lock_and_says_whose_it_took_over(preflight, tmp_path, caplog):
    out = tmp_path / "run"
    out.mkdir()
    (out / LOCK_NAME).write_text("pid 999999 on elsewhere since then: train_net.py\n")
    preflight(tiny_args(out))
    assert "pid 999999" in caplog.text and "takes it over" in caplog.text
    with pytest.raises(RunLockedError):
        RunLock(str(out)).acquire()


# ----------------------------------------------------------------------------- --resume
def test_resume_with_another_config_is_refused_before_anything_is_written(
    train_net, synthetic_vocab, tmp_path
):
    out = tmp_path / "run"
    before = _fake_run(out, "train.max_iter=2")
    message = cli_error(
        train_net.cli, ["--resume"] + tiny_args(out, "model.transformer.num_queries=30")
    )
    assert "--resume: the config differs from the run's" in message
    assert "model.transformer.num_queries (20 -> 30)" in message
    assert "train.output_dir (" not in message
    assert _digests(out) == before  # config.yaml, checkpoints, metrics untouched
    message = cli_error(train_net.cli, ["--resume"] + tiny_args(out, "optimizer.lr=0.5"))
    assert "optimizer.lr (0.0012 -> 0.5)" in message


def test_resume_may_change_where_and_how_often(preflight, tmp_path):
    """Keys that change nothing computed (see RESUME_MAY_DIFFER) pass, and so does
    train.seed=-1 (the run's recorded seed is kept)."""
    out = tmp_path / "run"
    _fake_run(out, "train.max_iter=2")
    shutil.move(str(out), str(tmp_path / "moved"))  # the folder moved: output_dir differs
    moved = tmp_path / "moved"
    preflight(
        ["--resume"]
        + tiny_args(moved, "train.eval_period=5", "train.log_period=3", "train.seed=-1")
        + ["train.checkpointer.max_to_keep=2", "dataloader.train.num_workers=0"]
    )


# ----------------------------------------------------------------------------- --overwrite
def test_overwrite_removes_the_old_tensorboard_events_and_checkpoints(preflight, tmp_path):
    out = tmp_path / "run"
    _fake_run(out)
    (out / "notes.txt").write_text("mine")
    preflight(["--overwrite"] + tiny_args(out))
    left = sorted(p.name for p in out.iterdir())
    assert not [n for n in left if n.startswith("events.out.tfevents")], left
    assert not [n for n in left if n.startswith("model_")], left
    assert "last_checkpoint" not in left and "metrics.json" not in left
    assert (out / "notes.txt").read_text() == "mine"


# ----------------------------------------------------------------------------- crashed runs
def test_a_run_that_crashed_before_its_first_row_is_not_a_run(preflight, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "config.yaml").write_text("train: {}\n")
    (out / "log.txt").write_text("... Traceback ...\n")
    (out / "metrics.json").write_text("")  # opened by the writer, never written
    (out / "events.out.tfevents.1.host.1.0").write_bytes(b"")
    preflight(tiny_args(out))  # no --overwrite needed


def test_a_run_with_a_metrics_row_still_needs_resume_or_overwrite(
    train_net, synthetic_vocab, tmp_path
):
    out = tmp_path / "run"
    out.mkdir()
    (out / "metrics.json").write_text('{"iteration": 0, "total_loss": 1.0}\n')
    assert "already holds a run (metrics.json)" in cli_error(train_net.cli, tiny_args(out))


# ----------------------------------------------------------------------------- disk full
def test_disk_full_while_writing_a_checkpoint_keeps_the_previous_one(tmp_path, monkeypatch):
    model = torch.nn.Linear(3, 2)
    checkpointer = AtomicCheckpointer(model, str(tmp_path))
    checkpointer.save("model_0000001")
    before = (tmp_path / "model_0000001.pth").read_bytes()
    real_save = torch.save

    def full(obj, f, *a, **k):
        real_save(obj, f, *a, **k)  # the data went out ...
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))  # ... and did not fit

    monkeypatch.setattr(torch, "save", full)
    with pytest.raises(CheckpointError) as e:
        checkpointer.save("model_0000002")
    message = str(e.value)
    assert message.startswith(f"no space left on device in {tmp_path}") and "\n" not in message
    assert "model_0000002.pth was not written" in message
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last_checkpoint", "model_0000001.pth"]
    assert (tmp_path / "model_0000001.pth").read_bytes() == before
    assert (tmp_path / "last_checkpoint").read_text() == "model_0000001.pth"


# ----------------------------------------------------------------------------- vocabulary
def test_check_vocabulary_names_the_first_difference():
    names = ["cat", "dog", "eel"]
    meta = {"class_names": names, "category_tree_sha256": "a" * 64}
    assert check_vocabulary(meta, names, "a" * 64, what="x.pth", dataset="d") == []
    assert check_vocabulary({}, ["other"], None, what="x.pth", dataset="d") == []  # no names
    with pytest.raises(CheckpointError, match=r"1 of 3 names differ \(class 1: 'dog' in the"):
        check_vocabulary(meta, ["cat", "fox", "eel"], "a" * 64, what="x.pth", dataset="d")
    with pytest.raises(CheckpointError, match="3 classes in the checkpoint, 2 in the dataset"):
        check_vocabulary(meta, ["cat", "dog"], None, what="x.pth", dataset="d")
    with pytest.raises(CheckpointError, match="same 3 names in another order"):
        check_vocabulary(meta, ["dog", "cat", "eel"], None, what="x.pth", dataset="d")
    with pytest.raises(CheckpointError, match="category tree differs"):
        check_vocabulary(meta, names, "b" * 64, what="x.pth", dataset="d")
    problems = check_vocabulary(meta, names, "b" * 64, what="x.pth", dataset="d", allow=True)
    assert len(problems) == 1


def test_tree_digest_ignores_formatting(tmp_path):
    a, b, c = tmp_path / "a.json", tmp_path / "b.json", tmp_path / "c.json"
    a.write_text(json.dumps({"x": [1, 2], "y": {"p": 1}}))
    b.write_text(json.dumps({"y": {"p": 1}, "x": [1, 2]}, indent=2))
    c.write_text(json.dumps({"x": [2, 1], "y": {"p": 1}}))
    assert tree_sha256(str(a)) == tree_sha256(str(b)) != tree_sha256(str(c))
    assert tree_sha256(None) is None


def _other_vocabulary(tiny_checkpoint, tmp_path):
    """A copy of the tiny run's checkpoint whose saved vocabulary differs in one name."""
    ckpt = torch.load(tiny_checkpoint, map_location="cpu", weights_only=True)
    ckpt["class_names"] = list(ckpt["class_names"])
    ckpt["class_names"][3] = "not-a-category-of-this-dataset"
    path = tmp_path / "other_vocabulary.pth"
    torch.save(ckpt, path)
    return path


def test_checkpoint_carries_its_vocabulary(tiny_checkpoint, synthetic_vocab):
    from cqdino.data import category_tree_file

    ckpt = torch.load(tiny_checkpoint, map_location="cpu", weights_only=True)
    names = (synthetic_vocab / "synthetic_vocab" / "category_names.txt").read_text()
    assert ckpt["class_names"] == names.splitlines()
    tree = category_tree_file("synthetic_vocab_train")
    assert ckpt["category_tree_sha256"] == tree_sha256(tree)


@pytest.mark.parametrize("use", ["eval", "init", "resume"])
def test_checkpoint_of_another_vocabulary_is_refused(
    use, train_net, preflight, tiny_checkpoint, tmp_path
):
    other = _other_vocabulary(tiny_checkpoint, tmp_path)
    out = tmp_path / "run"
    if use == "eval":
        argv = ["--eval-only"] + tiny_args(out, f"train.init_checkpoint={other}")
    elif use == "init":
        argv = tiny_args(out, f"train.init_checkpoint={other}")
    else:
        shutil.copytree(tiny_checkpoint.parent, out)
        shutil.copy(other, out / "model_final.pth")
        argv = ["--resume"] + tiny_args(out)
    message = cli_error(train_net.cli, argv)
    assert "was trained on another vocabulary than dataset 'synthetic_vocab_train'" in message
    assert "1 of 40 names differ (class 3: 'not-a-category-of-this-dataset'" in message
    assert "--allow-other-vocabulary" in message
    preflight(["--allow-other-vocabulary"] + argv)  # a loud warning instead


# ----------------------------------------------------------------------------- config checks
def test_unlocatable_target_is_an_error():
    from cqdino.engine.config_check import load_config, validate_config
    from cqdino.utils.io import InputError

    cfg = load_config(str(ROOT / "configs" / "demo.py"))
    cfg.model.neck._target_ = "cqdino.modeling.NoSuchNeck"
    with pytest.raises(InputError, match=r"^model.neck._target_: cannot locate .*NoSuchNeck"):
        validate_config(cfg)


def test_misspelt_key_of_a_kwargs_constructor_is_caught():
    """CQDINO(**kw) forwards to DINO: its keys are checked against DINO's arguments."""
    from cqdino.engine.config_check import load_config, validate_config
    from cqdino.utils.io import InputError

    cfg = load_config(str(ROOT / "configs" / "demo.py"))
    cfg.model.dn_numbr = 10  # as a config file of one's own could say
    with pytest.raises(InputError, match=r"model.dn_numbr: CQDINO .*did you mean model.dn_number"):
        validate_config(cfg)
    with pytest.raises(InputError, match=r"did you mean model.dn_number"):
        load_config(str(ROOT / "configs" / "demo.py"), ["model.dn_numbr=10"])
    load_config(
        str(ROOT / "configs" / "demo.py"), ["model.size_divisibility=32"]
    )  # DINO's argument


def test_class_count_check_does_not_skip_on_an_error(train_net):
    from cqdino.engine.config_check import load_config
    from cqdino.utils.io import InputError

    cfg = load_config(str(ROOT / "configs" / "demo.py"), TINY_OVERRIDES)
    cfg.dataloader.train.mapper.num_classes = "${model.class_head.no_such_key}"
    with pytest.raises(InputError, match=r"^dataloader.train.mapper.num_classes: cannot be"):
        train_net._check_class_counts(cfg)


@pytest.mark.parametrize(
    "override, named",
    [
        ("model.class_head.topk=0", "model.class_head.topk must be a positive integer, got 0"),
        ("model.class_head.test_topk=-1", "model.class_head.test_topk must be a positive"),
        ("model.transformer.num_queries=0", "model.transformer.num_queries must be a positive"),
        ("model.dn_number=-5", "model.dn_number must be an integer >= 0"),
    ],
)
def test_non_positive_sizes_are_one_line(train_net, synthetic_vocab, tmp_path, override, named):
    assert named in cli_error(train_net.cli, tiny_args(tmp_path / "out", override))
    assert not (tmp_path / "out").exists()


def test_batch_not_a_multiple_of_the_processes(train_net, synthetic_vocab, tmp_path):
    message = cli_error(train_net.cli, ["--num-gpus", "3"] + tiny_args(tmp_path / "out"))
    assert "dataloader.train.total_batch_size=2 is not a multiple of the 3 processes" in message
    assert not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------- end to end
@pytest.mark.slow
def test_eval_only_into_a_run_writes_a_new_folder(tiny_checkpoint, tiny_datasets, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(tiny_checkpoint.parent, run)
    (run / "inference").mkdir(exist_ok=True)
    (run / "inference" / "results.json").write_text("the run's own results")
    before = _digests(run)
    for n in (1, 2):
        proc = run_train_net(tiny_datasets, ["--eval-only", "--resume"] + tiny_args(run))
        text = proc.stdout + proc.stderr
        assert proc.returncode == 0, text[-3000:]
        assert f"Evaluating {run / 'model_final.pth'} (the run's last checkpoint" in text
        assert "Evaluation results" in text
        assert (run / "eval" / str(n) / "config.yaml").is_file()
        assert (run / "eval" / str(n) / "log.txt").is_file()
    assert _digests(run) == before  # log.txt, config.yaml, metrics.json, checkpoints
    assert (run / "inference" / "results.json").read_text() == "the run's own results"
    saved = LazyConfig.load(str(run / "eval" / "1" / "config.yaml"))
    assert saved.train.init_checkpoint == str(run / "model_final.pth")


@pytest.mark.slow
def test_resume_after_a_kill_before_the_first_last_checkpoint(tiny_datasets, tmp_path):
    """SIGKILL once model_0000001.pth is complete, before last_checkpoint exists: --resume
    continues at iteration 2 (not 0), metrics.json has one row per iteration, and the lock of
    the killed run is taken over (then released at the end)."""
    args = tiny_args(tmp_path, "train.max_iter=4", "train.checkpointer.period=2")
    killed = run_train_net(tiny_datasets, args, harness=["kill_before_tag", "1"])
    assert killed.returncode == -9, killed.stderr[-3000:]
    assert not (tmp_path / "last_checkpoint").exists()
    assert (tmp_path / "model_0000001.pth").is_file()
    refused = run_train_net(tiny_datasets, args)  # without --resume: it is a run
    assert refused.returncode != 0 and "already holds a run" in refused.stderr
    assert "ended without releasing it (killed?); this run takes it over" in refused.stderr
    proc = run_train_net(tiny_datasets, ["--resume"] + args)
    text = proc.stdout + proc.stderr
    assert proc.returncode == 0, text[-3000:]
    assert "no last_checkpoint" in text and "Resuming at iteration 2" in text
    rows = [json.loads(line) for line in (tmp_path / "metrics.json").read_text().splitlines()]
    # no iteration twice, none restarted from 0; the row of iteration 1 was never written (the
    # kill came after its checkpoint, before the writer, the last hook: as in
    # test_train_net.py's kill_after_save)
    assert [r["iteration"] for r in rows if "total_loss" in r] == [0, 2, 3]
    assert (tmp_path / LOCK_NAME).read_text() == ""  # released cleanly


@pytest.mark.slow
def test_disk_full_during_training_is_one_line(tiny_datasets, tmp_path):
    args = tiny_args(tmp_path, "train.max_iter=6", "train.checkpointer.period=2")
    proc = run_train_net(tiny_datasets, args, harness=["disk_full", "3"])
    text = proc.stdout + proc.stderr
    assert proc.returncode == 1, text[-3000:]
    assert "Traceback" not in text
    errors = [line for line in text.splitlines() if "ERROR" in line]
    assert len(errors) == 1 and f"no space left on device in {tmp_path}" in errors[0], errors
    assert (tmp_path / "last_checkpoint").read_text() == "model_0000001.pth"
    assert torch.load(tmp_path / "model_0000001.pth", weights_only=True)["iteration"] == 1


def test_demo_takes_its_options_after_the_overrides(tmp_path):
    demo = load_script("projects/demo.py", "demo_tool")
    image = tmp_path / "a=b.jpg"  # an input whose name looks like an override
    image.write_bytes(b"")
    args = demo.parse_args(
        CONFIG
        + ["--input", str(image), "x.jpg", "train.init_checkpoint=m.pth", "--confidence", "0.5"]
        + ["model.class_head.topk=5", "--output", str(tmp_path / "out")]
    )
    assert args.confidence == 0.5 and args.output == str(tmp_path / "out")
    assert args.input == [str(image), "x.jpg"]
    assert args.opts == ["train.init_checkpoint=m.pth", "model.class_head.topk=5"]
