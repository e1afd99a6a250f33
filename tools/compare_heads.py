#!/usr/bin/env python
"""CQ-DINO vs DINO with the same budget on the synthetic long-tailed vocabulary.

For each vocabulary size C, a synthetic dataset is generated (``python -m cqdino.data.synthetic
--num-categories C``, same image count and seed for every C), and for each seed both detectors
are trained through ``projects/train_net.py`` with the same iterations, images, backbone,
transformer, queries and seed: ``configs/demo.py`` (CQ-DINO) and ``configs/demo_dino.py`` (the
DINO linear head over all C). Each is evaluated at the end with the V3Det-style evaluator (AP,
AP50, rare/common/frequent AP). For CQ-DINO the selector's recall of the val images'
ground-truth categories in its top-K (the paper's ARC) is measured too. The table gives the
mean and the spread (min-max) over seeds.

    python tools/compare_heads.py --categories 1000 5000 --seeds 0 1 --iters 400 \\
        --json output/compare_heads/results.json
    python tools/compare_heads.py --quick      # seconds: 40 categories, tiny images

Runs trained elsewhere (e.g. two processes each through ``train_net.py``) are summarised the
same way from a manifest, a JSON list of ``{"head": "CQ-DINO" | "DINO", "categories": C,
"seed": S, "run": "<train_net.py output folder>"}``; each run's last evaluation is read from its
``metrics.json``, its s/iteration from ``log.txt`` and its ARC from an ``arc.json`` next to them
(``{"ARC": percent}``, when there); the json's ``settings`` are the runs' own (iterations and
class count from each ``config.yaml``, training images from ``log.txt``). ``--plot`` draws AP
and APr against C for both heads (mean over seeds, every seed as a point)::

    python tools/compare_heads.py --from-runs runs.json --json summary.json --plot ap_vs_c.png
    python tools/compare_heads.py --arc <CQ-DINO run> --topk 100   # writes <run>/arc.json
"""

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # this checkout's cqdino

from cqdino.utils.io import atomic_save, atomic_write  # noqa: E402

HEADS = {"CQ-DINO": ROOT / "configs" / "demo.py", "DINO": ROOT / "configs" / "demo_dino.py"}
METRICS = ("AP", "AP50", "APr", "APc", "APf")
EXTRAS = ("AP50-agnostic", "ARC", "s_per_iter")  # summarised when the runs have them
QUICK_OVERRIDES = [
    "dataloader.train.mapper.min_sizes=[64]",
    "dataloader.train.mapper.max_size=80",
    "dataloader.test.mapper.test_size=64",
    "dataloader.test.mapper.max_size=80",
    "dataloader.train.total_batch_size=2",
    "model.transformer.num_queries=20",
    "model.transformer.encoder.num_layers=1",
    "model.transformer.decoder.num_layers=2",
    "model.dn_number=10",
]


def class_overrides(head: str, num_categories: int, topk: int) -> List[str]:
    key = "model.class_head.num_categories" if head == "CQ-DINO" else "model.class_head.num_classes"
    out = [f"{key}={num_categories}"]
    out += [f"dataloader.{s}.mapper.num_classes={num_categories}" for s in ("train", "test")]
    if head == "CQ-DINO":
        out.append(f"model.class_head.topk={topk}")
    return out


def generate(root: Path, num_categories: int, train: int, val: int, size) -> None:
    out = root / "synthetic_vocab"
    if (out / "meta.json").is_file():
        meta = json.loads((out / "meta.json").read_text())
        if meta.get("num_categories") == num_categories:
            return
        raise SystemExit(f"{out} holds another vocabulary ({meta.get('num_categories')})")
    cmd = [sys.executable, "-m", "cqdino.data.synthetic", "--out", str(out)]
    cmd += [f"--num-categories={num_categories}", f"--num-train-images={train}"]
    cmd += [f"--num-val-images={val}", "--image-size", str(size[0]), str(size[1])]
    subprocess.run(cmd, check=True, cwd=ROOT)


def train_and_eval(head: str, root: Path, out: Path, overrides: List[str], threads: int) -> Dict:
    if (out / "model_final.pth").is_file() and (out / "metrics.json").is_file():
        pass  # finished earlier: reuse (delete the folder to re-run)
    else:
        env = {**os.environ, "DETECTRON2_DATASETS": str(root), "OMP_NUM_THREADS": str(threads)}
        cmd = [sys.executable, str(ROOT / "projects" / "train_net.py"), "--config-file"]
        # --overwrite: an unfinished earlier run of this tool in its own work folder
        cmd += [str(HEADS[head]), "--overwrite", *overrides, f"train.output_dir={out}"]
        with open(out.parent / f"{out.name}.stdout.txt", "w") as log:
            proc = subprocess.run(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
        if proc.returncode != 0:
            raise SystemExit(f"{head} run failed (exit {proc.returncode}); see {log.name}")
    from cqdino.engine import read_metrics

    _, evals = read_metrics(str(out))
    last = evals[max(evals)] if evals else {}
    if not last:
        raise SystemExit(f"no evaluation in {out / 'metrics.json'}")
    return _metrics(last)


def _metrics(last: Dict) -> Dict:
    """METRICS and EXTRAS of an evaluation row of metrics.json; ``ARC``: the evaluator's
    ``ARC@K`` (CQ-DINO inferring through its top-K)."""
    out = {m: float(last[f"bbox/{m}"]) for m in METRICS + EXTRAS if f"bbox/{m}" in last}
    arc = [v for k, v in last.items() if k.startswith("bbox/ARC@")]
    if arc:
        out["ARC"] = float(arc[0])
    return out


def read_run(run: Path) -> Dict:
    """A finished ``train_net.py`` run: its last evaluation (METRICS and ``AP50-agnostic``),
    its training speed (``s_per_iter``, from log.txt) and ARC (``arc.json``), when there."""
    from cqdino.utils import quiet_imports  # noqa: F401  (before detectron2)

    # isort: split

    from cqdino.engine import read_metrics

    _, evals = read_metrics(str(run))
    if not evals:
        raise SystemExit(f"{run}: no evaluation in metrics.json (not a finished, evaluated run)")
    out = _metrics(evals[max(evals)])
    log = run / "log.txt"
    if log.is_file():
        m = re.search(
            r"Overall training speed: \d+ iterations in \S+ \(([\d.]+) s / it\)", log.read_text()
        )
        if m:
            out["s_per_iter"] = float(m.group(1))
    arc = run / "arc.json"
    if arc.is_file():  # measured after the run (--arc), e.g. at another K
        out["ARC"] = float(json.loads(arc.read_text())["ARC"])
    return out


def run_settings(run: Path) -> Dict:
    """What a run was trained with, from its own files: ``iterations`` (``train.max_iter`` of
    its config.yaml), ``categories`` (the class head's class count), ``topk`` (CQ-DINO's K)
    and ``train_images`` (the training loader's image count, from log.txt); None where the
    file does not say."""
    from omegaconf import OmegaConf

    out: Dict = {"run": str(run), "iterations": None, "categories": None, "topk": None}
    config = run / "config.yaml"
    if config.is_file():
        cfg = OmegaConf.load(config)
        out["iterations"] = OmegaConf.select(cfg, "train.max_iter", default=None)
        head = OmegaConf.select(cfg, "model.class_head", default=None) or {}
        out["categories"] = head.get("num_categories", head.get("num_classes"))
        out["topk"] = head.get("topk")
    log = run / "log.txt"
    m = re.search(r"Training loader: (\d+) images", log.read_text()) if log.is_file() else None
    out["train_images"] = int(m.group(1)) if m else None
    return out


def manifest_settings(path: Path) -> Dict:
    """The ``settings`` of a summary of the runs a manifest lists: each run's own settings
    (:func:`run_settings`) and, per setting, the distinct values over the runs."""
    runs = [run_settings(Path(e["run"])) for e in json.loads(path.read_text())]
    keys = ("iterations", "train_images", "categories", "topk")
    values = {k: sorted({r[k] for r in runs if r[k] is not None}) for k in keys}
    return dict(from_runs=str(path), **values, runs=runs)


def read_manifest(path: Path) -> List[Dict]:
    """The runs a manifest lists (see the module doc), each checked before any is read."""
    try:
        entries = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise SystemExit(f"--from-runs {path}: {e}") from None
    if not isinstance(entries, list) or not entries:
        raise SystemExit(f"--from-runs {path}: expected a non-empty JSON list of runs")
    for i, e in enumerate(entries):
        keys = {"head", "categories", "seed", "run"}
        if not isinstance(e, dict) or set(e) != keys:
            raise SystemExit(
                f"--from-runs {path}: entry {i} must have exactly the keys {sorted(keys)}"
            )
        if e["head"] not in HEADS:
            raise SystemExit(
                f"--from-runs {path}: entry {i}: head {e['head']!r} is not one of {list(HEADS)}"
            )
        if not (Path(e["run"]) / "metrics.json").is_file():
            raise SystemExit(
                f"--from-runs {path}: entry {i}: {e['run']}/metrics.json: no such file"
            )
    rows = []
    for e in entries:
        row = {"categories": int(e["categories"]), "head": e["head"], "seed": int(e["seed"])}
        row.update(read_run(Path(e["run"])), run=e["run"])
        rows.append(row)
    return rows


def plot(rows: List[Dict], summary: List[Dict], path: Path, overwrite: bool = False) -> None:
    """AP and APr against C for both heads: the mean over seeds (line) and every seed (dots)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sizes = sorted({r["categories"] for r in rows})
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, key in zip(axes, ("AP", "APr")):
        for head, colour in (("CQ-DINO", "tab:blue"), ("DINO", "tab:orange")):
            pts = [(r["categories"], r[key]) for r in rows if r["head"] == head and key in r]
            if pts:
                ax.scatter(*zip(*pts), color=colour, alpha=0.5, s=18)
            mean = [
                (s["categories"], s[key]["mean"]) for s in summary if s["head"] == head and key in s
            ]
            if mean:
                ax.plot(*zip(*mean), marker="o", color=colour, label=f"{head} (mean over seeds)")
        ax.set_xscale("log")
        ax.set_xticks(sizes)
        ax.set_xticklabels([f"{c:,}" for c in sizes])
        ax.minorticks_off()
        ax.set_xlabel("categories C")
        ax.set_ylabel(f"{key} (%)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        ax.set_title(f"{key} against the vocabulary size")
    fig.tight_layout()
    atomic_save(str(path), lambda tmp: fig.savefig(tmp, format="png", dpi=100), overwrite)
    plt.close(fig)


def measure_arc(
    root: Path, out: Path, overrides: List[str], config: Optional[Path] = None
) -> float:
    """ARC (the paper's: the share of (val image, GT category) pairs whose category is in the
    image's top-K selection) of the trained CQ-DINO in ``out`` (its ``model_final.pth``): the
    ``ARC@K`` that the config's evaluator reports on its test set (``config``: the run's
    config, default configs/demo.py; ``overrides`` applied to it). Nothing is written."""
    os.environ["DETECTRON2_DATASETS"] = str(root)
    from detectron2.config import LazyConfig, instantiate

    from cqdino.data import register_synthetic_vocab
    from cqdino.engine import inference_on_dataset, load_weights_strict, use_ema_weights

    register_synthetic_vocab(str(root))
    cfg = LazyConfig.apply_overrides(LazyConfig.load(str(config or HEADS["CQ-DINO"])), overrides)
    cfg.train.init_checkpoint = str(out / "model_final.pth")
    model = instantiate(cfg.model)
    load_weights_strict(model, cfg.train.init_checkpoint, use_ema=use_ema_weights(cfg))
    cfg.dataloader.evaluator.output_dir = None  # no predictions file
    results = inference_on_dataset(
        model, instantiate(cfg.dataloader.test), instantiate(cfg.dataloader.evaluator), False
    )
    arc = _metrics({f"bbox/{k}": v for k, v in results.get("bbox", {}).items()}).get("ARC")
    if arc is None:
        raise SystemExit(f"{out}: the evaluator reports no ARC (test_topk above topk?)")
    return arc


def run_arc(run: Path, root: Path, topk: int) -> float:
    """ARC of a finished CQ-DINO run folder (its config.yaml and model_final.pth) at top-K
    ``topk``, written to ``<run>/arc.json`` (which must not exist yet)."""
    dest = run / "arc.json"
    for need in ("config.yaml", "model_final.pth"):
        if not (run / need).is_file():
            raise SystemExit(f"--arc {run}: no {need} (not a finished train_net.py run)")
    if "CQDINO" not in (run / "config.yaml").read_text():
        raise SystemExit(f"--arc {run}: not a CQ-DINO run (ARC is the selector's recall)")
    if dest.exists():
        raise SystemExit(f"--arc {run}: {dest} exists; remove it to measure again")
    arc = measure_arc(root, run, [f"model.class_head.test_topk={topk}"], run / "config.yaml")
    text = json.dumps({"ARC": arc, "topk": topk})
    try:  # overwrite=False: not even an arc.json that appeared during the measurement
        atomic_write(str(dest), lambda f: f.write(text), mode="w", overwrite=False)
    except FileExistsError:
        raise SystemExit(f"--arc {run}: {dest} appeared meanwhile; left as it is") from None
    return arc


def summarise(rows: List[Dict]) -> List[Dict]:
    out = []
    keys = sorted({(r["categories"], r["head"]) for r in rows})
    for c, head in keys:
        runs = [r for r in rows if r["categories"] == c and r["head"] == head]
        s = {"categories": c, "head": head, "seeds": [r["seed"] for r in runs]}
        for m in METRICS + EXTRAS:
            vals = [r[m] for r in runs if m in r]
            if vals:
                s[m] = {"mean": float(np.mean(vals)), "min": min(vals), "max": max(vals)}
        out.append(s)
    return out


def table(summary: List[Dict]) -> str:
    cols = list(METRICS) + [m for m in EXTRAS if any(m in s for s in summary)]
    lines = ["| C | head | seeds | " + " | ".join(cols) + " |", "|" + "---|" * (len(cols) + 3)]
    for s in summary:
        cells = []
        for m in cols:
            v = s.get(m)
            cells.append("" if v is None else f"{v['mean']:.2f} ({v['min']:.2f}-{v['max']:.2f})")
        lines.append(
            f"| {s['categories']} | {s['head']} | {len(s['seeds'])} | " + " | ".join(cells) + " |"
        )
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    ap.add_argument("--categories", type=int, nargs="+", default=[1000, 5000])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--iters", type=int, default=400, help="training iterations per run")
    ap.add_argument("--topk", type=int, default=100, help="CQ-DINO's K")
    ap.add_argument("--train-images", type=int, default=2000)
    ap.add_argument("--val-images", type=int, default=500)
    ap.add_argument("--threads", type=int, default=2, help="intra-op threads per run")
    ap.add_argument("--work-dir", type=Path, default=ROOT / "output" / "compare_heads")
    ap.add_argument("--json", type=Path, help="write the results here")
    ap.add_argument("--quick", action="store_true", help="40 categories, tiny data, 2 iterations")
    ap.add_argument("--from-runs", type=Path, help="summarise the runs this manifest lists")
    ap.add_argument("--plot", type=Path, help="write AP and APr against C here (PNG)")
    ap.add_argument(
        "--arc",
        type=Path,
        metavar="RUN",
        help="measure ARC of this finished CQ-DINO run at --topk on $DETECTRON2_DATASETS "
        "(or --data-root) and write RUN/arc.json",
    )
    ap.add_argument("--data-root", type=Path, help="with --arc; default: $DETECTRON2_DATASETS")
    ap.add_argument("--overwrite", action="store_true", help="replace an existing --json/--plot")
    args = ap.parse_args(argv)
    for flag, path in (("--json", args.json), ("--plot", args.plot)):
        if path and path.exists() and not args.overwrite:  # before any slow work
            raise SystemExit(f"{flag} {path} exists: add --overwrite to replace it")
    if args.arc:
        root = args.data_root or Path(os.environ.get("DETECTRON2_DATASETS", "datasets"))
        print(f"{args.arc} ARC (top-{args.topk}) {run_arc(args.arc, root, args.topk):.2f} %")
        return 0
    size, extra = (256, 320), []
    if args.quick:
        args.categories, args.iters, args.topk = [40], 2, 10
        args.train_images, args.val_images, size, extra = 8, 4, (64, 80), QUICK_OVERRIDES
    t0 = time.perf_counter()
    rows = read_manifest(args.from_runs) if args.from_runs else []
    for c in [] if args.from_runs else args.categories:
        root = args.work_dir / f"data_c{c}"
        generate(root, c, args.train_images, args.val_images, size)
        for seed in args.seeds:
            for head in HEADS:
                over = extra + class_overrides(head, c, args.topk)
                over += [
                    f"train.seed={seed}",
                    f"train.max_iter={args.iters}",
                    "train.eval_period=0",
                ]
                over += [f"train.checkpointer.period={args.iters}", "train.device=cpu"]
                out = args.work_dir / f"c{c}_{head.lower()}_s{seed}"
                t = time.perf_counter()
                row = {"categories": c, "head": head, "seed": seed}
                row.update(train_and_eval(head, root, out, over, args.threads))
                row["seconds"] = time.perf_counter() - t
                rows.append(row)
                print(json.dumps(row), flush=True)
    summary = summarise(rows)
    print(table(summary))
    if args.from_runs:  # the runs' own settings, not this command's defaults
        settings = manifest_settings(args.from_runs)
    else:
        settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    result = {
        "settings": settings,
        "runs": rows,
        "summary": summary,
        "seconds": time.perf_counter() - t0,
    }
    if args.json:
        text = json.dumps(result, indent=1)
        atomic_write(str(args.json), lambda f: f.write(text), mode="w", overwrite=args.overwrite)
    if args.plot:
        plot(rows, summary, args.plot, args.overwrite)
    return 0


if __name__ == "__main__":
    sys.exit(main())
