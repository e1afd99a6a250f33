#!/usr/bin/env python
"""Benchmark of multi-scale deformable attention: ours against the grid_sample reference, the
naive thread-per-channel CUDA kernel (the 2020 design, our own code) and, when installed, the
``torch-ms-deform-attn`` package (``pip install -e .[bench]``).

    python benchmarks/ms_deform_attn.py --device cpu|cuda [--quick] [--json PATH]

Prints one row per (shape, sampling, dtype, pass, implementation): median milliseconds, speed-up
over the reference, and peak memory above the inputs. Inputs are rotated over several sets
between calls so that timings are not of a warm cache; implementations are interleaved call by
call so that load from other processes affects all of them alike.
"""

import argparse
import os
import sys
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, _HERE)
sys.path.insert(0, os.path.dirname(_HERE))  # this checkout's cqdino, not an installed one

from common import (  # noqa: E402
    format_table,
    machine_info,
    median,
    peak_memory_bytes,
    time_interleaved,
    write_json,
)

from cqdino import _ext  # noqa: E402
from cqdino.layers.ms_deform_attn import (  # noqa: E402
    ms_deform_attn,
    ms_deform_attn_reference,
)

Levels = Sequence[Tuple[int, int]]

# DINO at 800x1333 (strides 8-64): S = 22,223.
DINO_LEVELS = [(100, 167), (50, 84), (25, 42), (13, 21)]
SHAPES = {
    "cpu": {
        "decoder": dict(batch=2, queries=900, levels=[(64, 64), (32, 32), (16, 16), (8, 8)]),
        "encoder": dict(batch=1, queries=None, levels=[(80, 80), (40, 40), (20, 20), (10, 10)]),
    },
    "cuda": {
        "decoder": dict(batch=2, queries=900, levels=DINO_LEVELS),
        "encoder": dict(batch=2, queries=None, levels=DINO_LEVELS),
    },
}
HEADS, HEAD_DIM, POINTS = 8, 32, 4


def make_inputs(
    batch: int,
    queries: Optional[int],
    levels: Levels,
    sampling: str,
    dtype: torch.dtype,
    device: str,
    generator: torch.Generator,
):
    """One input set. ``queries=None`` means encoder self-attention: one query per key, its
    reference point at its own pixel centre. ``realistic`` sampling puts reference points on the
    grid and adds offsets of a few pixels (DINO's initial offsets are 1-4 pixels);
    ``uniform`` draws locations uniformly over [0, 1]."""
    shapes = torch.tensor(levels, dtype=torch.int64)
    areas = shapes[:, 0] * shapes[:, 1]
    starts = torch.cat([areas.new_zeros(1), areas.cumsum(0)[:-1]])
    S = int(areas.sum())
    L = len(levels)
    g = dict(generator=generator)
    if queries is None:
        refs = []
        for h, w in levels:
            ys, xs = torch.meshgrid(
                (torch.arange(h) + 0.5) / h, (torch.arange(w) + 0.5) / w, indexing="ij"
            )
            refs.append(torch.stack([xs, ys], -1).reshape(-1, 2))
        ref = torch.cat(refs).expand(batch, S, 2)  # [B, Q, 2], shared across levels
        Q = S
    else:
        Q = queries
        ref = torch.rand(batch, Q, 2, **g)
    wh = shapes.flip(-1).to(torch.float32)  # (W_l, H_l)
    if sampling == "realistic":
        offsets = torch.randn(batch, Q, HEADS, L, POINTS, 2, **g) * 2.0  # pixels
        loc = ref[:, :, None, None, None, :] + offsets / wh[None, None, None, :, None, :]
    elif sampling == "uniform":
        loc = torch.rand(batch, Q, HEADS, L, POINTS, 2, **g)
    else:
        raise ValueError(f"unknown sampling {sampling!r}")
    attn = (
        torch.randn(batch, Q, HEADS, L * POINTS, **g).softmax(-1).view(batch, Q, HEADS, L, POINTS)
    )
    value = torch.randn(batch, S, HEADS, HEAD_DIM, **g)
    loc_dtype = torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype
    return (
        value.to(device, dtype),
        shapes.to(device),
        starts.to(device),
        loc.to(device, loc_dtype).contiguous(),
        attn.to(device, loc_dtype).contiguous(),
    )


class _NaiveFn(torch.autograd.Function):
    """The naive CUDA kernels (one thread per channel, per-channel atomics) with autograd."""

    @staticmethod
    def forward(ctx, value, shapes, starts, loc, attn):
        ctx.save_for_backward(value, shapes, starts, loc, attn)
        return torch.ops.cqdino._ms_deform_attn_forward_naive(value, shapes, starts, loc, attn)

    @staticmethod
    def backward(ctx, grad):
        value, shapes, starts, loc, attn = ctx.saved_tensors
        gv, gl, ga = torch.ops.cqdino._ms_deform_attn_backward_naive(
            grad.contiguous(), value, shapes, starts, loc, attn
        )
        return gv, None, None, gl, ga


def implementations(device: str, dtype: torch.dtype) -> Dict[str, Callable]:
    impls: Dict[str, Callable] = {"reference": ms_deform_attn_reference}
    if device == "cuda" and _ext.has_cuda_ext():
        impls["naive"] = _NaiveFn.apply
    try:
        import torch_ms_deform_attn  # optional benchmark extra

        def peer(value, shapes, starts, loc, attn):
            if value.dtype in (torch.float16, torch.bfloat16):  # it wants matching dtypes
                loc, attn = loc.to(value.dtype), attn.to(value.dtype)
            return torch_ms_deform_attn.ms_deform_attn(value, shapes, starts, loc, attn)

        impls["torch-ms-deform-attn"] = peer
    except ImportError:
        pass
    if _ext.use_ext("ms_deform_attn", device):
        impls["ours"] = ms_deform_attn
    return impls


def run_case(
    device: str,
    shape_name: str,
    sampling: str,
    dtype: torch.dtype,
    repeats: int,
    num_sets: int,
    passes: Sequence[str],
) -> List[Dict[str, object]]:
    spec = SHAPES[device][shape_name]
    gen = torch.Generator().manual_seed(0)
    sets = [
        make_inputs(spec["batch"], spec["queries"], spec["levels"], sampling, dtype, device, gen)
        for _ in range(num_sets)
    ]
    grads = []
    impls = implementations(device, dtype)
    with torch.no_grad():
        out0 = ms_deform_attn_reference(*sets[0])
    for _ in range(num_sets):
        grads.append(torch.randn(out0.shape, generator=gen).to(device, dtype))
    leaf_sets = []
    for v, s, st, lo, a in sets:
        leaf_sets.append((v.requires_grad_(), s, st, lo.requires_grad_(), a.requires_grad_()))

    def forward_fn(fn):
        def call(r):
            with torch.no_grad():
                return fn(*sets[r % num_sets])

        return call

    def train_fn(fn):
        def call(r):
            inputs = leaf_sets[r % num_sets]
            out = fn(*inputs)
            return torch.autograd.grad(out, (inputs[0], inputs[3], inputs[4]), grads[r % num_sets])

        return call

    # Backward alone: only the implementations with a callable backward op.
    backward_ops = {}
    if "naive" in impls:
        backward_ops["naive"] = torch.ops.cqdino._ms_deform_attn_backward_naive
    if "ours" in impls:
        backward_ops["ours"] = lambda *a: torch.ops.cqdino.ms_deform_attn_backward(*a, False)

    def backward_fn(bwd):
        def call(r):
            v, s, st, lo, a = sets[r % num_sets]
            with torch.no_grad():
                return bwd(grads[r % num_sets], v, s, st, lo, a)

        return call

    rows = []
    Q = sets[0][3].shape[1]
    shape_str = f"B={spec['batch']} Q={Q} S={sets[0][0].shape[1]}"
    for pass_name in passes:
        if pass_name == "bwd":
            fns = {name: backward_fn(bwd) for name, bwd in backward_ops.items()}
        else:
            wrap = forward_fn if pass_name == "fwd" else train_fn
            fns = {name: wrap(fn) for name, fn in impls.items()}
        if not fns:
            continue
        times = time_interleaved(fns, device, repeats=repeats, warmup=1)
        ref_ms = median(times["reference"]) if "reference" in times else None
        for name in fns:
            ms = median(times[name])
            mem = peak_memory_bytes(lambda: fns[name](0), device)
            rows.append(
                dict(
                    shape=shape_name,
                    dims=shape_str,
                    sampling=sampling,
                    dtype=str(dtype).replace("torch.", ""),
                    **{"pass": pass_name},
                    impl=name,
                    ms=ms,
                    speedup=ref_ms / ms if ref_ms else None,
                    peak_mb=mem / 2**20,
                    times_ms=times[name],
                )
            )
    return rows


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--quick", action="store_true", help="fewer repeats, one sampling")
    parser.add_argument("--json", default=None, help="write the results here as JSON")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (default: all)")
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--shapes", nargs="+", default=["decoder", "encoder"])
    parser.add_argument("--sampling", nargs="+", default=None, help="realistic and/or uniform")
    parser.add_argument("--dtypes", nargs="+", default=None, help="float32 float16 bfloat16 ...")
    parser.add_argument(
        "--passes",
        nargs="+",
        default=None,
        choices=["fwd", "fwd+bwd", "bwd"],
        help="default: fwd fwd+bwd (CPU), fwd bwd fwd+bwd (CUDA; bwd = backward op alone)",
    )
    args = parser.parse_args(argv)

    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available")
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.dtypes is None:
        args.dtypes = ["float32"] if args.device == "cpu" else ["float32", "float16", "bfloat16"]
    if args.passes is None:
        args.passes = ["fwd", "fwd+bwd"] if args.device == "cpu" else ["fwd", "bwd", "fwd+bwd"]
    if args.sampling is None:
        args.sampling = ["realistic"] if args.quick else ["realistic", "uniform"]
    repeats = args.repeats or (
        (3 if args.quick else 9) if args.device == "cpu" else (10 if args.quick else 50)
    )
    num_sets = 2 if args.device == "cpu" else 3

    info = machine_info(args.device)
    print("machine:", ", ".join(f"{k}={v}" for k, v in info.items()))
    rows: List[Dict[str, object]] = []
    for shape_name in args.shapes:
        for sampling in args.sampling:
            for dt in args.dtypes:
                dtype = getattr(torch, dt)
                rows += run_case(
                    args.device, shape_name, sampling, dtype, repeats, num_sets, args.passes
                )
                print(f"  done: {shape_name} {sampling} {dt}", flush=True)
    columns = ["shape", "dims", "sampling", "dtype", "pass", "impl", "ms", "speedup", "peak_mb"]
    print(format_table(rows, columns))
    impls = {r["impl"] for r in rows}
    for other in ("torch-ms-deform-attn", "naive"):
        if other not in impls or "ours" not in impls:
            continue
        print(f"\nspeed-up of ours over {other} (same run):")
        for r in rows:
            if r["impl"] != "ours":
                continue
            key = tuple(r[k] for k in ("shape", "sampling", "dtype", "pass"))
            for p in rows:
                if (
                    p["impl"] == other
                    and tuple(p[k] for k in ("shape", "sampling", "dtype", "pass")) == key
                ):
                    print("  " + "  ".join(f"{k:9s}" for k in key) + f"  {p['ms'] / r['ms']:.2f}x")
    write_json(
        args.json,
        dict(benchmark="ms_deform_attn", device=args.device, machine=info, results=rows),
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
