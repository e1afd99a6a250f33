"""Small helpers shared by the benchmarks: timing, peak memory, tables and JSON output.

Timings are medians over repeats. On CUDA they use device events after a warm-up; on the CPU
``time.perf_counter``. Callers interleave the implementations they compare (one call of each
per round) so that load from other processes hits all of them alike.
"""

import json
import os
import platform
import statistics
import subprocess
import tempfile
import time
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Tuple

import torch

from cqdino.utils.io import atomic_write

__all__ = [
    "machine_info",
    "time_interleaved",
    "peak_memory_bytes",
    "format_table",
    "write_json",
    "mem_available_bytes",
    "release_free_memory",
    "run_json_child",
    "linear_fit",
    "write_outputs",
    "log_log_axes",
    "save_figure",
]


def machine_info(device: str) -> Dict[str, object]:
    """A description of the machine (CPU model and threads, or the CUDA card) for the record."""
    info: Dict[str, object] = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
    }
    cpu = platform.processor() or platform.machine()
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
        for line in out.splitlines():
            if line.startswith("Model name:"):
                cpu = line.split(":", 1)[1].strip()
        info["avx512"] = "avx512f" in out
    except OSError:
        pass
    info["cpu"] = cpu
    info["cpu_count"] = os.cpu_count()
    if device == "cuda":
        info["gpu"] = torch.cuda.get_device_name()
        info["cuda"] = torch.version.cuda
    return info


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def time_interleaved(
    fns: Dict[str, Callable[[int], object]],
    device: str,
    repeats: int,
    warmup: int = 1,
) -> Dict[str, List[float]]:
    """Milliseconds per call of each ``fns[name](round_index)``, run round-robin.

    Each round calls every function once; the round index lets callers rotate their inputs so
    that no call times a warm cache left by the previous one.
    """
    names = list(fns)
    for r in range(warmup):
        for name in names:
            fns[name](r)
    _sync(device)
    times: Dict[str, List[float]] = {name: [] for name in names}
    for r in range(repeats):
        for name in names:
            if device == "cuda":
                start = torch.cuda.Event(enable_timing=True)
                end = torch.cuda.Event(enable_timing=True)
                start.record()
                fns[name](warmup + r)
                end.record()
                end.synchronize()
                times[name].append(start.elapsed_time(end))
            else:
                t0 = time.perf_counter()
                fns[name](warmup + r)
                times[name].append((time.perf_counter() - t0) * 1e3)
    return times


def median(xs: Sequence[float]) -> float:
    return float(statistics.median(xs))


def peak_memory_bytes(fn: Callable[[], object], device: str) -> int:
    """Peak bytes allocated by ``fn()`` above what was allocated when it started.

    CUDA: the caching allocator's peak statistic. CPU: the running sum of the allocations and
    frees that the PyTorch profiler records (tensors freed inside ``fn`` count until freed).
    """
    if device == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        return int(torch.cuda.max_memory_allocated() - base)
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    events.sort(key=lambda e: e.start_ns())
    current = peak = 0
    for e in events:
        if str(e.device_type()).rsplit(".", 1)[-1].upper() != "CPU":  # host allocations only
            continue
        current += e.nbytes()
        peak = max(peak, current)
    return int(peak)


def format_table(rows: Iterable[Dict[str, object]], columns: Sequence[str]) -> str:
    """A plain-text table of ``rows`` with the given columns, right-aligned numbers."""
    rows = list(rows)
    cells = [[_fmt(r.get(c)) for c in columns] for r in rows]
    widths = [max([len(c)] + [len(row[i]) for row in cells]) for i, c in enumerate(columns)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths))]
    lines.append("  ".join("-" * w for w in widths))
    for row, r in zip(cells, rows):
        parts = []
        for i, (cell, w) in enumerate(zip(row, widths)):
            num = isinstance(r.get(columns[i]), (int, float))
            parts.append(cell.rjust(w) if num else cell.ljust(w))
        lines.append("  ".join(parts))
    return "\n".join(lines)


def _fmt(v: object) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.3f}" if abs(v) < 100 else f"{v:.1f}"
    return str(v)


def write_json(path: Optional[str], payload: object) -> None:
    """Writes ``payload`` as JSON to ``path`` atomically (nothing when ``path`` is None)."""
    if not path:
        return
    atomic_write(path, lambda f: json.dump(payload, f, indent=1), mode="w")


def mem_available_bytes() -> int:
    """``MemAvailable`` of /proc/meminfo in bytes (what new allocations can get without swap)."""
    with open("/proc/meminfo") as fh:
        return next(int(line.split()[1]) * 1024 for line in fh if line.startswith("MemAvailable:"))


def release_free_memory() -> None:
    """Collect garbage and hand freed heap pages back to the OS (glibc ``malloc_trim``), so
    that the RSS before a measurement holds live memory only."""
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def run_json_child(
    argv: Sequence[str],
    env: Dict[str, str],
    timeout: float,
    rss_limit_bytes: Optional[int] = None,
    poll_s: float = 0.05,
) -> Dict[str, object]:
    """Run ``argv`` and return the JSON object it prints last on stdout.

    A child that exits non-zero, runs past ``timeout`` seconds or whose resident memory passes
    ``rss_limit_bytes`` (polled every ``poll_s`` seconds from /proc; the child is killed) gives
    ``{"error": "failed" | "timeout" | "rss_limit", "detail": ...}`` instead of raising, so a
    benchmark can report the case and go on.
    """
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen(argv, stdout=out, stderr=err, env=env, text=True)
        t0 = time.monotonic()
        reason, max_rss = None, 0
        while proc.poll() is None:
            if time.monotonic() - t0 > timeout:
                reason = "timeout"
            elif rss_limit_bytes is not None:
                try:
                    with open(f"/proc/{proc.pid}/status") as fh:
                        rss = next(
                            (
                                int(line.split()[1]) * 1024
                                for line in fh
                                if line.startswith("VmRSS:")
                            ),
                            0,
                        )
                except OSError:
                    rss = 0
                max_rss = max(max_rss, rss)
                if rss > rss_limit_bytes:
                    reason = "rss_limit"
            if reason is not None:
                proc.kill()
                proc.wait()
                break
            time.sleep(poll_s)
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read(), err.read()
    if reason is None and proc.returncode != 0:
        reason = "failed"
    if reason is not None:
        detail = stderr[-2000:]
        if reason == "rss_limit":
            detail = (
                f"killed at {max_rss / 2**30:.2f} GiB RSS (limit {rss_limit_bytes / 2**30:.2f})"
            )
        elif reason == "timeout":
            detail = f"killed after {timeout:.0f} s"
        return {"error": reason, "detail": detail}
    lines = stdout.strip().splitlines()
    return json.loads(lines[-1])


def linear_fit(xs: Sequence[float], ys: Sequence[float]) -> Tuple[float, float]:
    """Least-squares ``(slope, intercept)`` of ``ys`` against ``xs`` (two or more points)."""
    n = len(xs)
    if n < 2:
        raise ValueError("linear_fit needs at least two points")
    mx, my = sum(xs) / n, sum(ys) / n
    sxx = sum((x - mx) ** 2 for x in xs)
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sxx
    return slope, my - slope * mx


def write_outputs(
    json_path: Optional[str],
    payload: Dict[str, object],
    plot_path: Optional[str] = None,
    draw: Optional[Callable[[str], None]] = None,
) -> None:
    """End of a benchmark run: ``payload["info"]`` gets the load average, then the JSON is
    written (atomically, when ``json_path``) and ``draw(plot_path)`` called (when given)."""
    payload.setdefault("info", {})["load_avg_after"] = [round(x, 2) for x in os.getloadavg()]
    write_json(json_path, payload)
    if plot_path and draw is not None:
        draw(plot_path)


def log_log_axes(ax, ylabel: str, xlabel: str = "vocabulary size C") -> None:
    """Log-log axes with labels and a light grid (the evidence plots against C)."""
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(True, which="both", alpha=0.3)


def save_figure(fig, path: str, title: str, width: int = 160) -> None:
    """Wrap ``title`` over the figure, save it as ``path`` (folders made) and close it."""
    import textwrap

    import matplotlib.pyplot as plt

    fig.suptitle("\n".join(textwrap.wrap(title, width)), fontsize=8)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
