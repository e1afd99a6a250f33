#!/usr/bin/env python
"""Inference time per image against the vocabulary size C: CQ-DINO through its top-K (the
paper's inference), CQ-DINO with every category a column (``test_topk = C``) and DINO's linear
head over all C classes, at the demo's model size.

    python benchmarks/inference_vs_c.py --categories 1000 5000 13204 --threads 1 \\
        --json inference_vs_c.json

For each C a small synthetic vocabulary of C categories (names, tree; a few images) is generated
under ``--work-dir`` (kept for the next run) and registered as ``synthetic_vocab``, so that
``configs/demo.py`` (CQ-DINO, K = 100) and ``configs/demo_dino.py`` build at that C exactly as
they train (compositional queries from the names, the tree, the word head). Weights are the
untrained initialisation: the work of a forward does not depend on them, except the number of
detections kept, which the postprocessing caps. Each model gets the same ``--images`` random
images of the demo's test size (256 x 320) at batch 1; the three variants are timed round-robin
(one image each per round, ``--repeats`` rounds after one warm-up round) so load from other
processes hits all of them alike; the figure is the median CPU time of the process per image
(with one thread, what a forward costs even when other jobs share the cores).
"""

import argparse
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Dict, List

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.common import format_table, machine_info, write_outputs  # noqa: E402

VARIANTS = {  # name -> (config, extra overrides)
    "CQ-DINO top-K": ("configs/demo.py", []),
    "CQ-DINO all C": ("configs/demo.py", ["model.class_head.test_topk={C}"]),
    "DINO": ("configs/demo_dino.py", []),
}


def build(config: str, num_categories: int, extra: List[str]):
    from detectron2.config import LazyConfig, instantiate

    cfg = LazyConfig.load(str(ROOT / config))
    # the class count of either head: CQ-DINO's num_categories, the linear head's num_classes
    head = "num_categories" if "num_categories" in cfg.model.class_head else "num_classes"
    over = [f"model.class_head.{head}={num_categories}"]
    cfg = LazyConfig.apply_overrides(cfg, over + [o.format(C=num_categories) for o in extra])
    torch.manual_seed(0)
    return instantiate(cfg.model).eval()


def measure(num_categories: int, work_dir: Path, images: int, repeats: int) -> Dict[str, float]:
    from cqdino.data import register_synthetic_vocab
    from cqdino.data.synthetic import ensure_generated

    root = work_dir / f"c{num_categories}"
    sizes = dict(num_train_images=40, num_val_images=8)
    ensure_generated(str(root / "synthetic_vocab"), num_categories=num_categories, **sizes)
    os.environ["DETECTRON2_DATASETS"] = str(root)
    register_synthetic_vocab(str(root))
    models = {name: build(cfg, num_categories, extra) for name, (cfg, extra) in VARIANTS.items()}
    gen = torch.Generator().manual_seed(0)
    inputs = [torch.rand(3, 256, 320, generator=gen) * 255 for _ in range(images)]
    times: Dict[str, List[float]] = {name: [] for name in models}
    with torch.no_grad():
        for r in range(repeats + 1):
            for name, model in models.items():
                for im in inputs:
                    t0 = time.process_time()
                    model([{"image": im}])
                    if r:  # round 0 warms up
                        times[name].append(time.process_time() - t0)
    return {name: statistics.median(t) for name, t in times.items()}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--categories", type=int, nargs="+", default=[1000, 13204])
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1: CPU time)")
    ap.add_argument("--images", type=int, default=2, help="images per round")
    ap.add_argument("--repeats", type=int, default=5, help="timed rounds")
    ap.add_argument("--work-dir", type=Path, default=ROOT / "output" / "inference_vs_c")
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args(argv)
    if args.threads != 1:
        raise SystemExit("--threads: CPU time per image is read with one thread only")
    torch.set_num_threads(1)
    rows = []
    for c in args.categories:
        t = measure(c, args.work_dir, args.images, args.repeats)
        for name, s in t.items():
            rows.append({"C": c, "model": name, "ms_per_image": 1e3 * s, "vs_DINO": s / t["DINO"]})
        print(f"C = {c}: " + ", ".join(f"{n} {1e3 * s:.1f} ms" for n, s in t.items()), flush=True)
    print(format_table(rows, ["C", "model", "ms_per_image", "vs_DINO"]))
    record = {
        "info": machine_info("cpu"),
        "settings": vars(args) | {"work_dir": str(args.work_dir)},
    }
    record["rows"] = rows
    write_outputs(args.json, record)
    return 0


if __name__ == "__main__":
    sys.exit(main())
