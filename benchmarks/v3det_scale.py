"""V3Det-scale data loading and evaluation: time and peak memory.

    python benchmarks/v3det_scale.py                 # full scale (several minutes, ~3 GB)
    python benchmarks/v3det_scale.py --scale 0.05    # quick run

1. Annotation loading: a generated V3Det-sized train json (180k images, 1.3M boxes, 13,204
   categories) loaded by ``cqdino.data.load_detection_json`` and, as the baseline in the same run,
   by detectron2's ``load_coco_json`` (pycocotools index).
2. Evaluation: a generated V3Det-val-sized case (30k images x 300 detections = 9M detections,
   13,204 long-tailed categories) through ``cqdino.evaluation.evaluate_boxes`` with and without
   the hierarchy rule, in-process and with worker processes; baseline: one dense faster-coco-eval
   COCOeval on a subset (the dense form does not fit at full scale: 13,204 x 30k pairs).

Each measurement runs in a fresh subprocess of a small parent; peak RSS is that process's
``ru_maxrss`` (``peak_rss_worker_mb``: its largest child's), ``rss_before_mb`` its RSS after
imports and input generation. Prints a table and writes JSON (``--out``).
"""

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repo root

from cqdino.utils.io import atomic_write  # noqa: E402

NUM_CATEGORIES = 13204


def _rss_now_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return round(int(line.split()[1]) / 1024, 1)
    return float("nan")


def _reset_peak() -> bool:
    """Reset this process's RSS high-water mark (Linux ``clear_refs``), so the peak measured
    afterwards belongs to the work that follows, not to input generation."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _hwm_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return round(int(line.split()[1]) / 1024, 1)
    return float("nan")


def _peak_mb() -> dict:
    me = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    kids = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    return {"peak_rss_mb": round(me, 1), "peak_rss_worker_mb": round(kids, 1)}


def _long_tail(rng, n, size):
    p = 1.0 / np.arange(1, n + 1) ** 1.05
    p = p[rng.permutation(n)]
    return rng.choice(n, size=size, p=p / p.sum()) + 1


# ---------------------------------------------------------------------------- generation
def make_train_json(path: str, num_images: int, num_boxes: int, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    w = rng.integers(300, 1400, num_images)
    h = rng.integers(300, 1400, num_images)
    img_of_box = np.sort(rng.integers(0, num_images, num_boxes))
    cats = _long_tail(rng, NUM_CATEGORIES, num_boxes)
    bw = rng.uniform(0.05, 0.6, num_boxes) * w[img_of_box]
    bh = rng.uniform(0.05, 0.6, num_boxes) * h[img_of_box]
    x = rng.uniform(0, 1, num_boxes) * (w[img_of_box] - bw)
    y = rng.uniform(0, 1, num_boxes) * (h[img_of_box] - bh)
    images = [
        {
            "id": i + 1,
            "file_name": f"Q{i % 13204:05d}/{i:08d}.jpg",
            "width": int(a),
            "height": int(b),
        }
        for i, (a, b) in enumerate(zip(w.tolist(), h.tolist()))
    ]
    anns = [
        {
            "id": j + 1,
            "image_id": int(i) + 1,
            "category_id": int(c),
            "bbox": [round(a, 2), round(b, 2), round(c2, 2), round(d, 2)],
            "area": round(c2 * d, 2),
            "iscrowd": 0,
        }
        for j, (i, c, a, b, c2, d) in enumerate(
            zip(
                img_of_box.tolist(), cats.tolist(), x.tolist(), y.tolist(), bw.tolist(), bh.tolist()
            )
        )
    ]
    categories = [{"id": k, "name": f"category {k}", "novel": False} for k in range(1, 13205)]
    with open(path, "w") as f:
        json.dump({"images": images, "annotations": anns, "categories": categories}, f)


def make_eval_case(num_images: int, dets_per_image: int, gt_per_image: float, seed: int = 0):
    """GT and detections as column arrays (see cqdino.evaluation.v3det_evaluation)."""
    from cqdino.evaluation.v3det_evaluation import dt_arrays, gt_arrays

    rng = np.random.default_rng(seed)
    # Category tree: a random forest over categories (each has a category parent w.p. 0.6).
    parent = np.full(NUM_CATEGORIES + 1, -1)
    for k in range(2, NUM_CATEGORIES + 1):
        if rng.random() < 0.6:
            parent[k] = rng.integers(1, k)
    ancestors, children = {}, {}
    for k in range(1, NUM_CATEGORIES + 1):
        chain, q = [], parent[k]
        while q > 0:
            chain.append(int(q))
            q = parent[q]
        if chain:
            ancestors[k] = chain
            children.setdefault(int(parent[k]), []).append(k)

    n_gt = int(num_images * gt_per_image)
    g_img = np.sort(rng.integers(1, num_images + 1, n_gt))
    g_cat = _long_tail(rng, NUM_CATEGORIES, n_gt)
    g_box = np.c_[rng.uniform(0, 600, (n_gt, 2)), rng.uniform(8, 300, (n_gt, 2))]
    gt = gt_arrays(g_img, g_cat, g_box)
    # Detections: 4 jittered copies of each GT (class kept 70%, a child class of it 15% where
    # it has one, else random), the rest random boxes of random classes.
    n_tp = 4 * n_gt
    src = np.repeat(np.arange(n_gt), 4)
    jit = rng.normal(0, 0.08, (n_tp, 4)) * np.c_[g_box[src, 2:], g_box[src, 2:]]
    d_box_tp = g_box[src] + jit
    d_box_tp[:, 2:] = np.maximum(d_box_tp[:, 2:], 2)
    u = rng.random(n_tp)
    d_cat_tp = np.where(u < 0.7, g_cat[src], _long_tail(rng, NUM_CATEGORIES, n_tp))
    for j in np.flatnonzero((u >= 0.7) & (u < 0.85)):
        kids = children.get(int(g_cat[src[j]]))
        if kids:
            d_cat_tp[j] = kids[rng.integers(len(kids))]
    n_fp = num_images * dets_per_image - n_tp
    d_img_fp = np.repeat(np.arange(1, num_images + 1), dets_per_image)[:n_fp]
    d_img = np.r_[g_img[src], d_img_fp]
    d_cat = np.r_[d_cat_tp, _long_tail(rng, NUM_CATEGORIES, n_fp)]
    d_box = np.r_[d_box_tp, np.c_[rng.uniform(0, 600, (n_fp, 2)), rng.uniform(8, 300, (n_fp, 2))]]
    score = np.r_[rng.uniform(0.2, 1.0, n_tp), rng.uniform(0, 0.6, n_fp)]
    dt = dt_arrays(d_img, d_cat, d_box, score)
    return gt, dt, ancestors


# ---------------------------------------------------------------------------- stages
def stage_load(json_file: str, which: str) -> dict:
    from detectron2.data.datasets import load_coco_json

    from cqdino.data import load_detection_json

    base = _rss_now_mb()
    _reset_peak()
    t0 = time.perf_counter()
    if which == "cqdino":
        dicts = load_detection_json(json_file, "/images")
    else:
        dicts = load_coco_json(json_file, "/images")
    dt = time.perf_counter() - t0
    n_boxes = sum(len(d["annotations"]) for d in dicts)
    return {
        "seconds": round(dt, 2),
        "images": len(dicts),
        "boxes": n_boxes,
        "rss_before_mb": base,
        "rss_after_mb": _rss_now_mb(),
        "peak_rss_during_load_mb": _hwm_mb(),
        **_peak_mb(),
    }


def stage_eval(num_images: int, tree: bool, workers: int, dense: bool) -> dict:
    from cqdino.evaluation import evaluate_boxes

    gt, dt, ancestors = make_eval_case(num_images, 300, 7.0)
    base = _rss_now_mb()
    reset = _reset_peak()
    t0 = time.perf_counter()
    if dense:
        stats = _dense_faster_coco_eval(gt, dt)
    else:
        res = evaluate_boxes(
            gt,
            dt,
            range(1, NUM_CATEGORIES + 1),
            ancestors=ancestors if tree else None,
            num_workers=workers,
        )
        stats = res["stats"]
    sec = time.perf_counter() - t0
    return {
        "seconds": round(sec, 2),
        "images": num_images,
        "detections": len(dt),
        "gt": len(gt),
        "AP": round(100 * stats["AP"], 3),
        "rss_before_mb": base,
        "peak_rss_during_eval_mb": _hwm_mb() if reset else None,
        **_peak_mb(),
    }


def _dense_faster_coco_eval(gt, dt) -> dict:
    from faster_coco_eval import COCO
    from faster_coco_eval.core.faster_eval_api import COCOeval_faster

    imgs = [{"id": int(i), "height": 1, "width": 1} for i in np.unique(gt["image_id"])]
    cats = [{"id": k} for k in range(1, NUM_CATEGORIES + 1)]
    g = COCO()
    g.dataset = {
        "images": imgs,
        "categories": cats,
        "annotations": [
            {
                "id": j + 1,
                "image_id": int(gt["image_id"][j]),
                "category_id": int(gt["category_id"][j]),
                "bbox": gt["bbox"][j].tolist(),
                "area": float(gt["area"][j]),
                "iscrowd": 0,
            }
            for j in range(len(gt))
        ],
    }
    g.createIndex()
    d = g.loadRes(
        [
            {
                "image_id": int(dt["image_id"][j]),
                "category_id": int(dt["category_id"][j]),
                "bbox": dt["bbox"][j].tolist(),
                "score": float(dt["score"][j]),
            }
            for j in range(len(dt))
        ]
    )
    ev = COCOeval_faster(g, d, "bbox", print_function=lambda *a: None)
    ev.params.maxDets = [1, 10, 300]
    ev.evaluate()
    ev.accumulate()
    ev.summarize()
    return {"AP": float(ev.stats[0])}


def _run(args: list) -> dict:
    out = subprocess.run(
        [sys.executable, __file__, "--stage", *map(str, args)],
        capture_output=True,
        text=True,
        check=False,
    )
    if out.returncode != 0:
        raise RuntimeError(f"stage {args} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--scale", type=float, default=1.0, help="fraction of the V3Det sizes")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--dense-images", type=int, default=100, help="images in the dense baseline")
    p.add_argument("--out", default="output/benchmarks/v3det_scale.json")
    p.add_argument("--stage", nargs="+", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.stage:
        kind, *rest = a.stage
        if kind == "gen":
            t0 = time.perf_counter()
            make_train_json(rest[0], int(rest[1]), int(rest[2]))
            res = {"seconds": round(time.perf_counter() - t0, 1)}
        elif kind == "load":
            res = stage_load(rest[0], rest[1])
        else:
            res = stage_eval(int(rest[0]), rest[1] == "1", int(rest[2]), rest[3] == "1")
        print(json.dumps(res))
        return

    n_img, n_box, n_val = int(180_000 * a.scale), int(1_300_000 * a.scale), int(30_000 * a.scale)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        jf = os.path.join(tmp, "v3det_like_train.json")
        # Generated in a subprocess too: Linux children inherit the parent's RSS high-water
        # mark through fork, so the parent must stay small for ru_maxrss to mean anything.
        gen_s = _run(["gen", jf, n_img, n_box])["seconds"]
        size_mb = os.path.getsize(jf) / 2**20
        print(f"generated {jf}: {n_img} images, {n_box} boxes, {size_mb:.0f} MB in {gen_s:.0f} s")
        for which in ("cqdino", "detectron2"):
            r = _run(["load", jf, which])
            rows.append({"task": f"load train json ({which})", **r})
            print(rows[-1], flush=True)
    cases = [
        ("eval dense faster-coco-eval (baseline)", a.dense_images, 0, 0, 1),
        ("eval cqdino same subset", a.dense_images, 0, 0, 0),
        ("eval cqdino no tree, in-process", n_val, 0, 0, 0),
        ("eval cqdino tree, in-process", n_val, 1, 0, 0),
        (f"eval cqdino tree, {a.workers} workers", n_val, 1, a.workers, 0),
    ]
    for name, n, tree, workers, dense in cases:
        r = _run(["eval", n, tree, workers, dense])
        rows.append({"task": name, **r})
        print(rows[-1], flush=True)

    from tabulate import tabulate

    cols = ["task", "seconds", "rss_before_mb", "peak_during_mb", "peak_rss_worker_mb", "images"]
    cols += ["AP"]
    for r in rows:
        r["peak_during_mb"] = r.get("peak_rss_during_eval_mb") or r.get("peak_rss_during_load_mb")
    print(tabulate([[r.get(c, "") for c in cols] for r in rows], headers=cols, tablefmt="pipe"))
    info = {
        "machine": f"{platform.node()} {platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} CPUs (shared)",
        "python": sys.version.split()[0],
        "scale": a.scale,
        "train_json": {"images": n_img, "boxes": n_box, "categories": NUM_CATEGORIES},
        "eval": {"images": n_val, "dets_per_image": 300, "gt_per_image": 7},
        "rows": rows,
    }
    atomic_write(a.out, lambda f: json.dump(info, f, indent=1), mode="w")
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
