#!/usr/bin/env python
"""The floating-point work of one inference forward, per part of the model, against what this
machine's core can do: the physical floor of eager (and any runtime's) CPU latency.

    python benchmarks/flops.py --presets demo r50 --threads 1 --json flops.json

For each preset of ``benchmarks/export_latency.py`` (untrained weights), one forward on one
image of the preset's size is counted with ``torch.utils.flop_counter.FlopCounterMode``
(matmuls, convolutions, attention; a multiply-add counts 2; our deformable-attention op
through its registered formula, :func:`cqdino.layers.ms_deform_attn_flops`); element-wise
operations, normalisation and data movement are not counted (they are memory-bound, their
time is what the profile shows beyond the floor). What eager inference keeps between calls
(CQ-DINO's category queries and their projections) is computed by a first call and not counted,
as it is not in the timed forwards. The same forward is then timed
(``--repeats``, median, CPU time of the process). The machine's rate is the median of fp32
square matmuls (``--gemm-size``, the same thread count): ``floor = GFLOP / rate``, and
``eager / floor`` says how far eager is from the arithmetic it must do.
"""

import argparse
import os
import statistics
import sys
import time
from typing import Dict, List

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.common import format_table, machine_info, write_outputs  # noqa: E402
from benchmarks.export_latency import PRESETS, _build, _inputs  # noqa: E402

# The parts reported, as module paths below the meta-architecture; an operation counts for the
# deepest of them that is running (the rest: "other").
PARTS = (
    "backbone",
    "neck",
    "transformer.encoder",
    "transformer.decoder",
    "transformer",
    "class_head.selector",
    "class_head",
    "word_head",
)


def _clock():
    """CPU time of the process with one thread (unaffected by other jobs), else wall time."""
    return time.process_time if torch.get_num_threads() == 1 else time.perf_counter


def gemm_gflops(size: int, repeats: int) -> float:
    """This process's fp32 matmul rate (GFLOP/s): the median of ``repeats`` square products."""
    a, b = torch.rand(size, size), torch.rand(size, size)
    torch.mm(a, b)  # warm-up
    clock, times = _clock(), []
    for _ in range(repeats):
        t0 = clock()
        torch.mm(a, b)
        times.append(clock() - t0)
    return 2 * size**3 / statistics.median(times) / 1e9


def count(model, images) -> Dict[str, object]:
    """FLOPs of one forward: the total, per part (each operation for the deepest running
    part of :data:`PARTS`) and per operator."""
    from torch.utils.flop_counter import FlopCounterMode

    root = type(model).__name__
    parts = {p: 0 for p in PARTS + ("other",)}

    class PartCounter(FlopCounterMode):
        def _count_flops(self, func_packet, out, args, kwargs):
            if func_packet in self.flop_registry:
                n = self.flop_registry[func_packet](*args, **kwargs, out_val=out)
                on = self.mod_tracker.parents  # module names, a submodule run alone included
                running = [
                    p
                    for p in PARTS
                    if any(m == f"{root}.{p}" or m.startswith(f"{root}.{p}.") for m in on)
                ]
                parts[max(running, key=len) if running else "other"] += n
            return super()._count_flops(func_packet, out, args, kwargs)

    model.requires_grad_(False)  # the counter's module tracker hooks tensors needing grad
    with torch.no_grad():
        # a first call computes what inference keeps between calls (the category queries and
        # their projections): the count is that of every later forward, as timed
        model([{"image": im} for im in images])
        with PartCounter(display=False) as fc:
            model([{"image": im} for im in images])
    total = fc.get_total_flops()
    if sum(parts.values()) != total:
        raise RuntimeError(f"parts {sum(parts.values())} != total {total} FLOPs")
    ops = {str(op).split(".")[-1]: n for op, n in fc.get_flop_counts()["Global"].items()}
    return {"total": total, "parts": parts, "ops": ops}


def time_forward(model, images, repeats: int) -> float:
    """Median seconds of a forward (CPU time of the process with one thread, else wall)."""
    clock = _clock()
    with torch.no_grad():
        model([{"image": im} for im in images])  # warm-up
        times = []
        for _ in range(repeats):
            t0 = clock()
            model([{"image": im} for im in images])
            times.append(clock() - t0)
    return statistics.median(times)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--presets", nargs="+", default=["demo"], choices=list(PRESETS))
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=3, help="timed forwards per preset")
    ap.add_argument("--gemm-size", type=int, default=2048)
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    rate = gemm_gflops(args.gemm_size, 5)
    rows: List[Dict[str, object]] = []
    record: Dict[str, object] = {
        "info": machine_info("cpu"),
        "gemm": {"size": args.gemm_size, "gflops": rate},
        "presets": {},
    }
    for preset in args.presets:
        model = _build(preset, "cpu")
        images = _inputs(preset, model.size_divisibility, "cpu")[0]
        res = count(model, images)
        seconds = time_forward(model, images, args.repeats)
        floor = res["total"] / 1e9 / rate
        h, w = PRESETS[preset]["size"]
        res.update(seconds=seconds, floor_s=floor, input=f"1x3x{h}x{w}")
        record["presets"][preset] = res
        for part, n in list(res["parts"].items()) + [("total", res["total"])]:
            rows.append(
                {
                    "preset": preset,
                    "part": part,
                    "GFLOP": n / 1e9,
                    "share_%": 100.0 * n / max(res["total"], 1),
                    "floor_s": n / 1e9 / rate,
                }
            )
        print(
            f"{preset}: {res['total'] / 1e9:.1f} GFLOP; eager {seconds:.3f} s, floor "
            f"{floor:.3f} s at {rate:.1f} GFLOP/s: eager / floor = {seconds / floor:.2f}",
            flush=True,
        )
    print(format_table(rows, ["preset", "part", "GFLOP", "share_%", "floor_s"]))
    write_outputs(args.json, record)
    return 0


if __name__ == "__main__":
    sys.exit(main())
