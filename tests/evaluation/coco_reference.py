"""Independent references for the evaluator tests: pycocotools and faster-coco-eval run densely
on the whole problem (maxDets [1, 10, N]), summarised at maxDets N from ``precision``."""

import contextlib
import copy
import io

import numpy as np

from cqdino.evaluation.v3det_evaluation import dt_arrays, gt_arrays


def _stats_from_precision(precision: np.ndarray, recall: np.ndarray) -> dict:
    """COCO summary at the last maxDets index, computed from the raw arrays."""

    def mean(s):
        s = s[s > -1]
        return float(s.mean()) if s.size else float("nan")

    return {
        "AP": mean(precision[:, :, :, 0, -1]),
        "AP50": mean(precision[0, :, :, 0, -1]),
        "AP75": mean(precision[5, :, :, 0, -1]),
        "APs": mean(precision[:, :, :, 1, -1]),
        "APm": mean(precision[:, :, :, 2, -1]),
        "APl": mean(precision[:, :, :, 3, -1]),
        "AR": mean(recall[:, :, 0, -1]),
    }


def truncate(dets: list, max_dets: int) -> list:
    """Each image's ``max_dets`` best detections (plain Python, independent of the library)."""
    by_img = {}
    for d in dets:
        by_img.setdefault(d["image_id"], []).append(d)
    out = []
    for ds in by_img.values():
        out += sorted(ds, key=lambda d: -d["score"])[:max_dets]
    return out


def _with_iscrowd(gt: dict) -> dict:
    gt = copy.deepcopy(gt)
    for a in gt["annotations"]:
        a.setdefault("iscrowd", 0)
    return gt


def pycocotools_stats(gt: dict, dets: list, max_dets: int = 300) -> dict:
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    with contextlib.redirect_stdout(io.StringIO()):
        cg = COCO()
        cg.dataset = _with_iscrowd(gt)
        cg.createIndex()
        cd = cg.loadRes(copy.deepcopy(dets))
        ev = COCOeval(cg, cd, "bbox")
        ev.params.maxDets = [1, 10, max_dets]
        ev.params.imgIds = sorted({d["image_id"] for d in dets})
        ev.evaluate()
        ev.accumulate()
    return _stats_from_precision(ev.eval["precision"], ev.eval["recall"])


def faster_coco_eval_stats(gt: dict, dets: list, max_dets: int = 300) -> dict:
    from faster_coco_eval import COCO
    from faster_coco_eval.core.faster_eval_api import COCOeval_faster

    cg = COCO(_with_iscrowd(gt))
    cd = cg.loadRes(copy.deepcopy(dets))
    ev = COCOeval_faster(cg, cd, "bbox", print_function=lambda *a: None)
    ev.params.maxDets = [1, 10, max_dets]
    ev.params.imgIds = sorted({d["image_id"] for d in dets})
    ev.evaluate()
    ev.accumulate()
    ev.summarize()
    s = ev.stats
    return {
        "AP": s[0],
        "AP50": s[1],
        "AP75": s[2],
        "APs": s[3],
        "APm": s[4],
        "APl": s[5],
        "AR": s[8],
    }


def to_arrays(gt: dict, dets: list, image_ids=None):
    """Column arrays of a COCO gt dict and a detection list (GT restricted to ``image_ids``)."""
    anns = [a for a in gt["annotations"] if image_ids is None or a["image_id"] in image_ids]
    g = gt_arrays(
        [a["image_id"] for a in anns],
        [a["category_id"] for a in anns],
        [a["bbox"] for a in anns],
        area=[a["area"] for a in anns],
        iscrowd=[a.get("iscrowd", 0) for a in anns],
    )
    d = dt_arrays(
        [x["image_id"] for x in dets],
        [x["category_id"] for x in dets],
        [x["bbox"] for x in dets],
        [x["score"] for x in dets],
    )
    return g, d


def jittered_detections(gt: dict, rng: np.random.Generator, per_image_fp: int = 5) -> list:
    """Predictions from GT: jittered true boxes (some with a wrong class), dropped ones and
    random false positives, random scores."""
    cats = [c["id"] for c in gt["categories"]]
    imgs = {im["id"]: im for im in gt["images"]}
    dets = []
    for a in gt["annotations"]:
        if rng.random() < 0.15:
            continue
        x, y, w, h = a["bbox"]
        j = rng.normal(0, 0.12, 4) * [w, h, w, h]
        box = [x + j[0], y + j[1], max(1.0, w + j[2]), max(1.0, h + j[3])]
        cat = a["category_id"] if rng.random() > 0.1 else int(rng.choice(cats))
        dets.append(dict(image_id=a["image_id"], category_id=cat, bbox=box, score=rng.random()))
    for im in imgs.values():
        for _ in range(per_image_fp):
            w, h = rng.uniform(4, im["width"] / 2), rng.uniform(4, im["height"] / 2)
            x, y = rng.uniform(0, im["width"] - w), rng.uniform(0, im["height"] - h)
            dets.append(
                dict(
                    image_id=im["id"],
                    category_id=int(rng.choice(cats)),
                    bbox=[x, y, w, h],
                    score=0.5 * rng.random(),
                )
            )
    return dets
