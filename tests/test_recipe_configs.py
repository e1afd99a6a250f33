"""The recipe configs (``configs/*.py``): every leaf loads, saves to yaml and back, agrees with
itself (colour format, class counts), builds a model that runs, names registered datasets, and
has the epoch <-> iteration arithmetic and LR steps its comments state.

The expectations below (dataset sizes, class counts, epochs, milestones) are written out here from
the recipes' descriptions and the datasets' published sizes, not read from the configs, so a
config that drifts from its recipe fails. A new leaf config needs an entry in ``RECIPES``.
"""

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Optional, Tuple

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
LEAVES = sorted(p.stem for p in (ROOT / "configs").glob("*.py"))
# configs whose data paths are command-line overrides (the user's own data): no fixed dataset
# or schedule to hold them to; tests/engine/test_custom_dataset.py and test_custom_small.py
# train them
OWN_DATA = {"custom_coco", "custom_coco_small"}
RECIPE_LEAVES = [n for n in LEAVES if n not in OWN_DATA]


@dataclass(frozen=True)
class Dataset:
    train: str
    test: str
    num_classes: int
    train_images: Tuple[int, int]  # (min, max) images in one epoch: the split, less empty ones
    evaluator_type: str


DATASETS = {
    # V3Det v1: 13,204 categories, 183,354 train images (the dataset's README); an epoch may
    # count a few fewer (images without boxes are filtered), not more.
    "v3det": Dataset("v3det_train", "v3det_val", 13204, (183354 - 100, 183354), "v3det"),
    # COCO train2017: 118,287 images, 117,266 of them with boxes (filter_empty=True).
    "coco": Dataset("coco_2017_train", "coco_2017_val", 80, (117266, 117266), "coco"),
    # The synthetic demo vocabulary at its default size (4,000 train images, each with boxes).
    "synthetic": Dataset(
        "synthetic_vocab_train", "synthetic_vocab_val", 1000, (4000, 4000), "v3det"
    ),
    # The same images, boxes and tree with opaque names (generated with --names opaque).
    "synthetic_opaque": Dataset(
        "synthetic_vocab_opaque_train", "synthetic_vocab_opaque_val", 1000, (4000, 4000), "v3det"
    ),
}


@dataclass(frozen=True)
class Recipe:
    dataset: str
    meta_arch: str  # "CQDINO" | "DINO"
    backbone: str  # "R50" | "R18" | "swin_b" | "swin_l"
    epochs: float
    milestone_epochs: Tuple[float, ...]  # lr x 0.1 at each
    batch: int
    head: Optional[Dict[str, Any]] = None  # CQ-DINO head settings of the recipe
    repeat_threshold: Optional[float] = None
    word_loss: bool = False  # model.word_head (the demo's name-word loss; not the paper's)


V3DET_HEAD = dict(topk=100, relation="tree", selection_loss="asl", ancestor_masking=True)
COCO_HEAD = dict(topk=30, relation="self_attn", selection_loss="bce", tree_file=None)
V3DET_24EP = dict(epochs=24, milestone_epochs=(12, 18), batch=16)  # steps at epochs 12 and 18
COCO_12EP = dict(epochs=12, milestone_epochs=(11,), batch=16)  # step at epoch 11
# 2.5 epochs at batch 8 (the demo's time budget); one step at 0.9 of the run; the word loss
DEMO_BUDGET = dict(epochs=2.5, milestone_epochs=(2.25,), batch=8, word_loss=True)
DEMO_HEAD = dict(topk=100, relation="tree", selection_loss="asl", force_gt=True)
RECIPES = {
    "v3det": Recipe("v3det", "CQDINO", "R50", head=V3DET_HEAD, **V3DET_24EP),
    "v3det_swinb": Recipe("v3det", "CQDINO", "swin_b", head=V3DET_HEAD, **V3DET_24EP),
    "v3det_swinl": Recipe("v3det", "CQDINO", "swin_l", head=V3DET_HEAD, **V3DET_24EP),
    "dino_v3det": Recipe("v3det", "DINO", "R50", repeat_threshold=1e-3, **V3DET_24EP),
    # stage 1 of the two-stage recipes (the selector alone): 10 epochs, step at 8 / 6 epochs,
    # step at 5
    "v3det_stage1": Recipe(
        "v3det", "CQDINO", "R50", head=V3DET_HEAD, epochs=10, milestone_epochs=(8,), batch=16
    ),
    "coco_stage1": Recipe(
        "coco", "CQDINO", "R50", head=COCO_HEAD, epochs=6, milestone_epochs=(5,), batch=16
    ),
    "coco": Recipe("coco", "CQDINO", "R50", head=COCO_HEAD, **COCO_12EP),
    "coco_swinl": Recipe("coco", "CQDINO", "swin_l", head=COCO_HEAD, **COCO_12EP),
    "dino_coco": Recipe("coco", "DINO", "R50", **COCO_12EP),
    "demo": Recipe("synthetic", "CQDINO", "R18", head=DEMO_HEAD, **DEMO_BUDGET),
    # the DINO baseline at the demo's size (demo.py with the linear head)
    "demo_dino": Recipe("synthetic", "DINO", "R18", **DEMO_BUDGET),
    # the demo on opaque names: the same recipe, the tree's words instead of the names'
    "demo_opaque": Recipe("synthetic_opaque", "CQDINO", "R18", head=DEMO_HEAD, **DEMO_BUDGET),
}
LIGHT = {"demo", "demo_dino", "demo_opaque"}  # the others: full-width R50/Swin, 13,204 categories


def _load(name: str):
    from detectron2.config import LazyConfig

    return LazyConfig.load(str(ROOT / "configs" / f"{name}.py"))


def _recipe(name: str) -> Recipe:
    if name not in RECIPES:
        pytest.fail(f"configs/{name}.py has no expectations: add it to RECIPES in {__file__}")
    return RECIPES[name]


def _num_classes_of_model_cfg(model_cfg) -> int:
    """The class count C of a model config: ``num_categories`` of the CQ-DINO contrastive head,
    ``num_classes`` of the DINO linear head."""
    from cqdino.modeling import LinearClassHead, build_contrastive_class_head

    head = model_cfg.class_head
    if head._target_ is build_contrastive_class_head:
        return head.num_categories
    assert head._target_ is LinearClassHead, f"unknown class head {head._target_}"
    return head.num_classes


def _walk(node, path=""):
    """(path, value) of every leaf of a plain container (``OmegaConf.to_container``)."""
    if isinstance(node, dict):
        for k, v in node.items():
            yield from _walk(v, f"{path}.{k}" if path else str(k))
    elif isinstance(node, (list, tuple)):
        for i, v in enumerate(node):
            yield from _walk(v, f"{path}[{i}]")
    else:
        yield path, node


def test_every_leaf_config_has_expectations():
    assert LEAVES, "no configs/*.py found"
    assert sorted(RECIPES) == RECIPE_LEAVES and OWN_DATA <= set(LEAVES)


# --------------------------------------------------------------------------- load / save / check
@pytest.mark.parametrize("name", LEAVES)
def test_config_loads_with_the_five_names_and_no_lambdas_or_absolute_paths(name):
    from omegaconf import OmegaConf

    cfg = _load(name)
    assert set(cfg.keys()) == {"model", "dataloader", "optimizer", "lr_multiplier", "train"}
    for path, value in _walk(OmegaConf.to_container(cfg, resolve=False)):
        assert getattr(value, "__name__", None) != "<lambda>", f"{name}: {path} is a lambda"
        if isinstance(value, str):
            absolute = os.path.isabs(value) or value.startswith("~")
            assert not absolute, f"{name}: {path} = {value!r} is an absolute path"
    for path, value in _walk(OmegaConf.to_container(cfg, resolve=True)):
        if isinstance(value, str):
            assert not os.path.isabs(value), f"{name}: {path} resolves to {value!r}"


def _assert_same(original, reloaded, path=""):
    from pydoc import locate

    if isinstance(original, dict):
        assert isinstance(reloaded, dict) and set(original) == set(reloaded), path
        for k in original:
            _assert_same(original[k], reloaded[k], f"{path}.{k}")
    elif isinstance(original, list):
        assert isinstance(reloaded, list) and len(original) == len(reloaded), path
        for i, (a, b) in enumerate(zip(original, reloaded)):
            _assert_same(a, b, f"{path}[{i}]")
    elif path.endswith("._target_") and callable(original):
        assert isinstance(reloaded, str) and locate(reloaded) is original, (path, reloaded)
    else:
        assert type(original) is type(reloaded) and original == reloaded, (path, original, reloaded)


@pytest.mark.parametrize("name", LEAVES)
def test_config_round_trips_through_yaml(name, tmp_path):
    from detectron2.config import LazyConfig
    from omegaconf import OmegaConf

    cfg = _load(name)
    path = tmp_path / "config.yaml"
    LazyConfig.save(cfg, str(path))
    assert path.is_file()
    assert not (tmp_path / "config.yaml.pkl").exists(), "config.yaml could not hold the config"
    reloaded = LazyConfig.load(str(path))
    for resolve in (False, True):
        _assert_same(
            OmegaConf.to_container(cfg, resolve=resolve),
            OmegaConf.to_container(reloaded, resolve=resolve),
        )


@pytest.mark.parametrize("name", LEAVES)
def test_mappers_and_model_share_one_colour_format(name):
    """issue 11 item 3: the mappers read ``model.input_format`` (one place), and the model's
    ``pixel_mean`` is in that channel order (ImageNet means: blue 103.5 < red 123.7)."""
    cfg = _load(name)
    fmt = cfg.model.input_format
    assert fmt in ("BGR", "RGB")
    assert cfg.dataloader.train.mapper.image_format == fmt
    assert cfg.dataloader.test.mapper.image_format == fmt
    mean = list(cfg.model.pixel_mean)
    assert (mean[0] < mean[2]) == (fmt == "BGR"), f"pixel_mean {mean} is not in {fmt} order"
    other = "RGB" if fmt == "BGR" else "BGR"
    cfg.model.input_format = other  # set in one place, read everywhere
    assert cfg.dataloader.train.mapper.image_format == other
    assert cfg.dataloader.test.mapper.image_format == other


@pytest.mark.parametrize("name", RECIPE_LEAVES)
def test_class_counts_agree_with_the_dataset(name):
    from detectron2.data import MetadataCatalog

    import cqdino.data  # noqa: F401  (registers v3det_* and synthetic_vocab_*)

    cfg, recipe = _load(name), _recipe(name)
    data = DATASETS[recipe.dataset]
    c = _num_classes_of_model_cfg(cfg.model)
    msg = f"{name}: the model has {c} classes, {recipe.dataset} has {data.num_classes}"
    assert c == data.num_classes, msg
    assert cfg.dataloader.train.mapper.num_classes == c
    assert cfg.dataloader.test.mapper.num_classes == c
    for split in (data.train, data.test):
        classes = MetadataCatalog.get(split).get("thing_classes", None)
        if classes is not None:  # V3Det's names need the dataset's txt
            assert len(classes) == c, split


@pytest.mark.parametrize("name", RECIPE_LEAVES)
def test_model_is_the_recipe(name):
    """Meta-architecture, backbone and (CQ-DINO) class-head settings of the recipe."""
    from cqdino.modeling import CQDINO, DINO, TimmSwinBackbone, build_resnet

    cfg, recipe = _load(name), _recipe(name)
    m = cfg.model
    assert m._target_ is {"CQDINO": CQDINO, "DINO": DINO}[recipe.meta_arch]
    if recipe.backbone.startswith("swin"):
        assert m.backbone._target_ is TimmSwinBackbone and m.backbone.variant == recipe.backbone
    else:
        assert m.backbone._target_ is build_resnet and m.backbone.depth == int(recipe.backbone[1:])
    for key, value in (recipe.head or {}).items():
        assert m.class_head[key] == value, f"{name}: model.class_head.{key}"
    assert cfg.dataloader.train.repeat_threshold == recipe.repeat_threshold
    assert ("word_head" in m) == recipe.word_loss, f"{name}: model.word_head"


# --------------------------------------------------------------------------- models on tiny input
@pytest.fixture(scope="module")
def datasets_root(tmp_path_factory):
    """A ``$DETECTRON2_DATASETS`` with a V3Det-format category tree of 13,204 categories (from
    the synthetic vocabulary; no V3Det files offline) and a tiny synthetic_vocab dataset of the
    demo's 1,000 categories; v3det_* and synthetic_vocab_* are registered there meanwhile."""
    from cqdino.data import register_synthetic_vocab, register_v3det, synthetic

    root = tmp_path_factory.mktemp("datasets")
    tree = root / "V3Det" / "annotations" / "v3det_2023_v1_category_tree.json"
    tree.parent.mkdir(parents=True)
    num_v3det = DATASETS["v3det"].num_classes
    tree.write_text(json.dumps(synthetic.category_tree_dict(synthetic.vocabulary(num_v3det))))
    tiny = ["--num-categories", "1000", "--num-train-images", "4", "--num-val-images", "2"]
    tiny += ["--image-size", "64", "80"]
    synthetic.main(["--out", str(root / "synthetic_vocab")] + tiny)
    opaque = "synthetic_vocab_opaque"
    synthetic.main(["--out", str(root / opaque), "--names", "opaque"] + tiny)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DETECTRON2_DATASETS", str(root))
        register_v3det(str(root))
        register_synthetic_vocab(str(root))
        register_synthetic_vocab(str(root), folder=opaque)
        try:
            yield root
        finally:
            mp.undo()  # the original $DETECTRON2_DATASETS, then its registrations
            register_v3det()
            register_synthetic_vocab()
            register_synthetic_vocab(folder=opaque, names="opaque")


def _check_instances(out, sizes, num_classes):
    from detectron2.structures import Instances

    assert isinstance(out, list) and len(out) == len(sizes)
    for o, (h, w) in zip(out, sizes):
        # CQ-DINO also returns its selector's ranking (for ARC@K): K columns, 2K ranked
        assert set(o) in ({"instances"}, {"instances", "category_ranking", "num_selected"})
        if "category_ranking" in o:
            ranking, k = o["category_ranking"], o["num_selected"]
            assert ranking.shape == (min(2 * k, num_classes),) and len(
                set(ranking.tolist())
            ) == len(ranking)
        inst = o["instances"]
        assert isinstance(inst, Instances) and inst.image_size == (h, w)
        assert len(inst) > 0
        boxes = inst.pred_boxes.tensor
        assert torch.isfinite(boxes).all()
        x0, y0, x1, y1 = boxes.unbind(1)
        eps = 1e-3
        assert (x0 >= -eps).all() and (y0 >= -eps).all()
        assert (x1 <= w + eps).all() and (y1 <= h + eps).all()
        assert (x1 >= x0).all() and (y1 >= y0).all()
        cls = inst.pred_classes
        assert cls.dtype == torch.int64 and (cls >= 0).all() and (cls < num_classes).all()
        assert torch.isfinite(inst.scores).all()


# the full-width recipes are built, trained one step and evaluated at their defaults by
# tests/engine/test_leaf_configs_train.py; here the light ones, in process
@pytest.mark.parametrize("name", sorted(LIGHT))
def test_model_builds_and_runs_on_a_tiny_input(name, datasets_root):
    from detectron2.config import instantiate
    from detectron2.data import MetadataCatalog

    from cqdino.modeling import CQDINO

    cfg, recipe = _load(name), _recipe(name)
    c = DATASETS[recipe.dataset].num_classes
    head = cfg.model.class_head
    if head.get("relation") == "tree":  # the tree comes from the training set's metadata
        tree_file = instantiate(head.tree_file)
        train_name = DATASETS[recipe.dataset].train
        assert tree_file == MetadataCatalog.get(train_name).category_tree_file
        assert Path(tree_file).is_relative_to(datasets_root)
    torch.manual_seed(0)
    model = instantiate(cfg.model).eval()
    if isinstance(model, CQDINO):
        assert model.class_head.num_categories == c
        if head.get("relation") == "tree":
            assert model.class_head.category_queries.relation.num_categories == c
    else:
        assert model.class_head.num_classes == c
    images = [
        {"image": torch.rand(3, 64, 80) * 255},
        {"image": torch.rand(3, 56, 72) * 255, "height": 112, "width": 144},  # output 2x larger
    ]
    with torch.no_grad():
        out = model(images)
    _check_instances(out, [(64, 80), (112, 144)], c)


def test_demo_loaders_feed_the_model_and_the_evaluator(datasets_root, tmp_path):
    """The demo's real chain on the tiny synthetic set: train loader -> a finite training loss;
    test loader -> predictions at the record's size -> its evaluator."""
    from detectron2.config import instantiate

    from cqdino.evaluation import V3DetEvaluator

    cfg = _load("demo")
    cfg.dataloader.train.total_batch_size = 2
    cfg.train.seed = 0
    cfg.train.output_dir = str(tmp_path)  # the evaluator writes under it
    torch.manual_seed(0)
    model = instantiate(cfg.model)
    batch = next(iter(instantiate(cfg.dataloader.train)))
    assert len(batch) == 2
    for d in batch:
        assert d["image"].shape[0] == 3
        assert (d["instances"].gt_classes < 1000).all()
    losses = model.train()(batch)
    assert losses and all(torch.isfinite(v) for v in losses.values())

    model.eval()
    evaluator = instantiate(cfg.dataloader.evaluator)
    assert isinstance(evaluator, V3DetEvaluator)
    assert Path(cfg.dataloader.evaluator.output_dir).is_relative_to(tmp_path)
    evaluator.reset()
    n = 0
    with torch.no_grad():
        for inputs in instantiate(cfg.dataloader.test):
            out = model(inputs)
            _check_instances(out, [(d["height"], d["width"]) for d in inputs], 1000)
            evaluator.process(inputs, out)
            n += len(inputs)
    assert n == 2
    results = evaluator.evaluate()
    assert 0 <= results["bbox"]["AP"] <= 100


# --------------------------------------------------------------------------- dataloader definitions
@pytest.mark.parametrize("name", RECIPE_LEAVES)
def test_dataloader_definitions_resolve(name):
    """Dataset names registered (not loaded), mappers instantiate, evaluator on the test set."""
    from detectron2.config import instantiate
    from detectron2.data import DatasetCatalog, MetadataCatalog

    from cqdino.data import DetrDatasetMapper
    from cqdino.data.build import build_test_loader, build_train_loader, get_dataset_dicts
    from cqdino.evaluation import build_evaluator

    cfg, recipe = _load(name), _recipe(name)
    data = DATASETS[recipe.dataset]
    dl = cfg.dataloader
    assert dl.train._target_ is build_train_loader and dl.test._target_ is build_test_loader
    for part, split in ((dl.train, data.train), (dl.test, data.test)):
        assert part.dataset._target_ is get_dataset_dicts
        names = part.dataset.names
        assert names == split
        for n in [names] if isinstance(names, str) else names:
            assert n in DatasetCatalog.list(), f"{name}: dataset {n!r} is not registered"
    assert dl.train.dataset.filter_empty and not dl.test.dataset.filter_empty
    for part, is_train in ((dl.train, True), (dl.test, False)):
        mapper = instantiate(part.mapper)
        assert isinstance(mapper, DetrDatasetMapper) and mapper.is_train == is_train
        assert mapper.num_classes == data.num_classes
        assert mapper.image_format == cfg.model.input_format
    assert dl.evaluator._target_ is build_evaluator
    assert dl.evaluator.dataset_name == data.test
    assert not os.path.isabs(dl.evaluator.output_dir)
    assert MetadataCatalog.get(data.test).get("evaluator_type") == data.evaluator_type
    assert dl.train.total_batch_size == recipe.batch


# --------------------------------------------------------------------------- iteration arithmetic
def _multiplier(cfg):
    """iteration -> LR multiplier, as detectron2's ``LRMultiplier`` calls the schedule."""
    from detectron2.config import instantiate

    schedule, max_iter = instantiate(cfg.lr_multiplier), cfg.train.max_iter
    return lambda it: schedule(it / max_iter)


def _assert_warmup(mult, warmup_iters):
    """Linear warm-up from 0.1x to 1 over ``warmup_iters`` iterations."""
    assert warmup_iters >= 2
    assert mult(0) == pytest.approx(0.1)
    assert mult(warmup_iters // 2) == pytest.approx(0.1 + 0.9 * (warmup_iters // 2) / warmup_iters)
    assert mult(warmup_iters) == pytest.approx(1.0)


def _assert_steps_at(mult, step_iters):
    """Multiplier 1 just before the first step, 0.1 ** k between steps k and k + 1 (each step
    placed within +-1 iteration of ``step_iters``)."""
    for k, at in enumerate(step_iters):
        assert mult(math.floor(at) - 2) == pytest.approx(0.1**k), (k, at)
        assert mult(math.ceil(at) + 1) == pytest.approx(0.1 ** (k + 1)), (k, at)


@pytest.mark.parametrize("name", RECIPE_LEAVES)
def test_max_iter_and_lr_steps_follow_the_epochs(name):
    cfg, recipe = _load(name), _recipe(name)
    data = DATASETS[recipe.dataset]
    epochs, images = cfg.train.epochs, cfg.train.images_per_epoch
    batch = cfg.dataloader.train.total_batch_size
    assert epochs == recipe.epochs and batch == recipe.batch
    lo, hi = data.train_images
    assert lo <= images <= hi, f"{name}: {images} images per epoch, {recipe.dataset} has {hi}"
    iters_per_epoch = images / batch
    assert abs(cfg.train.max_iter - round(epochs * iters_per_epoch)) <= 1
    mult = _multiplier(cfg)
    _assert_warmup(mult, cfg.lr_multiplier.warmup_iters)
    _assert_steps_at(mult, [e * iters_per_epoch for e in recipe.milestone_epochs])
    last = 0.1 ** len(recipe.milestone_epochs)
    assert mult(cfg.train.max_iter - 1) == pytest.approx(last)


@pytest.mark.parametrize("name", RECIPE_LEAVES)
def test_command_line_max_iter_moves_the_lr_steps(name):
    """``train.max_iter=...`` on the command line (as projects/train_net.py applies it) moves
    the steps with it and keeps the warm-up length in iterations: the schedule reads max_iter
    by interpolation, not an import-time value (a stale max_iter would stretch the warm-up)."""
    from detectron2.config import LazyConfig

    cfg, recipe = _load(name), _recipe(name)
    old = cfg.train.max_iter
    new = 20000
    assert new != old
    LazyConfig.apply_overrides(cfg, [f"train.max_iter={new}"])
    mult = _multiplier(cfg)
    _assert_warmup(mult, cfg.lr_multiplier.warmup_iters)
    _assert_steps_at(mult, [new * e / recipe.epochs for e in recipe.milestone_epochs])
    assert mult(new - 1) == pytest.approx(0.1 ** len(recipe.milestone_epochs))
