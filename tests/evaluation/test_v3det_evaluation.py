import json
import logging

import numpy as np
import pytest
import torch
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.datasets import register_coco_instances
from detectron2.evaluation import COCOEvaluator
from detectron2.structures import Boxes, Instances

from cqdino.data import CategoryTree
from cqdino.evaluation import V3DetEvaluator, evaluate_boxes
from cqdino.evaluation.v3det_evaluation import dt_arrays, gt_arrays

from .coco_reference import (
    faster_coco_eval_stats,
    jittered_detections,
    pycocotools_stats,
    to_arrays,
    truncate,
)

KEYS = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR")


def _assert_stats_equal(ours, ref):
    for k in KEYS:
        r = ref[k]
        if r == -1 or np.isnan(r):  # no GT in that area range
            assert np.isnan(ours[k]), k
        else:
            assert ours[k] == pytest.approx(r, abs=1e-12), k


def _crosscheck(gt, dets, num_workers=0, chunk_size=64, refs=None):
    img_ids = {d["image_id"] for d in dets}
    g, d = to_arrays(gt, dets, img_ids)
    ours = evaluate_boxes(
        g, d, [c["id"] for c in gt["categories"]], num_workers=num_workers, chunk_size=chunk_size
    )["stats"]
    if refs is None:
        dets = truncate(dets, 300)
        refs = (pycocotools_stats(gt, dets), faster_coco_eval_stats(gt, dets))
    for ref in refs:
        _assert_stats_equal(ours, ref)
    return ours


def test_visdrone_real_detections(shared_data):
    d = shared_data / "eval_crosscheck"
    gt = json.loads((d / "sahi_visdrone2_gt.json").read_text())
    dets = json.loads((d / "sahi_visdrone2_dt.json").read_text())
    ours = _crosscheck(gt, dets)
    assert 0.05 < ours["AP"] < 0.1  # a real, weak detector; 0-based category ids


@pytest.fixture(scope="module")
def lvis_case(shared_data):
    """LVIS v0.5 subset (1,230 categories) with jittered predictions and both references."""
    gt = json.loads((shared_data / "eval_crosscheck" / "lvis_v0.5_val_100_gt.json").read_text())
    dets = jittered_detections(gt, np.random.default_rng(0))
    top = truncate(dets, 300)
    return gt, dets, (pycocotools_stats(gt, top), faster_coco_eval_stats(gt, top))


@pytest.mark.slow  # the dense pycocotools reference over 1,230 categories takes a few seconds
@pytest.mark.parametrize("num_workers", [0, 2])
def test_lvis_subset_jittered(lvis_case, num_workers):
    gt, dets, refs = lvis_case
    ours = _crosscheck(gt, dets, num_workers=num_workers, chunk_size=32, refs=refs)
    assert 0.1 < ours["AP"] < 0.9


def test_coco8_jittered(shared_data):
    gt = json.loads((shared_data / "coco8" / "annotations" / "coco8_train.json").read_text())
    for seed in range(3):
        _crosscheck(gt, jittered_detections(gt, np.random.default_rng(seed), per_image_fp=40))


def _grid_case(n_gt=150):
    """One image, one category, n_gt disjoint boxes; detections hit them with falling scores."""
    boxes = [[(i % 20) * 50.0, (i // 20) * 50.0, 40.0, 40.0] for i in range(n_gt)]
    gt = {
        "images": [{"id": 1, "width": 1000, "height": 1000}],
        "categories": [{"id": 5, "name": "x"}, {"id": 6, "name": "y"}],
        "annotations": [
            {"id": i + 1, "image_id": 1, "category_id": 5, "bbox": b, "area": 1600.0, "iscrowd": 0}
            for i, b in enumerate(boxes)
        ],
    }
    dets = [
        {"image_id": 1, "category_id": 5, "bbox": b, "score": 1.0 - i / 1000}
        for i, b in enumerate(boxes)
    ]
    return gt, dets


def test_300_detections_are_used():
    gt, dets = _grid_case()
    g, d = to_arrays(gt, dets)
    ours = evaluate_boxes(g, d, [5, 6])["stats"]
    # Detections 101..150 are all true positives: with maxDets 300 AP and AR are 1, with
    # COCO's default 100 AR would be 100/150.
    assert ours["AP"] == pytest.approx(1.0) and ours["AR"] == pytest.approx(1.0)
    assert faster_coco_eval_stats(gt, dets, max_dets=100)["AR"] == pytest.approx(100 / 150)
    _assert_stats_equal(ours, pycocotools_stats(gt, dets))

    # Per-image truncation over all categories: 210 higher-scoring detections of another
    # category push the 60 lowest-scoring true positives out of the image's top 300.
    extra = [
        {"image_id": 1, "category_id": 6, "bbox": [0, 0, 5, 5], "score": 2.0} for _ in range(210)
    ]
    g, d = to_arrays(gt, dets + extra)
    ours = evaluate_boxes(g, d, [5, 6])["stats"]
    assert ours["AR"] == pytest.approx(90 / 150)
    _assert_stats_equal(ours, faster_coco_eval_stats(gt, truncate(dets + extra, 300)))


def _hierarchy_case():
    # animal (id 1) is the parent of dog (id 2).
    tree = CategoryTree.from_parents(
        {"animal": [], "dog": ["animal"]}, [1, 2], {1: "animal", 2: "dog"}
    )
    A, B, C = [10, 10, 50, 50], [100, 100, 50, 50], [200, 200, 50, 50]
    gt = gt_arrays([1, 2, 3], [2, 1, 2], [A, B, C])  # dog, animal, dog
    dt = dt_arrays(
        [1, 2, 3, 2, 3],
        [2, 2, 2, 1, 1],
        [A, B, C, B, C],
        [0.9, 0.95, 0.85, 0.7, 0.8],
    )
    return tree, gt, dt


def test_hierarchy_rule_hand_built():
    tree, gt, dt = _hierarchy_case()
    anc = {2: [1]}
    assert tree.category_ancestors() == [[], [0]]
    plain = evaluate_boxes(gt, dt, [1, 2])
    hier = evaluate_boxes(gt, dt, [1, 2], ancestors=anc)
    # dog: detections 0.95 (on the animal box B), 0.9 TP, 0.85 TP; 2 dog GTs.
    #   plain: the first is a false positive -> interpolated precision 2/3 at every recall.
    #   with the tree: it matches the ignored copy of B -> AP 1.
    # animal: 0.8 on the dog box C is a false positive either way (a parent-class detection on
    #   a child box is not excused), 0.7 TP -> AP 1/2.
    ap = lambda r: r["precision"][:, :, 0].mean(axis=1)  # noqa: E731
    np.testing.assert_allclose(ap(plain), [0.5, 2 / 3])
    np.testing.assert_allclose(ap(hier), [0.5, 1.0])
    assert hier["stats"]["AP"] == pytest.approx(0.75)
    assert plain["stats"]["AP"] == pytest.approx((0.5 + 2 / 3) / 2)
    # The ignored copy is not a GT: dog recall stays 2/2, no extra GT to find.
    np.testing.assert_allclose(hier["recall"][:, :, 0].mean(axis=1), [1.0, 1.0])
    # A dog detection that does not overlap the animal box is still a false positive.
    far = [300, 300, 20, 20]
    dt2 = dt_arrays(
        [1, 2, 3], [2, 2, 2], [[10, 10, 50, 50], far, [200, 200, 50, 50]], [0.9, 0.95, 0.85]
    )
    res = evaluate_boxes(gt, dt2, [1, 2], ancestors=anc)
    np.testing.assert_allclose(res["precision"][1, :, 0].mean(), 2 / 3)


def _instances(boxes_xywh, scores, classes, h, w):
    b = torch.tensor(boxes_xywh, dtype=torch.float32).reshape(-1, 4)
    b[:, 2:] += b[:, :2]
    inst = Instances((h, w))
    inst.pred_boxes = Boxes(b)
    inst.scores = torch.tensor(scores, dtype=torch.float32)
    inst.pred_classes = torch.tensor(classes, dtype=torch.long)
    return inst


def test_dataset_evaluator_end_to_end(shared_data, tmp_path, caplog):
    root = shared_data / "coco8"
    jf = root / "annotations" / "coco8_val.json"
    name = "cqdino_test_coco8_val"
    if name in DatasetCatalog.list():
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)
    register_coco_instances(name, {}, str(jf), str(root))
    dicts = DatasetCatalog.get(name)  # sets thing_classes / id mapping
    meta = MetadataCatalog.get(name)
    gt = json.loads(jf.read_text())
    dets = jittered_detections(gt, np.random.default_rng(5), per_image_fp=30)
    to_contig = meta.thing_dataset_id_to_contiguous_id
    image_count = list(range(len(meta.thing_classes)))  # 0..79: 11 rare, 90 common... etc.

    out = tmp_path / "inference"
    ours = V3DetEvaluator(
        name, tree=None, distributed=False, image_count=image_count, output_dir=str(out)
    )
    d2 = COCOEvaluator(
        name, distributed=False, max_dets_per_image=300, use_fast_impl=False, output_dir=None
    )
    for ev in (ours, d2):
        ev.reset()
        for rec in dicts:
            ds = [x for x in dets if x["image_id"] == rec["image_id"]]
            inst = _instances(
                [x["bbox"] for x in ds],
                [x["score"] for x in ds],
                [to_contig[x["category_id"]] for x in ds],
                rec["height"],
                rec["width"],
            )
            ev.process([{"image_id": rec["image_id"]}], [{"instances": inst}])
    with caplog.at_level(logging.INFO):
        res = ours.evaluate()["bbox"]
    ref = pycocotools_stats(gt, truncate(dets, 300))
    assert res["AP"] == pytest.approx(100 * ref["AP"], abs=1e-4)
    assert res["AP50"] == pytest.approx(100 * ref["AP50"], abs=1e-4)
    # detectron2's COCOEvaluator (pycocotools path) on the same predictions: float32 boxes,
    # so equal to ~1e-4 AP points.
    d2_res = d2.evaluate()["bbox"]
    for k in ("AP", "AP50", "AP75"):
        assert res[k] == pytest.approx(d2_res[k], abs=1e-3), k
    # Frequency groups from image_count: rare <= 10, common 11..100, frequent > 100.
    per_cat = np.array([res[f"AP-{n}"] for n in meta.thing_classes])
    assert res["APr"] == pytest.approx(np.nanmean(per_cat[:11]))
    assert res["APc"] == pytest.approx(np.nanmean(per_cat[11:]))
    assert np.isnan(res["APf"])
    assert "Per-frequency AP" in caplog.text
    # the output folder: the predictions (fewer than 300 per image here: all) and the results
    saved = np.load(out / "v3det_predictions.npz")
    assert len(saved["score"]) == len(dets)
    record = json.loads((out / "results.json").read_text())
    assert record["dataset"] == name and record["bbox"]["AP"] == pytest.approx(res["AP"])
    assert sorted(p.name for p in out.iterdir()) == ["results.json", "v3det_predictions.npz"]


def test_v3det_frequency_groups_from_cat_info(shared_data, tmp_path):
    from cqdino.evaluation.v3det_evaluation import frequency_groups, load_image_count_file

    path = shared_data / "categories" / "v3det_2023_v1_train_cat_info.json"
    counts = load_image_count_file(str(path), range(1, 13205))
    assert counts[0] == 45  # ashtray
    groups = frequency_groups(counts)
    assert {k: len(v) for k, v in groups.items()} == {
        "rare": 1218,
        "common": 11492,
        "frequent": 494,
    }
    (tmp_path / "c.json").write_text(json.dumps({"3": 7, "1": 200}))
    assert load_image_count_file(str(tmp_path / "c.json"), [1, 2, 3]).tolist() == [200, 0, 7]
    (tmp_path / "bad.json").write_text(json.dumps([{"id": 1}]))
    with pytest.raises(ValueError, match="bad.json"):
        load_image_count_file(str(tmp_path / "bad.json"), [1])


def test_unknown_category_is_an_error():
    g = gt_arrays([1], [3], [[0, 0, 5, 5]])
    d = dt_arrays([1], [4], [[0, 0, 5, 5]], [0.5])
    with pytest.raises(ValueError, match=r"detections use unknown category ids \[4\]"):
        evaluate_boxes(g, d, [1, 2, 3])


def test_evaluator_on_synthetic_with_tree_file(tmp_path):
    from cqdino.data import register_synthetic_vocab

    small = dict(num_categories=40, num_train_images=30, num_val_images=10, seed=1)
    register_synthetic_vocab(str(tmp_path), **small)
    try:
        dicts = DatasetCatalog.get("synthetic_vocab_val")
        DatasetCatalog.get("synthetic_vocab_train")
        results = {}
        for tree in ("auto", None):
            ev = V3DetEvaluator("synthetic_vocab_val", tree=tree, distributed=False)
            ev.reset()
            for rec in dicts:
                anns = rec["annotations"]
                inst = _instances(
                    [a["bbox"] for a in anns],
                    [1.0] * len(anns),
                    [a["category_id"] for a in anns],
                    rec["height"],
                    rec["width"],
                )
                ev.process([{"image_id": rec["image_id"]}], [{"instances": inst}])
            assert ev._tree() is None if tree is None else ev._tree().num_categories == 40
            results[tree] = ev.evaluate()["bbox"]
        for res in results.values():
            assert res["AP"] == pytest.approx(100.0)  # perfect predictions
            # image counts come from the train json named in the metadata
            assert {"APr", "APc", "APf"} <= set(res)
        assert not hasattr(MetadataCatalog.get("synthetic_vocab_val"), "image_count")
    finally:
        register_synthetic_vocab()


def test_build_evaluator_picks_by_type(shared_data):
    import cqdino.data  # noqa: F401  (registers the datasets)
    from cqdino.evaluation import build_evaluator

    assert isinstance(build_evaluator("synthetic_vocab_val"), V3DetEvaluator)
    name = "cqdino_test_coco8_train"
    if name not in DatasetCatalog.list():
        root = shared_data / "coco8"
        register_coco_instances(name, {}, str(root / "annotations" / "coco8_train.json"), str(root))
    ev = build_evaluator(name)
    assert isinstance(ev, COCOEvaluator) and ev._use_fast_impl is False


def test_hierarchy_copies_match_a_plain_loop():
    from cqdino.evaluation.v3det_evaluation import add_hierarchy_ignores

    rng = np.random.default_rng(0)
    ancestors = {2: [1], 3: [1], 4: [3, 1], 6: [5], 7: [5, 9]}
    gt = gt_arrays(
        rng.integers(1000, 1030, 200), rng.integers(1, 10, 200), rng.uniform(1, 50, (200, 4))
    )
    dt = dt_arrays(
        rng.integers(1000, 1030, 300),
        rng.integers(1, 10, 300),
        rng.uniform(1, 50, (300, 4)),
        rng.random(300),
    )
    out = add_hierarchy_ignores(gt, dt, ancestors)
    n = len(gt)
    assert (out["ignore"][:n] == 0).all() and (out["ignore"][n:] == 1).all()
    got = sorted(
        (int(i), int(c), tuple(b))
        for i, c, b in zip(out["image_id"][n:], out["category_id"][n:], out["bbox"][n:].tolist())
    )
    expect = []
    for img, d in sorted({(int(i), int(c)) for i, c in zip(dt["image_id"], dt["category_id"])}):
        for a in ancestors.get(d, []):
            for j in range(n):
                if gt["image_id"][j] == img and gt["category_id"][j] == a:
                    expect.append((img, d, tuple(gt["bbox"][j].tolist())))
    assert len(expect) > 20 and got == sorted(expect)


def _register_tiny(name, num_classes=3, with_metadata=True):
    """A registered dataset of one 20x20 image with one box per class (dataset ids 10, 20, ..)."""
    if name in DatasetCatalog.list():
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)
    anns = [
        {"bbox": [1.0 + c, 1.0, 5.0, 5.0], "bbox_mode": 1, "category_id": c}
        for c in range(num_classes)
    ]
    DatasetCatalog.register(
        name, lambda: [{"image_id": 7, "height": 20, "width": 20, "annotations": anns}]
    )
    if with_metadata:
        MetadataCatalog.get(name).set(
            thing_classes=[f"c{c}" for c in range(num_classes)],
            thing_dataset_id_to_contiguous_id={10 * (c + 1): c for c in range(num_classes)},
        )


@pytest.mark.parametrize("bad_id", [-1, 3, 100])
def test_predicted_class_ids_out_of_range_name_image_and_id(bad_id):
    name = "cqdino_test_tiny_classes"
    _register_tiny(name)
    ev = V3DetEvaluator(name, tree=None, distributed=False)
    good = _instances([[1, 1, 5, 5]], [0.9], [2], 20, 20)
    ev.process([{"image_id": 7}], [{"instances": good}])
    bad = _instances([[1, 1, 5, 5], [2, 2, 5, 5]], [0.9, 0.8], [0, bad_id], 20, 20)
    with pytest.raises(ValueError, match=rf"image 8 .*class ids \[{bad_id}\] outside \[0, 3\)"):
        ev.process([{"image_id": 8}], [{"instances": bad}])
    # id 2 (the last category, where -1 used to wrap to) maps to dataset id 30
    assert ev._predictions[0][3].tolist() == [30] and len(ev._predictions) == 1


def test_evaluator_on_unregistered_or_category_less_dataset_fails_at_construction():
    with pytest.raises(ValueError, match="'cqdino_test_not_registered' is not registered"):
        V3DetEvaluator("cqdino_test_not_registered", distributed=False)
    name = "cqdino_test_no_metadata"
    _register_tiny(name, with_metadata=False)
    with pytest.raises(ValueError, match=f"{name!r} has no thing_classes"):
        V3DetEvaluator(name, distributed=False)


def test_ground_truth_class_ids_out_of_range_from_dicts_name_the_image():
    name = "cqdino_test_tiny_bad_gt"
    _register_tiny(name)
    DatasetCatalog.remove(name)
    anns = [{"bbox": [1.0, 1.0, 5.0, 5.0], "bbox_mode": 1, "category_id": c} for c in (0, -1)]
    DatasetCatalog.register(
        name, lambda: [{"image_id": 5, "height": 20, "width": 20, "annotations": anns}]
    )
    ev = V3DetEvaluator(name, tree=None, distributed=False)
    ev.process([{"image_id": 5}], [{"instances": _instances([[1, 1, 5, 5]], [0.9], [0], 20, 20)}])
    with pytest.raises(
        ValueError, match=r"image 5 has 1 ground-truth box\(s\) with category ids \[-1\]"
    ):
        ev.evaluate()


def test_class_agnostic_ap_matches_pycocotools_with_one_category(shared_data):
    from cqdino.evaluation.v3det_evaluation import class_agnostic_ap

    from .coco_reference import pycocotools_stats, to_arrays

    gt = json.loads((shared_data / "coco8" / "annotations" / "coco8_train.json").read_text())
    dets = jittered_detections(gt, np.random.default_rng(7), per_image_fp=40)
    g, d = to_arrays(gt, dets, {x["image_id"] for x in dets})
    got = class_agnostic_ap(g, d, 300)
    # the reference: pycocotools on the same boxes with every category set to one
    one = {**gt, "categories": [{"id": 1, "name": "object"}]}
    one["annotations"] = [{**a, "category_id": 1} for a in gt["annotations"]]
    ref = pycocotools_stats(one, [{**x, "category_id": 1} for x in dets], 300)
    assert got["AP-agnostic"] == pytest.approx(100 * ref["AP"], abs=1e-6)
    assert got["AP50-agnostic"] == pytest.approx(100 * ref["AP50"], abs=1e-6)
    # the detections' classes do not matter
    d2 = {**d, "category_id": np.roll(d["category_id"], 3)}
    assert class_agnostic_ap(g, type(d)(d2), 300) == got
