"""The evaluator a config asks for is checked against the test dataset before training
(issue 35): class-agnostic AP only from the V3Det-style evaluator, a registered dataset of a
known evaluator type, sane counts; one line naming the key."""

import pytest
from detectron2.config import LazyCall as L
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.evaluation import COCOEvaluator
from omegaconf import OmegaConf

from cqdino.evaluation import build_evaluator
from cqdino.evaluation.build import check_evaluator_args, check_evaluator_config
from cqdino.utils.io import InputError


@pytest.fixture
def datasets():
    kinds = {"cqdino_test_ev_coco": "coco", "cqdino_test_ev_v3det": "v3det"}
    kinds["cqdino_test_ev_other"] = "lvis"
    for name, kind in kinds.items():
        DatasetCatalog.register(name, lambda: [])
        MetadataCatalog.get(name).set(evaluator_type=kind, thing_classes=["a", "b"])
    yield kinds
    for name in kinds:
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)


def _config(dataset, **kwargs):
    cfg = OmegaConf.create({"dataloader": {"test": {"dataset": {"names": dataset}}}})
    cfg.dataloader.evaluator = L(build_evaluator)(dataset_name="${..test.dataset.names}", **kwargs)
    return cfg


def test_class_agnostic_needs_the_v3det_evaluator(datasets):
    cfg = _config("cqdino_test_ev_coco", class_agnostic=True)
    with pytest.raises(InputError) as e:
        check_evaluator_config(cfg)
    message = str(e.value)
    assert message.startswith("dataloader.evaluator.class_agnostic=True: dataset")
    assert "'cqdino_test_ev_coco'" in message and "COCOEvaluator" in message
    assert "\n" not in message
    with pytest.raises(InputError, match="class_agnostic=True"):  # the builder says the same
        build_evaluator("cqdino_test_ev_coco", class_agnostic=True)
    check_evaluator_config(_config("cqdino_test_ev_v3det", class_agnostic=True))
    check_evaluator_config(_config("cqdino_test_ev_coco"))


@pytest.mark.parametrize(
    "dataset, kwargs, named",
    [
        ("cqdino_test_ev_missing", {}, "no such registered dataset"),
        ("cqdino_test_ev_other", {}, "evaluator_type 'lvis'"),
        ("cqdino_test_ev_coco", {"max_dets_per_image": 0}, "max_dets_per_image=0"),
        ("cqdino_test_ev_coco", {"num_workers": -1}, "num_workers=-1"),
    ],
)
def test_bad_arguments_are_one_line(datasets, dataset, kwargs, named):
    with pytest.raises(InputError, match=named):
        check_evaluator_config(_config(dataset, **kwargs))


def test_other_evaluators_are_left_alone(datasets):
    cfg = _config("cqdino_test_ev_coco")
    cfg.dataloader.evaluator = L(COCOEvaluator)(dataset_name="not checked here")
    check_evaluator_config(cfg)
    check_evaluator_config(OmegaConf.create({"dataloader": {}}))
    assert check_evaluator_args("cqdino_test_ev_v3det") == "v3det"
