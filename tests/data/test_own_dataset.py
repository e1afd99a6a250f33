"""One's own COCO-format data (issue 20, items 16 and 17): registered from paths alone, clear
messages for what a self-attention config must set, name embeddings cached outside the
annotation folder, and a training set whose images have no boxes said so with the count."""

import hashlib
import os

import pytest
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.datasets import register_coco_instances
from PIL import Image

from cqdino.data import category_tree_file, load_detection_json
from cqdino.data.build import get_dataset_dicts
from tests.helpers import write_coco_json


def _own_coco(root, boxes=True):
    """3 images, 2 categories with non-contiguous ids (7 kettle, 3 teapot)."""
    (root / "images").mkdir(parents=True)
    (root / "annotations").mkdir()
    images = []
    for i in range(3):
        Image.new("RGB", (64, 48), (40 * i, 90, 160)).save(root / "images" / f"{i}.png")
        images.append({"id": i + 1, "file_name": f"{i}.png", "width": 64, "height": 48})
    annotations = [
        {"id": i + 1, "image_id": i + 1, "category_id": (7, 3)[i % 2], "bbox": [4, 4, 20, 16]}
        for i in range(3 if boxes else 0)
    ]
    cats = [{"id": 7, "name": "kettle"}, {"id": 3, "name": "teapot"}]
    return write_coco_json(root / "annotations" / "train.json", images, annotations, cats)


def test_images_without_boxes_are_counted_in_the_message(tmp_path, registered):
    path = _own_coco(tmp_path, boxes=False)
    DatasetCatalog.register(
        "own_no_boxes", lambda: load_detection_json(str(path), str(tmp_path / "images"))
    )
    registered.append("own_no_boxes")
    with pytest.raises(ValueError, match=r"none of its 3 images has a box.*drops images without"):
        get_dataset_dicts("own_no_boxes", filter_empty=True)
    assert len(get_dataset_dicts("own_no_boxes", filter_empty=False)) == 3


def test_tree_error_says_what_to_set(tmp_path, registered):
    path = _own_coco(tmp_path)
    register_coco_instances("own_lazy", {}, str(path), str(tmp_path / "images"))
    registered.append("own_lazy")
    with pytest.raises(ValueError, match=r"model.class_head.relation=self_attn.*tree_file=None"):
        category_tree_file("own_lazy")


def test_name_embeddings_of_a_lazy_registration_go_to_the_cache(tmp_path, monkeypatch, registered):
    """``register_coco_instances`` sets ``thing_classes`` only when the dataset is loaded; the
    table is written into the cache folder, never next to the user's annotations."""
    from cqdino.data.name_embeddings import name_embedding_file

    path = _own_coco(tmp_path / "data")
    register_coco_instances("own_lazy", {}, str(path), str(tmp_path / "data" / "images"))
    registered.append("own_lazy")
    monkeypatch.setenv("CQDINO_CACHE", str(tmp_path / "cache"))
    before = {
        p: hashlib.sha256((path.parent / p).read_bytes()).hexdigest()
        for p in os.listdir(path.parent)
    }
    table = name_embedding_file("own_lazy", dim=8)
    assert os.path.dirname(table) == str(tmp_path / "cache") and os.path.isfile(table)
    after = {
        p: hashlib.sha256((path.parent / p).read_bytes()).hexdigest()
        for p in os.listdir(path.parent)
    }
    assert after == before


def test_register_coco_json_from_paths(tmp_path, registered):
    from cqdino.data import coco_json_dataset, coco_json_num_categories, register_coco_json

    path = _own_coco(tmp_path)
    registered.append("own_paths")
    register_coco_json("own_paths", str(path), str(tmp_path / "images"))
    meta = MetadataCatalog.get("own_paths")
    assert meta.thing_classes == ["teapot", "kettle"]  # by sorted id, before any loading
    assert coco_json_num_categories(str(path)) == 2
    dicts = coco_json_dataset("own_paths", str(path), str(tmp_path / "images"))
    assert len(dicts) == 3 and {a["category_id"] for d in dicts for a in d["annotations"]} == {
        0,
        1,
    }
