"""``launch``: run a training function in every process of a distributed job.

Three ways a job's processes come to be:

* **torchrun** (``torchrun --nnodes N --nproc-per-node G projects/train_net.py ...``) or
  **SLURM** (``srun`` with one task per process) started them: this process is one rank; its
  rank, world size and local rank come from the environment (``RANK``/``WORLD_SIZE``/
  ``LOCAL_RANK``/``MASTER_ADDR``/``MASTER_PORT``, or ``SLURM_PROCID``/``SLURM_NTASKS``/
  ``SLURM_LOCALID``/``SLURM_NODEID`` with the first host of ``SLURM_STEP_NODELIST``), and
  nothing is spawned (:func:`rendezvous_from_env`).
* **our own launcher** (``--num-gpus G [--num-machines N --machine-rank R --dist-url URL]``):
  ``G`` processes are started per machine (one per GPU, NCCL; without CUDA, ``G`` CPU processes
  over gloo, which detectron2 0.6's ``launch`` refuses).
* **one process** (world size 1): the function is called here.

The checks before training (``preflight``) run once per job: here, before any process starts,
when this process starts all of them (one machine); otherwise on global rank 0 once the process
group is up, while the other ranks wait for its verdict, so an error stops every rank with the
message instead of leaving them waiting for rank 0. Every collective operation, and the
forming of the group itself, waits at most ``timeout`` (``--dist-timeout`` /
``$CQDINO_DIST_TIMEOUT``): a node that dies or hangs stops the others with one line saying so.
"""

import atexit
import logging
import os
import re
import sys
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Callable, List, Mapping, Optional, Sequence, Tuple, Type

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from detectron2.engine.launch import _find_free_port
from detectron2.utils import comm

from cqdino.utils.io import InputError

__all__ = [
    "DEFAULT_TIMEOUT",
    "LaunchError",
    "Rendezvous",
    "dist_timeout",
    "first_host",
    "launch",
    "rendezvous_from_env",
]

logger = logging.getLogger(__name__)

DEFAULT_TIMEOUT = timedelta(minutes=30)
TIMEOUT_ENV = "CQDINO_DIST_TIMEOUT"
LAUNCHERS = ("auto", "spawn", "torchrun", "slurm")


class LaunchError(InputError):
    """A job that cannot start or cannot go on (the message says why, in one line)."""


def dist_timeout(seconds: Optional[float] = None, environ: Mapping[str, str] = None) -> timedelta:
    """How long a rank waits for the others: ``seconds`` if given, else ``$CQDINO_DIST_TIMEOUT``
    (seconds), else 30 minutes."""
    environ = os.environ if environ is None else environ
    source = "--dist-timeout"
    if seconds is None and environ.get(TIMEOUT_ENV, "").strip():
        source, seconds = TIMEOUT_ENV, environ[TIMEOUT_ENV]
    if seconds is None:
        return DEFAULT_TIMEOUT
    try:
        value = float(seconds)
    except ValueError:
        raise LaunchError(f"{source}={seconds!r}: expected a number of seconds") from None
    if not value > 0:
        raise LaunchError(f"{source}={seconds!r}: expected a number of seconds > 0")
    return timedelta(seconds=value)


@dataclass(frozen=True)
class Rendezvous:
    """This process's place in a job whose processes an outside launcher started.

    Args:
        launcher: ``"torchrun"`` or ``"slurm"``.
        rank, world_size: global rank and number of processes.
        local_rank: rank on this node (the CUDA device it uses).
        node_rank: the node's index (processes of one node share it).
        init_method: ``"env://"`` (torchrun) or ``"tcp://host:port"``.
    """

    launcher: str
    rank: int
    world_size: int
    local_rank: int
    node_rank: int
    init_method: str


def first_host(nodelist: str) -> str:
    """The first host of a SLURM host list (``"gpu[07-09,12],cpu3"`` -> ``"gpu07"``), as
    ``scontrol show hostnames`` would list it first."""
    first, depth = "", 0
    for ch in nodelist.strip():  # the first top-level comma-separated item
        depth += ch == "["
        depth -= ch == "]"
        if ch == "," and depth == 0:
            break
        first += ch

    def lowest(match: "re.Match") -> str:
        return match.group(1).split(",")[0].split("-")[0]

    host = re.sub(r"\[([^\]]*)\]", lowest, first)
    if not host or "[" in host or "]" in host:
        raise LaunchError(f"cannot read a host name from the SLURM node list {nodelist!r}")
    return host


def _int_env(environ: Mapping[str, str], *names: str) -> Optional[int]:
    """The first of ``names`` set in ``environ``, as an int (None if none is set)."""
    for name in names:
        value = environ.get(name, "").strip()
        if value:
            try:
                return int(value)
            except ValueError:
                raise LaunchError(f"${name}={value!r} is not an integer") from None
    return None


def _torchrun(environ: Mapping[str, str]) -> Rendezvous:
    missing = [n for n in ("RANK", "WORLD_SIZE", "LOCAL_RANK") if not environ.get(n)]
    if not environ.get("TORCHELASTIC_USE_AGENT_STORE"):  # otherwise the agent's store is used
        missing += [n for n in ("MASTER_ADDR", "MASTER_PORT") if not environ.get(n)]
    if missing:
        raise LaunchError(
            f"started as a torchrun worker, but ${', $'.join(missing)} "
            f"{'is' if len(missing) == 1 else 'are'} not set"
        )
    rank = _int_env(environ, "RANK")
    return Rendezvous(
        launcher="torchrun",
        rank=rank,
        world_size=_int_env(environ, "WORLD_SIZE"),
        local_rank=_int_env(environ, "LOCAL_RANK"),
        node_rank=_int_env(environ, "GROUP_RANK") if environ.get("GROUP_RANK") else rank,
        init_method="env://",
    )


def _slurm(environ: Mapping[str, str], dist_url: Optional[str]) -> Rendezvous:
    rank = _int_env(environ, "SLURM_PROCID")
    world = _int_env(environ, "SLURM_STEP_NUM_TASKS", "SLURM_NTASKS", "SLURM_NPROCS")
    local_rank = _int_env(environ, "SLURM_LOCALID")
    if world is None or local_rank is None:
        raise LaunchError(
            "a SLURM task without $SLURM_NTASKS or $SLURM_LOCALID: start train_net.py with srun"
        )
    if dist_url and dist_url != "auto":
        init_method = dist_url
    else:
        addr = environ.get("MASTER_ADDR", "").strip()
        nodelist = next(
            (
                environ[n]
                for n in ("SLURM_STEP_NODELIST", "SLURM_JOB_NODELIST", "SLURM_NODELIST")
                if environ.get(n, "").strip()
            ),
            None,
        )
        if not addr and nodelist:  # rank 0 runs on the step's first node (block distribution)
            addr = first_host(nodelist)
        addr = addr or environ.get("SLURM_LAUNCH_NODE_IPADDR", "").strip()
        if not addr:
            raise LaunchError(
                "SLURM task: no $SLURM_STEP_NODELIST, $SLURM_LAUNCH_NODE_IPADDR or $MASTER_ADDR "
                "to find rank 0's host; set MASTER_ADDR (or give --dist-url tcp://HOST:PORT)"
            )
        port = _int_env(environ, "MASTER_PORT")
        if port is None:  # one port per job: two jobs sharing a node do not collide
            port = 15000 + (_int_env(environ, "SLURM_JOB_ID", "SLURM_JOBID") or 0) % 15000
        init_method = f"tcp://{addr}:{port}"
    node = _int_env(environ, "SLURM_NODEID")
    return Rendezvous(
        launcher="slurm",
        rank=rank,
        world_size=world,
        local_rank=local_rank,
        node_rank=node if node is not None else rank - local_rank,
        init_method=init_method,
    )


def rendezvous_from_env(
    launcher: str = "auto", environ: Mapping[str, str] = None, dist_url: Optional[str] = None
) -> Optional[Rendezvous]:
    """The rendezvous torchrun or srun set up for this process, None when this process starts
    the job's processes itself.

    ``launcher="auto"``: torchrun when ``$TORCHELASTIC_RUN_ID`` or ``$RANK`` and
    ``$WORLD_SIZE`` are set; SLURM when ``$SLURM_PROCID`` is set in a step of more than one
    task (a batch script that runs train_net.py without srun, or ``srun -n 1``, starts its own
    processes); else None. ``"spawn"``: always None (SLURM's variables are ignored).
    ``dist_url`` (other than ``"auto"``) replaces the master address of a SLURM job.
    """
    environ = os.environ if environ is None else environ
    if launcher not in LAUNCHERS:
        raise LaunchError(f"--launcher {launcher}: expected one of {', '.join(LAUNCHERS)}")
    if launcher == "spawn":
        return None
    is_torchrun = bool(environ.get("TORCHELASTIC_RUN_ID")) or bool(
        environ.get("RANK") and environ.get("WORLD_SIZE")
    )
    if launcher == "torchrun" or (launcher == "auto" and is_torchrun):
        return _torchrun(environ)
    if launcher == "slurm":
        if not environ.get("SLURM_PROCID"):
            raise LaunchError("--launcher slurm, but $SLURM_PROCID is not set: start it with srun")
        return _slurm(environ, dist_url)
    tasks = _int_env(environ, "SLURM_STEP_NUM_TASKS", "SLURM_NTASKS")
    if environ.get("SLURM_PROCID") and tasks is not None and tasks > 1:
        return _slurm(environ, dist_url)
    return None


def launch(
    main_func: Callable,
    num_gpus_per_machine: int,
    num_machines: int = 1,
    machine_rank: int = 0,
    dist_url: str = None,
    args: Tuple[Any, ...] = (),
    timeout: timedelta = DEFAULT_TIMEOUT,
    *,
    preflight: Optional[Callable] = None,
    user_errors: Sequence[Type[BaseException]] = (InputError,),
    launcher: str = "auto",
) -> None:
    """Run ``main_func(*args)`` in every process of the job, after ``preflight(*args)`` once.

    Args:
        num_gpus_per_machine, num_machines, machine_rank, dist_url: as detectron2's ``launch``
            (``dist_url="auto"``: a free local port, one machine only). Left at 1, 1, 0 and
            "auto" when torchrun or srun started the processes.
        timeout: how long a rank waits for the others, in any collective operation and while
            the process group forms.
        preflight: checks before anything is built; run once per job (see the module's
            docstring).
        user_errors: exception types whose message is the whole story: raised by
            ``preflight`` on rank 0, they stop every rank with that message (a ``LaunchError``
            on the other ranks).
        launcher: ``"auto"``, ``"spawn"``, ``"torchrun"`` or ``"slurm"`` (see
            :func:`rendezvous_from_env`).
    Raises:
        LaunchError: options that contradict the launcher, a group that does not form, a rank
            that loses contact with the others (a node died or hung).
    """
    rdzv = rendezvous_from_env(launcher, dist_url=dist_url)
    if rdzv is not None:
        name = "torchrun" if rdzv.launcher == "torchrun" else "srun"
        given = [
            f"{opt} {value}"
            for opt, value, default in (
                ("--num-gpus", num_gpus_per_machine, 1),
                ("--num-machines", num_machines, 1),
                ("--machine-rank", machine_rank, 0),
            )
            if value != default
        ]
        if rdzv.launcher == "torchrun" and dist_url not in (None, "auto"):
            given.append(f"--dist-url {dist_url}")
        if given:
            raise LaunchError(
                f"{' '.join(given)}: the processes were started by {name}, which says how many "
                f"there are and where they meet; leave {'/'.join(g.split()[0] for g in given)} "
                "out (or give --launcher spawn to start them here)"
            )
        logger.info(
            f"{name}: rank {rdzv.rank} of {rdzv.world_size} (node {rdzv.node_rank}, local rank "
            f"{rdzv.local_rank}) at {rdzv.init_method}; this process starts no others"
        )
        _worker(
            rdzv.local_rank,
            main_func,
            rdzv.world_size,
            rdzv.rank - rdzv.local_rank,
            rdzv.node_rank,
            rdzv.init_method,
            args,
            timeout,
            preflight,
            tuple(user_errors),
        )
        return
    if num_gpus_per_machine < 1 or num_machines < 1:
        raise LaunchError(
            f"--num-gpus ({num_gpus_per_machine}) and --num-machines ({num_machines}) must be >= 1"
        )
    if not 0 <= machine_rank < num_machines:
        raise LaunchError(f"--machine-rank {machine_rank}: expected 0 to {num_machines - 1}")
    if torch.cuda.is_available() and num_gpus_per_machine > torch.cuda.device_count():
        raise LaunchError(
            f"--num-gpus {num_gpus_per_machine}, but only {torch.cuda.device_count()} "
            "CUDA devices are visible"
        )
    world_size = num_machines * num_gpus_per_machine
    if num_machines == 1 and preflight is not None:
        preflight(*args)  # this process starts every process of the job: check here, once
        preflight = None
    if world_size == 1:
        main_func(*args)
        return
    if dist_url is None or dist_url == "auto":
        if num_machines != 1:
            raise LaunchError("--dist-url auto works on one machine only; give tcp://HOST:PORT")
        dist_url = f"tcp://127.0.0.1:{_find_free_port()}"
    backend = "NCCL" if torch.cuda.is_available() else "gloo (CPU)"
    logger.info(
        f"Machine {machine_rank} of {num_machines}: {num_gpus_per_machine} processes, "
        f"{backend}, {dist_url}"
    )
    first_rank = machine_rank * num_gpus_per_machine
    worker_args = (main_func, world_size, first_rank, machine_rank, dist_url, args, timeout)
    worker_args += (preflight, tuple(user_errors))
    if num_gpus_per_machine == 1:  # one process per machine: this one
        _worker(0, *worker_args)
        return
    mp.start_processes(_spawned_worker, nprocs=num_gpus_per_machine, args=worker_args, daemon=False)


def _spawned_worker(local_rank: int, *worker_args) -> None:
    """A process started by ``launch``: one line for a stop the user can act on."""
    user_errors = worker_args[-1]
    try:
        _worker(local_rank, *worker_args)
    except (LaunchError, *user_errors) as e:
        sys.exit(f"error: {e}")


def _worker(
    local_rank: int,
    main_func: Callable,
    world_size: int,
    first_rank: int,
    node_rank: int,
    init_method: str,
    args: Tuple[Any, ...],
    timeout: timedelta,
    preflight: Optional[Callable],
    user_errors: Tuple[Type[BaseException], ...],
) -> None:
    """Rank ``first_rank + local_rank``: join the group, set up the node's group and the
    device, run the checks (rank 0), run ``main_func``."""
    cuda = torch.cuda.is_available()
    rank = first_rank + local_rank
    if cuda:
        if local_rank >= torch.cuda.device_count():
            raise LaunchError(
                f"local rank {local_rank}, but this process sees {torch.cuda.device_count()} "
                "CUDA devices: give every process of a node all of its GPUs (SLURM: "
                "--gpus-per-node, no --gpus-per-task or --gpu-bind)"
            )
        torch.cuda.set_device(local_rank)
    limit = f"{timeout.total_seconds():g} s (--dist-timeout)"
    try:
        dist.init_process_group(
            backend="nccl" if cuda else "gloo",
            init_method=init_method,
            world_size=world_size,
            rank=rank,
            timeout=timeout,
        )
    except Exception as e:
        raise LaunchError(
            f"rank {rank} of {world_size}: the process group did not form at {init_method} "
            f"within {limit}: {_first_line(e)}. Are all {world_size} processes started, and is "
            "the address reachable from every node?"
        ) from None
    try:
        _local_group(node_rank, local_rank)
        if not cuda:  # a CPU process per rank: split the cores between a node's ranks
            torch.set_num_threads(max(1, torch.get_num_threads() // comm.get_local_size()))
        comm.synchronize()
        if preflight is not None:
            _preflight_on_rank0(preflight, args, user_errors)
        main_func(*args)
    except Exception as e:
        if world_size > 1 and _is_peer_failure(e):
            # the process group is not torn down (a dead peer can hang that); at exit its
            # communication threads may still run, and the C++ runtime then aborts the process
            # (SIGABRT) after the error was printed: end with status 1 instead
            atexit.register(_exit_without_teardown, 1)
            raise LaunchError(
                f"rank {rank} of {world_size} lost contact with the other processes "
                f"({_cause(e)}): another node or process stopped or hung (its own log "
                f"says why); waited at most {limit}"
            ) from None
        raise  # the group is left to the exiting process (a dead peer can hang its teardown)
    dist.destroy_process_group()


def _exit_without_teardown(code: int) -> None:
    """End the process now with ``code`` after flushing the logs and standard streams, without
    the interpreter's teardown of a process group whose peer was lost."""
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(code)


def _local_group(node_rank: int, local_rank: int) -> None:
    """detectron2's per-node group (``comm.get_local_rank/size``): the ranks that share this
    process's node, numbered as the launcher numbered them on that node (checked on every
    rank, so that all stop with the same message)."""
    mine = (node_rank, local_rank)
    places: List[Tuple[int, int]] = comm.all_gather(mine) if dist.get_world_size() > 1 else [mine]
    for node in sorted({n for n, _ in places}):  # every rank creates every group, in order
        ranks = [r for r, (n, _) in enumerate(places) if n == node]
        group = dist.new_group(ranks)
        if node == node_rank:
            comm._LOCAL_PROCESS_GROUP = group
    for node in sorted({n for n, _ in places}):
        ranks = [r for r, (n, _) in enumerate(places) if n == node]
        local = [places[r][1] for r in ranks]
        if local != list(range(len(ranks))):
            raise LaunchError(
                f"node {node} holds ranks {ranks} with local ranks {local}: ranks must be "
                "numbered node by node (SLURM: --distribution=block)"
            )


def _preflight_on_rank0(
    preflight: Callable, args: Tuple[Any, ...], user_errors: Tuple[type, ...]
) -> None:
    """Rank 0 runs the checks; every rank learns the outcome (a collective: nobody waits for
    a rank 0 that stopped), and what the checks set on the arguments (attributes of an
    ``argparse.Namespace``, e.g. the folder ``--eval-only`` writes to) reaches every rank."""
    outcome, raised = [None, None], None
    if dist.get_rank() == 0:
        before = [dict(vars(a)) if hasattr(a, "__dict__") else {} for a in args]
        try:
            preflight(*args)
            outcome[1] = [
                {k: v for k, v in vars(a).items() if k not in old or old[k] != v}
                for a, old in zip(args, before)
                if hasattr(a, "__dict__")
            ]
        except user_errors as e:
            outcome, raised = [str(e), None], e
        except BaseException as e:  # a bug: the others stop with its name, rank 0 raises it
            outcome, raised = [f"{type(e).__name__}: {_first_line(e)}", None], e
    dist.broadcast_object_list(outcome, src=0)
    if raised is not None:
        raise raised
    if outcome[0] is not None:
        raise LaunchError(f"rank 0 stopped in the checks before training: {outcome[0]}")
    if dist.get_rank() != 0:
        for a, changed in zip([a for a in args if hasattr(a, "__dict__")], outcome[1]):
            for k, v in changed.items():
                setattr(a, k, v)


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def _cause(e: BaseException) -> str:
    """The first line of a backend's message without its source location (gloo's
    ``[.../gloo/transport/tcp/pair.cc:545] Read error ...``)."""
    return re.sub(r"^\[[^\]]*:\d+\]\s*", "", _first_line(e))


# What gloo, NCCL and the TCP store say when a peer is gone or silent.
_PEER_FAILURE = re.compile(
    r"Connection (closed|reset) by peer|Broken pipe|Timed out|timed out|timeout|"
    r"NCCL (communicator|error)|DistNetworkError|gloo/transport|Socket Timeout",
)


def _is_peer_failure(e: BaseException) -> bool:
    dist_error = getattr(dist, "DistError", ())
    if dist_error and isinstance(e, dist_error):
        return True
    return isinstance(e, RuntimeError) and bool(_PEER_FAILURE.search(str(e)))
