"""The synthetic generator's worker processes never hang or outlive their run (issue 28): a
script read from standard input generates (spawned workers could not import it; the parent
used to wait or die with BrokenProcessPool), a worker that dies is an error saying so, workers
end when their parent is killed with SIGKILL, and the temporary folder a killed run leaves is
removed by the next run. Also: ``--seed -1`` is a random seed, printed and saved; ``--help``
prints no FutureWarning."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cqdino.data import synthetic
from cqdino.data.synthetic.generation import _host

ROOT = Path(__file__).resolve().parents[2]
TINY = dict(num_categories=20, num_val_images=2, image_size=(32, 48))


def _env():
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT)] + sys.path)}
    env.pop("PYTHONWARNINGS", None)
    env["OMP_NUM_THREADS"] = "1"
    return env


def _state(pid: int) -> str:
    """The process state letter ('' when the process does not exist)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return ""


def _workers(parent: int):
    """Pids of the worker processes ``parent`` started (not a resource tracker)."""
    out = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                cmdline = f.read()
        except (OSError, IndexError, ValueError):
            continue
        if ppid == parent and b"resource_tracker" not in cmdline:
            out.append(int(entry))
    return out


def _alive(pids):
    return [p for p in pids if _state(p) not in ("", "Z")]


@pytest.mark.parametrize("method", [None, "spawn"])
def test_script_on_standard_input_generates(tmp_path, method):
    """Forked workers (the default in a single-threaded process) need not import the script;
    spawned ones cannot, so the images are rendered in the process, which says so."""
    script = (
        "from cqdino.data import synthetic\n"
        "from cqdino.data.synthetic import workers\n"
        f"workers._START_METHOD = {method!r}\n"
        f"synthetic.generate({str(tmp_path / 'out')!r}, num_train_images=200, workers=2, "
        f"**{TINY!r})\n"
        "print('generated')\n"
    )
    proc = subprocess.run(
        [sys.executable, "-"],
        input=script,
        env=_env(),
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0 and "generated" in proc.stdout, proc.stderr[-3000:]
    fallback = "rendering the images in this process, not in 2 worker processes: the main script"
    assert (fallback in proc.stderr) == (method == "spawn"), proc.stderr[-3000:]
    assert os.listdir(tmp_path) == ["out"]  # nothing hidden left
    train = json.loads((tmp_path / "out/annotations/synthetic_vocab_train.json").read_text())
    assert len(train["images"]) == 200


def _start(tmp_path, name, method):
    """A generator run in a script (workers=2) and the pids of its two workers."""
    script = tmp_path / f"{name}.py"
    script.write_text(
        "from cqdino.data import synthetic\n"
        "from cqdino.data.synthetic import workers\n"
        "if __name__ == '__main__':\n"
        f"    workers._START_METHOD = {method!r}\n"
        f"    synthetic.generate({str(tmp_path / name)!r}, num_train_images=20000, workers=2, "
        f"**{TINY!r})\n"
    )
    proc = subprocess.Popen(
        [sys.executable, str(script)],
        env=_env(),
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 120
    while len(_workers(proc.pid)) < 2:
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.05)
    return proc, _workers(proc.pid)


def _wait_gone(pids, seconds=60):
    deadline = time.monotonic() + seconds
    while _alive(pids) and time.monotonic() < deadline:
        time.sleep(0.1)
    return _alive(pids)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
@pytest.mark.parametrize("method", ["fork", pytest.param("spawn", marks=pytest.mark.slow)])
def test_dead_worker_and_killed_parent(tmp_path, method):
    # a worker killed: the run stops with an error that says a worker died, leaving nothing
    proc, workers = _start(tmp_path, "a", method)
    try:
        os.kill(workers[0], signal.SIGKILL)
        _, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 1
    assert "WorkerError: a process rendering the synthetic images died" in err.splitlines()[-1]
    assert "--workers 1" in err.splitlines()[-1]
    assert not _wait_gone(workers)
    assert sorted(os.listdir(tmp_path)) == ["a.py"], os.listdir(tmp_path)

    # the parent killed with SIGKILL: its workers end, and the next run removes its folder
    proc, workers = _start(tmp_path, "b", method)
    proc.kill()
    proc.wait()
    assert not _wait_gone(workers), "workers outlived their killed parent"
    left = [n for n in os.listdir(tmp_path) if n.startswith(".synthetic_vocab-")]
    assert len(left) == 1 and str(proc.pid) in left[0]
    synthetic.generate(tmp_path / "c", num_train_images=2, workers=1, **TINY)
    assert sorted(os.listdir(tmp_path)) == ["a.py", "b.py", "c"]


def test_leftovers_of_live_or_other_runs_are_kept(tmp_path):
    mine = tmp_path / f".synthetic_vocab-{_host()}-{os.getpid()}-abcd1234"
    other_host = tmp_path / ".synthetic_vocab-elsewhere-999999999-abcd1234"
    unknown = tmp_path / ".synthetic_vocab-abcd1234"  # no owner recorded
    for folder in (mine, other_host, unknown):
        folder.mkdir()
    synthetic.generate(tmp_path / "d", num_train_images=2, workers=1, **TINY)
    assert mine.is_dir() and other_host.is_dir() and unknown.is_dir()


def test_seed_minus_one_is_a_random_seed_printed_and_saved(tmp_path, capsys):
    out = tmp_path / "d"
    args = ["--out", out, "--num-categories", "13", "--num-train-images", "1"]
    args += ["--num-val-images", "1", "--image-size", "16", "16", "--seed", "-1"]
    synthetic.main([str(a) for a in args])
    printed = capsys.readouterr().out
    seed = json.loads((out / "meta.json").read_text())["seed"]
    assert seed >= 0 and f"--seed -1: using the random seed {seed}" in printed
    with pytest.raises(SystemExit) as e:
        synthetic.main([str(a) for a in args[:-1]] + ["-2", "--out", str(tmp_path / "e")])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].endswith("--seed must be >= 0, or -1 for a random seed, got -2"), err
    with pytest.raises(ValueError, match=r"^image_seed must be an integer >= 0, got -1$"):
        synthetic.generate(tmp_path / "f", num_train_images=1, image_seed=-1, **TINY)
    assert "-1: a random seed" in " ".join(synthetic_help(capsys).split())


def synthetic_help(capsys) -> str:
    with pytest.raises(SystemExit):
        synthetic.main(["--help"])
    return capsys.readouterr().out


def test_help_prints_no_future_warning():
    proc = subprocess.run(
        [sys.executable, "-m", "cqdino.data.synthetic", "--help"],
        env=_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0 and "--num-categories" in proc.stdout
    assert "Warning" not in proc.stderr, proc.stderr
