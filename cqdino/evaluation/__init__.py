"""Evaluation: the V3Det-style evaluator (COCO uses detectron2's ``COCOEvaluator``)."""

from .build import build_evaluator
from .v3det_evaluation import BoxArrays, V3DetEvaluator, evaluate_boxes

__all__ = ["BoxArrays", "V3DetEvaluator", "build_evaluator", "evaluate_boxes"]
