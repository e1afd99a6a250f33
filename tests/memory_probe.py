"""Peak-memory measurement in a child process, shared by the memory tests.

``run_child(script, *args)`` runs ``script`` in a fresh interpreter (one torch thread, a fixed
malloc mmap threshold so freed large blocks return to the OS and peak RSS tracks live memory)
and returns the JSON object the script prints last. Inside the script, ``reset_peak_rss()``
then ``rss_bytes("VmHWM")`` give the peak of the measured part alone (``ru_maxrss`` would
report the pytest parent's peak in a child).
"""

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def rss_bytes(key: str = "VmRSS") -> int:
    """A memory figure of this process from /proc/self/status (``VmRSS``, ``VmHWM``), in bytes."""
    with open("/proc/self/status") as fh:
        return next(int(line.split()[1]) * 1024 for line in fh if line.startswith(key + ":"))


def reset_peak_rss() -> None:
    """Reset ``VmHWM`` to the current RSS (no-op where the kernel does not allow it)."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
    except OSError:
        pass


def run_child(script: str, *args: str, timeout: float = 600) -> dict:
    env = dict(
        os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", MALLOC_MMAP_THRESHOLD_="131072"
    )
    res = subprocess.run(
        [sys.executable, "-c", script, *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=REPO,
        timeout=timeout,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    return json.loads(res.stdout.strip().splitlines()[-1])
