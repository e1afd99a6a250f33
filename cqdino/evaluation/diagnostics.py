"""Where a detector on the synthetic vocabulary fails: boxes or names.

* :func:`attribute_accuracy`: for every ground-truth box, the best-scoring detection that
  overlaps it (IoU >= 0.5); how often its category is exactly right, and how often each of its
  name's attributes (shape, colour, texture, border) is.
* :func:`boxes_per_category`: the training data's boxes per category (min / median / max, and
  the categories without any).
* :func:`linear_probe`: whether features carry an attribute at all: a softmax regression fitted
  on one set of (feature, label) pairs and scored on another (``tools/feature_probe.py`` feeds
  it the detector's object features and its backbone features inside the GT boxes).

Both read what the demo writes: the COCO jsons of ``cqdino.data.synthetic`` and the evaluator's
``v3det_predictions.npz``.
"""

import json
from typing import Dict, Mapping, Optional, Sequence

import numpy as np

__all__ = [
    "selector_baselines",
    "attribute_accuracy",
    "boxes_per_category",
    "linear_probe",
    "load_predictions",
    "ATTRIBUTES",
]

ATTRIBUTES = ("shape", "colour", "texture", "border")


def load_predictions(path: str) -> Dict[str, np.ndarray]:
    """The evaluator's ``v3det_predictions.npz`` (image_id, category_id, bbox xywh, score)."""
    with np.load(path) as f:
        return {k: f[k] for k in f.files}


def _iou_xywh(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """(N, M) IoU of xywh boxes."""
    ax1, ay1 = a[:, 0:1], a[:, 1:2]
    ax2, ay2 = ax1 + a[:, 2:3], ay1 + a[:, 3:4]
    bx1, by1 = b[None, :, 0], b[None, :, 1]
    bx2, by2 = bx1 + b[None, :, 2], by1 + b[None, :, 3]
    iw = np.clip(np.minimum(ax2, bx2) - np.maximum(ax1, bx1), 0, None)
    ih = np.clip(np.minimum(ay2, by2) - np.maximum(ay1, by1), 0, None)
    inter = iw * ih
    union = a[:, 2:3] * a[:, 3:4] + b[None, :, 2] * b[None, :, 3] - inter
    return inter / np.maximum(union, 1e-12)


def attribute_accuracy(
    gt_json: str,
    predictions: Mapping[str, np.ndarray],
    attributes: Mapping[int, Optional[Sequence[int]]],
    iou_threshold: float = 0.5,
) -> Dict[str, float]:
    """Accuracy (%) of the best-scoring detection on each ground-truth box.

    Args:
        gt_json: COCO json of the evaluated split.
        predictions: ``image_id``, ``category_id``, ``bbox`` (xywh), ``score`` arrays.
        attributes: dataset category id -> attribute indices ``(shape, colour, texture,
            border)``, or ``(shape,)`` / None for a category that only names its shape.
        iou_threshold: a detection overlaps a box at this IoU or more.
    Returns:
        ``found`` (% of GT boxes with an overlapping detection), ``category`` (% of those whose
        best detection has the right category) and one entry per attribute (% right among the
        found boxes whose GT category has that attribute), plus ``boxes`` (count).
    """
    with open(gt_json, encoding="utf-8") as f:
        anns = json.load(f)["annotations"]
    by_image: Dict[int, list] = {}
    for a in anns:
        by_image.setdefault(a["image_id"], []).append(a)
    img = np.asarray(predictions["image_id"])
    order = np.argsort(img, kind="stable")
    img_sorted = img[order]
    found = right = 0
    attr_right = np.zeros(len(ATTRIBUTES))
    attr_total = np.zeros(len(ATTRIBUTES))
    for image_id, gts in by_image.items():
        lo, hi = np.searchsorted(img_sorted, [image_id, image_id + 1])
        idx = order[lo:hi]
        if len(idx) == 0:
            continue
        boxes = np.asarray(predictions["bbox"])[idx]
        scores = np.asarray(predictions["score"])[idx]
        cats = np.asarray(predictions["category_id"])[idx]
        iou = _iou_xywh(np.asarray([g["bbox"] for g in gts], np.float64), boxes)
        for g, row in zip(gts, iou):
            hit = np.flatnonzero(row >= iou_threshold)
            if len(hit) == 0:
                continue
            found += 1
            best = int(cats[hit[np.argmax(scores[hit])]])
            right += best == g["category_id"]
            want = attributes.get(g["category_id"]) or ()
            got = attributes.get(best) or ()
            for k in range(min(len(want), len(ATTRIBUTES))):
                attr_total[k] += 1
                attr_right[k] += k < len(got) and got[k] == want[k]
    n = len(anns)
    out = {
        "boxes": n,
        "found": 100.0 * found / max(n, 1),
        "category": 100.0 * right / max(found, 1),
    }
    for k, name in enumerate(ATTRIBUTES):
        out[name] = 100.0 * attr_right[k] / attr_total[k] if attr_total[k] else float("nan")
    return out


def selector_baselines(train_json: str, val_json: str, k: int) -> Dict[str, float]:
    """What a selector that ignores the image keeps of the val images' GT categories (in %):
    ``prior``, a constant top-``k`` of the categories in most training images, and ``random``,
    the expected recall of ``k`` categories drawn at random (``k / C``). The bars a trained
    selector's ARC@k must clear."""
    with open(train_json, encoding="utf-8") as f:
        train = json.load(f)
    with open(val_json, encoding="utf-8") as f:
        val = json.load(f)
    ids = sorted(c["id"] for c in train["categories"])
    images = {}
    for a in train["annotations"]:
        images.setdefault(a["category_id"], set()).add(a["image_id"])
    # most training images first; ties by category id (deterministic)
    ranked = sorted(ids, key=lambda c: (-len(images.get(c, ())), c))
    top = set(ranked[:k])
    pairs = {(a["image_id"], a["category_id"]) for a in val["annotations"]}
    hit = sum(c in top for _, c in pairs)
    return {
        "prior": 100.0 * hit / max(len(pairs), 1),
        "random": 100.0 * min(k, len(ids)) / max(len(ids), 1),
    }


def boxes_per_category(json_file: str) -> Dict[str, float]:
    """Boxes per category of a COCO json: ``min``, ``median``, ``max`` over its categories,
    ``empty`` (categories without a box), ``categories`` and ``boxes``."""
    with open(json_file, encoding="utf-8") as f:
        data = json.load(f)
    ids = [c["id"] for c in data["categories"]]
    counts = dict.fromkeys(ids, 0)
    for a in data["annotations"]:
        counts[a["category_id"]] = counts.get(a["category_id"], 0) + 1
    c = np.asarray([counts[i] for i in ids])
    return {
        "categories": len(ids),
        "boxes": int(c.sum()),
        "min": int(c.min()) if len(c) else 0,
        "median": float(np.median(c)) if len(c) else 0.0,
        "max": int(c.max()) if len(c) else 0,
        "empty": int((c == 0).sum()),
    }


def linear_probe(
    train_x: np.ndarray,
    train_y: np.ndarray,
    val_x: np.ndarray,
    val_y: np.ndarray,
    steps: int = 500,
    lr: float = 1e-2,
    weight_decay: float = 1e-3,
    seed: int = 0,
) -> Dict[str, float]:
    """Accuracy (%) of a multinomial logistic regression fitted on ``train_x [N, D]`` /
    ``train_y [N]`` (int labels) and applied to ``val_x`` / ``val_y``.

    Features are standardised with the training set's mean and std; full-batch Adam for
    ``steps`` steps. Returns ``train``, ``val`` and ``majority`` (the val accuracy of always
    answering the most frequent val label: what a probe on features without the attribute
    scores), plus the counts ``n_train`` / ``n_val``.
    """
    import torch

    train_x = np.asarray(train_x, np.float64)
    val_x = np.asarray(val_x, np.float64)
    train_y = np.asarray(train_y, np.int64)
    val_y = np.asarray(val_y, np.int64)
    if train_x.ndim != 2 or val_x.ndim != 2 or train_x.shape[1] != val_x.shape[1]:
        raise ValueError(
            f"linear_probe: features must be [N, D] with one D, got {train_x.shape} and "
            f"{val_x.shape}"
        )
    if len(train_x) != len(train_y) or len(val_x) != len(val_y) or not len(train_y):
        raise ValueError(
            f"linear_probe: {len(train_x)}/{len(train_y)} train and {len(val_x)}/{len(val_y)} "
            "val features/labels (non-empty, one label per row)"
        )
    if min(train_y.min(), val_y.min(initial=0)) < 0:
        raise ValueError("linear_probe: labels must be >= 0")
    num_classes = int(max(train_y.max(), val_y.max(initial=0))) + 1
    mu = train_x.mean(0)
    sd = train_x.std(0) + 1e-6
    x = torch.from_numpy((train_x - mu) / sd)
    xv = torch.from_numpy((val_x - mu) / sd)
    y = torch.from_numpy(train_y)
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(x.shape[1], num_classes, generator=gen, dtype=torch.float64) * 0.01
    b = torch.zeros(num_classes, dtype=torch.float64)
    w.requires_grad_(True)
    b.requires_grad_(True)
    opt = torch.optim.Adam([w, b], lr=lr, weight_decay=weight_decay)
    for _ in range(steps):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(x @ w + b, y).backward()
        opt.step()
    with torch.no_grad():
        acc_tr = ((x @ w + b).argmax(1) == y).double().mean().item()
        acc_va = ((xv @ w + b).argmax(1).numpy() == val_y).mean() if len(val_y) else float("nan")
    majority = np.bincount(val_y).max() / len(val_y) if len(val_y) else float("nan")
    return {
        "train": 100.0 * acc_tr,
        "val": 100.0 * float(acc_va),
        "majority": 100.0 * float(majority),
        "n_train": float(len(train_y)),
        "n_val": float(len(val_y)),
    }
