"""Class names of a dataset registered lazily from a COCO json (detectron2's
``register_coco_instances``: ``thing_classes`` exist only once the json is loaded) come from the
json's categories, read without decoding the annotations; what cannot give names is one line
naming the dataset (issue 35)."""

import json

import pytest
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.datasets import load_coco_json, register_coco_instances

from cqdino.data.build import dataset_class_names
from cqdino.data.datasets import json_category_names
from cqdino.utils.io import InputError


@pytest.fixture
def registered():
    """Register names for one test, then remove them."""
    names = []

    def register(name, json_file, image_root):
        register_coco_instances(name, {}, str(json_file), str(image_root))
        names.append(name)
        return name

    yield register
    for name in names:
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)


def test_lazily_registered_coco_json(shared_data, registered):
    root = shared_data / "labelme_voc2011_3img"
    name = registered("cqdino_test_lazy_voc", root / "annotations_coco.json", root)
    names = dataset_class_names(name, 20)
    assert MetadataCatalog.get(name).get("thing_classes") is None  # nothing was loaded
    # the reference: detectron2's own loader, which sets thing_classes
    load_coco_json(str(root / "annotations_coco.json"), str(root), "cqdino_test_lazy_voc_ref")
    assert names == MetadataCatalog.get("cqdino_test_lazy_voc_ref").thing_classes
    assert names[14] == "person" and len(names) == 20
    with pytest.raises(InputError, match="has 20 categories"):
        dataset_class_names(name, 21)


def test_names_in_sorted_id_order_whatever_the_key_order(tmp_path):
    cats = [{"id": 7, "name": "c"}, {"id": 2, "name": "a]"}, {"id": 5, "name": 'b"{'}]
    expected = ["a]", 'b"{', "c"]
    nested = {"categories": [{"id": 1, "name": "nested"}], "s": '"}]'}
    layouts = {
        # COCO's own order: categories last (found from the end)
        "last": {"images": [], "annotations": [{"id": 1, "bbox": [1, 2]}], "categories": cats},
        # detectron2's converted files: categories between images and annotations
        "middle": {"info": nested, "categories": cats, "annotations": [[[], {}], "x\\", None]},
        # a nested "categories" after the real one
        "first": {"categories": cats, "extra": nested},
    }
    for layout, data in layouts.items():
        for indent in (None, 1):
            path = tmp_path / f"{layout}_{indent}.json"
            path.write_text(json.dumps(data, indent=indent))
            assert json_category_names(str(path)) == expected, (layout, indent)
            assert json_category_names(str(path)) == expected  # cached


def test_unreadable_categories_are_one_line_naming_the_dataset(tmp_path, registered):
    bad = {
        "no_categories.json": '{"images": [], "annotations": []}',
        "not_json.json": '{"images": [], "categories": [',
        "bad_entries.json": '{"categories": [{"id": "1", "name": "a"}]}',
        "duplicate.json": '{"categories": [{"id": 1, "name": "a"}, {"id": 1, "name": "b"}]}',
    }
    for i, (file, text) in enumerate(bad.items()):
        (tmp_path / file).write_text(text)
        name = registered(f"cqdino_test_bad_{i}", tmp_path / file, tmp_path)
        with pytest.raises(InputError) as e:
            dataset_class_names(name, 1)
        message = str(e.value)
        assert f"dataset {name!r}" in message and file in message and "\n" not in message


def test_no_names_anywhere(registered):
    DatasetCatalog.register("cqdino_test_no_names", lambda: [])
    try:
        assert dataset_class_names("cqdino_test_no_names", 3) is None  # optional: no names
        with pytest.raises(InputError, match="'cqdino_test_no_names' has no class names"):
            dataset_class_names("cqdino_test_no_names", 3, required=True)
    finally:
        DatasetCatalog.remove("cqdino_test_no_names")
        MetadataCatalog.remove("cqdino_test_no_names")
    with pytest.raises(InputError, match="'cqdino_test_never_registered' is not registered"):
        dataset_class_names("cqdino_test_never_registered", 3, required=True)
