"""CQ-DINO vs DINO in the test configuration: CPU time per training iteration and peak memory.

Both models are the small CPU test models of ``tests/modeling`` (R18 with width 32, d = 64,
2 + 2 transformer layers, 8 heads, FFN 128, 30 queries, 10 DN queries); DINO has the linear
head over all C classes, CQ-DINO the contrastive head over K = min(100, C) selected categories
with a narrow selector (width 64, FFN 128, 2 layers), encoder fusion (width 128) and decoder
category attention; ``CQDINO-ckpt`` is CQ-DINO with the selector run in chunks of 1,024
categories recomputed in backward (``selector_checkpoint=True``). One iteration = forward +
backward + AdamW step on a batch of two ``--size`` images with ``--boxes`` GT boxes each.

Each (model, C) runs in a fresh subprocess: build the model, one warm-up iteration, then reset
the kernel's peak-RSS mark (``/proc/self/clear_refs``) and time ``--iters`` iterations; the
peak RSS reported is ``VmHWM`` over the timed iterations (process total, model included) and
its growth over the RSS before them. ``MALLOC_MMAP_THRESHOLD_`` is fixed so freed large blocks
go back to the OS and the peak tracks live memory.

Usage::

    python benchmarks/cqdino_vs_dino.py [--iters 5] [--threads 1] [--json out.json]
"""

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time

from cqdino.utils.io import atomic_write

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

_CHILD = r"""
import json, sys, time, torch
from tests.modeling.cqdino_utils import tiny_cqdino
from tests.modeling.utils import batch, tiny_dino
a = json.loads(sys.argv[1])
torch.set_num_threads(a["threads"])
torch.manual_seed(0)
C = a["C"]
if a["model"] == "DINO":
    model = tiny_dino(C, embed_dim=64, ffn_dim=128, width=32, num_queries=30, dn_number=10)
elif a["model"] == "CQDINO":
    model = tiny_cqdino(C, topk=100, num_queries=30, dn_number=10)
else:  # selector chunks of 1024 categories recomputed in backward
    model = tiny_cqdino(C, topk=100, num_queries=30, dn_number=10, selector_chunk_size=1024,
                        selector_checkpoint=True)
opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
inputs = batch([(a["size"], a["size"], a["boxes"])] * 2, C)
def status(key):
    with open("/proc/self/status") as fh:
        return next(int(l.split()[1]) * 1024 for l in fh if l.startswith(key + ":"))
def step():
    losses = model(inputs)
    total = sum(losses.values())
    opt.zero_grad(set_to_none=True)
    total.backward()
    opt.step()
    return total.item()
step()  # warm-up (lazy allocations, AdamW state)
try:
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")
    reset = True
except OSError:
    reset = False
base = status("VmRSS")
times = []
for _ in range(a["iters"]):
    t0 = time.perf_counter()
    loss = step()
    times.append(time.perf_counter() - t0)
print(json.dumps({"times": times, "loss": loss, "base_mib": base / 2**20,
                  "peak_mib": status("VmHWM") / 2**20, "peak_reset": reset,
                  "params_m": sum(p.numel() for p in model.parameters()) / 1e6}))
"""


def run_one(model: str, C: int, args) -> dict:
    cfg = dict(model=model, C=C, iters=args.iters, threads=args.threads, size=args.size)
    cfg["boxes"] = args.boxes
    env = dict(
        os.environ,
        PYTHONPATH=REPO,
        OMP_NUM_THREADS=str(args.threads),
        MALLOC_MMAP_THRESHOLD_="131072",
    )
    res = subprocess.run(
        [sys.executable, "-c", _CHILD, json.dumps(cfg)],
        capture_output=True,
        text=True,
        env=env,
        cwd=REPO,
        timeout=1800,
    )
    if res.returncode != 0:
        raise RuntimeError(f"{model} C={C} failed:\n{res.stderr[-3000:]}")
    r = json.loads(res.stdout.strip().splitlines()[-1])
    return {
        "model": model,
        "C": C,
        "sec_per_iter_median": statistics.median(r["times"]),
        "sec_per_iter_min": min(r["times"]),
        "peak_rss_mib": r["peak_mib"],
        "rss_growth_mib": r["peak_mib"] - r["base_mib"],
        "params_m": r["params_m"],
        "loss": r["loss"],
    }


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--classes", type=int, nargs="+", default=[80, 13204])
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--size", type=int, default=128, help="square image side")
    ap.add_argument("--boxes", type=int, default=3, help="GT boxes per image")
    ap.add_argument(
        "--models",
        nargs="+",
        default=["DINO", "CQDINO", "CQDINO-ckpt"],
        choices=["DINO", "CQDINO", "CQDINO-ckpt"],
        help="CQDINO-ckpt: selector in chunks of 1024 categories, recomputed in backward",
    )
    ap.add_argument("--json", default=None, help="write the results here (atomically)")
    args = ap.parse_args(argv)

    rows = []
    for C in args.classes:
        for model in args.models:  # interleaved: same machine state for each C
            rows.append(run_one(model, C, args))
            print(f"done {model} C={C}", file=sys.stderr)
    load = os.getloadavg()
    info = {
        "machine": platform.machine(),
        "cpu": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(),
        "load_avg_1m_after": round(load[0], 2),
        "torch_threads": args.threads,
        "dtype": "float32",
        "batch": f"2 x {args.size}x{args.size}, {args.boxes} boxes each",
        "iters": args.iters,
        "time": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    head = f"{'model':<12} {'C':>6} {'s/iter (median)':>16} {'s/iter (min)':>13} "
    head += f"{'peak RSS MiB':>13} {'growth MiB':>11} {'params M':>9}"
    print(head)
    for r in rows:
        print(
            f"{r['model']:<12} {r['C']:>6} {r['sec_per_iter_median']:>16.3f} "
            f"{r['sec_per_iter_min']:>13.3f} {r['peak_rss_mib']:>13.0f} "
            f"{r['rss_growth_mib']:>11.0f} {r['params_m']:>9.2f}"
        )
    print(json.dumps(info))
    if args.json:
        out = {"info": info, "results": rows}
        atomic_write(args.json, lambda f: json.dump(out, f, indent=1), mode="w")


if __name__ == "__main__":
    main()
