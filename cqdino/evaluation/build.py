"""Pick the evaluator for a registered dataset, and check a config's choice before training."""

from typing import Optional

from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.evaluation import COCOEvaluator, DatasetEvaluator

from cqdino.utils.io import InputError

from .v3det_evaluation import V3DetEvaluator

__all__ = ["build_evaluator", "check_evaluator_args", "check_evaluator_config"]

# evaluator_type -> what build_evaluator builds for it
_EVALUATORS = {"v3det": "the V3Det-style evaluator", "coco": "detectron2's COCOEvaluator"}


def check_evaluator_args(
    dataset_name: str,
    output_dir: Optional[str] = None,
    max_dets_per_image: Optional[int] = None,
    num_workers: int = 0,
    class_agnostic: bool = False,
    key: str = "dataloader.evaluator",
) -> str:
    """Raise :class:`~cqdino.utils.io.InputError` (one line naming ``key``) when
    :func:`build_evaluator` cannot build an evaluator from these arguments: the dataset is not
    registered, its ``evaluator_type`` has no evaluator, ``class_agnostic`` is asked of
    detectron2's ``COCOEvaluator`` (only the V3Det-style evaluator reports it), or a count is
    not a positive integer. Returns the dataset's evaluator type. Loads nothing."""
    if not isinstance(dataset_name, str):
        raise InputError(
            f"{key}.dataset_name={dataset_name!r}: the evaluator takes one dataset name"
        )
    if dataset_name not in DatasetCatalog.list():
        raise InputError(f"{key}.dataset_name={dataset_name!r}: no such registered dataset")
    kind = MetadataCatalog.get(dataset_name).get("evaluator_type", "coco")
    if kind not in _EVALUATORS:
        raise InputError(
            f"{key}: dataset {dataset_name!r} has evaluator_type {kind!r}; there is an evaluator "
            f"for {' and '.join(repr(k) for k in _EVALUATORS)}"
        )
    if class_agnostic and kind != "v3det":
        raise InputError(
            f"{key}.class_agnostic=True: dataset {dataset_name!r} is evaluated by "
            f"{_EVALUATORS[kind]} (evaluator_type {kind!r}), which has no class-agnostic AP "
            f"(only the V3Det-style evaluator has): set {key}.class_agnostic=False"
        )
    if max_dets_per_image is not None and (
        isinstance(max_dets_per_image, bool)
        or not isinstance(max_dets_per_image, int)
        or max_dets_per_image <= 0
    ):
        raise InputError(
            f"{key}.max_dets_per_image={max_dets_per_image!r}: must be a positive integer or None"
        )
    if isinstance(num_workers, bool) or not isinstance(num_workers, int) or num_workers < 0:
        raise InputError(f"{key}.num_workers={num_workers!r}: must be an integer >= 0")
    return kind


def check_evaluator_config(cfg) -> None:
    """The up-front check of a LazyConfig's ``dataloader.evaluator`` (projects/train_net.py's
    preflight, after the datasets are registered): when it is :func:`build_evaluator`, its
    resolved arguments go through :func:`check_evaluator_args`, so a config error is found
    before training rather than at the first evaluation. Other evaluators are left alone (their
    arguments are checked against their signature by the config check)."""
    from omegaconf import DictConfig, OmegaConf

    node = OmegaConf.select(cfg, "dataloader.evaluator", default=None)
    if not isinstance(node, DictConfig) or "_target_" not in node:
        return
    target = node._target_
    if isinstance(target, str):
        from detectron2.utils.registry import locate

        try:
            target = locate(target)
        except Exception:
            return
    if target is not build_evaluator:
        return
    try:
        args = {k: node[k] for k in node.keys() if k != "_target_"}
    except Exception as e:  # an interpolation that does not resolve
        raise InputError(f"dataloader.evaluator: {str(e).splitlines()[0]}") from None
    args = {
        k: OmegaConf.to_container(v, resolve=True) if isinstance(v, DictConfig) else v
        for k, v in args.items()
    }
    check_evaluator_args(**args)


def build_evaluator(
    dataset_name: str,
    output_dir: Optional[str] = None,
    max_dets_per_image: Optional[int] = None,
    num_workers: int = 0,
    class_agnostic: bool = False,
) -> DatasetEvaluator:
    """``V3DetEvaluator`` for datasets with ``evaluator_type == "v3det"`` (V3Det,
    synthetic_vocab; 300 detections per image), detectron2's ``COCOEvaluator`` otherwise
    (``use_fast_impl=False``: the patched detectron2 has no compiled ops; 100 detections).
    ``class_agnostic``: the V3Det evaluator also reports class-agnostic AP / AP50. Arguments it
    cannot use raise as :func:`check_evaluator_args` says."""
    kind = check_evaluator_args(
        dataset_name, output_dir, max_dets_per_image, num_workers, class_agnostic
    )
    if kind == "v3det":
        return V3DetEvaluator(
            dataset_name,
            max_dets_per_image=max_dets_per_image or 300,
            num_workers=num_workers,
            output_dir=output_dir,
            class_agnostic=class_agnostic,
        )
    return COCOEvaluator(
        dataset_name,
        tasks=("bbox",),
        output_dir=output_dir,
        max_dets_per_image=max_dets_per_image or 100,
        use_fast_impl=False,
    )
