"""The synthetic generator's command line and its safety: ``--overwrite`` replaces only a
dataset it wrote, SIGTERM leaves no temporary folder, outputs follow the umask, and every bad
argument is one line naming it (issue 20, items 3, 4, 9, 14, 15)."""

import hashlib
import os
import signal
import stat
import subprocess
import sys
import time

import pytest

from cqdino.data import synthetic

TINY = ["--num-categories", "13", "--num-train-images", "1", "--num-val-images", "1"]
TINY += ["--image-size", "16", "16"]


def _cli(capsys, *args):
    """(exit status, stderr) of ``python -m cqdino.data.synthetic args`` (in this process)."""
    try:
        synthetic.main([str(a) for a in args])
        code = 0
    except SystemExit as e:
        code = e.code
    return code, capsys.readouterr().err


def _one_line_error(err: str) -> str:
    lines = [line for line in err.splitlines() if line.startswith("python -m cqdino")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def _digest(path) -> str:
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


def test_overwrite_refuses_a_file(tmp_path, capsys):
    victim = tmp_path / "thesis.txt"
    victim.write_text("years of work")
    before = _digest(victim)
    code, err = _cli(capsys, "--out", victim, "--overwrite", *TINY)
    assert code == 2 and "does not hold a dataset written by this generator" in err
    _one_line_error(err)
    assert victim.is_file() and _digest(victim) == before


def test_overwrite_refuses_a_folder_it_did_not_write(tmp_path, capsys):
    folder = tmp_path / "photos"
    folder.mkdir()
    (folder / "a.jpg").write_bytes(b"a photo")
    code, err = _cli(capsys, "--out", folder, "--overwrite", *TINY)
    assert code == 2 and str(folder) in _one_line_error(err)
    assert sorted(os.listdir(folder)) == ["a.jpg"]
    assert (folder / "a.jpg").read_bytes() == b"a photo"
    with pytest.raises(ValueError, match="does not hold a dataset"):
        synthetic.generate(folder, num_categories=13, overwrite=True)  # the API too
    assert sorted(os.listdir(folder)) == ["a.jpg"]


def test_overwrite_replaces_a_generated_dataset(tmp_path, capsys):
    out = tmp_path / "synthetic_vocab"
    assert _cli(capsys, "--out", out, *TINY)[0] == 0
    code, err = _cli(capsys, "--out", out, *TINY)  # exists, no --overwrite
    line = _one_line_error(err)
    assert code == 2 and "--overwrite" in line and "overwrite=True" not in line
    assert _cli(capsys, "--out", out, "--overwrite", *TINY[:-2], "20", "20")[0] == 0
    assert synthetic.read_meta(str(out))["image_size"] == [20, 20]
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".")]


def test_outputs_follow_the_umask(tmp_path, capsys):
    old = os.umask(0o022)
    try:
        assert _cli(capsys, "--out", tmp_path / "d", *TINY)[0] == 0
    finally:
        os.umask(old)
    for path in [tmp_path / "d", tmp_path / "d" / "images"]:
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o755, path
    for path in [tmp_path / "d" / "meta.json", tmp_path / "d" / "images" / "val" / "000001.jpg"]:
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o644, path


@pytest.mark.parametrize(
    "args, flag",
    [
        (["--num-train-images", "0"], "--num-train-images"),
        (["--num-val-images", "-3"], "--num-val-images"),
        (["--num-categories", "5"], "--num-categories"),
        (["--image-size", "40", "20"], "--image-size"),
        (["--num-categories", "many"], "--num-categories"),
    ],
)
def test_bad_arguments_are_one_line(tmp_path, capsys, args, flag):
    code, err = _cli(capsys, "--out", tmp_path / "d", *TINY, *args)
    assert code == 2 and flag in _one_line_error(err)
    assert not os.path.exists(tmp_path / "d")


def test_category_range_is_the_same_in_help_and_error(tmp_path, capsys):
    with pytest.raises(SystemExit):
        synthetic.main(["--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    _, err = _cli(capsys, "--out", tmp_path / "d", "--num-categories", "13837")
    assert synthetic.CATEGORY_RANGE in help_text and synthetic.CATEGORY_RANGE in err
    with pytest.raises(ValueError, match=synthetic.CATEGORY_RANGE):
        synthetic.vocabulary(5)


def test_api_rejects_empty_splits(tmp_path):
    for key in ("num_train_images", "num_val_images"):
        with pytest.raises(ValueError, match=key):
            synthetic.generate(tmp_path / "d", num_categories=13, **{key: 0})
    assert not os.listdir(tmp_path)


def test_output_under_a_file_is_one_line(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    code, err = _cli(capsys, "--out", blocker / "sub" / "d", *TINY)
    assert code == 2 and "is a file" in _one_line_error(err)


def test_sigterm_removes_the_temporary_folder(tmp_path):
    out = tmp_path / "d"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    cmd = [sys.executable, "-m", "cqdino.data.synthetic", "--out", str(out)]
    cmd += ["--num-categories", "13", "--num-train-images", "100000", "--image-size", "16", "16"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 120
        while not any((p / "images" / "train").is_dir() for p in tmp_path.glob(".synthetic*")):
            assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read()
            time.sleep(0.1)
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode != 0
    assert os.listdir(tmp_path) == [], os.listdir(tmp_path)
