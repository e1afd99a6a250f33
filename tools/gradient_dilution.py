#!/usr/bin/env python
"""Gradient dilution: the classification loss's positive-to-negative gradient ratio per
category, DINO's linear head against CQ-DINO's contrastive head, at several vocabulary sizes.

    python tools/gradient_dilution.py [--classes 100 1000 5000] [--quick] [--json J] [--plot P]

For every category c, over all training iterations::

    pos_c = sum of |dL/dlogit| over the logit entries whose target is 1 for c
    neg_c = sum of |dL/dlogit| over the entries of c's column(s) whose target is 0
    ratio_c = pos_c / neg_c

where L is the detection classification loss (sigmoid focal loss over the logit columns:
DINO's C classes, CQ-DINO's K selected categories, each column mapped back to its category).
The table gives, per frequency group of the training set (the V3Det evaluator's groups, rare: <= 10
training images, common: 11-100, frequent: > 100; categories without training images have no
positives and are left out, so rare is 1-10 here), the mean and median of ratio_c over the group's
categories, and the pooled ratio (sum of pos_c over sum of neg_c). A CQ-DINO category that never got
a column has no negatives and no defined ratio (``defined`` counts the others); one that got columns
only in images where it was not a target has ratio 0. The ``early_*`` columns repeat the statistic
over the first 10% of the iterations only (before the heads' biases have settled). For CQ-DINO the
same statistic of its selection loss (ASL on the selector's [B, C] scores against the image-level
labels) is given separately: it is the loss through which every category still sees every image.

Setup (kept small so that it runs on a CPU in minutes; the heads and losses are the project's):

* data: the synthetic long-tailed vocabulary (``cqdino.data.synthetic.generate``, the same
  seed and number of training images at every C, Zipf category frequencies), generated under
  ``$DETECTRON2_DATASETS`` (``--data-root``) unless already there;
* features, computed once per image and frozen: per pixel a soft assignment to the generator's
  16 colours and their dark texture shades plus grey-level gradients (34 channels), average
  pooled to stride 4 and 32; the stride-32 map stands in for the last backbone stage (read by
  CQ-DINO's selector, ``in_feature="res5"``); each image has ``--queries`` fixed query boxes
  (two jittered copies of every GT box, the rest random), described by ``roi_align`` of the
  stride-4 map (4 x 4) and the box geometry;
* model: the same trainable 2-layer MLP turns a query's RoI feature into a 256-d query feature
  for both (a stand-in for the decoder: no attention, one layer, no DN queries, no encoder
  proposals), then DINO's ``LinearClassHead(C)`` or CQ-DINO's ``build_contrastive_class_head``
  (category queries with tree aggregation over the dataset's category tree, a narrow selector
  (``--selector-dim``, 4 heads, 1 layer), top-K = ``--topk``, ASL selection loss with ancestor
  masking, contrastive logits);
* loss and assignment: ``HungarianMatcher`` (class cost 2, L1 5, GIoU 2, on the fixed query
  boxes) and ``SetCriterion.loss_single``'s focal loss; CQ-DINO adds its selection loss. The
  box losses are constant here (the boxes are inputs) and left out;
* optimisation: AdamW (lr ``--lr``, weight decay 1e-4), ``--iters`` iterations of ``--batch``
  images, the same image order and initial MLP for both heads.

The synthetic data is not V3Det: what is measured is how the ratio moves with C for the two
heads under one controlled setup, not the paper's numbers.
"""

import argparse
import json
import os
import sys
import time
from typing import List, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)  # this checkout's cqdino, not an installed one
sys.path.insert(0, os.path.join(REPO, "benchmarks"))

from common import (  # noqa: E402
    format_table,
    log_log_axes,
    machine_info,
    save_figure,
    write_outputs,
)

from cqdino.data import image_counts_from_json, load_detection_json, synthetic  # noqa: E402
from cqdino.evaluation.v3det_evaluation import frequency_groups  # noqa: E402
from cqdino.modeling import (  # noqa: E402
    HungarianMatcher,
    LinearClassHead,
    SetCriterion,
    build_contrastive_class_head,
)

EARLY_KEYS = ("defined", "mean_ratio", "pooled_ratio")
MODELS = ("DINO", "CQ-DINO")
FEATURE_CHANNELS = 2 * len(synthetic.COLOURS) + 2
ROI_SIZE = 4


# ---------------------------------------------------------------- data and frozen features
def ensure_dataset(root: str, num_categories: int, num_images: int, seed: int) -> str:
    """The synthetic dataset with these parameters under ``root`` (generated if absent)."""
    out = os.path.join(root, f"synthetic_vocab_gd_c{num_categories}_n{num_images}_s{seed}")
    if not os.path.exists(os.path.join(out, "meta.json")):
        synthetic.generate(
            out,
            num_categories=num_categories,
            num_train_images=num_images,
            num_val_images=1,  # not written: the train split alone
            splits=["train"],
            seed=seed,
            overwrite=os.path.exists(out),
        )
    return out


def pixel_channels(img: torch.Tensor) -> torch.Tensor:
    """``[3, H, W]`` in [0, 1] -> ``[34, H, W]``: soft assignment of each pixel to the 16
    generator colours and their dark shades (softmax of minus squared distance), and the
    absolute horizontal and vertical grey-level differences."""
    base = torch.tensor(list(synthetic.COLOURS.values()), dtype=torch.float32) / 255
    palette = torch.cat([base, 0.45 * base])  # (32, 3): texture stripes use 0.45 x colour
    d2 = ((img[None] - palette[:, :, None, None]) ** 2).sum(1)  # (32, H, W)
    assign = (-d2 / 0.005).softmax(0)
    grey = img.mean(0, keepdim=True)
    dx = F.pad((grey[..., 1:] - grey[..., :-1]).abs(), (0, 1))
    dy = F.pad((grey[:, 1:] - grey[:, :-1]).abs(), (0, 0, 0, 1))
    return torch.cat([assign, 4 * dx, 4 * dy])


def query_boxes(gt_xyxy: np.ndarray, w: int, h: int, num: int, rng) -> np.ndarray:
    """``num`` query boxes (xyxy, pixels): two jittered copies of each GT box (10% and 30% of
    its size), then random boxes (5-60% of the image side)."""
    out = []
    for x0, y0, x1, y1 in gt_xyxy:
        bw, bh = x1 - x0, y1 - y0
        for s in (0.1, 0.3):
            dx0, dy0, dx1, dy1 = rng.uniform(-s, s, 4) * [bw, bh, bw, bh]
            out.append([x0 + dx0, y0 + dy0, x1 + dx1, y1 + dy1])
    while len(out) < num:
        bw, bh = rng.uniform(0.05, 0.6, 2) * [w, h]
        cx, cy = rng.uniform(0, 1, 2) * [w, h]
        out.append([cx - bw / 2, cy - bh / 2, cx + bw / 2, cy + bh / 2])
    boxes = np.asarray(out[:num], np.float32)
    boxes[:, [0, 2]] = boxes[:, [0, 2]].clip(0, w - 1)
    boxes[:, [1, 3]] = boxes[:, [1, 3]].clip(0, h - 1)
    boxes[:, 2:] = np.maximum(boxes[:, 2:], boxes[:, :2] + 2)
    return boxes


def precompute(dataset_dir: str, num_queries: int, seed: int) -> dict:
    """Frozen features of every training image (see the module docstring)."""
    from torchvision.ops import roi_align

    json_file = os.path.join(dataset_dir, "annotations", "synthetic_vocab_train.json")
    dicts = load_detection_json(json_file, os.path.join(dataset_dir, "images"))
    with open(json_file) as f:
        num_categories = len(json.load(f)["categories"])
    counts = image_counts_from_json(json_file)  # category id -> images (ids 1..C)
    n = len(dicts)
    stride32 = torch.zeros(n, FEATURE_CHANNELS, 10, 10)  # images are at most 320 px
    roi_dim = FEATURE_CHANNELS * ROI_SIZE**2 + 5
    roi = torch.zeros(n, num_queries, roi_dim)
    qboxes = torch.zeros(n, num_queries, 4)  # normalised cxcywh
    labels, gt_boxes, sizes = [], [], []
    rng = np.random.default_rng([seed, 7])
    for i, d in enumerate(dicts):
        img = torch.from_numpy(np.array(Image.open(d["file_name"]).convert("RGB")))
        img = img.permute(2, 0, 1).float() / 255
        h, w = img.shape[-2:]
        ch = pixel_channels(img)
        s4 = F.avg_pool2d(ch[None], 4, ceil_mode=True)
        s32 = F.avg_pool2d(ch[None], 32, ceil_mode=True)[0]
        stride32[i, :, : s32.shape[1], : s32.shape[2]] = s32
        xywh = np.asarray([a["bbox"] for a in d["annotations"]], np.float32).reshape(-1, 4)
        xyxy = np.concatenate([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], 1)
        q = query_boxes(xyxy, w, h, num_queries, rng)
        qt = torch.from_numpy(q)
        pooled = roi_align(s4, [qt], ROI_SIZE, spatial_scale=0.25, sampling_ratio=2, aligned=True)
        scale = torch.tensor([w, h, w, h], dtype=torch.float32)
        cxcywh = torch.cat([(qt[:, :2] + qt[:, 2:]) / 2, qt[:, 2:] - qt[:, :2]], 1) / scale
        geom = torch.cat([cxcywh, (cxcywh[:, 2:3] / cxcywh[:, 3:4]).log()], 1)
        roi[i] = torch.cat([pooled.flatten(1), geom], 1)
        qboxes[i] = cxcywh
        g = torch.from_numpy(xyxy)
        gt_boxes.append(torch.cat([(g[:, :2] + g[:, 2:]) / 2, g[:, 2:] - g[:, :2]], 1) / scale)
        labels.append(torch.tensor([a["category_id"] for a in d["annotations"]], dtype=torch.long))
        sizes.append((int(h), int(w)))
    image_count = torch.tensor([counts.get(c + 1, 0) for c in range(num_categories)])
    return dict(
        C=num_categories,
        stride32=stride32,
        roi=roi,
        qboxes=qboxes,
        labels=labels,
        gt_boxes=gt_boxes,
        sizes=sizes,
        image_count=image_count,
        tree_file=os.path.join(dataset_dir, "category_tree.json"),
        num_boxes=int(sum(len(x) for x in labels)),
    )


# ---------------------------------------------------------------- training with gradient taps
def build_head(model: str, data: dict, args) -> nn.Module:
    C = data["C"]
    if model == "DINO":
        return LinearClassHead(C, 256, num_decoder_layers=1)
    return build_contrastive_class_head(
        C,
        FEATURE_CHANNELS,
        num_decoder_layers=1,
        embed_dim=256,
        topk=args.topk,
        query_dim=args.selector_dim,
        selector_memory_dim=args.selector_dim,
        selector_num_heads=4,
        selector_ffn_dim=2 * args.selector_dim,
        selector_num_layers=1,
        relation="tree",
        tree_file=data["tree_file"],
        ancestor_masking=True,
        selection_loss="asl",
        in_feature="res5",
        in_stride=32,
    )


def train(model: str, data: dict, args) -> dict:
    """Train one head; returns the accumulated per-category gradient sums and a few checks."""
    torch.manual_seed(args.seed)
    C = data["C"]
    roi_dim = data["roi"].shape[-1]
    mlp = nn.Sequential(nn.Linear(roi_dim, 256), nn.ReLU(), nn.Linear(256, 256), nn.LayerNorm(256))
    torch.manual_seed(args.seed + 1)
    head = build_head(model, data, args)
    criterion = SetCriterion(HungarianMatcher(2.0, 5.0, 2.0))
    params = list(mlp.parameters()) + list(head.parameters())
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=1e-4)

    captured: List[torch.Tensor] = []
    if model != "DINO":  # the selector's [B, C, 1] scores, for the selection-loss gradients

        def keep(module, inputs, output):
            output.retain_grad()
            captured.append(output)

        head.selector.score.register_forward_hook(keep)

    keys = ("pos", "neg", "sel_pos", "sel_neg")
    sums = {k: torch.zeros(C, dtype=torch.float64) for k in keys}
    early_iters = max(1, args.iters // 10)  # the first 10% of iterations, also kept apart
    n_img = len(data["labels"])
    order = np.random.default_rng([args.seed, 3])
    perm: List[int] = []
    checks = dict(matched=0, correct=0, selected=0, gt=0)
    losses_seen = []
    t0 = time.perf_counter()
    for it in range(args.iters):
        if len(perm) < args.batch:
            perm += order.permutation(n_img).tolist()
        idx, perm = perm[: args.batch], perm[args.batch :]
        gt_classes = [data["labels"][i] for i in idx]
        gt_boxes = [data["gt_boxes"][i] for i in idx]
        sizes = [data["sizes"][i] for i in idx]
        boxes = data["qboxes"][idx]

        hidden = mlp(data["roi"][idx])  # (B, Q, 256)
        captured.clear()
        state = head.prepare({"res5": data["stride32"][idx]}, sizes, gt_classes)
        mapped = head.map_targets(gt_classes, state)
        targets = [{"labels": lab, "boxes": box} for lab, box in zip(mapped, gt_boxes)]
        logits = head(hidden, state, 0)  # (B, Q, N_col)
        logits.retain_grad()
        indices = criterion.matcher(logits, boxes, targets)
        num_boxes = criterion.num_boxes(targets, logits.device)
        single = criterion.loss_single(logits, boxes, targets, indices, num_boxes)
        loss = single["loss_class"] * criterion.weights["loss_class"]
        total = loss + sum(state.losses.values())
        opt.zero_grad(set_to_none=True)
        total.backward()
        opt.step()
        losses_seen.append(float(loss.detach()))

        with torch.no_grad():
            B, _, N = logits.shape
            target = torch.zeros_like(logits)
            for b, ((q, g), lab) in enumerate(zip(indices, mapped)):
                keep_pos = lab[g] >= 0
                target[b, q[keep_pos], lab[g][keep_pos]] = 1
            g_abs = logits.grad.abs().double()  # every image has exactly K real columns
            pos_col = (g_abs * target).sum(1)  # (B, N)
            neg_col = (g_abs * (1 - target)).sum(1)
            if state.indices is None:  # DINO: columns are the categories
                sums["pos"] += pos_col.sum(0)
                sums["neg"] += neg_col.sum(0)
            else:
                cats = state.indices.flatten()
                sums["pos"].index_add_(0, cats, pos_col.flatten())
                sums["neg"].index_add_(0, cats, neg_col.flatten())
            if captured:
                g_sel = captured[0].grad.squeeze(-1).abs().double()  # (B, C)
                present = torch.zeros(B, C, dtype=torch.bool)
                for b, cls in enumerate(gt_classes):
                    present[b, cls] = True
                sums["sel_pos"] += (g_sel * present).sum(0)
                sums["sel_neg"] += (g_sel * ~present).sum(0)
            if it + 1 == early_iters:
                early = {k: v.clone() for k, v in sums.items()}
            if it >= args.iters * 0.8:  # train-batch checks over the last 20% of iterations
                for b, (q, g) in enumerate(indices):
                    cls = head.columns_to_classes(logits[b : b + 1, q].argmax(-1), _row(state, b))
                    checks["matched"] += len(q)
                    checks["correct"] += int((cls[0] == gt_classes[b][g]).sum())
                    checks["selected"] += int((mapped[b] >= 0).sum())
                    checks["gt"] += len(mapped[b])
    tail = losses_seen[int(len(losses_seen) * 0.8) :]
    return dict(
        sums={k: v.tolist() for k, v in sums.items()},
        early={k: v.tolist() for k, v in early.items()},
        early_iters=early_iters,
        seconds=time.perf_counter() - t0,
        loss_first=losses_seen[0],
        loss_last=sum(tail) / len(tail),
        train_top1=checks["correct"] / max(checks["matched"], 1),
        gt_selected=checks["selected"] / max(checks["gt"], 1),
        num_columns=getattr(head, "num_topk", None) or C,
    )


def _row(state, b: int):
    """The classification state of image ``b`` alone (for ``columns_to_classes``)."""
    import dataclasses

    if state.indices is None:
        return state
    return dataclasses.replace(state, indices=state.indices[b : b + 1])


# ---------------------------------------------------------------- statistics, table and plot
def group_stats(pos: Sequence[float], neg: Sequence[float], image_count: torch.Tensor) -> list:
    """Per frequency group of the V3Det evaluator (:func:`frequency_groups`: rare <= 10
    training images, common 11..100, frequent > 100), leaving out the categories without
    training images (they have no positives): categories, defined ratios, mean/median ratio,
    pooled ratio."""
    pos_t, neg_t = torch.tensor(pos), torch.tensor(neg)
    count = torch.as_tensor(image_count)
    out = []
    for name, positions in frequency_groups(count.tolist()).items():
        member = torch.zeros(len(pos_t), dtype=torch.bool)
        member[torch.from_numpy(positions)] = True
        member &= count > 0  # no training image: no positives, no ratio to speak of
        defined = member & (neg_t > 0)
        ratio = pos_t[defined] / neg_t[defined]
        row = dict(
            group=name,
            categories=int(member.sum()),
            defined=int(defined.sum()),
            mean_ratio=float(ratio.mean()) if len(ratio) else None,
            median_ratio=float(ratio.median()) if len(ratio) else None,
            pooled_ratio=(
                float(pos_t[member].sum() / neg_t[member].sum())
                if float(neg_t[member].sum()) > 0
                else None
            ),
        )
        out.append(row)
    return out


def plot(rows: List[dict], path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(12, 8.5))
    axes = list(axes.flat)
    colours = {"rare": "tab:red", "common": "tab:orange", "frequent": "tab:green"}
    styles = {"DINO": "s--", "CQ-DINO": "o-"}
    panels = [
        ("mean_ratio", "focal loss, all iterations: mean over categories"),
        ("pooled_ratio", "focal loss, all iterations: pooled (sum / sum)"),
        ("early_mean_ratio", "focal loss, first 10% of iterations: mean over categories"),
    ]
    for ax, (key, label) in zip(axes, panels):
        for model in ("DINO", "CQ-DINO"):
            for g in colours:
                pts = [
                    (r["C"], r[key])
                    for r in rows
                    if r["model"] == model and r["group"] == g and r["loss"] == "focal"
                ]
                pts = [p for p in pts if p[1]]
                if pts:
                    ax.plot(*zip(*pts), styles[model], color=colours[g], label=f"{model} {g}")
        ax.set_title(label, fontsize=9)
    ax = axes[3]
    for key, style, when in (("mean_ratio", "^-", "all"), ("early_mean_ratio", "v:", "first 10%")):
        for g in colours:
            pts = [(r["C"], r[key]) for r in rows if r["loss"] == "selection" and r["group"] == g]
            pts = [p for p in pts if p[1]]
            if pts:
                ax.plot(*zip(*pts), style, color=colours[g], label=f"{g}, {when}")
    ax.set_title("CQ-DINO selection loss (ASL over all C): mean over categories", fontsize=9)
    for ax in axes:
        log_log_axes(ax, "positive / negative |dL/dlogit|")
        ax.legend(fontsize=7)
    save_figure(fig, path, title, width=170)


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--classes", type=int, nargs="+", default=None)
    ap.add_argument("--quick", action="store_true", help="C in {100, 300}, 40 images, 6 iters")
    ap.add_argument("--json", default=None, help="write the results here (atomically)")
    ap.add_argument("--plot", default=None, help="write a PNG plot here")
    ap.add_argument("--data-root", default=None, help="default: $DETECTRON2_DATASETS")
    ap.add_argument("--images", type=int, default=None, help="training images (same at every C)")
    ap.add_argument("--iters", type=int, default=None)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--queries", type=int, default=40, help="query boxes per image")
    ap.add_argument("--topk", type=int, default=100)
    ap.add_argument("--selector-dim", type=int, default=128)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    args.classes = args.classes or ([100, 300] if args.quick else [100, 1000, 5000])
    args.images = args.images or (40 if args.quick else 800)
    args.iters = args.iters or (6 if args.quick else 300)
    if args.quick:
        args.batch = min(args.batch, 4)
    root = args.data_root or os.getenv("DETECTRON2_DATASETS", "datasets")
    torch.set_num_threads(args.threads)

    info = machine_info("cpu")
    print("machine:", ", ".join(f"{k}={v}" for k, v in info.items()), flush=True)
    header = (
        f"synthetic vocabulary, {args.images} training images (seed {args.seed}), "
        f"{args.iters} iterations x {args.batch} images, {args.queries} fixed query boxes per "
        f"image, frozen colour/texture features + trainable 2-layer MLP; DINO LinearClassHead, "
        f"CQ-DINO contrastive head (top-K {args.topk}, selector width {args.selector_dim}, "
        f"1 layer, tree aggregation, ASL); focal loss via SetCriterion; AdamW lr {args.lr}; "
        f"cpu, {args.threads} thread(s)"
    )
    print(header, flush=True)
    t_start = time.perf_counter()
    rows: List[dict] = []
    runs: List[dict] = []
    for C in args.classes:
        t0 = time.perf_counter()
        data = precompute(ensure_dataset(root, C, args.images, args.seed), args.queries, args.seed)
        prep_s = time.perf_counter() - t0
        seen = int((data["image_count"] > 0).sum())
        for model in MODELS:
            res = train(model, data, args)
            s = res["sums"]
            run = dict(
                model=model,
                C=C,
                columns=res["num_columns"],
                categories_seen=seen,
                boxes=data["num_boxes"],
                seconds=round(res["seconds"], 1),
                prep_seconds=round(prep_s, 1),
                loss_first=res["loss_first"],
                loss_last=res["loss_last"],
                train_top1=res["train_top1"],
                gt_selected=res["gt_selected"],
            )
            runs.append(run)
            e = res["early"]
            losses = [("focal", "pos", "neg")]
            if model != "DINO":
                losses.append(("selection", "sel_pos", "sel_neg"))
            for loss, kp, kn in losses:
                full = group_stats(s[kp], s[kn], data["image_count"])
                first = group_stats(e[kp], e[kn], data["image_count"])
                for g, g0 in zip(full, first):
                    row = dict(model=model, C=C, loss=loss, **g)
                    row.update({f"early_{k}": g0[k] for k in EARLY_KEYS})
                    rows.append(row)
            print(
                f"done {model} C={C}: {res['seconds']:.0f} s, class loss "
                f"{res['loss_first']:.3f} -> {res['loss_last']:.3f}",
                file=sys.stderr,
                flush=True,
            )
    elapsed = time.perf_counter() - t_start

    print(header)
    cols = ["model", "C", "loss", "group", "categories", "defined"]
    cols += ["mean_ratio", "median_ratio", "pooled_ratio"]
    cols += [f"early_{k}" for k in EARLY_KEYS]
    print(format_table(rows, cols))
    print(f"(early_*: the same over the first {max(1, args.iters // 10)} iterations only)")
    print("\nruns (train_top1: matched queries classified right, gt_selected: GT boxes whose")
    print("category was in the image's columns; both on training batches, last 20% of iters):")
    rcols = ["model", "C", "columns", "categories_seen", "boxes", "loss_first", "loss_last"]
    rcols += ["train_top1", "gt_selected", "seconds"]
    print(format_table(runs, rcols))
    print(f"\ntotal time {elapsed:.0f} s")
    payload = {
        "info": dict(info, header=header, elapsed_s=round(elapsed, 1)),
        "config": {k: v for k, v in vars(args).items() if k not in ("json", "plot")},
        "results": rows,
        "runs": runs,
    }
    write_outputs(args.json, payload, args.plot, lambda path: plot(rows, path, header))
    return 0


if __name__ == "__main__":
    sys.exit(main())
