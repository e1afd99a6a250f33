"""Pick the evaluator for a registered dataset."""

from typing import Optional

from detectron2.data import MetadataCatalog
from detectron2.evaluation import COCOEvaluator, DatasetEvaluator

from .v3det_evaluation import V3DetEvaluator

__all__ = ["build_evaluator"]


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
    ``class_agnostic``: the V3Det evaluator also reports class-agnostic AP / AP50."""
    kind = MetadataCatalog.get(dataset_name).get("evaluator_type", "coco")
    if kind == "v3det":
        return V3DetEvaluator(
            dataset_name,
            max_dets_per_image=max_dets_per_image or 300,
            num_workers=num_workers,
            output_dir=output_dir,
            class_agnostic=class_agnostic,
        )
    if class_agnostic:
        raise ValueError(f"{dataset_name}: class_agnostic needs the V3Det-style evaluator")
    if kind != "coco":
        raise ValueError(f"{dataset_name}: no evaluator for evaluator_type {kind!r}")
    return COCOEvaluator(
        dataset_name,
        tasks=("bbox",),
        output_dir=output_dir,
        max_dets_per_image=max_dets_per_image or 100,
        use_fast_impl=False,
    )
