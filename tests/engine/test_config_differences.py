"""``config_differences`` (what ``--resume`` compares with the run's config.yaml): a function
that moved to another module, still importable from the old one, is not a difference."""

from detectron2.config import LazyCall as L
from detectron2.config import LazyConfig
from omegaconf import OmegaConf

from cqdino.data.datasets import get_dataset_dicts
from cqdino.engine.config_check import config_differences


def _saved(tmp_path, cfg, target: str):
    """``cfg`` saved as config.yaml with its dataset's ``_target_`` written as ``target``."""
    path = tmp_path / "config.yaml"
    LazyConfig.save(cfg, str(path))
    saved = OmegaConf.load(path)
    saved.dataloader.train.dataset._target_ = target
    OmegaConf.save(saved, path)
    return str(path)


def test_a_moved_target_is_the_same_value(tmp_path):
    cfg = OmegaConf.create(
        {"dataloader": {"train": {"dataset": L(get_dataset_dicts)(names="x", filter_empty=True)}}}
    )
    # saved before get_dataset_dicts moved from cqdino.data.build to cqdino.data.datasets
    assert (
        config_differences(cfg, _saved(tmp_path, cfg, "cqdino.data.build.get_dataset_dicts")) == []
    )
    other = "cqdino.data.datasets.coco_json_dataset"
    assert config_differences(cfg, _saved(tmp_path, cfg, other)) == [
        ("dataloader.train.dataset._target_", other, "cqdino.data.datasets.get_dataset_dicts")
    ]
    missing = "cqdino.data.build.no_such_function"
    assert [d[0] for d in config_differences(cfg, _saved(tmp_path, cfg, missing))] == [
        "dataloader.train.dataset._target_"
    ]
