"""Class-aware repeat-factor sampling (LVIS / V3Det style).

An image is repeated ``r(I) = max_{c in I} max(1, sqrt(t / f(c)))`` times per epoch in
expectation, where ``f(c)`` is the fraction of training images containing category ``c`` and
``t`` the threshold (1e-3 for V3Det, the V3Det baselines' value; off in the CQ-DINO recipe).
The fractional part is sampled stochastically by detectron2's ``RepeatFactorTrainingSampler``.
"""

from typing import List, Optional

import numpy as np
import torch
from detectron2.data.samplers import RepeatFactorTrainingSampler

__all__ = ["repeat_factors_from_category_frequency", "build_repeat_factor_sampler"]


def repeat_factors_from_category_frequency(
    dataset_dicts: List[dict], repeat_thresh: float = 1e-3
) -> torch.Tensor:
    """Per-image repeat factors (vectorised over all boxes; images without boxes get 1).

    Args:
        dataset_dicts: detectron2 dataset dicts (``annotations[*]["category_id"]``).
        repeat_thresh: frequency threshold ``t`` (> 0); a category in a fraction ``t / 4`` of
            the images makes its images repeat 2 times.
    Returns:
        (N,) float32 tensor.
    """
    if not repeat_thresh > 0:
        raise ValueError(f"repeat_thresh must be > 0, got {repeat_thresh}")
    n = len(dataset_dicts)
    if n == 0:
        return torch.zeros(0)
    counts = np.fromiter((len(d["annotations"]) for d in dataset_dicts), np.int64, n)
    total = int(counts.sum())
    if total == 0:
        return torch.ones(n)
    cats = np.fromiter(
        (a["category_id"] for d in dataset_dicts for a in d["annotations"]), np.int64, total
    )
    imgs = np.repeat(np.arange(n), counts)
    pairs = np.unique(imgs * (int(cats.max()) + 1) + cats)  # distinct (image, category)
    pair_img, pair_cat = np.divmod(pairs, int(cats.max()) + 1)
    freq = np.bincount(pair_cat) / n  # fraction of images containing each category
    cat_rep = np.maximum(1.0, np.sqrt(repeat_thresh / np.maximum(freq, 1e-300)))
    rep = np.ones(n)
    np.maximum.at(rep, pair_img, cat_rep[pair_cat])
    return torch.from_numpy(rep.astype(np.float32))


def build_repeat_factor_sampler(
    dataset_dicts: List[dict], repeat_thresh: float = 1e-3, seed: Optional[int] = None
) -> RepeatFactorTrainingSampler:
    """detectron2's ``RepeatFactorTrainingSampler`` with class-aware repeat factors."""
    return RepeatFactorTrainingSampler(
        repeat_factors_from_category_frequency(dataset_dicts, repeat_thresh), seed=seed
    )
