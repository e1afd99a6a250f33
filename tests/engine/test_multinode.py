"""Training over several "machines" on this one (gloo, CPU, localhost): ``--num-machines 2``
and ``torchrun --nnodes 2`` give the losses of a 2-process single-machine run of the same seed;
a node that dies stops the other with one line; resume works across nodes; the checks before
training run once (rank 0) and stop every rank; torchrun's and SLURM's variables are read."""

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta
from pathlib import Path
from typing import Dict, List

import pytest
import torch

from cqdino.engine.launch import (
    LaunchError,
    Rendezvous,
    dist_timeout,
    first_host,
    launch,
    rendezvous_from_env,
)

from .conftest import ROOT, TINY_OVERRIDES, metrics_by_iter, run_train_net

CONFIG = ["--config-file", str(ROOT / "configs" / "demo.py")]
TRAIN_NET = str(ROOT / "projects" / "train_net.py")
# 1 image per rank, checkpoints after iterations 1 and 3
RUN = ["train.max_iter=4", "train.checkpointer.period=2", "train.checkpointer.max_to_keep=10"]
TIMEOUT = 60  # --dist-timeout of the runs here (seconds)
LAUNCH_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "GROUP_RANK")


def _args(out, *extra) -> List[str]:
    return CONFIG + TINY_OVERRIDES + RUN + [f"train.output_dir={out}", *extra]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(datasets: Path, **extra) -> Dict[str, str]:
    """This process's environment without any launcher's variables, plus ``extra``."""
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in LAUNCH_VARS and not k.startswith(("SLURM_", "TORCHELASTIC_"))
    }
    env.update(DETECTRON2_DATASETS=str(datasets), OMP_NUM_THREADS="1", **extra)
    return env


def _start(cmd: List[str], env: Dict[str, str]) -> subprocess.Popen:
    return subprocess.Popen(
        cmd,
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,  # a node: killed with all its processes if the test fails
    )


def _finish(procs: List[subprocess.Popen], timeout: float = 600) -> List[tuple]:
    """(returncode, stdout + stderr, exit time) of each node; every node killed if one hangs."""

    def wait(p):
        try:
            out, err = p.communicate(timeout=timeout)
        finally:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.communicate()
        return p.returncode, out + err, time.monotonic()

    with ThreadPoolExecutor(len(procs)) as pool:
        return list(pool.map(wait, procs))


def _ok(result):
    code, text, _ = result
    assert code == 0, f"exit {code}\n{text[-6000:]}"
    return text


def _two_machines(datasets, args, harness0=()) -> List[tuple]:
    url = f"tcp://127.0.0.1:{_free_port()}"
    procs = []
    for rank in (1, 0):
        head = [sys.executable, TRAIN_NET]
        if rank == 0 and harness0:
            head = [sys.executable, "-m", "tests.engine.harness", *harness0, "--"]
        node = ["--num-machines", "2", "--machine-rank", str(rank), "--dist-url", url]
        procs.append(_start(head + node + args, _env(datasets)))
    return _finish(procs[::-1])  # node 0, node 1


def _torchrun_nodes(datasets, args) -> List[tuple]:
    port = str(_free_port())
    procs = []
    for rank in (1, 0):
        run = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2"]
        run += ["--nproc-per-node", "1", "--node-rank", str(rank)]
        run += ["--master-addr", "127.0.0.1", "--master-port", port, TRAIN_NET]
        procs.append(_start(run + args, _env(datasets)))
    return _finish(procs[::-1])


def _assert_same_losses(got: Dict[int, dict], ref: Dict[int, dict], iters) -> None:
    for i in iters:
        keys = [k for k in ref[i] if k.startswith("loss_") or k == "total_loss"]
        assert "loss_class" in keys and "loss_select" in keys
        for k in keys + ["lr"]:
            assert got[i][k] == pytest.approx(ref[i][k], rel=1e-5, abs=1e-7), (i, k)


def _assert_same_weights(a: Path, b: Path) -> None:
    x = torch.load(a / "model_final.pth", map_location="cpu", weights_only=True)["model"]
    y = torch.load(b / "model_final.pth", map_location="cpu", weights_only=True)["model"]
    assert x.keys() == y.keys()
    for k, v in y.items():
        torch.testing.assert_close(x[k], v, rtol=1e-4, atol=1e-6, msg=k)


@pytest.fixture(scope="module")
def one_machine(tiny_datasets, tmp_path_factory):
    """The reference: 2 processes on one machine (``--num-gpus 2``), 4 iterations."""
    out = tmp_path_factory.mktemp("one_machine")
    proc = run_train_net(tiny_datasets, ["--num-gpus", "2"] + _args(out))
    assert proc.returncode == 0, proc.stderr[-6000:]
    assert "World size: 2" in proc.stdout + proc.stderr
    return out, metrics_by_iter(out)


@pytest.mark.slow
def test_two_machines_node_dies_then_resume(one_machine, tiny_datasets, tmp_path):
    """``--num-machines 2``: node 0 is killed (SIGKILL) once it has saved iteration 1; node 1
    stops with one line within the timeout; both resumed, iterations 2-3 and the final weights
    are the single-machine run's."""
    ref_dir, ref = one_machine
    args = _args(tmp_path, f"--dist-timeout={TIMEOUT}")
    node0, node1 = _two_machines(tiny_datasets, args, harness0=["kill_after_save", "1"])
    assert node0[0] == -9, node0[1][-4000:]
    assert node1[0] not in (0, -9), node1[1][-4000:]
    # stopped soon after node 0's death (at its next collective; loose for a loaded machine),
    # not after detectron2's 30-minute default
    assert node1[2] - node0[2] < 300
    last = node1[1].strip().splitlines()[-1]
    assert last.startswith("error: rank 1 of 2 lost contact with the other processes ("), last
    assert "another node or process stopped or hung" in last and "Traceback" not in node1[1]
    assert "/gloo/" not in last  # the backend's source location is left out
    assert (tmp_path / "last_checkpoint").read_text() == "model_0000001.pth"
    got = metrics_by_iter(tmp_path)
    assert sorted(got) == [0]  # killed before the writer logged iteration 1
    _assert_same_losses(got, ref, [0])

    resumed = _two_machines(tiny_datasets, ["--resume"] + args)
    text = _ok(resumed[0])
    _ok(resumed[1])
    assert "Resuming at iteration 2" in text and "World size: 2" in text
    got = metrics_by_iter(tmp_path)
    assert sorted(got) == [0, 2, 3]
    _assert_same_losses(got, ref, [0, 2, 3])
    _assert_same_weights(tmp_path, ref_dir)
    # written once, by rank 0; rank 1 keeps its own log beside it
    assert (tmp_path / "log.txt").is_file() and (tmp_path / "log.txt.rank1").is_file()
    assert not list(tmp_path.glob(".*.tmp"))


@pytest.mark.slow
def test_torchrun_two_nodes_match_one_machine(one_machine, tiny_datasets, tmp_path):
    """``torchrun --nnodes 2 --nproc-per-node 1`` (static rendezvous on localhost): train.py
    takes its rank from torchrun's variables and spawns nothing; the run equals the
    single-machine one; then a resume under torchrun from the iteration-1 checkpoint of a copy
    of the reference gives its iterations 2-3 again."""
    ref_dir, ref = one_machine
    out = tmp_path / "fresh"
    node0, node1 = _torchrun_nodes(tiny_datasets, _args(out, f"--dist-timeout={TIMEOUT}"))
    text = _ok(node0)
    _ok(node1)
    assert "World size: 2" in text
    assert "torchrun: rank 0 of 2 (node 0, local rank 0) at env://; this process starts no" in text
    got = metrics_by_iter(out)
    assert sorted(got) == [0, 1, 2, 3]
    _assert_same_losses(got, ref, range(4))
    _assert_same_weights(out, ref_dir)

    copy = tmp_path / "resumed"
    shutil.copytree(ref_dir, copy)
    for name in ("model_final.pth", "model_0000003.pth"):
        (copy / name).unlink()
    (copy / "last_checkpoint").write_text("model_0000001.pth")
    node0, node1 = _torchrun_nodes(tiny_datasets, ["--resume"] + _args(copy))
    assert "Resuming at iteration 2" in _ok(node0)
    _ok(node1)
    got = metrics_by_iter(copy)
    assert sorted(got) == [0, 1, 2, 3]
    _assert_same_losses(got, ref, range(4))
    _assert_same_weights(copy, ref_dir)


@pytest.mark.slow
def test_srun_tasks_checks_run_once_and_stop_every_rank(one_machine, tiny_datasets, tmp_path):
    """Two tasks as srun starts them (SLURM_* variables, rank 0's host from the node list):
    a folder holding a run without --resume is refused by rank 0's checks, and rank 1 stops
    with the same message instead of waiting for a rank 0 that will not come."""
    ref_dir, _ = one_machine
    shutil.copytree(ref_dir, tmp_path / "run")
    slurm = dict(
        SLURM_JOB_ID="4242",
        SLURM_NTASKS="2",
        SLURM_STEP_NUM_TASKS="2",
        SLURM_STEP_NODELIST="localhost",
        MASTER_PORT=str(_free_port()),
    )
    procs = []
    for rank in (1, 0):
        env = _env(tiny_datasets, **slurm, SLURM_PROCID=str(rank), SLURM_LOCALID="0")
        env["SLURM_NODEID"] = str(rank)
        cmd = [sys.executable, TRAIN_NET, f"--dist-timeout={TIMEOUT}"]
        procs.append(_start(cmd + _args(tmp_path / "run"), env))
    (code0, text0, _), (code1, text1, _) = _finish(procs[::-1])
    last0, last1 = text0.strip().splitlines()[-1], text1.strip().splitlines()[-1]
    assert code0 == 1 and last0.startswith("error: ") and "already holds a run" in last0, text0
    assert code1 == 1 and last1.startswith("error: rank 0 stopped in the checks"), text1
    assert "already holds a run" in last1 and "Traceback" not in text0 + text1
    assert "World size: 2" not in text0  # nothing was built
    assert (tmp_path / "run" / "last_checkpoint").read_text() == "model_final.pth"


# Two bare ranks (no training): what rank 0's checks set on the arguments reaches rank 1;
# then rank 1 hangs (alive, silent) and rank 0 stops after --dist-timeout, not never.
HANG = """
import argparse, sys, time, torch, torch.distributed as dist
from datetime import timedelta
from cqdino.engine.launch import LaunchError, launch

def preflight(ns):
    ns.chosen = f"eval/{dist.get_rank() + 3}"  # e.g. the folder --eval-only writes to

def main(ns):
    print(f"rank {dist.get_rank()} chosen {ns.chosen}", flush=True)
    x = torch.ones(1)
    dist.all_reduce(x)  # both ranks are in
    if dist.get_rank() == 1:
        time.sleep(120)  # hung
    dist.all_reduce(x)

rank, url = int(sys.argv[1]), sys.argv[2]
ns = argparse.Namespace(chosen=None)
try:
    launch(main, 1, 2, rank, url, (ns,), timedelta(seconds=float(sys.argv[3])),
           preflight=preflight)
except LaunchError as e:
    sys.exit(f"error: {e}")
"""


@pytest.mark.slow
def test_rank0_checks_reach_every_rank_and_a_hung_peer_times_out(tmp_path):
    url = f"tcp://127.0.0.1:{_free_port()}"
    procs = [
        _start([sys.executable, "-c", HANG, str(r), url, "15"], _env(tmp_path)) for r in (0, 1)
    ]
    try:
        text0 = "".join(procs[0].communicate(timeout=300))
        assert procs[1].poll() is None  # rank 1 still hangs; rank 0 gave up
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
        text1 = "".join(procs[1].communicate())
    assert "rank 0 chosen eval/3" in text0 and "rank 1 chosen eval/3" in text1
    last = text0.strip().splitlines()[-1]
    assert procs[0].returncode == 1, text0
    assert last.startswith("error: rank 0 of 2 lost contact with the other processes"), text0
    assert "Timed out" in last and "waited at most 15 s (--dist-timeout)" in last


SLURM_TASK = """
import sys
from datetime import timedelta
from cqdino.engine.launch import LaunchError, launch
try:
    launch(lambda: print("trained", flush=True), 1, timeout=timedelta(seconds=60))
except LaunchError as e:
    sys.exit(f"error: {e}")
"""


@pytest.mark.slow
def test_srun_tasks_numbered_cyclically_stop_with_one_line(tmp_path):
    """Two srun tasks on one node whose local ids do not follow their ranks (as under
    ``--distribution=cyclic`` across nodes): both stop with the same line, nothing runs."""
    slurm = dict(SLURM_NTASKS="2", SLURM_NODEID="0", SLURM_STEP_NODELIST="localhost")
    slurm["MASTER_PORT"] = str(_free_port())
    procs = []
    for rank in (0, 1):
        env = _env(tmp_path, **slurm, SLURM_PROCID=str(rank), SLURM_LOCALID=str(1 - rank))
        procs.append(_start([sys.executable, "-c", SLURM_TASK], env))
    for code, text, _ in _finish(procs, timeout=300):
        last = text.strip().splitlines()[-1]
        assert code == 1 and "trained" not in text, text
        assert last == (
            "error: node 0 holds ranks [0, 1] with local ranks [1, 0]: ranks must be numbered "
            "node by node (SLURM: --distribution=block)"
        )


# Reading the launchers' variables (no processes).


def test_first_host_of_a_slurm_node_list():
    assert first_host("gpu[07-09,12],cpu3") == "gpu07"
    assert first_host("node1,node2") == "node1"
    assert first_host("rack[2-3]-n[010-011]") == "rack2-n010"
    assert first_host("n[5]") == "n5"
    with pytest.raises(LaunchError, match="node list"):
        first_host("gpu[07")


def test_torchrun_variables():
    env = dict(
        TORCHELASTIC_RUN_ID="x",
        RANK="5",
        WORLD_SIZE="8",
        LOCAL_RANK="1",
        GROUP_RANK="2",
        MASTER_ADDR="10.0.0.1",
        MASTER_PORT="29500",
    )
    assert rendezvous_from_env(environ=env) == Rendezvous("torchrun", 5, 8, 1, 2, "env://")
    del env["MASTER_PORT"]
    with pytest.raises(LaunchError, match=r"\$MASTER_PORT is not set"):
        rendezvous_from_env(environ=env)
    assert rendezvous_from_env("spawn", environ=env) is None


def test_slurm_variables():
    env = dict(
        SLURM_JOB_ID="123456",
        SLURM_PROCID="3",
        SLURM_NTASKS="4",
        SLURM_STEP_NUM_TASKS="4",
        SLURM_LOCALID="1",
        SLURM_NODEID="1",
        SLURM_STEP_NODELIST="gpu[07-08]",
        SLURM_LAUNCH_NODE_IPADDR="10.1.1.1",
    )
    # rank 0's host: the step's first node; the port from the job id (15000 + 123456 % 15000)
    assert rendezvous_from_env(environ=env) == Rendezvous("slurm", 3, 4, 1, 1, "tcp://gpu07:18456")
    got = rendezvous_from_env(environ={**env, "MASTER_ADDR": "head", "MASTER_PORT": "1234"})
    assert got.init_method == "tcp://head:1234"
    got = rendezvous_from_env(environ=env, dist_url="tcp://other:99")
    assert got.init_method == "tcp://other:99"
    no_list = {k: v for k, v in env.items() if k != "SLURM_STEP_NODELIST"}
    assert rendezvous_from_env(environ=no_list).init_method == "tcp://10.1.1.1:18456"
    # a batch script (or srun -n 1) running train_net.py itself: it starts its own processes
    batch = {**env, "SLURM_PROCID": "0", "SLURM_LOCALID": "0", "SLURM_NTASKS": "1"}
    del batch["SLURM_STEP_NUM_TASKS"]
    assert rendezvous_from_env(environ=batch) is None
    assert rendezvous_from_env(environ={}) is None
    with pytest.raises(LaunchError, match="SLURM_PROCID is not set"):
        rendezvous_from_env("slurm", environ={})
    with pytest.raises(LaunchError, match=r"\$SLURM_LOCALID='x' is not an integer"):
        rendezvous_from_env(environ={**env, "SLURM_LOCALID": "x"})


def test_options_that_contradict_torchrun_are_one_line(monkeypatch):
    for k, v in dict(RANK="0", WORLD_SIZE="2", LOCAL_RANK="0", MASTER_ADDR="h").items():
        monkeypatch.setenv(k, v)
    monkeypatch.setenv("MASTER_PORT", "1")
    called = []
    with pytest.raises(LaunchError, match="--num-gpus 2: the processes were started by torchrun"):
        launch(called.append, 2, args=(1,))
    with pytest.raises(LaunchError, match="--dist-url tcp://h:2"):
        launch(called.append, 1, dist_url="tcp://h:2", args=(1,))
    assert not called


def test_dist_timeout():
    assert dist_timeout(environ={}) == timedelta(minutes=30)
    assert dist_timeout(environ={"CQDINO_DIST_TIMEOUT": "12.5"}) == timedelta(seconds=12.5)
    assert dist_timeout(3, environ={"CQDINO_DIST_TIMEOUT": "12.5"}) == timedelta(seconds=3)
    with pytest.raises(LaunchError, match="CQDINO_DIST_TIMEOUT='soon'"):
        dist_timeout(environ={"CQDINO_DIST_TIMEOUT": "soon"})
    with pytest.raises(LaunchError, match="--dist-timeout=0"):
        dist_timeout(0, environ={})
