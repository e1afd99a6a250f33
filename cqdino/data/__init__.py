"""Datasets, category hierarchy, class-aware sampling and the DETR mapper.

Importing this package registers ``v3det_{train,val}``, ``synthetic_vocab_{train,val}`` and
``synthetic_vocab_opaque_{train,val}`` (the same data, opaque category names) under
``$DETECTRON2_DATASETS`` (default ``./datasets``); COCO uses detectron2's ``coco_2017_*``.
"""

from . import synthetic
from .datasets import (
    category_tree_file,
    coco_json_dataset,
    coco_json_num_categories,
    image_counts_from_json,
    load_detection_json,
    read_category_names,
    register_coco_json,
    register_synthetic_vocab,
    register_v3det,
)
from .hierarchy import CategoryDAG, CategoryTree
from .mapper import DetrDatasetMapper, RecordError
from .sampler import build_repeat_factor_sampler, repeat_factors_from_category_frequency

register_v3det()
register_synthetic_vocab()
register_synthetic_vocab(folder="synthetic_vocab_opaque", names="opaque")

__all__ = [
    "CategoryDAG",
    "CategoryTree",
    "DetrDatasetMapper",
    "RecordError",
    "build_repeat_factor_sampler",
    "category_tree_file",
    "coco_json_dataset",
    "coco_json_num_categories",
    "image_counts_from_json",
    "load_detection_json",
    "read_category_names",
    "register_coco_json",
    "register_synthetic_vocab",
    "register_v3det",
    "repeat_factors_from_category_frequency",
    "synthetic",
]
