"""Timing of the CQ-DINO category modules on the CPU.

Measures, in one run and on one machine:
- TreeAggregation forward+backward at V3Det scale: sparse-operator path vs level-wise path;
- CategorySelector forward (no grad) for a few chunk sizes.

The hierarchy is synthetic: a random multi-parent DAG (every new node gets one or two parents
among the earlier ones, seeded; depth grows like log C, as in WordNet-derived trees).
Prints a table and writes JSON::

    python benchmarks/bench_category_modules.py --out output/bench_category_modules.json
"""

import argparse
import json
import platform
import random
import time
from typing import Callable, Dict, List

import torch

from cqdino.modeling import CategorySelector, TreeAggregation
from cqdino.utils.io import atomic_write


def random_dag(num_categories: int, seed: int = 0) -> List[List[int]]:
    """Random DAG: node i > 0 gets one parent (two with probability 1/4) among nodes < i."""
    rng = random.Random(seed)
    children: List[List[int]] = [[] for _ in range(num_categories)]
    for i in range(1, num_categories):
        for p in set(rng.sample(range(i), min(i, rng.choice((1, 1, 1, 2))))):
            children[p].append(i)
    return children


def timeit(fn: Callable[[], None], repeat: int) -> float:
    fn()  # warm-up
    best = float("inf")
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--categories", type=int, default=13204)
    ap.add_argument("--dim", type=int, default=768)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--out", default="output/bench_category_modules.json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    C, D = args.categories, args.dim
    rows: List[Dict] = []

    children = random_dag(C)
    x = torch.randn(C, D, requires_grad=True)
    for name, max_nnz in (("operator", 4_000_000), ("level-wise", 0)):
        t0 = time.perf_counter()
        agg = TreeAggregation(children, max_operator_nnz=max_nnz)
        build = time.perf_counter() - t0

        def step():
            x.grad = None
            agg(x).sum().backward()

        rows.append(
            dict(
                module="TreeAggregation",
                variant=f"{name} ({agg.extra_repr().split(', ')[-1]})",
                shape=f"[{C}, {D}] fp32 fwd+bwd",
                seconds=timeit(step, args.repeat),
                build_seconds=build,
            )
        )

    queries = torch.randn(C, D)
    feats = torch.randn(1, 256, 10, 10)
    sel = CategorySelector(256, query_dim=D, memory_dim=512, ffn_dim=3072).eval()
    for chunk in (512, 2048, C):
        sel.chunk_size = chunk

        def fwd():
            with torch.no_grad():
                sel(queries, feats)

        rows.append(
            dict(
                module="CategorySelector",
                variant=f"chunk {chunk}",
                shape=f"C={C}, B=1, 101 tokens, widths {D}/512/3072, fp32 no-grad",
                seconds=timeit(fwd, args.repeat),
            )
        )

    machine = f"{platform.processor() or platform.machine()}, {args.threads} thread(s)"
    print(f"machine: {machine}, torch {torch.__version__}")
    print(f"{'module':<18} {'variant':<26} {'shape':<58} {'seconds':>8}")
    for r in rows:
        print(f"{r['module']:<18} {r['variant']:<26} {r['shape']:<58} {r['seconds']:>8.3f}")
    payload = dict(machine=machine, torch=torch.__version__, rows=rows)
    atomic_write(args.out, lambda fh: json.dump(payload, fh, indent=1), mode="w")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
