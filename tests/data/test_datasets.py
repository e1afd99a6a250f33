import json
import os
import subprocess
import sys

import numpy as np
import pytest
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.datasets import load_coco_json
from detectron2.data.samplers import RepeatFactorTrainingSampler
from detectron2.structures import BoxMode

from cqdino.data import (
    CategoryTree,
    category_tree_file,
    image_counts_from_json,
    load_detection_json,
    read_category_names,
    register_synthetic_vocab,
    register_v3det,
    repeat_factors_from_category_frequency,
    synthetic,
)
from cqdino.data.synthetic import workers as synthetic_workers
from cqdino.data.synthetic.render import _zipf_probs


def test_v3det_names_txt(shared_data):
    txt = shared_data / "categories" / "category_name_13204_v3det_2023_v1.txt"
    names = read_category_names(txt)
    assert len(names) == 13204
    assert names[0] == "ashtray" and names[1] == "cash machine"
    assert not any("\r" in n or "\n" in n for n in names)
    with open(shared_data / "categories" / "v3det_2023_v1_train_cat_info.json") as f:
        info = json.load(f)
    # The info file's names are the json's names; most agree with the txt (40 differ).
    differ = sum(1 for c in info if c["name"] != names[c["id"] - 1])
    assert 0 < differ <= 60


def test_loader_matches_detectron2_coco_loader(shared_data):
    root = shared_data / "coco8"
    jf = str(root / "annotations" / "coco8_val.json")
    ours = load_detection_json(jf, str(root))
    ref = load_coco_json(jf, str(root), "coco8_ref_for_test")
    ref_map = MetadataCatalog.get("coco8_ref_for_test").thing_dataset_id_to_contiguous_id
    assert len(ours) == len(ref) == 4
    ref_by_id = {d["image_id"]: d for d in ref}
    for d in ours:
        r = ref_by_id[d["image_id"]]
        assert d["file_name"] == r["file_name"]
        assert (d["height"], d["width"]) == (r["height"], r["width"])
        got = [(a["category_id"], tuple(a["bbox"])) for a in d["annotations"]]
        exp = [(a["category_id"], tuple(a["bbox"])) for a in r["annotations"]]
        assert got == exp
        assert all(a["bbox_mode"] == BoxMode.XYWH_ABS for a in d["annotations"])
    with open(jf) as f:
        ids = sorted(c["id"] for c in json.load(f)["categories"])
    assert ref_map == {c: i for i, c in enumerate(ids)}


def _write_v3det(root, anns_extra=()):
    cats = [{"id": i, "name": n} for i, n in [(1, "door"), (2, "cat"), (3, "door")]]
    images = [
        {"id": 10, "file_name": "a/1.jpg", "height": 50, "width": 60},
        {"id": 11, "file_name": "b/2.jpg", "height": 50, "width": 60},
    ]
    anns = [
        {"id": 1, "image_id": 10, "category_id": 3, "bbox": [1, 2, 10, 20], "iscrowd": 0},
        {"id": 2, "image_id": 10, "category_id": 3, "bbox": [5, 5, 10, 10], "iscrowd": 0},
        {"id": 3, "image_id": 11, "category_id": 3, "bbox": [5, 5, 10, 10], "iscrowd": 0},
        {"id": 4, "image_id": 11, "category_id": 1, "bbox": [5, 5, 10, 10], "iscrowd": 0},
        *anns_extra,
    ]
    ann_dir = root / "V3Det" / "annotations"
    ann_dir.mkdir(parents=True, exist_ok=True)
    for split in ("train", "val"):
        data = {"images": images, "annotations": anns, "categories": cats}
        (ann_dir / f"v3det_2023_v1_{split}.json").write_text(json.dumps(data))
    (root / "V3Det" / "category_name_13204_v3det_2023_v1.txt").write_bytes(
        b"door\r\ncat\r\nsliding door\r\n"
    )


def test_register_v3det(tmp_path):
    _write_v3det(tmp_path)
    register_v3det(str(tmp_path))
    try:
        meta = MetadataCatalog.get("v3det_val")
        assert meta.thing_classes == ["door", "cat", "sliding door"]  # from the txt, not json
        assert meta.thing_dataset_id_to_contiguous_id == {1: 0, 2: 1, 3: 2}
        assert meta.category_tree_file.endswith("v3det_2023_v1_category_tree.json")
        dicts = DatasetCatalog.get("v3det_train")
        assert [d["image_id"] for d in dicts] == [10, 11]
        assert dicts[0]["file_name"] == os.path.join(str(tmp_path), "V3Det", "images", "a/1.jpg")
        assert [a["category_id"] for a in dicts[1]["annotations"]] == [2, 0]
        # image counts per category: id1 -> 1 image, id2 -> 0, id3 -> 2 images (train only)
        assert MetadataCatalog.get("v3det_train").image_count == [1, 0, 2]
        DatasetCatalog.get("v3det_val")
        assert not hasattr(MetadataCatalog.get("v3det_val"), "image_count")
        assert image_counts_from_json(meta.train_json_file) == {1: 1, 2: 0, 3: 2}
    finally:
        register_v3det()  # back to the default root


def test_loader_rejects_unknown_ids(tmp_path):
    _write_v3det(tmp_path, [{"id": 9, "image_id": 11, "category_id": 77, "bbox": [0, 0, 1, 1]}])
    jf = str(tmp_path / "V3Det" / "annotations" / "v3det_2023_v1_val.json")
    with pytest.raises(ValueError, match="annotation 9 of image 11 has unknown category id 77"):
        load_detection_json(jf, str(tmp_path))
    _write_v3det(tmp_path, [{"id": 8, "image_id": 99, "category_id": 1, "bbox": [0, 0, 1, 1]}])
    with pytest.raises(ValueError, match="annotation 8 refers to unknown image id 99"):
        load_detection_json(jf, str(tmp_path))


def test_repeat_factors_match_detectron2():
    rng = np.random.default_rng(0)
    dicts = []
    for _ in range(200):
        n = int(rng.integers(0, 5))
        cats = rng.zipf(1.5, size=n) % 40
        dicts.append({"annotations": [{"category_id": int(c)} for c in cats]})
    for t in (1e-3, 0.05, 0.3):
        ours = repeat_factors_from_category_frequency(dicts, t)
        ref = RepeatFactorTrainingSampler.repeat_factors_from_category_frequency(dicts, t)
        np.testing.assert_allclose(ours.numpy(), ref.numpy(), rtol=1e-6)
    # Hand case: 4 images; category 7 in 1 of 4 images -> f = 0.25, t = 1 -> r = 2.
    hand = (
        [{"annotations": [{"category_id": 7}, {"category_id": 1}]}]
        + [{"annotations": [{"category_id": 1}]}] * 2
        + [{"annotations": []}]
    )
    r1 = (1 / 0.75) ** 0.5  # category 1 is in 3 of 4 images
    np.testing.assert_allclose(
        repeat_factors_from_category_frequency(hand, 1.0).numpy(), [2.0, r1, r1, 1.0], rtol=1e-6
    )
    with pytest.raises(ValueError):
        repeat_factors_from_category_frequency(hand, 0.0)


SMALL = dict(num_categories=60, num_train_images=24, num_val_images=8, seed=3)


def _read(path):
    with open(path, "rb") as f:
        return f.read()


def _tree(root):
    """{relative path: bytes} of every file under ``root``."""
    out = {}
    for folder, _, files in os.walk(root):
        for name in files:
            path = os.path.join(folder, name)
            out[os.path.relpath(path, root)] = _read(path)
    return out


def test_synthetic_generator_deterministic_and_valid(tmp_path, monkeypatch):
    a = synthetic.generate(tmp_path / "a", **SMALL, workers=1)
    monkeypatch.setattr(synthetic_workers, "_CHUNK", 5)  # several chunks per split, out of order
    b = synthetic.generate(tmp_path / "b", **SMALL, workers=3)
    c = synthetic.generate(tmp_path / "c", **{**SMALL, "seed": 4})
    # rendered in this process or by 3 processes: the same files, byte for byte
    tree_a = _tree(a)
    assert len(tree_a) == 24 + 8 + 5 and tree_a == _tree(b)
    for rel in ("annotations/synthetic_vocab_train.json", "images/train/000005.jpg"):
        assert _read(os.path.join(a, rel)) != _read(os.path.join(c, rel))
    with pytest.raises(ValueError, match="workers"):
        synthetic.generate(tmp_path / "e", **SMALL, workers=0)
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".")]  # no temp leftovers
    with open(os.path.join(a, "annotations", "synthetic_vocab_train.json")) as f:
        data = json.load(f)
    assert len(data["categories"]) == 60 and len(data["images"]) == 24
    sizes = {im["id"]: (im["width"], im["height"]) for im in data["images"]}
    per_image = {}
    for ann in data["annotations"]:
        x, y, w, h = ann["bbox"]
        W, H = sizes[ann["image_id"]]
        assert w > 0 and h > 0 and x >= 0 and y >= 0 and x + w <= W and y + h <= H
        per_image[ann["image_id"]] = per_image.get(ann["image_id"], 0) + 1
    assert max(per_image.values()) >= 3  # several objects per image
    from PIL import Image

    im = data["images"][0]
    with Image.open(os.path.join(a, "images", im["file_name"])) as img:
        assert img.size == (im["width"], im["height"])

    tree = CategoryTree.from_v3det_json(os.path.join(a, "category_tree.json"))
    assert tree.num_categories == 60
    dag = tree.category_dag()
    # Shape categories (ids 1..12) are parents of leaves through a non-category node.
    assert max(dag.height) == 1 and len(dag.levels[1]) >= 10
    assert all(tree.parents(c)[0].count(".") == 2 for c in range(13, 61))


def test_synthetic_vocabulary_long_tail():
    cats = synthetic.vocabulary(13204)
    assert len(cats) == 13204 and len({c["name"] for c in cats}) == 13204
    probs = _zipf_probs(1000, 1.1, 0)
    top = np.sort(probs)[::-1]
    assert top[:10].sum() > 0.2 and (probs < 1 / 1000).mean() > 0.8  # few frequent, most rare
    with pytest.raises(ValueError):
        synthetic.vocabulary(10)


def test_synthetic_registration_generates_on_first_use(tmp_path):
    register_synthetic_vocab(str(tmp_path), **SMALL)
    try:
        dicts = DatasetCatalog.get("synthetic_vocab_val")
        assert len(dicts) == 8 and os.path.isfile(dicts[0]["file_name"])
        meta = MetadataCatalog.get("synthetic_vocab_val")
        assert len(meta.thing_classes) == 60 and os.path.isfile(meta.category_tree_file)
        assert len(DatasetCatalog.get("synthetic_vocab_train")) == 24
        with pytest.raises(ValueError, match="other parameters"):
            synthetic.ensure_generated(str(tmp_path / "synthetic_vocab"), **{**SMALL, "seed": 9})
    finally:
        register_synthetic_vocab()


def test_synthetic_cli_help_shows_defaults(capsys):
    with pytest.raises(SystemExit):
        synthetic.main(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "(default: 1000)" in text and "--image-size MIN MAX" in text
    assert "(default: [256, 320])" in text


def test_synthetic_cli_non_default_sizes_load_through_the_catalog(tmp_path):
    out = tmp_path / "synthetic_vocab"
    args = ["--out", str(out), "--num-categories", "70", "--num-train-images", "5"]
    args += ["--num-val-images", "3", "--image-size", "40", "56", "--seed", "2"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    # -W error: runpy's "found in sys.modules" RuntimeWarning would fail the run
    cmd = [sys.executable, "-W", "error::RuntimeWarning", "-m", "cqdino.data.synthetic", *args]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "RuntimeWarning" not in proc.stderr
    register_synthetic_vocab(str(tmp_path))  # no generation arguments: the folder is the truth
    try:
        meta = MetadataCatalog.get("synthetic_vocab_train")
        assert len(meta.thing_classes) == 70
        dicts = DatasetCatalog.get("synthetic_vocab_train")
        assert len(dicts) == 5 and len(DatasetCatalog.get("synthetic_vocab_val")) == 3
        assert all(40 <= d["width"] <= 56 and 40 <= d["height"] <= 56 for d in dicts)
        names = [c["name"] for c in synthetic.vocabulary(70, 2)]
        assert meta.thing_classes == names and len(meta.image_count) == 70
        assert {a["category_id"] for d in dicts for a in d["annotations"]} <= set(range(70))
    finally:
        register_synthetic_vocab()


def test_synthetic_folder_generated_after_registration_wins(tmp_path):
    register_synthetic_vocab(str(tmp_path))  # folder absent: metadata of the 1,000-class demo
    try:
        assert len(MetadataCatalog.get("synthetic_vocab_val").thing_classes) == 1000
        synthetic.generate(tmp_path / "synthetic_vocab", **SMALL)  # 60 classes
        dicts = DatasetCatalog.get("synthetic_vocab_val")
        assert len(dicts) == 8
        meta = MetadataCatalog.get("synthetic_vocab_val")
        assert meta.thing_classes == [c["name"] for c in synthetic.vocabulary(60, 3)]
        assert meta.thing_dataset_id_to_contiguous_id == {i + 1: i for i in range(60)}
        assert meta.evaluator_type == "v3det"  # the other metadata survives the refresh
    finally:
        register_synthetic_vocab()


def test_synthetic_meta_json_of_another_format_is_a_clear_error(tmp_path):
    out = tmp_path / "synthetic_vocab"
    synthetic.generate(out, **{**SMALL, "num_train_images": 1, "num_val_images": 1})
    (out / "meta.json").write_text(json.dumps({"format_version": 0}))
    register_synthetic_vocab(str(tmp_path))  # registration (on import) does not raise
    try:
        with pytest.raises(ValueError, match=r"meta.json: format version 0.*--overwrite"):
            DatasetCatalog.get("synthetic_vocab_train")
    finally:
        register_synthetic_vocab()


def test_category_tree_file_from_v3det_registration(tmp_path, monkeypatch):
    from detectron2.config import LazyCall as L
    from detectron2.config import instantiate

    monkeypatch.setenv("DETECTRON2_DATASETS", str(tmp_path))
    register_v3det()
    try:
        want = str(tmp_path / "V3Det" / "annotations" / "v3det_2023_v1_category_tree.json")
        with pytest.raises(FileNotFoundError, match=f"'v3det_train' not found: {want}"):
            category_tree_file("v3det_train")
        assert category_tree_file("v3det_train", must_exist=False) == want
        os.makedirs(os.path.dirname(want))
        with open(want, "w") as f:
            f.write("{}")
        assert instantiate(L(category_tree_file)(dataset_name="v3det_train")) == want
        assert category_tree_file("v3det_val") == want
    finally:
        monkeypatch.undo()
        register_v3det()


def test_category_tree_file_errors_and_synthetic(tmp_path):
    with pytest.raises(KeyError, match="'cqdino_test_unregistered' is not registered"):
        category_tree_file("cqdino_test_unregistered")
    name = "cqdino_test_no_tree"
    if name not in DatasetCatalog.list():
        DatasetCatalog.register(name, lambda: [])
    with pytest.raises(ValueError, match=f"{name!r} has no category tree"):
        category_tree_file(name)
    register_synthetic_vocab(str(tmp_path), **SMALL)
    try:  # the synthetic folder is generated on demand, its tree read back
        path = category_tree_file("synthetic_vocab_train")
        assert path == str(tmp_path / "synthetic_vocab" / "category_tree.json")
        assert CategoryTree.from_v3det_json(path).num_categories == 60
    finally:
        register_synthetic_vocab()


def test_category_quotas_hand_computed():
    probs = np.array([0.5, 0.3, 0.2])
    # floor 2 each, the other 4 by largest remainders of [2.0, 1.2, 0.8] -> [2, 1, 1]
    assert synthetic.category_quotas(10, probs, 2).tolist() == [4, 3, 3]
    # 4 objects cannot give 3 categories 2 each: the floor drops to 1
    assert synthetic.category_quotas(4, probs, 2).tolist() == [2, 1, 1]
    assert synthetic.category_quotas(7, probs, 0).tolist() == [4, 2, 1]  # 3.5, 2.1, 1.4


def test_demo_regime_every_category_has_boxes_and_a_long_tail():
    leaves = synthetic.DEMO_CONFIG["num_categories"] - len(synthetic.SHAPES)
    probs = _zipf_probs(leaves, 0.8, 0)
    quotas = synthetic.category_quotas(4000 * 4, probs, 5)  # ~4.5 objects per train image
    assert quotas.min() >= 5 and quotas.max() >= 20 * quotas.min()


def test_synthetic_split_floor_and_image_seed(tmp_path):
    kw = dict(SMALL, num_train_images=40, min_train_objects=3, max_objects=4)
    a = synthetic.generate(tmp_path / "a", **kw)
    b = synthetic.generate(tmp_path / "b", **kw, image_seed=1)
    with open(os.path.join(a, "annotations", "synthetic_vocab_train.json")) as f:
        train = json.load(f)
    counts = np.bincount([x["category_id"] for x in train["annotations"]], minlength=61)[13:]
    assert (counts > 0).mean() > 0.95  # a floor of 3 objects; occlusion drops a few
    for rel in ("category_tree.json", "category_names.txt"):  # same vocabulary and tree
        assert _read(os.path.join(a, rel)) == _read(os.path.join(b, rel))
    for rel in ("images/val/000001.jpg", "annotations/synthetic_vocab_val.json"):
        assert _read(os.path.join(a, rel)) != _read(os.path.join(b, rel))
    sides = [min(x["bbox"][2:]) for x in train["annotations"]]
    assert np.median(sides) >= 20  # objects start at min_object_size (24 px); occlusion crops


def test_synthetic_rendering_registration(tmp_path):
    register_synthetic_vocab(str(tmp_path), **SMALL)
    try:
        dicts = DatasetCatalog.get("synthetic_vocab_val_img1")
        assert len(dicts) == 8
        main_val = DatasetCatalog.get("synthetic_vocab_val")
        assert [d["file_name"] for d in dicts] != [d["file_name"] for d in main_val]
        meta = MetadataCatalog.get("synthetic_vocab_val_img1")
        assert meta.thing_classes == MetadataCatalog.get("synthetic_vocab_val").thing_classes
        assert meta.train_json_file == MetadataCatalog.get("synthetic_vocab_train").json_file
        out = tmp_path / "synthetic_vocab_val_img1"
        assert synthetic.read_meta(str(out))["image_seed"] == 1
        assert not (out / "images" / "train").exists()  # the val split alone
    finally:
        register_synthetic_vocab()
