#!/usr/bin/env python
"""``make demo``: the main job on the embedded default, end to end.

1. generates the synthetic vast vocabulary (1,000 long-tailed categories with their tree) under
   ``$DETECTRON2_DATASETS/synthetic_vocab`` if it is absent;
2. trains CQ-DINO with ``configs/demo.py`` through ``projects/train_net.py`` (on the visible
   GPUs, else as two CPU processes over gloo; ``--num-gpus N`` and trailing ``key=value``
   overrides are passed through);
3. prints the V3Det-style AP table of the final evaluation on ``synthetic_vocab_val``;
4. writes ``curves.png`` (losses and AP against iterations) and a few val images with their
   detections drawn (``vis/``), and prints where everything is.

    python tools/run_demo.py [--num-gpus N] [--skip-train] [key=value ...]
"""

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "demo.py"
TABLE_KEYS = ("AP", "AP50", "AP75", "APr", "APc", "APf")


def _datasets_root() -> Path:
    return Path(os.environ.get("DETECTRON2_DATASETS", "datasets")).expanduser()


def generate_data() -> float:
    out = _datasets_root() / "synthetic_vocab"
    if (out / "meta.json").is_file():
        print(f"[demo] data: {out} (exists)")
        return 0.0
    t0 = time.perf_counter()
    print(f"[demo] generating the synthetic vocabulary into {out} ...", flush=True)
    subprocess.run([sys.executable, "-m", "cqdino.data.synthetic", "--out", str(out)], check=True)
    return time.perf_counter() - t0


def ap_table(rec: dict) -> str:
    """The headline APs of an evaluation record of metrics.json."""
    from cqdino.engine import format_results

    keys = [k for k in TABLE_KEYS if f"bbox/{k}" in rec]
    return format_results({"bbox": {k: rec[f"bbox/{k}"] for k in keys}}, keys=keys)


def plot_curves(train: dict, evals: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    its = sorted(train)
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    for key in ("total_loss", "loss_class", "loss_bbox", "loss_giou", "loss_select"):
        if its and key in train[its[0]]:
            ax1.plot(its, [train[i][key] for i in its], label=key, lw=1)
    ax1.set_yscale("log")
    ax1.set_xlabel("iteration")
    ax1.set_title("training losses (per iteration)")
    ax1.legend(fontsize=8)
    ev = sorted(evals)
    for key in TABLE_KEYS:
        if ev and f"bbox/{key}" in evals[ev[0]]:
            ax2.plot(ev, [evals[i][f"bbox/{key}"] for i in ev], marker="o", label=key)
    ax2.set_xlabel("iteration")
    ax2.set_title("synthetic_vocab_val AP (%)")
    ax2.legend(fontsize=8)
    ax2.grid(alpha=0.3)
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=110)
    os.replace(tmp, path)
    plt.close(fig)


def draw_examples(output_dir: Path, overrides, count: int = 6) -> Path:
    sys.path.insert(0, str(ROOT / "projects"))
    import demo as inference_tool  # projects/demo.py

    val = _datasets_root() / "synthetic_vocab" / "images" / "val"
    images = sorted(val.glob("*.jpg"))[:count]
    vis = output_dir / "vis"
    inference_tool.main(
        [
            "--config-file",
            str(CONFIG),
            "--input",
            *map(str, images),
            "--output",
            str(vis),
            "--confidence",
            "0.3",
            *overrides,
            f"train.init_checkpoint={output_dir / 'model_final.pth'}",
        ]
    )
    return vis


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--num-gpus",
        type=int,
        default=None,
        help="processes: the visible GPUs, or without CUDA min(2, CPU cores) CPU processes",
    )
    ap.add_argument("--skip-train", action="store_true", help="report on an existing run")
    ap.add_argument(
        "--overwrite",
        action="store_true",
        help="replace a previous run in a train.output_dir given as an override (the default "
        "output/demo is always replaced)",
    )
    ap.add_argument("opts", nargs=argparse.REMAINDER, help="config overrides key=value")
    args = ap.parse_args(argv)
    if args.num_gpus is None:
        import torch

        n = torch.cuda.device_count()
        args.num_gpus = n if n > 0 else min(2, os.cpu_count() or 1)
    default_output = output_dir = ROOT / "output" / "demo"
    overrides = list(args.opts)
    for o in overrides:
        if o.startswith("train.output_dir="):
            output_dir = Path(o.split("=", 1)[1]).resolve()
    overrides = [o for o in overrides if not o.startswith("train.output_dir=")]
    overrides.append(f"train.output_dir={output_dir}")

    t0 = time.perf_counter()
    gen_time = generate_data()
    if not args.skip_train:
        cmd = [sys.executable, str(ROOT / "projects" / "train_net.py"), "--config-file"]
        cmd += [str(CONFIG), "--num-gpus", str(args.num_gpus)]
        if output_dir == default_output or args.overwrite:
            cmd.append("--overwrite")  # the demo's own folder: a new `make demo` replaces it
        cmd += overrides
        print("[demo] " + " ".join(cmd), flush=True)
        proc = subprocess.run(cmd, cwd=ROOT)
        if proc.returncode != 0:
            print(f"[demo] training failed (exit {proc.returncode}); log: {output_dir / 'log.txt'}")
            return proc.returncode
    train_time = time.perf_counter() - t0 - gen_time

    from cqdino.engine import read_metrics

    train, evals = read_metrics(str(output_dir))
    if not evals:
        print(f"[demo] no evaluation found in {output_dir / 'metrics.json'}")
        return 1
    last = evals[max(evals)]
    curves = output_dir / "curves.png"
    plot_curves(train, evals, curves)
    vis = draw_examples(output_dir, overrides)
    total = time.perf_counter() - t0
    print()
    print(
        "[demo] synthetic_vocab_val, V3Det-style AP (%) at 300 detections/image after "
        f"{max(train) + 1 if train else '?'} training iterations:"
    )
    print(ap_table(last))
    print()
    print(
        f"[demo] wall time: {total / 60:.1f} min (data {gen_time:.0f} s, training + "
        f"evaluation {train_time:.0f} s)"
    )
    print(f"[demo] log:          {output_dir / 'log.txt'}")
    print(f"[demo] metrics:      {output_dir / 'metrics.json'}")
    print(f"[demo] curves:       {curves}")
    print(f"[demo] detections:   {vis}/ (drawn images, detections.json)")
    print(f"[demo] checkpoint:   {output_dir / 'model_final.pth'}")
    print(
        f"[demo] inference:    python projects/demo.py --config-file configs/demo.py "
        f"--input <images> --output out/ train.init_checkpoint={output_dir / 'model_final.pth'}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
