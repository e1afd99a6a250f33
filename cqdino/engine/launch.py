"""``launch``: detectron2's multi-process launcher, extended to CPU-only machines.

On CUDA machines this is detectron2's ``launch`` (one process per GPU, NCCL). Without CUDA,
``num_gpus_per_machine > 1`` starts that many CPU processes over gloo (detectron2 0.6 asserts
CUDA here), so distributed training can be run and tested anywhere.
"""

import logging
from datetime import timedelta
from typing import Any, Callable, Tuple

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from detectron2.engine import launch as d2_launch
from detectron2.engine.launch import _find_free_port
from detectron2.utils import comm

__all__ = ["launch"]

logger = logging.getLogger(__name__)

DEFAULT_TIMEOUT = timedelta(minutes=30)


def launch(
    main_func: Callable,
    num_gpus_per_machine: int,
    num_machines: int = 1,
    machine_rank: int = 0,
    dist_url: str = None,
    args: Tuple[Any, ...] = (),
    timeout: timedelta = DEFAULT_TIMEOUT,
) -> None:
    """Run ``main_func(*args)`` in ``num_machines * num_gpus_per_machine`` processes.

    Args mirror detectron2's ``launch``; ``dist_url="auto"`` picks a free local port (one
    machine only).
    """
    if num_gpus_per_machine < 1 or num_machines < 1:
        raise ValueError(
            f"--num-gpus ({num_gpus_per_machine}) and --num-machines ({num_machines}) must be >= 1"
        )
    if torch.cuda.is_available():
        if num_gpus_per_machine > torch.cuda.device_count():
            raise ValueError(
                f"--num-gpus {num_gpus_per_machine}, but only {torch.cuda.device_count()} "
                "CUDA devices are visible"
            )
        return d2_launch(
            main_func,
            num_gpus_per_machine,
            num_machines=num_machines,
            machine_rank=machine_rank,
            dist_url=dist_url,
            args=args,
            timeout=timeout,
        )
    world_size = num_machines * num_gpus_per_machine
    if world_size == 1:
        return main_func(*args)
    if dist_url is None or dist_url == "auto":
        if num_machines != 1:
            raise ValueError("dist_url='auto' works on one machine only; give --dist-url")
        dist_url = f"tcp://127.0.0.1:{_find_free_port()}"
    logger.info(f"No CUDA: {world_size} CPU processes over gloo ({dist_url})")
    mp.start_processes(
        _cpu_worker,
        nprocs=num_gpus_per_machine,
        args=(main_func, world_size, num_gpus_per_machine, machine_rank, dist_url, args, timeout),
        daemon=False,
    )


def _cpu_worker(
    local_rank, main_func, world_size, num_per_machine, machine_rank, dist_url, args, timeout
):
    rank = machine_rank * num_per_machine + local_rank
    dist.init_process_group(
        backend="gloo", init_method=dist_url, world_size=world_size, rank=rank, timeout=timeout
    )
    if hasattr(comm, "create_local_process_group"):  # detectron2 > 0.6
        comm.create_local_process_group(num_per_machine)
    else:
        for i in range(world_size // num_per_machine):
            group = dist.new_group(list(range(i * num_per_machine, (i + 1) * num_per_machine)))
            if i == machine_rank:
                comm._LOCAL_PROCESS_GROUP = group
    # A CPU process per rank: split the cores between them (as one GPU per rank would).
    torch.set_num_threads(max(1, torch.get_num_threads() // num_per_machine))
    comm.synchronize()
    try:
        main_func(*args)
    finally:
        dist.destroy_process_group()
