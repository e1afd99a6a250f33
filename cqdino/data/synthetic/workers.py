"""The processes that render a split's images in chunks (fork when this process runs a single
thread, else spawn; a worker ends when its parent dies). Every image is a function of its own
seed, so the output is the same for any number of workers. A spawned worker imports this module
for its task function."""

import ctypes
import logging
import multiprocessing
import os
import signal
import sys
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import List, Optional

from .render import _render_chunk

logger = logging.getLogger(__name__)


# Images per task sent to a rendering process, and the smallest job worth starting processes.
_CHUNK = 50
_MIN_PARALLEL_IMAGES = 200
_WORKER_STATE: dict = {}


def _exit_with_parent(parent_pid: int) -> None:
    """Make this worker end when the process that started it dies (a parent killed with
    SIGKILL cannot stop its workers, which would wait for work forever): Linux delivers SIGKILL
    on the parent's death (``prctl(PR_SET_PDEATHSIG)``); elsewhere a thread polls the parent
    pid every second. A parent already gone ends the worker at once."""
    watch = True
    if sys.platform.startswith("linux"):
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            watch = libc.prctl(1, signal.SIGKILL, 0, 0, 0) != 0  # 1 = PR_SET_PDEATHSIG
        except (OSError, AttributeError):
            pass
    if os.getppid() != parent_pid:  # died before the signal was armed
        os._exit(1)
    if watch:

        def poll() -> None:
            while os.getppid() == parent_pid:
                time.sleep(1.0)
            os._exit(1)

        threading.Thread(target=poll, daemon=True).start()


def _init_worker(state: dict, parent_pid: int) -> None:
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, signal.SIG_DFL)  # not the parent's handler (fork)
    _exit_with_parent(parent_pid)
    _WORKER_STATE.clear()
    _WORKER_STATE.update(state)


def _render_chunk_in_worker(split: str, split_idx: int, first: int, objects) -> List[tuple]:
    return _render_chunk(_WORKER_STATE, split, split_idx, first, objects)


def _spawn_blocker() -> Optional[str]:
    """None when a spawned worker can start, else the reason it cannot: spawn re-imports the
    main script from its path, which a script read from standard input (``python - <<EOF``,
    path ``<stdin>``) does not have."""
    main = sys.modules.get("__main__")
    if main is None or getattr(getattr(main, "__spec__", None), "name", None):
        return None  # ``python -m``: imported by module name
    path = getattr(main, "__file__", None)
    if path is None:
        return None  # ``python -c`` or interactive: nothing to re-import
    path = os.path.join(getattr(multiprocessing.process, "ORIGINAL_DIR", None) or "", path)
    if os.path.isfile(path):
        return None
    return f"the main script {getattr(main, '__file__', path)} is not a file a worker can import"


# "fork" or "spawn" instead of the choice of :func:`_pool_context` (tests)
_START_METHOD: Optional[str] = None


def _pool_context():
    """fork when this process runs a single thread (Linux, ``/proc/self/task``; the command
    line's case): workers start at once, share the imported modules, and need not import the
    main script; else spawn (forking a process that runs other threads can deadlock)."""
    if _START_METHOD is not None:
        return multiprocessing.get_context(_START_METHOD)
    if sys.platform.startswith("linux") and "fork" in multiprocessing.get_all_start_methods():
        try:
            if len(os.listdir("/proc/self/task")) == 1:
                return multiprocessing.get_context("fork")
        except OSError:
            pass
    return multiprocessing.get_context("spawn")


def _render_pool(workers: Optional[int], total: int, state: dict):
    """A process pool for the rendering, or None to render in this process."""
    requested = workers
    if workers is None:
        workers = min(os.cpu_count() or 1, 8) if total >= _MIN_PARALLEL_IMAGES else 1
    if workers <= 1:
        return None
    context = _pool_context()
    reason = _spawn_blocker() if context.get_start_method() != "fork" else None
    if reason is not None:
        log = logger.warning if requested is not None else logger.info
        log(f"rendering the images in this process, not in {workers} worker processes: {reason}")
        return None
    return ProcessPoolExecutor(
        max_workers=workers,
        mp_context=context,
        initializer=_init_worker,
        initargs=(state, os.getpid()),
    )


class WorkerError(RuntimeError):
    """A rendering worker process died (the message says what can cause it)."""


def _render_split(pool, state: dict, split: str, split_idx: int, objects) -> List[tuple]:
    """Every image of a split, in order (in chunks over ``pool`` when there is one)."""
    chunks = [(first, objects[first : first + _CHUNK]) for first in range(0, len(objects), _CHUNK)]
    if pool is None:
        return [
            r for first, objs in chunks for r in _render_chunk(state, split, split_idx, first, objs)
        ]
    try:
        futures = [pool.submit(_render_chunk_in_worker, split, split_idx, f, o) for f, o in chunks]
        return [r for fut in futures for r in fut.result()]
    except BrokenProcessPool:
        raise WorkerError(
            "a process rendering the synthetic images died before finishing (its own error, if "
            "any, is printed above): killed (e.g. out of memory), or it could not start because "
            "the calling script cannot be imported again by a new process (a script needs its "
            'work under `if __name__ == "__main__":`); workers=1 (--workers 1) renders in '
            "this process"
        ) from None
