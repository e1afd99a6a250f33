"""One's own COCO data on a CPU (issue 35): ``configs/custom_coco_small.py`` trains and
evaluates on real photographs given by paths only, and a config derived from ``configs/demo.py``
for a dataset registered with detectron2's ``register_coco_instances`` (class names only in the
json until it is loaded) builds, trains, or stops before training with one line.

The data: the people and animals of the real COCO and PASCAL VOC photographs of
``../shared/data`` (8 images, 24 boxes) as a two-class COCO json (:func:`write_people_animals`),
the same images for training and evaluation.
"""

import json
import math
import os

import pytest

from .conftest import ROOT, run_train_net

ANIMALS = {"giraffe", "zebra", "dog", "horse", "elephant", "cat", "cow", "sheep", "bird"}
# (image folder, its COCO json) under ../shared/data
SOURCES = (
    ("coco8", "annotations/coco8_train.json"),
    ("coco8", "annotations/coco8_val.json"),
    ("labelme_voc2011_3img", "annotations_coco.json"),
)


def write_people_animals(shared_data, out) -> str:
    """Write ``out/people_animals.json``: every image of ``shared_data``'s COCO jsons with a
    person or an animal, those boxes as category 1 "person" / 2 "animal" (``file_name`` relative
    to ``shared_data``). Returns the json's path."""
    images, annotations = [], []
    for folder, rel in SOURCES:
        with open(os.path.join(shared_data, folder, rel)) as f:
            data = json.load(f)
        names = {c["id"]: c["name"] for c in data["categories"]}
        for im in data["images"]:
            boxes = []
            for a in data["annotations"]:
                name = names[a["category_id"]]
                if a["image_id"] != im["id"] or (name != "person" and name not in ANIMALS):
                    continue
                boxes.append((1 if name == "person" else 2, [float(v) for v in a["bbox"]]))
            if not boxes:
                continue
            image_id = len(images) + 1
            images.append(
                {
                    "id": image_id,
                    "file_name": f"{folder}/{im['file_name']}",
                    "height": im["height"],
                    "width": im["width"],
                }
            )
            for category, bbox in boxes:
                annotations.append(
                    {
                        "id": len(annotations) + 1,
                        "image_id": image_id,
                        "category_id": category,
                        "bbox": bbox,
                        "area": bbox[2] * bbox[3],
                        "iscrowd": 0,
                    }
                )
    categories = [{"id": 1, "name": "person"}, {"id": 2, "name": "animal"}]
    os.makedirs(out, exist_ok=True)
    path = os.path.join(out, "people_animals.json")
    with open(path, "w") as f:
        json.dump({"images": images, "annotations": annotations, "categories": categories}, f)
    return path


# seconds, not minutes: 128-160 px images, batch 2, 1 + 2 layers, 20 queries, 3 iterations
TINY = [
    "dataloader.train.mapper.min_sizes=[128]",
    "dataloader.train.mapper.max_size=160",
    "dataloader.test.mapper.test_size=128",
    "dataloader.test.mapper.max_size=160",
    "dataloader.train.total_batch_size=2",
    "model.transformer.num_queries=20",
    "model.transformer.decoder.num_layers=2",
    "model.dn_number=10",
    "train.max_iter=3",
    "lr_multiplier.warmup_iters=1",
    "train.log_period=1",
    "train.seed=0",
]


def _bbox_results(text: str) -> dict:
    """The bbox row of the results table projects/train_net.py logs after an evaluation
    (``| task | AP | AP50 | ...`` then ``| bbox | ...``), as {metric: value}."""
    lines = text.splitlines()
    for i, line in enumerate(lines):
        if line.startswith("| task"):
            keys = [c.strip() for c in line.strip("|").split("|")][1:]
            row = next(r for r in lines[i + 1 :] if r.startswith("| bbox"))
            values = [float(c) for c in row.strip("|").split("|")[1:]]
            return dict(zip(keys, values))
    raise AssertionError("no evaluation results in the log:\n" + text[-3000:])


def test_people_animals_json(shared_data, tmp_path):
    data = json.loads(open(write_people_animals(shared_data, tmp_path)).read())
    assert len(data["images"]) == 8
    per_class = [sum(a["category_id"] == c for a in data["annotations"]) for c in (1, 2)]
    # by hand from the source jsons: people 1 + 6 + 3 (COCO 36, 49, 61) + 2 + 4 (VOC 1, 3);
    # animals 2 giraffes, 1 zebra, 1 dog, 2 horses, 2 elephants
    assert per_class == [16, 8]
    for im in data["images"]:
        assert (shared_data / im["file_name"]).is_file()


@pytest.mark.slow
def test_small_config_trains_and_evaluates_real_images(shared_data, tmp_path):
    ann = write_people_animals(shared_data, tmp_path / "data")
    args = ["--config-file", str(ROOT / "configs" / "custom_coco_small.py"), *TINY]
    for split in ("train", "test"):
        args += [f"dataloader.{split}.dataset.json_file={ann}"]
        args += [f"dataloader.{split}.dataset.image_root={shared_data}"]
    out = tmp_path / "run"
    proc = run_train_net(tmp_path, args + [f"train.output_dir={out}"])
    text = proc.stdout + proc.stderr
    assert proc.returncode == 0, text[-4000:]
    results = _bbox_results(text)
    assert set(results) >= {"AP", "AP50", "AP75"}
    assert all(math.isfinite(v) and 0.0 <= v <= 100.0 for v in results.values())
    assert (out / "model_final.pth").is_file()


# A config derived from configs/demo.py as the README shows ("Training on your own
# COCO-format data"), for a dataset registered with register_coco_instances.
DERIVED = """
from detectron2.data import DatasetCatalog
from detectron2.data.datasets import register_coco_instances

from .demo import dataloader, lr_multiplier, model, name_words, optimizer, train

for split in ("train", "val"):
    if f"my_{{split}}" not in DatasetCatalog.list():  # the config is loaded more than once
        register_coco_instances(f"my_{{split}}", {{}}, {json!r}, {root!r})
name_words(model, dataloader, {words})  # compositional queries, word head and scores, ...
model.class_head.relation = "self_attn"  # no category tree
model.class_head.tree_file = None
model.class_head.ancestor_masking = False
model.class_head.num_categories = 2  # = dataloader.{{train,test}}.mapper.num_classes
dataloader.train.mapper.num_classes = dataloader.test.mapper.num_classes = 2
dataloader.train.dataset.names, dataloader.test.dataset.names = "my_train", "my_val"
"""


def _derived_config(shared_data, folder, words: bool) -> str:
    """``folder/my_data.py`` derived from configs/demo.py, beside links to ``demo.py`` and
    ``common/`` of the repository's configs (LazyConfig's relative imports resolve by
    location, as for a file saved in configs/)."""
    ann = write_people_animals(shared_data, folder / "data")
    for name in ("demo.py", "common"):
        os.symlink(ROOT / "configs" / name, folder / name)
    path = folder / "my_data.py"
    path.write_text(DERIVED.format(json=ann, root=str(shared_data), words=words))
    return str(path)


def test_demo_derived_config_names_from_a_lazily_registered_json(shared_data, tmp_path):
    """Name words on: the compositional queries and the word head get the json's names; the
    demo's class-agnostic evaluation does not exist for a COCO-evaluated dataset, which the
    up-front check says before anything is trained."""
    from detectron2.config import instantiate
    from detectron2.data import DatasetCatalog, MetadataCatalog

    from cqdino.engine.config_check import load_config
    from cqdino.evaluation.build import check_evaluator_config
    from cqdino.utils.io import InputError

    config = _derived_config(shared_data, tmp_path, words=True)
    try:
        cfg = load_config(config, TINY)
        assert MetadataCatalog.get("my_train").get("thing_classes") is None  # still lazy
        model = instantiate(cfg.model)
        assert model.word_head is not None
        assert model.class_head.category_queries.name_encoder is not None  # compositional
        words = instantiate(cfg.model.class_head.category_names)
        assert words == [["person"], ["animal"]]  # the json's names' words, in id order
        with pytest.raises(InputError, match="class_agnostic=True: dataset 'my_val'"):
            check_evaluator_config(cfg)
    finally:
        for name in ("my_train", "my_val"):
            if name in DatasetCatalog.list():
                DatasetCatalog.remove(name)
                MetadataCatalog.remove(name)


THREE = [
    "model.class_head.num_categories=3",
    "dataloader.train.mapper.num_classes=3",
    "dataloader.test.mapper.num_classes=3",
]


@pytest.mark.parametrize(
    "words, overrides, message",
    [
        # the demo's class-agnostic evaluation, which a COCO-evaluated dataset does not have
        (True, [], "error: dataloader.evaluator.class_agnostic=True: dataset 'my_val'"),
        # a class count other than the lazily registered json's (its names were unknown)
        (False, THREE, "error: the model has 3 classes"),
    ],
)
def test_demo_derived_config_errors_stop_before_training(
    shared_data, tmp_path, words, overrides, message
):
    config = _derived_config(shared_data, tmp_path, words=words)
    out = tmp_path / "run"
    args = ["--config-file", config, *TINY, *overrides, f"train.output_dir={out}"]
    proc = run_train_net(tmp_path, args)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith(message), last
    assert not (out / "last_checkpoint").exists() and not (out / "metrics.json").exists()


@pytest.mark.slow
def test_demo_derived_config_without_name_words_trains(shared_data, tmp_path):
    config = _derived_config(shared_data, tmp_path, words=False)
    out = tmp_path / "run"
    proc = run_train_net(tmp_path, ["--config-file", config, *TINY, f"train.output_dir={out}"])
    text = proc.stdout + proc.stderr
    assert proc.returncode == 0, text[-4000:]
    assert set(_bbox_results(text)) >= {"AP", "AP50"}
    assert (out / "model_final.pth").is_file()
