"""Annotation files that would be silently wrong or end in a traceback (issue 28): a val json
whose categories differ from the training json's is refused in one line naming the differences
(the same set reordered is fine); invalid JSON names the file, line and column; duplicate image
ids name the file and the id. Through ``projects/train_net.py`` each is one ``error:`` line
before anything is built."""

from pathlib import Path

import pytest
from detectron2.data import DatasetCatalog, MetadataCatalog

from cqdino.data.datasets import (
    check_same_categories,
    load_detection_json,
    register_coco_json,
    register_v3det,
)
from cqdino.utils.io import InputError
from tests.helpers import ROOT, cli_error, write_coco_json

TRAIN_CATS = [{"id": 3, "name": "teapot"}, {"id": 7, "name": "kettle"}, {"id": 9, "name": "cup"}]


def _write(path: Path, categories, images=None) -> Path:
    images = images or [{"id": 1, "file_name": "1.png", "width": 64, "height": 48}]
    anns = [{"id": 1, "image_id": images[0]["id"], "category_id": 3, "bbox": [4, 4, 20, 16]}]
    return write_coco_json(path, images, anns, categories)


def _register(registered, tmp_path, name, categories):
    registered.append(name)
    return register_coco_json(name, str(_write(tmp_path / f"{name}.json", categories)), tmp_path)


def test_val_with_the_same_categories_reordered_is_accepted(tmp_path, registered):
    _register(registered, tmp_path, "own28_train", TRAIN_CATS)
    _register(registered, tmp_path, "own28_val", TRAIN_CATS[::-1])
    check_same_categories(["own28_train"], ["own28_val"])


def test_val_with_other_category_ids_names_them(tmp_path, registered):
    _register(registered, tmp_path, "own28_train", TRAIN_CATS)
    # id 9 missing, id 11 added, id 7 renamed
    other = [{"id": 3, "name": "teapot"}, {"id": 7, "name": "pot"}, {"id": 11, "name": "mug"}]
    _register(registered, tmp_path, "own28_val", other)
    with pytest.raises(InputError) as e:
        check_same_categories(["own28_train"], ["own28_val"])
    msg = str(e.value)
    assert "\n" not in msg
    assert "own28_val.json" in msg and "own28_train.json" in msg
    assert "ids only in 'own28_train': [9]" in msg
    assert "ids only in 'own28_val': [11]" in msg
    assert "7: 'kettle' vs 'pot'" in msg


def test_json_is_checked_against_its_registration_when_loaded(tmp_path):
    """V3Det's categories come from its names txt (ids 1..3): a val json with other ids stops
    when it is loaded, naming the ids, instead of detectron2's metadata assertion."""
    ann = tmp_path / "V3Det" / "annotations"
    ann.mkdir(parents=True)
    cats = [{"id": i, "name": n} for i, n in [(1, "door"), (2, "cat"), (3, "sliding door")]]
    _write(ann / "v3det_2023_v1_train.json", cats)
    _write(ann / "v3det_2023_v1_val.json", cats[:2] + [{"id": 4, "name": "sliding door"}])
    (tmp_path / "V3Det" / "category_name_13204_v3det_2023_v1.txt").write_text(
        "door\ncat\nsliding door\n"
    )
    register_v3det(str(tmp_path))
    try:
        DatasetCatalog.get("v3det_train")
        with pytest.raises(InputError, match=r"v3det_2023_v1_val.json: its category ids differ"):
            DatasetCatalog.get("v3det_val")
        with pytest.raises(InputError, match=r"only in the registration: \[3\]; .*json: \[4\]"):
            DatasetCatalog.get("v3det_val")
    finally:
        register_v3det()


def test_invalid_json_names_file_line_and_column(tmp_path):
    path = tmp_path / "broken.json"
    path.write_text('{"images": [],\n "annotations": [}')
    with pytest.raises(InputError) as e:
        load_detection_json(str(path), str(tmp_path))
    msg = str(e.value)
    assert str(path) in msg and "line 2 column 18" in msg and "\n" not in msg


def test_duplicate_image_id_names_file_and_id(tmp_path):
    images = [
        {"id": 5, "file_name": "a.png", "width": 8, "height": 8},
        {"id": 6, "file_name": "b.png", "width": 8, "height": 8},
        {"id": 5, "file_name": "c.png", "width": 8, "height": 8},
    ]
    path = _write(tmp_path / "dup.json", TRAIN_CATS, images)
    with pytest.raises(InputError, match=r"dup.json: duplicate image id 5 \(entries 0 and 2"):
        load_detection_json(str(path), str(tmp_path))


def _train_net_error(train_net, tmp_path, train_json, val_json) -> str:
    """The one line ``train_net.py --config-file configs/custom_coco.py`` stops with."""
    argv = ["--config-file", str(ROOT / "configs" / "custom_coco.py")]
    argv += [f"dataloader.train.dataset.json_file={train_json}"]
    argv += [f"dataloader.train.dataset.image_root={tmp_path}"]
    argv += [f"dataloader.test.dataset.json_file={val_json}"]
    argv += [f"dataloader.test.dataset.image_root={tmp_path}"]
    argv += [f"train.output_dir={tmp_path / 'run'}", "train.max_iter=1"]
    try:
        message = cli_error(train_net.cli, argv)
    finally:
        for name in ("custom_train", "custom_val"):
            if name in DatasetCatalog.list():
                DatasetCatalog.remove(name)
                MetadataCatalog.remove(name)
    assert not (tmp_path / "run").exists()  # refused before anything was written
    return message


def test_train_net_refuses_a_val_json_with_other_categories(train_net, tmp_path):
    train = _write(tmp_path / "train.json", TRAIN_CATS)
    val = _write(tmp_path / "val.json", TRAIN_CATS[:2])
    message = _train_net_error(train_net, tmp_path, train, val)
    assert "val.json" in message and "ids only in 'custom_train': [9]" in message


def test_train_net_invalid_json_and_duplicate_ids_are_one_line(train_net, tmp_path):
    train = _write(tmp_path / "train.json", TRAIN_CATS)
    broken = tmp_path / "val.json"
    broken.write_text('{"images": [], "annotations": [], "categories": [,]}')
    message = _train_net_error(train_net, tmp_path, train, broken)
    assert f"{broken}: invalid JSON at line 1 column 50" in message
    images = [{"id": 4, "file_name": "a.png", "width": 8, "height": 8}] * 2
    dup = _write(tmp_path / "dup.json", TRAIN_CATS, images)
    message = _train_net_error(train_net, tmp_path, dup, train)
    assert f"{dup}: duplicate image id 4" in message


def test_custom_coco_without_a_val_json_is_one_line_naming_the_key(train_net, tmp_path):
    """Documented in configs/custom_coco.py and the README: the val json is required."""
    train = _write(tmp_path / "train.json", TRAIN_CATS)
    message = _train_net_error(train_net, tmp_path, train, "")
    assert "dataloader.test.dataset.json_file is not set" in message
