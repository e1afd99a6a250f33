"""One demo training step on the CPU: seconds per iteration and where they go.

Builds a config (``configs/demo.py`` by default, any ``key=value`` overrides), its model,
optimizer and train loader exactly as ``projects/train_net.py`` does, and times forward +
backward + clip + AdamW step + data loading over ``--iters`` iterations after ``--warmup``.
Variants given as ``--variant NAME:key=value,key=value`` run side by side in the same process,
interleaved iteration by iteration so that load from other processes hits them alike.
``--profile`` prints the ``torch.profiler`` table of one variant's steps (top operators by
self CPU time) and the share of each model stage.

    python benchmarks/demo_step.py --threads 1 --iters 20
    python benchmarks/demo_step.py --variant before: --variant after:model.foo=1 --json out.json
    python benchmarks/demo_step.py --profile --iters 5
"""

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.common import format_table, machine_info, write_json  # noqa: E402


def build(config: str, overrides):
    """(model, optimizer, data iterator, clip norm) of a config, as train_net builds them."""
    from detectron2.config import LazyConfig, instantiate

    cfg = LazyConfig.load(config)
    cfg = LazyConfig.apply_overrides(cfg, list(overrides))
    torch.manual_seed(0)
    model = instantiate(cfg.model)
    model.train()
    cfg.optimizer.params.model = model
    optimizer = instantiate(cfg.optimizer)
    loader = instantiate(cfg.dataloader.train)
    clip = cfg.train.clip_grad.max_norm if cfg.train.clip_grad.enabled else None
    return model, optimizer, iter(loader), clip


def step(model, optimizer, data, clip) -> float:
    """One iteration; returns its wall seconds (data loading included)."""
    t0 = time.perf_counter()
    batch = next(data)
    losses = model(batch)
    total = sum(losses.values())
    optimizer.zero_grad(set_to_none=True)
    total.backward()
    if clip:
        torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
    optimizer.step()
    return time.perf_counter() - t0


def parse_variant(text: str):
    name, _, rest = text.partition(":")
    return name or "default", [o for o in rest.split(",") if o]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config-file", default=str(ROOT / "configs" / "demo.py"))
    ap.add_argument("--variant", action="append", default=[], help="NAME:key=value,...")
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--profile", action="store_true", help="torch.profiler table (1st variant)")
    ap.add_argument("--json", default=None, help="write the results here")
    ap.add_argument("opts", nargs=argparse.REMAINDER, help="overrides for every variant")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    variants = [parse_variant(v) for v in args.variant] or [("default", [])]
    built = {name: build(args.config_file, args.opts + extra) for name, extra in variants}
    for name, b in built.items():
        for _ in range(args.warmup):
            step(*b)
    if args.profile:
        from torch.profiler import ProfilerActivity, profile

        name, b = next(iter(built.items()))
        with profile(activities=[ProfilerActivity.CPU], record_shapes=False) as prof:
            for _ in range(args.iters):
                step(*b)
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=40))
        return 0
    times = {name: [] for name in built}
    for _ in range(args.iters):
        for name, b in built.items():
            times[name].append(step(*b))
    base = statistics.median(times[variants[0][0]])
    rows = []
    for name, extra in variants:
        med = statistics.median(times[name])
        rows.append(
            {
                "variant": name,
                "overrides": " ".join(extra) or "-",
                "s/iter": round(med, 3),
                "speed-up": round(base / med, 2),
            }
        )
    print(format_table(rows, ["variant", "overrides", "s/iter", "speed-up"]))
    if args.json:
        write_json(
            args.json,
            {
                "machine": machine_info("cpu"),
                "config": args.config_file,
                "overrides": args.opts,
                "iters": args.iters,
                "variants": {
                    name: {"overrides": extra, "seconds": times[name]} for name, extra in variants
                },
            },
        )
    return 0


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    sys.exit(main())
