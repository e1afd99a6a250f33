"""V3Det-style box evaluation: COCO AP with 300 detections per image and the hierarchy rule.

* Each image keeps its ``max_dets_per_image`` (300) best-scoring detections over all categories
  (the evaluator truncates; it does not trust the detector).
* Hierarchy rule: if an image has detections of category d and a ground-truth box of a category
  a that is an *ancestor* of d, a copy of that box (non-crowd, flagged ignore) is added to d, so a
  child-class detection on a parent-labelled box is ignored rather than a false positive.
* AP / AP50 / AP75 / APs / APm / APl (COCO definitions at maxDets 300), AR@300, per-category AP
  and per-frequency AP (rare <= 10, common 11..100, frequent > 100 training images).
* Optionally (``class_agnostic=True``) the class-agnostic ``AP-agnostic`` / ``AP50-agnostic``:
  the same 300 detections per image and ground truth with every category replaced by one, so
  localisation is measured alone (a box detected under several categories counts once as a
  true positive, its other copies as false positives).

COCO AP decomposes over categories: a category's precision/recall depend only on its own
(image, category) pairs. So the evaluation groups boxes by category and runs faster-coco-eval's
matching and accumulation per category, over only the images where that category has ground truth
or detections, in worker processes over category chunks. Work and memory are proportional to the
boxes, never to (images x categories); the result equals one dense COCOeval over everything.
"""

import itertools
import json
import logging
import multiprocessing as mp
import os
import time
from typing import Dict, List, Optional, Sequence, Union

import numpy as np
import torch
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.evaluation import DatasetEvaluator
from detectron2.structures import BoxMode
from detectron2.utils import comm
from detectron2.utils.logger import create_small_table
from faster_coco_eval import COCO
from faster_coco_eval.core.faster_eval_api import COCOeval_faster
from tabulate import tabulate

from cqdino.data.hierarchy import CategoryTree
from cqdino.utils.io import atomic_write

__all__ = [
    "V3DetEvaluator",
    "evaluate_boxes",
    "class_agnostic_ap",
    "BoxArrays",
    "FREQUENCY_GROUPS",
]

logger = logging.getLogger(__name__)

# Frequency groups by number of training images containing the category (V3Det, LVIS-like).
FREQUENCY_GROUPS = (("rare", 0, 10), ("common", 11, 100), ("frequent", 101, None))
_AREAS = ("all", "small", "medium", "large")


class BoxArrays(dict):
    """Column arrays of boxes: ``image_id`` (int64), ``category_id`` (int64, dataset ids),
    ``bbox`` (N, 4) float64 xywh, and ``score`` (detections) or ``area``/``iscrowd``/``ignore``
    (ground truth). A dict subclass so it pickles cheaply to worker processes."""

    def __len__(self) -> int:
        return len(self["image_id"])

    def take(self, idx) -> "BoxArrays":
        return BoxArrays({k: v[idx] for k, v in self.items()})

    @staticmethod
    def concat(parts: Sequence["BoxArrays"]) -> "BoxArrays":
        keys = parts[0].keys()
        return BoxArrays({k: np.concatenate([p[k] for p in parts]) for k in keys})


def gt_arrays(image_id, category_id, bbox, area=None, iscrowd=None, ignore=None) -> BoxArrays:
    """Ground-truth :class:`BoxArrays` (area defaults to the box area)."""
    bbox = np.asarray(bbox, np.float64).reshape(-1, 4)
    n = len(bbox)
    return BoxArrays(
        image_id=np.asarray(image_id, np.int64).reshape(n),
        category_id=np.asarray(category_id, np.int64).reshape(n),
        bbox=bbox,
        area=(bbox[:, 2] * bbox[:, 3]) if area is None else np.asarray(area, np.float64),
        iscrowd=np.zeros(n, np.uint8) if iscrowd is None else np.asarray(iscrowd, np.uint8),
        ignore=np.zeros(n, np.uint8) if ignore is None else np.asarray(ignore, np.uint8),
    )


def dt_arrays(image_id, category_id, bbox, score) -> BoxArrays:
    """Detection :class:`BoxArrays`."""
    bbox = np.asarray(bbox, np.float64).reshape(-1, 4)
    n = len(bbox)
    return BoxArrays(
        image_id=np.asarray(image_id, np.int64).reshape(n),
        category_id=np.asarray(category_id, np.int64).reshape(n),
        bbox=bbox,
        score=np.asarray(score, np.float64).reshape(n),
    )


def truncation_index(dt: BoxArrays, max_dets: int) -> np.ndarray:
    """Sorted indices of each image's ``max_dets`` highest-scoring detections."""
    if len(dt) == 0:
        return np.zeros(0, np.int64)
    order = np.lexsort((-dt["score"], dt["image_id"]))  # by image, then score descending
    img = dt["image_id"][order]
    starts = np.flatnonzero(np.r_[True, img[1:] != img[:-1]])
    rank = np.arange(len(img)) - np.repeat(starts, np.diff(np.r_[starts, len(img)]))
    return np.sort(order[rank < max_dets])


def truncate_per_image(dt: BoxArrays, max_dets: int) -> BoxArrays:
    """Keep each image's ``max_dets`` highest-scoring detections (over all categories)."""
    return dt.take(truncation_index(dt, max_dets))


def add_hierarchy_ignores(
    gt: BoxArrays, dt: BoxArrays, ancestors: Dict[int, Sequence[int]]
) -> BoxArrays:
    """Apply the hierarchy rule: for every image with detections of category d, copy each GT of
    an ancestor category of d into d as a non-crowd ignored box. Returns gt + copies.

    Args:
        ancestors: dataset category id -> dataset ids of its category ancestors.
    """
    if len(gt) == 0 or len(dt) == 0 or not ancestors:
        return gt
    # CSR table: dataset category id -> ancestor ids.
    ids = np.fromiter(ancestors.keys(), np.int64, len(ancestors))
    lens = np.fromiter((len(v) for v in ancestors.values()), np.int64, len(ancestors))
    flat = np.fromiter(itertools.chain.from_iterable(ancestors.values()), np.int64, lens.sum())
    sorter = np.argsort(ids)
    ids, lens = ids[sorter], lens[sorter]
    offs = np.r_[0, np.cumsum(np.asarray([len(v) for v in ancestors.values()]))][:-1][sorter]

    # Distinct (image, detected category) pairs whose category has ancestors.
    pairs = np.unique(np.stack([dt["image_id"], dt["category_id"]], 1), axis=0)
    pos = np.searchsorted(ids, pairs[:, 1])
    pos = np.minimum(pos, len(ids) - 1)
    has = ids[pos] == pairs[:, 1]
    pairs, pos = pairs[has], pos[has]
    if len(pairs) == 0:
        return gt
    n_anc = lens[pos]
    trip_img = np.repeat(pairs[:, 0], n_anc)
    trip_det = np.repeat(pairs[:, 1], n_anc)
    start = np.repeat(offs[pos], n_anc)
    within = np.arange(len(trip_img)) - np.repeat(np.cumsum(n_anc) - n_anc, n_anc)
    trip_anc = flat[start + within]

    # Join (image, ancestor) with GT sorted by (image, category).
    gorder = np.lexsort((gt["category_id"], gt["image_id"]))
    gkey = np.stack([gt["image_id"][gorder], gt["category_id"][gorder]], 1)
    # Encode (image, category) as a structured row for searchsorted.
    gk = gkey.view([("i", np.int64), ("c", np.int64)]).ravel()
    tk = np.stack([trip_img, trip_anc], 1).view([("i", np.int64), ("c", np.int64)]).ravel()
    lo = np.searchsorted(gk, tk, side="left")
    hi = np.searchsorted(gk, tk, side="right")
    cnt = hi - lo
    if cnt.sum() == 0:
        return gt
    src = np.repeat(lo, cnt) + (np.arange(cnt.sum()) - np.repeat(np.cumsum(cnt) - cnt, cnt))
    copies = gt.take(gorder[src])
    copies["category_id"] = np.repeat(trip_det, cnt)
    copies["iscrowd"] = np.zeros(len(copies), np.uint8)
    copies["ignore"] = np.ones(len(copies), np.uint8)
    return BoxArrays.concat([gt, copies])


class _COCOevalIgnore(COCOeval_faster):
    """faster-coco-eval with GT ``ignore`` flags kept (its ``_prepare`` derives ``ignore`` from
    ``iscrowd`` only, like pycocotools); matching and accumulation stay the library's."""

    def _prepare(self):
        super()._prepare()
        for ann in self.cocoGt.anns.values():
            if ann.get("_ignore_copy"):
                ann["ignore"] = 1


def _coco(images: List[dict], anns: List[dict]) -> COCO:
    c = COCO()
    c.dataset = {"images": images, "annotations": anns, "categories": [{"id": 1}]}
    c.createIndex()
    return c


def _eval_one_category(gt: BoxArrays, dt: BoxArrays, max_dets: int):
    """(T, A) mean-over-recall precision and (T, A) recall at maxDet; NaN where no GT."""
    img_ids = np.union1d(gt["image_id"], dt["image_id"]).tolist()
    images = [{"id": i, "height": 1, "width": 1} for i in img_ids]
    g_anns = [
        {"id": j, "image_id": i, "category_id": 1, "bbox": b, "area": a, "iscrowd": c}
        for j, i, b, a, c in zip(
            itertools.count(1),
            gt["image_id"].tolist(),
            gt["bbox"].tolist(),
            gt["area"].tolist(),
            gt["iscrowd"].tolist(),
        )
    ]
    for j in np.flatnonzero(gt["ignore"]).tolist():
        g_anns[j]["_ignore_copy"] = True
    d_bbox = dt["bbox"]
    d_anns = [
        {"id": j, "image_id": i, "category_id": 1, "bbox": b, "score": s, "area": a}
        for j, i, b, s, a in zip(
            itertools.count(1),
            dt["image_id"].tolist(),
            d_bbox.tolist(),
            dt["score"].tolist(),
            (d_bbox[:, 2] * d_bbox[:, 3]).tolist(),
        )
    ]
    ev = _COCOevalIgnore(
        _coco(images, g_anns), _coco(images, d_anns), "bbox", print_function=_quiet
    )
    ev.params.maxDets = [1, 10, max_dets] if max_dets > 10 else [max_dets]
    ev.evaluate()
    ev.accumulate()
    prec = np.asarray(ev.eval["precision"])[:, :, 0, :, -1]  # (T, R, A)
    rec = np.asarray(ev.eval["recall"])[:, 0, :, -1]  # (T, A)
    valid = prec[0, 0, :] > -1  # (A,)  -1 marks "no GT in this area range"
    p = np.where(valid[None, :], prec.mean(axis=1), np.nan)
    r = np.where(valid[None, :], rec, np.nan)
    return p, r


def _quiet(*args, **kwargs):
    pass


def _eval_chunk(args):
    """Evaluate a chunk of categories: (positions, gt slice, dt slice, boundaries, max_dets)."""
    positions, gt, dt, g_bounds, d_bounds, max_dets = args
    out_p = np.full((len(positions), 10, len(_AREAS)), np.nan)
    out_r = np.full((len(positions), 10, len(_AREAS)), np.nan)
    for j in range(len(positions)):
        g = gt.take(slice(g_bounds[j], g_bounds[j + 1]))
        d = dt.take(slice(d_bounds[j], d_bounds[j + 1]))
        if not (g["ignore"] == 0).any():
            continue  # only ignored copies: precision undefined (-1 in COCOeval), skip the work
        out_p[j], out_r[j] = _eval_one_category(g, d, max_dets)
    return positions, out_p, out_r


def evaluate_boxes(
    gt: BoxArrays,
    dt: BoxArrays,
    category_ids: Sequence[int],
    ancestors: Optional[Dict[int, Sequence[int]]] = None,
    max_dets_per_image: int = 300,
    num_workers: int = 0,
    chunk_size: int = 64,
) -> dict:
    """The V3Det-style evaluation on column arrays.

    Args:
        gt, dt: ground truth and detections (see :class:`BoxArrays`); only images present in
            ``gt`` or ``dt`` matter.
        category_ids: all dataset category ids (order defines the output arrays).
        ancestors: dataset id -> dataset ids of its category ancestors (hierarchy rule);
            None: plain COCO AP.
        max_dets_per_image: per-image truncation and COCO maxDets.
        num_workers: worker processes over category chunks (0: in this process).
        chunk_size: categories per task.
    Returns:
        dict with ``precision`` (K, T, A) mean-over-recall precision (NaN: no GT),
        ``recall`` (K, T, A), ``category_ids`` (K,), and the summary ``stats`` dict
        (AP, AP50, AP75, APs, APm, APl, AR, in [0, 1]; NaN if no category has GT).
    """
    category_ids = np.asarray(list(category_ids), np.int64)
    K = len(category_ids)
    if K == 0 or len(np.unique(category_ids)) != K or category_ids.min() < 0:
        raise ValueError("category_ids must be distinct non-negative ids")
    pos_of_id = np.full(int(category_ids.max()) + 1, -1, np.int64)
    pos_of_id[category_ids] = np.arange(K)

    def positions(arr: BoxArrays, name: str) -> np.ndarray:
        c = arr["category_id"]
        bad = (c < 0) | (c >= len(pos_of_id))
        pos = np.where(bad, -1, pos_of_id[np.clip(c, 0, len(pos_of_id) - 1)])
        if (pos < 0).any():
            raise ValueError(
                f"{name} use unknown category ids {np.unique(c[pos < 0])[:10].tolist()}"
            )
        return pos

    positions(gt, "ground truth")
    positions(dt, "detections")
    # Truncate and group detections with a single copy of the (possibly 9M-row) arrays.
    keep = truncation_index(dt, max_dets_per_image)
    kept = BoxArrays(image_id=dt["image_id"][keep], category_id=dt["category_id"][keep])
    if ancestors:
        gt = add_hierarchy_ignores(gt, kept, ancestors)
    # Group by category position, keeping input order within a category.
    gpos, dpos = positions(gt, "ground truth"), positions(kept, "detections")
    del kept
    gorder = np.argsort(gpos, kind="stable")
    dorder = np.argsort(dpos, kind="stable")
    gt, dt = gt.take(gorder), dt.take(keep[dorder])
    del keep
    g_bounds = np.searchsorted(gpos[gorder], np.arange(K + 1))
    d_bounds = np.searchsorted(dpos[dorder], np.arange(K + 1))
    # Only categories with some GT get evaluated (no GT: undefined precision, excluded).
    todo = np.flatnonzero(np.diff(g_bounds) > 0)

    def tasks():
        for s in range(0, len(todo), chunk_size):
            pos = todo[s : s + chunk_size]
            gi = np.concatenate([np.arange(g_bounds[k], g_bounds[k + 1]) for k in pos])
            di = np.concatenate([np.arange(d_bounds[k], d_bounds[k + 1]) for k in pos])
            gb = np.r_[0, np.cumsum(g_bounds[pos + 1] - g_bounds[pos])]
            db = np.r_[0, np.cumsum(d_bounds[pos + 1] - d_bounds[pos])]
            yield pos, gt.take(gi), dt.take(di), gb, db, max_dets_per_image

    precision = np.full((K, 10, len(_AREAS)), np.nan)
    recall = np.full((K, 10, len(_AREAS)), np.nan)
    if num_workers > 0 and len(todo) > chunk_size:
        ctx = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")
        with ctx.Pool(num_workers) as pool:
            for pos, p, r in pool.imap_unordered(_eval_chunk, tasks()):
                precision[pos], recall[pos] = p, r
    else:
        for t in tasks():
            pos, p, r = _eval_chunk(t)
            precision[pos], recall[pos] = p, r
    return {
        "precision": precision,
        "recall": recall,
        "category_ids": category_ids,
        "stats": summarize(precision, recall),
    }


def _nanmean(x: np.ndarray) -> float:
    x = x[~np.isnan(x)]
    return float(x.mean()) if x.size else float("nan")


def summarize(precision: np.ndarray, recall: np.ndarray) -> Dict[str, float]:
    """COCO summary numbers from per-category (K, T, A) arrays (IoU 0.50:0.05:0.95)."""
    return {
        "AP": _nanmean(precision[:, :, 0].mean(axis=1)),
        "AP50": _nanmean(precision[:, 0, 0]),
        "AP75": _nanmean(precision[:, 5, 0]),
        "APs": _nanmean(precision[:, :, 1].mean(axis=1)),
        "APm": _nanmean(precision[:, :, 2].mean(axis=1)),
        "APl": _nanmean(precision[:, :, 3].mean(axis=1)),
        "AR": _nanmean(recall[:, :, 0].mean(axis=1)),
    }


def frequency_groups(image_count: Sequence[int]) -> Dict[str, np.ndarray]:
    """Category positions per frequency group (rare <= 10, common 11..100, frequent > 100)."""
    ic = np.asarray(image_count)
    out = {}
    for name, lo, hi in FREQUENCY_GROUPS:
        sel = (ic >= lo) & (ic <= (np.inf if hi is None else hi))
        out[name] = np.flatnonzero(sel)
    return out


def load_image_count_file(path: str, category_ids: Sequence[int]) -> np.ndarray:
    """Training images per category from a user file, in ``category_ids`` order.

    Accepts a V3Det/LVIS-style category list (``[{"id", "image_count", ...}]``, e.g.
    ``v3det_2023_v1_train_cat_info.json``), optionally under a ``categories`` key, or a
    ``{category id: count}`` mapping. Categories absent from the file count 0.
    """
    with open(path, encoding="utf-8") as f:
        data = json.load(f)
    if isinstance(data, dict) and "categories" in data:
        data = data["categories"]
    try:
        if isinstance(data, dict):
            counts = {int(k): int(v) for k, v in data.items()}
        else:
            counts = {int(c["id"]): int(c["image_count"]) for c in data}
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"{path}: not an image-count file ({e})") from e
    return np.asarray([counts.get(int(c), 0) for c in category_ids])


def class_agnostic_ap(gt: BoxArrays, dt: BoxArrays, max_dets_per_image: int = 300) -> dict:
    """``{"AP-agnostic", "AP50-agnostic"}`` (in %): COCO AP with every category replaced by
    one, over each image's ``max_dets_per_image`` best detections; no hierarchy rule."""
    dt = truncate_per_image(dt, max_dets_per_image)
    one_gt = BoxArrays({**gt, "category_id": np.zeros(len(gt), np.int64)})
    one_dt = BoxArrays({**dt, "category_id": np.zeros(len(dt), np.int64)})
    stats = evaluate_boxes(one_gt, one_dt, [0], max_dets_per_image=max_dets_per_image)["stats"]
    return {"AP-agnostic": 100 * stats["AP"], "AP50-agnostic": 100 * stats["AP50"]}


def _best_per_query(queries: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
    """Indices of the best-scoring detection of each object query (one box per query: the
    class-agnostic AP must not count a box once per category it was named)."""
    order = torch.argsort(scores, descending=True, stable=True)
    q = queries[order]
    first = torch.ones_like(q, dtype=torch.bool)
    seen = set()
    for i, v in enumerate(q.tolist()):
        first[i] = v not in seen
        seen.add(v)
    return order[first]


def selector_recall(gt: BoxArrays, rankings: Dict) -> Dict[str, float]:
    """The selector's recall (in %) of each image's ground-truth categories: ``ARC@K`` (the
    paper's metric: (image, GT category) pairs whose category is among the image's K selected
    ones) and ``recall@{K/2, 2K}`` from the ranking beyond K.

    Args:
        gt: ground-truth boxes (dataset category ids).
        rankings: ``{image id: (K, dataset category ids best first, at least K of them)}``.
    """
    pairs = sorted(set(zip(gt["image_id"].tolist(), gt["category_id"].tolist())))
    ks = sorted({k for k, _ in rankings.values()})
    if len(ks) != 1:
        raise ValueError(f"images were ranked with different K: {ks}")
    k = ks[0]
    rank = {  # image id -> {category: its position in the ranking}
        i: {int(c): r for r, c in enumerate(ids.tolist())} for i, (_, ids) in rankings.items()
    }
    ranks = [rank[i].get(c, len(rank[i])) for i, c in pairs if i in rank]
    ranks = np.asarray(ranks, np.int64)
    out = {}
    for name, n in ((f"ARC@{k}", k), (f"recall@{max(k // 2, 1)}", max(k // 2, 1))):
        out[name] = 100.0 * float((ranks < n).mean()) if len(ranks) else float("nan")
    out[f"recall@{2 * k}"] = 100.0 * float((ranks < 2 * k).mean()) if len(ranks) else float("nan")
    return out


def _load_gt_json(json_file: str, image_ids: Optional[set]) -> BoxArrays:
    with open(json_file, encoding="utf-8") as f:
        anns = json.load(f)["annotations"]
    if image_ids is not None:
        anns = [a for a in anns if a["image_id"] in image_ids]
    n = len(anns)
    bbox = np.asarray([a["bbox"] for a in anns], np.float64).reshape(n, 4)
    return gt_arrays(
        [a["image_id"] for a in anns],
        [a["category_id"] for a in anns],
        bbox,
        area=[a.get("area", b[2] * b[3]) for a, b in zip(anns, bbox)],
        iscrowd=[a.get("iscrowd", 0) for a in anns],
    )


def _checked_metadata(dataset_name: str):
    """The metadata of a registered dataset with its categories (``thing_classes`` or
    ``thing_dataset_id_to_contiguous_id``). Datasets whose loader fills them (V3Det without the
    names txt) are loaded once; an unregistered or category-less dataset is an error."""
    if dataset_name not in DatasetCatalog.list():
        raise ValueError(
            f"V3DetEvaluator: dataset {dataset_name!r} is not registered in DatasetCatalog "
            "(import cqdino.data for v3det_* / synthetic_vocab_*, or register it first)"
        )
    meta = MetadataCatalog.get(dataset_name)

    def has_categories():
        return any(
            getattr(meta, k, None) is not None
            for k in ("thing_classes", "thing_dataset_id_to_contiguous_id")
        )

    if not has_categories():
        logger.info(f"{dataset_name}: no categories in the metadata yet; loading the dataset")
        DatasetCatalog.get(dataset_name)
    if not has_categories():
        raise ValueError(
            f"V3DetEvaluator: dataset {dataset_name!r} has no thing_classes or "
            "thing_dataset_id_to_contiguous_id in its metadata (MetadataCatalog); set them when "
            "registering it"
        )
    return meta


class V3DetEvaluator(DatasetEvaluator):
    """V3Det-style box AP (see module doc). Works for any registered detection dataset.

    Ground truth comes from ``metadata.json_file`` (COCO json, with its ``area``) when it exists,
    else from the dataset dicts (box areas). Only images that were processed are evaluated.
    """

    def __init__(
        self,
        dataset_name: str,
        tree: Union[None, str, CategoryTree] = "auto",
        max_dets_per_image: int = 300,
        num_workers: int = 0,
        output_dir: Optional[str] = None,
        distributed: bool = True,
        image_count: Optional[Sequence[int]] = None,
        class_agnostic: bool = False,
    ):
        """
        Args:
            dataset_name: a registered dataset.
            tree: hierarchy for the ignore rule: a :class:`CategoryTree`, a tree json path,
                None (plain COCO AP) or "auto" (``metadata.category_tree_file`` when it exists;
                a warning otherwise).
            max_dets_per_image: detections kept per image (300 for V3Det).
            num_workers: evaluation worker processes (0: in process).
            output_dir: where to save the compact predictions (``v3det_predictions.npz``) and
                the results (``results.json``: ``{"dataset", "bbox": {metric: value}}``), each
                written atomically.
            distributed: gather predictions from all ranks.
            image_count: training images per category (contiguous order) for frequency AP;
                default ``metadata.image_count``, else ``metadata.image_count_file`` (see
                :func:`load_image_count_file`), else counted from ``metadata.train_json_file``.
            class_agnostic: also report class-agnostic AP and AP50 (localisation alone).
        """
        self._dataset_name = dataset_name
        self._metadata = _checked_metadata(dataset_name)
        self._tree_arg = tree
        self._max_dets = int(max_dets_per_image)
        self._num_workers = num_workers
        self._output_dir = output_dir
        self._distributed = distributed
        self._image_count = image_count
        self._class_agnostic = class_agnostic
        self._cpu = torch.device("cpu")
        self._to_dataset = self._contiguous_to_dataset()  # contiguous id -> dataset id
        self.reset()

    def reset(self):
        self._predictions: List[tuple] = []
        self._rankings: Dict = {}  # image id -> (num_selected K, dataset ids best first)

    def _contiguous_to_dataset(self) -> np.ndarray:
        m = getattr(self._metadata, "thing_dataset_id_to_contiguous_id", None)
        if m is None:  # no mapping: contiguous ids are dataset ids
            return np.arange(len(self._metadata.thing_classes), dtype=np.int64)
        inv = np.zeros(len(m), np.int64)
        for d, c in m.items():
            inv[c] = d
        return inv

    def _dataset_ids(self, image_id, classes: np.ndarray, what: str = "detection") -> np.ndarray:
        """Dataset category ids of contiguous ``classes`` (of one image); out-of-range ids are
        an error (never wrapped around as numpy negative indices)."""
        C = len(self._to_dataset)
        bad = (classes < 0) | (classes >= C)
        if bad.any():
            kind = "predicted class" if what == "detection" else "category"
            raise ValueError(
                f"V3DetEvaluator({self._dataset_name!r}): image {image_id!r} has "
                f"{int(bad.sum())} {what}(s) with {kind} ids "
                f"{np.unique(classes[bad])[:10].tolist()} outside [0, {C}) "
                f"({C} categories in the metadata)"
            )
        return self._to_dataset[classes]

    def process(self, inputs, outputs):
        for inp, out in zip(inputs, outputs):
            if "category_ranking" in out:
                ranking = out["category_ranking"].to(self._cpu).numpy().astype(np.int64)
                ids = self._dataset_ids(inp["image_id"], ranking, "ranked category")
                self._rankings[inp["image_id"]] = (int(out["num_selected"]), ids)
            if "instances" not in out:
                continue
            inst = out["instances"].to(self._cpu)
            if self._class_agnostic and inst.has("pred_query"):
                inst = inst[_best_per_query(inst.pred_query, inst.scores)]
            scores = inst.scores
            if len(inst) > self._max_dets:
                keep = torch.topk(scores, self._max_dets).indices
                inst = inst[keep]
                scores = inst.scores
            boxes = inst.pred_boxes.tensor.numpy().astype(np.float64)
            boxes = BoxMode.convert(boxes, BoxMode.XYXY_ABS, BoxMode.XYWH_ABS)
            classes = self._dataset_ids(inp["image_id"], inst.pred_classes.numpy())
            self._predictions.append(
                (
                    inp["image_id"],
                    boxes.astype(np.float32),
                    scores.numpy().astype(np.float32),
                    classes,
                )
            )

    def _tree(self) -> Optional[CategoryTree]:
        t = self._tree_arg
        if isinstance(t, CategoryTree) or t is None:
            return t
        cat_ids = sorted(getattr(self._metadata, "thing_dataset_id_to_contiguous_id", {}))
        if t == "auto":
            t = getattr(self._metadata, "category_tree_file", None)
            if not t or not os.path.exists(t):
                logger.warning(
                    f"{self._dataset_name}: no category tree file ({t}); evaluating without the "
                    "hierarchy ignore rule"
                )
                return None
        return CategoryTree.from_v3det_json(t, cat_ids or None)

    def _image_counts(self) -> Optional[np.ndarray]:
        if self._image_count is not None:
            return np.asarray(self._image_count)
        ic = getattr(self._metadata, "image_count", None)
        if ic is not None:
            return np.asarray(ic)
        user_file = getattr(self._metadata, "image_count_file", None)
        if user_file:
            return load_image_count_file(user_file, self._to_dataset)
        train_json = getattr(self._metadata, "train_json_file", None)
        if train_json and os.path.exists(train_json):
            from cqdino.data.datasets import image_counts_from_json

            counts = image_counts_from_json(train_json)
            return np.asarray([counts.get(int(c), 0) for c in self._to_dataset])
        return None

    def evaluate(self, img_ids=None):
        if self._distributed:
            comm.synchronize()
            preds = list(itertools.chain(*comm.gather(self._predictions, dst=0)))
            rankings = {}
            for part in comm.gather(self._rankings, dst=0):
                rankings.update(part)
            if not comm.is_main_process():
                return {}
        else:
            preds, rankings = self._predictions, self._rankings
        if not preds:
            logger.warning("[V3DetEvaluator] Did not receive valid predictions.")
            return {}
        n = [len(p[1]) for p in preds]
        dt = dt_arrays(
            np.repeat([p[0] for p in preds], n),
            np.concatenate([p[3] for p in preds]),
            np.concatenate([p[1] for p in preds]),
            np.concatenate([p[2] for p in preds]),
        )
        if self._output_dir:
            path = os.path.join(self._output_dir, "v3det_predictions.npz")
            atomic_write(path, lambda f: np.savez(f, **dt))
        image_ids = {p[0] for p in preds}
        json_file = getattr(self._metadata, "json_file", None)
        if json_file and os.path.exists(json_file):
            gt = _load_gt_json(json_file, image_ids)
        else:
            gt = self._gt_from_dicts(image_ids)
        tree = self._tree()
        ancestors = None
        if tree is not None:
            ids = tree.category_ids
            ancestors = {
                ids[k]: [ids[a] for a in anc]
                for k, anc in enumerate(tree.category_ancestors())
                if anc
            }
        t0 = time.perf_counter()
        res = evaluate_boxes(
            gt,
            dt,
            self._to_dataset,
            ancestors=ancestors,
            max_dets_per_image=self._max_dets,
            num_workers=self._num_workers,
        )
        logger.info(f"V3Det-style evaluation took {time.perf_counter() - t0:.1f} s")
        results = self._derive_results(res)
        if rankings:
            results.update(selector_recall(gt, rankings))
        if self._class_agnostic:
            results.update(class_agnostic_ap(gt, dt, self._max_dets))
        if self._output_dir:  # the numbers next to the predictions, for scripts
            record = {"dataset": self._dataset_name, "bbox": results}
            atomic_write(
                os.path.join(self._output_dir, "results.json"),
                lambda f: json.dump(record, f, indent=1),
                mode="w",
            )
        return {"bbox": results}

    def _gt_from_dicts(self, image_ids: set) -> BoxArrays:
        dicts = [d for d in DatasetCatalog.get(self._dataset_name) if d["image_id"] in image_ids]
        rows = [(d["image_id"], a) for d in dicts for a in d.get("annotations", [])]
        boxes = np.asarray(
            [BoxMode.convert(list(a["bbox"]), a["bbox_mode"], BoxMode.XYWH_ABS) for _, a in rows],
            np.float64,
        ).reshape(-1, 4)
        classes = np.asarray([a["category_id"] for _, a in rows], np.int64)
        image_ids = [i for i, _ in rows]
        bad = np.flatnonzero((classes < 0) | (classes >= len(self._to_dataset)))
        if len(bad):  # raises, naming the first such image
            first = image_ids[bad[0]]
            self._dataset_ids(first, classes[np.asarray(image_ids) == first], "ground-truth box")
        return gt_arrays(
            image_ids,
            self._to_dataset[classes],
            boxes,
            iscrowd=[a.get("iscrowd", 0) for _, a in rows],
        )

    def _derive_results(self, res: dict) -> Dict[str, float]:
        stats = res["stats"]
        results = {k: 100 * v for k, v in stats.items()}
        logger.info(
            f"Evaluation results for bbox (maxDets {self._max_dets}): \n"
            + create_small_table(results)
        )
        per_cat_ap = res["precision"][:, :, 0].mean(axis=1)  # (K,)
        counts = self._image_counts()
        if counts is not None and len(counts) == len(per_cat_ap):
            rows = []
            for name, idx in frequency_groups(counts).items():
                ap = 100 * _nanmean(per_cat_ap[idx])
                results[f"AP{name[0]}"] = ap
                n_eval = int((~np.isnan(per_cat_ap[idx])).sum())
                rows.append((name, len(idx), n_eval, f"{ap:.3f}"))
            logger.info(
                "Per-frequency AP:\n"
                + tabulate(
                    rows, headers=["group", "#categories", "#with GT", "AP"], tablefmt="pipe"
                )
            )
        names = getattr(self._metadata, "thing_classes", None)
        for k, ap in enumerate(per_cat_ap):
            cid = int(res["category_ids"][k])
            key = f"AP-{names[k]}" if names is not None and k < len(names) else f"AP-{cid}"
            if key in results:  # repeated display name
                key = f"{key} (id {cid})"
            results[key] = float("nan") if np.isnan(ap) else 100 * float(ap)
        return results
