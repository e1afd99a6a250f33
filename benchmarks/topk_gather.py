"""Benchmark of the fused top-K category gather + batched contrastive logits.

Compares, on the same inputs and in the same run:

* ``ours``:    ``topk_category_gather`` (one op, no host sync) + ``contrastive_logits`` (one
               batched GEMM over all N query sets with scale and bias fused, then the mask);
* ``topk``:    (a) ``torch.topk`` + ``gather`` + ``matmul`` + scale + bias + ``masked_fill``;
* ``authors``: (b) the official code's style: ``torch.topk``, ``.tolist()`` (a device->host
               sync), a Python loop per image with padding to a common K, then one contrastive
               head call per query set (decoder layer).

Two timings per method: the selection + gather alone (``select``) and the whole path to the
``[N, B, Q, K]`` logits (``total``). Forward only. Shapes default to the issue's grid
(C = 13,204 V3Det categories, Q = 900 queries, D = 256, N = 7 query sets, per-image
embeddings ``[B, C, D]``); ``--quick`` runs a small subset.

Usage::

    python benchmarks/topk_gather.py --device cpu|cuda [--quick] [--json PATH]
"""

import argparse
import json
import math
import os
import platform
import statistics
import sys
import time
from typing import Callable, Dict, List

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from cqdino import _ext  # noqa: E402
from cqdino.layers import contrastive_logits, topk_category_gather  # noqa: E402
from cqdino.utils.io import atomic_write  # noqa: E402

# ------------------------------------------------------------------ the three implementations


def select_ours(scores, emb, k):
    return topk_category_gather(scores, emb, k)


def total_ours(scores, emb, k, queries, bias, valid):
    _, cats = topk_category_gather(scores, emb, k)
    return contrastive_logits(queries, cats, bias, valid)


def select_topk(scores, emb, k):
    idx = torch.topk(scores, k, dim=1).indices
    return idx, emb.gather(1, idx[..., None].expand(-1, -1, emb.shape[-1]))


def total_topk(scores, emb, k, queries, bias, valid):
    _, cats = select_topk(scores, emb, k)
    logits = torch.matmul(queries, cats.transpose(1, 2).unsqueeze(0))
    logits = logits / math.sqrt(queries.shape[-1]) + bias
    return logits.masked_fill(~valid[:, None, :], -math.inf)


def select_authors(scores, emb, k):
    idx = torch.topk(scores, k, dim=1).indices.tolist()  # device -> host sync
    rows, valid = [], []
    for b, ids in enumerate(idx):  # per-image loop, padded to a common length
        sel = torch.as_tensor(ids, device=emb.device)
        pad = k - len(ids)
        row = emb[b, sel]
        if pad > 0:
            row = torch.cat([row, row.new_zeros(pad, row.shape[-1])])
        rows.append(row)
        valid.append(torch.arange(k, device=emb.device) < len(ids))
    return torch.stack(rows), torch.stack(valid)


def total_authors(scores, emb, k, queries, bias, valid):
    cats, valid = select_authors(scores, emb, k)
    out = []
    for q in queries:  # one contrastive head call per decoder layer
        logits = torch.matmul(q, cats.transpose(1, 2)) / math.sqrt(q.shape[-1]) + bias
        out.append(logits.masked_fill(~valid[:, None, :], -math.inf))
    return torch.stack(out)


METHODS = {
    "ours": (select_ours, total_ours),
    "topk": (select_topk, total_topk),
    "authors": (select_authors, total_authors),
}

# ------------------------------------------------------------------ timing helpers


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_round_robin(
    fns: Dict[str, Callable[[], object]], device: torch.device, repeats: int, min_time: float
) -> Dict[str, float]:
    """Median wall time (ms) of each function. After one warm-up call each, every sample round
    runs each function in turn (so load changes on a shared machine hit all of them alike); a
    sample repeats a function enough times to last about ``min_time`` seconds."""
    inner = {}
    for name, fn in fns.items():
        fn()
        _sync(device)
        t0 = time.perf_counter()
        fn()
        _sync(device)
        inner[name] = max(1, int(min_time / max(time.perf_counter() - t0, 1e-6)))
    samples = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            _sync(device)
            t0 = time.perf_counter()
            for _ in range(inner[name]):
                fn()
            _sync(device)
            samples[name].append((time.perf_counter() - t0) / inner[name] * 1e3)
    return {name: statistics.median(v) for name, v in samples.items()}


def write_json_atomic(path: str, payload: Dict) -> None:
    atomic_write(path, lambda f: json.dump(payload, f, indent=2), mode="w")


# ------------------------------------------------------------------ main


def machine_description(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    cpu = platform.processor() or "cpu"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} cores, torch threads {torch.get_num_threads()}"


def main(argv: List[str] = None) -> Dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--quick", action="store_true", help="a small subset of the grid")
    parser.add_argument("--json", default=None, help="write the results to this JSON file")
    parser.add_argument("--batches", type=int, nargs="*", default=[2, 4, 16])
    parser.add_argument("--ks", type=int, nargs="*", default=[30, 100, 300, 1000])
    parser.add_argument("--categories", type=int, default=13204)
    parser.add_argument("--queries", type=int, default=900)
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--layers", type=int, default=7)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--min-time", type=float, default=0.05, help="seconds per sample")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    args = parser.parse_args(argv)

    device = torch.device(args.device)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is visible")
    if not _ext.use_ext("topk_category_gather", device.type):
        print("warning: the compiled op is unavailable; 'ours' times the PyTorch reference")
    if args.quick:
        args.batches, args.ks, args.repeats = [2, 16], [100, 1000], 3
        if device.type == "cpu":
            args.queries = 300
    dtype = getattr(torch, args.dtype)
    C, Q, D, N = args.categories, args.queries, args.dim, args.layers
    gen = torch.Generator().manual_seed(0)

    rows = []
    for B in args.batches:
        scores = torch.randn(B, C, generator=gen).to(device)
        emb = torch.randn(B, C, D, generator=gen).to(device, dtype)
        queries = torch.randn(N, B, Q, D, generator=gen).to(device, dtype)
        bias = torch.tensor(-4.595, device=device, dtype=dtype)
        for k in args.ks:
            valid = torch.ones(B, k, dtype=torch.bool, device=device)
            # all three must agree on the selection (random scores have no ties)
            ref = total_topk(scores, emb, k, queries, bias, valid)
            for name, (_, total) in METHODS.items():
                torch.testing.assert_close(total(scores, emb, k, queries, bias, valid), ref)
            row = {"B": B, "C": C, "K": k, "Q": Q, "D": D, "N": N}
            fns = {}
            for name, (select, total) in METHODS.items():
                fns[f"{name}_select_ms"] = lambda f=select: f(scores, emb, k)
                fns[f"{name}_total_ms"] = lambda f=total: f(scores, emb, k, queries, bias, valid)
            with torch.no_grad():
                row.update(time_round_robin(fns, device, args.repeats, args.min_time))
            rows.append(row)
            print_row(row, header=len(rows) == 1)

    result = {
        "benchmark": "topk_gather",
        "device": str(device),
        "machine": machine_description(device),
        "torch": torch.__version__,
        "dtype": args.dtype,
        "embeddings": "per-image [B, C, D]",
        "timing": f"median of {args.repeats} samples, forward only, milliseconds",
        "rows": rows,
    }
    if args.json:
        write_json_atomic(args.json, result)
    print(f"\n{result['machine']}; torch {torch.__version__}; {args.dtype}; {result['timing']}")
    return result


def print_row(row: Dict, header: bool) -> None:
    cols = [
        ("B", "{B}"),
        ("K", "{K}"),
        ("select ours", "{ours_select_ms:.3f}"),
        ("select (a) topk", "{topk_select_ms:.3f}"),
        ("select (b) authors", "{authors_select_ms:.3f}"),
        ("total ours", "{ours_total_ms:.2f}"),
        ("total (a)", "{topk_total_ms:.2f}"),
        ("total (b)", "{authors_total_ms:.2f}"),
        ("select (a)/ours", "{sa:.2f}x"),
        ("select (b)/ours", "{sb:.2f}x"),
        ("total (a)/ours", "{ta:.2f}x"),
        ("total (b)/ours", "{tb:.2f}x"),
    ]
    vals = dict(row)
    vals["sa"] = row["topk_select_ms"] / row["ours_select_ms"]
    vals["sb"] = row["authors_select_ms"] / row["ours_select_ms"]
    vals["ta"] = row["topk_total_ms"] / row["ours_total_ms"]
    vals["tb"] = row["authors_total_ms"] / row["ours_total_ms"]
    if header:
        print("| " + " | ".join(c[0] for c in cols) + " |")
        print("|" + "|".join("---:" for _ in cols) + "|")
    print("| " + " | ".join(fmt.format(**vals) for _, fmt in cols) + " |", flush=True)


if __name__ == "__main__":
    main()
