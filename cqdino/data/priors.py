"""Per-category image frequency of a registered training dataset: the prior that the category
selector's per-category bias starts from (``model.class_head.selector_prior``)."""

from typing import List

from detectron2.data import MetadataCatalog

from cqdino.utils.io import InputError

from .datasets import _image_counts, _load_json

__all__ = ["category_image_fraction"]


def category_image_fraction(dataset_name: str, num_classes: int) -> List[float]:
    """Fraction of the training images holding each category, in the model's (contiguous)
    order, read from the dataset's COCO json (``json_file`` metadata).

    Raises :class:`InputError` naming the dataset when it has no json or another class count."""
    meta = MetadataCatalog.get(dataset_name)
    json_file = meta.get("json_file")
    if not json_file:
        raise InputError(
            f"dataset {dataset_name!r} has no json_file in its metadata: the selector's "
            "category prior (model.class_head.selector_prior) needs one; set it to None"
        )
    data = _load_json(json_file)
    counts = _image_counts(data["annotations"], [c["id"] for c in data["categories"]])
    mapping = meta.get("thing_dataset_id_to_contiguous_id") or {
        c: i for i, c in enumerate(sorted(counts))
    }
    if len(mapping) != num_classes:
        raise InputError(
            f"dataset {dataset_name!r} has {len(mapping)} categories, the model {num_classes} "
            "(model.class_head.num_categories)"
        )
    num_images = max(len(data["images"]), 1)
    out = [0.0] * num_classes
    for cid, i in mapping.items():
        out[i] = counts.get(int(cid), 0) / num_images
    return out
