"""The selector's recall (ARC@K, recall@K/2, recall@2K) reported by the V3Det-style evaluator,
against a brute-force count over the ground truth of coco8, and the class-agnostic AP's rule of
one detection per object query."""

import json

import numpy as np
import pytest
import torch
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.datasets import register_coco_instances
from detectron2.structures import Boxes, Instances

from cqdino.evaluation.v3det_evaluation import V3DetEvaluator


def _register(shared_data, name="cqdino_test_arc_coco8_val"):
    root = shared_data / "coco8"
    jf = root / "annotations" / "coco8_val.json"
    if name in DatasetCatalog.list():
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)
    register_coco_instances(name, {}, str(jf), str(root))
    return name, DatasetCatalog.get(name), json.loads(jf.read_text())


def _one_box(h, w, cls, query=None):
    inst = Instances((h, w))
    inst.pred_boxes = Boxes(torch.tensor([[0.0, 0.0, 10.0, 10.0]]))
    inst.scores = torch.tensor([0.5])
    inst.pred_classes = torch.tensor([cls])
    if query is not None:
        inst.pred_query = torch.tensor([query])
    return inst


def test_arc_matches_a_brute_force_count(shared_data):
    name, dicts, gt = _register(shared_data)
    meta = MetadataCatalog.get(name)
    to_contig = meta.thing_dataset_id_to_contiguous_id
    C, K = len(meta.thing_classes), 4
    rng = np.random.default_rng(0)
    ev = V3DetEvaluator(name, tree=None, distributed=False)
    ev.reset()
    rankings = {}
    for rec in dicts:
        ranking = rng.permutation(C)[: 2 * K]
        present = sorted({a["category_id"] for a in rec["annotations"]})  # contiguous
        # put some GT categories at chosen ranks: first (in K/2), 3rd (in K), 6th (in 2K)
        for pos, c in zip((0, 2, 5), present):
            ranking = np.concatenate(
                [ranking[ranking != c][:pos], [c], ranking[ranking != c][pos:]]
            )
        ranking = ranking[: 2 * K]
        rankings[rec["image_id"]] = ranking
        out = {
            "instances": _one_box(rec["height"], rec["width"], int(ranking[0])),
            "category_ranking": torch.as_tensor(ranking),
            "num_selected": K,
        }
        ev.process([{"image_id": rec["image_id"]}], [out])
    res = ev.evaluate()["bbox"]
    # brute force: (image, GT category) pairs from the json, each looked up in its ranking
    from_contig = {v: k for k, v in to_contig.items()}
    pairs = {(a["image_id"], a["category_id"]) for a in gt["annotations"]}
    for key, n in ((f"ARC@{K}", K), (f"recall@{K // 2}", K // 2), (f"recall@{2 * K}", 2 * K)):
        hit = sum(cid in {from_contig[int(c)] for c in rankings[img][:n]} for img, cid in pairs)
        assert res[key] == pytest.approx(100.0 * hit / len(pairs)), key
    assert 0 < res[f"recall@{K // 2}"] < res[f"ARC@{K}"] <= res[f"recall@{2 * K}"] <= 100


def test_no_ranking_no_arc(shared_data):
    name, dicts, _ = _register(shared_data)
    ev = V3DetEvaluator(name, tree=None, distributed=False)
    ev.reset()
    for rec in dicts:
        ev.process(
            [{"image_id": rec["image_id"]}],
            [{"instances": _one_box(rec["height"], rec["width"], 0)}],
        )
    assert not [k for k in ev.evaluate()["bbox"] if k.startswith(("ARC", "recall@"))]


def test_class_agnostic_keeps_one_detection_per_query(shared_data):
    """A box named with three categories by one query counts once in the class-agnostic AP:
    the same AP as with the query's best-scoring detection alone (hand-built: two GT boxes
    found by queries 0 and 2, a false positive of query 1 between them)."""
    name, dicts, _ = _register(shared_data)
    rec = next(r for r in dicts if len(r["annotations"]) >= 2)
    h, w = rec["height"], rec["width"]
    gt_boxes = []
    for ann in rec["annotations"][:2]:
        x, y, bw, bh = ann["bbox"]
        gt_boxes.append([x, y, x + bw, y + bh])
    fp = [0.0, 0.0, 2.0, 2.0]

    def run(with_copies):
        rows = [(gt_boxes[0], 0.9, 0, 0), (fp, 0.8, 1, 1), (gt_boxes[1], 0.6, 2, 2)]
        if with_copies:  # query 1's box again with other classes, scores between the two TPs
            rows += [(fp, 0.75, 3, 1), (fp, 0.7, 4, 1)]
        inst = Instances((h, w))
        inst.pred_boxes = Boxes(torch.tensor([r[0] for r in rows], dtype=torch.float32))
        inst.scores = torch.tensor([r[1] for r in rows])
        inst.pred_classes = torch.tensor([r[2] for r in rows])
        inst.pred_query = torch.tensor([r[3] for r in rows])
        ev = V3DetEvaluator(name, tree=None, distributed=False, class_agnostic=True)
        ev.reset()
        ev.process([{"image_id": rec["image_id"]}], [{"instances": inst}])
        return ev.evaluate()["bbox"]

    one, copies = run(False), run(True)
    assert copies["AP-agnostic"] == pytest.approx(one["AP-agnostic"])
    assert copies["AP50-agnostic"] == pytest.approx(one["AP50-agnostic"])
    # without the rule the copies rank above the second TP: precision 2/5 there, not 2/3
    assert 0 < one["AP50-agnostic"] < 100
