"""Box conversions and (generalised) IoU for normalised ``(cx, cy, w, h)`` / ``(x0, y0, x1, y1)``
boxes, written for the DETR losses (pairwise and element-wise variants)."""

import torch
from torch import Tensor

__all__ = [
    "box_cxcywh_to_xyxy",
    "box_xyxy_to_cxcywh",
    "generalized_box_iou",
    "elementwise_box_iou",
    "elementwise_generalized_box_iou",
    "inverse_sigmoid",
]


def box_cxcywh_to_xyxy(boxes: Tensor) -> Tensor:
    """``[..., 4]`` (cx, cy, w, h) -> (x0, y0, x1, y1)."""
    cx, cy, w, h = boxes.unbind(-1)
    return torch.stack([cx - 0.5 * w, cy - 0.5 * h, cx + 0.5 * w, cy + 0.5 * h], dim=-1)


def box_xyxy_to_cxcywh(boxes: Tensor) -> Tensor:
    """``[..., 4]`` (x0, y0, x1, y1) -> (cx, cy, w, h)."""
    x0, y0, x1, y1 = boxes.unbind(-1)
    return torch.stack([(x0 + x1) / 2, (y0 + y1) / 2, x1 - x0, y1 - y0], dim=-1)


def _area(boxes: Tensor) -> Tensor:
    return (boxes[..., 2] - boxes[..., 0]) * (boxes[..., 3] - boxes[..., 1])


def generalized_box_iou(boxes1: Tensor, boxes2: Tensor, eps: float = 1e-7) -> Tensor:
    """Pairwise GIoU of ``[N, 4]`` and ``[M, 4]`` xyxy boxes -> ``[N, M]``.

    Degenerate (zero-area) boxes are allowed; ``eps`` keeps the divisions finite.
    """
    return _giou(boxes1[:, None, :], boxes2[None, :, :], eps)


def elementwise_generalized_box_iou(boxes1: Tensor, boxes2: Tensor, eps: float = 1e-7) -> Tensor:
    """GIoU of corresponding ``[N, 4]`` xyxy boxes -> ``[N]``."""
    return _giou(boxes1, boxes2, eps)


def elementwise_box_iou(boxes1: Tensor, boxes2: Tensor, eps: float = 1e-7) -> Tensor:
    """IoU of corresponding ``[N, 4]`` xyxy boxes -> ``[N]``."""
    return _iou_union(boxes1, boxes2, eps)[0]


def _iou_union(b1: Tensor, b2: Tensor, eps: float):
    area1, area2 = _area(b1), _area(b2)
    lt = torch.maximum(b1[..., :2], b2[..., :2])
    rb = torch.minimum(b1[..., 2:], b2[..., 2:])
    inter = (rb - lt).clamp(min=0).prod(-1)
    union = area1 + area2 - inter
    return inter / (union + eps), union


def _giou(b1: Tensor, b2: Tensor, eps: float) -> Tensor:
    iou, union = _iou_union(b1, b2, eps)
    lt_c = torch.minimum(b1[..., :2], b2[..., :2])
    rb_c = torch.maximum(b1[..., 2:], b2[..., 2:])
    hull = (rb_c - lt_c).clamp(min=0).prod(-1)
    return iou - (hull - union) / (hull + eps)


def inverse_sigmoid(x: Tensor, eps: float = 1e-5) -> Tensor:
    """``log(x / (1 - x))`` with ``x`` clamped to ``[eps, 1 - eps]`` (finite at 0 and 1)."""
    x = x.clamp(min=0, max=1)
    return torch.log(x.clamp(min=eps) / (1 - x).clamp(min=eps))
