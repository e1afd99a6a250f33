"""Hungarian matcher of DINO: one-to-one assignment of queries to GT boxes minimising
``w_class * focal_cost + w_bbox * L1 + w_giou * (-GIoU)`` (scipy's linear_sum_assignment)."""

from typing import Dict, List, Tuple

import torch
from scipy.optimize import linear_sum_assignment
from torch import Tensor, nn

from .box_ops import box_cxcywh_to_xyxy, generalized_box_iou

__all__ = ["HungarianMatcher"]


class HungarianMatcher(nn.Module):
    """
    Args:
        cost_class: weight of the focal classification cost.
        cost_bbox: weight of the L1 cost on normalised (cx, cy, w, h).
        cost_giou: weight of the negative GIoU cost.
        alpha, gamma: focal-cost parameters (as in the focal loss).

    A target whose label is ``-1`` (no logit column, see :mod:`cqdino.modeling.heads`) has class
    cost 0: it is matched on its box only.
    """

    def __init__(
        self,
        cost_class: float = 2.0,
        cost_bbox: float = 5.0,
        cost_giou: float = 2.0,
        alpha: float = 0.25,
        gamma: float = 2.0,
    ):
        super().__init__()
        self.cost_class, self.cost_bbox, self.cost_giou = cost_class, cost_bbox, cost_giou
        self.alpha, self.gamma = alpha, gamma

    @torch.no_grad()
    def cost_matrix(
        self, logits: Tensor, boxes: Tensor, labels: Tensor, gt_boxes: Tensor
    ) -> Tensor:
        """``[Q, N_col]`` logits, ``[Q, 4]`` boxes, ``[G]`` labels, ``[G, 4]`` GT -> ``[Q, G]``."""
        prob = logits[:, labels.clamp(min=0)].float().sigmoid()  # (Q, G)
        neg = (1 - self.alpha) * prob**self.gamma * -(1 - prob + 1e-8).log()
        pos = self.alpha * (1 - prob) ** self.gamma * -(prob + 1e-8).log()
        cls = (pos - neg) * (labels >= 0)
        l1 = torch.cdist(boxes.float(), gt_boxes.float(), p=1)
        giou = generalized_box_iou(
            box_cxcywh_to_xyxy(boxes.float()), box_cxcywh_to_xyxy(gt_boxes.float())
        )
        return self.cost_class * cls + self.cost_bbox * l1 - self.cost_giou * giou

    @torch.no_grad()
    def forward(
        self, pred_logits: Tensor, pred_boxes: Tensor, targets: List[Dict[str, Tensor]]
    ) -> List[Tuple[Tensor, Tensor]]:
        """
        Args:
            pred_logits: ``[B, Q, N_col]``.
            pred_boxes: ``[B, Q, 4]`` normalised (cx, cy, w, h).
            targets: per image ``{"labels": [G_i] int64 (-1 allowed), "boxes": [G_i, 4]}``.

        Returns:
            per image ``(query_idx, target_idx)``, int64 on the CPU, each of length
            ``min(Q, G_i)``.
        """
        costs = [
            self.cost_matrix(pred_logits[b], pred_boxes[b], t["labels"], t["boxes"]).cpu()
            for b, t in enumerate(targets)
        ]
        out = []
        for c in costs:
            if c.numel() == 0:
                empty = torch.zeros(0, dtype=torch.int64)
                out.append((empty, empty.clone()))
                continue
            if not torch.isfinite(c).all():
                raise FloatingPointError(
                    "HungarianMatcher: non-finite matching cost (NaN/inf in the predictions?)"
                )
            q, g = linear_sum_assignment(c.numpy())
            out.append(
                (torch.as_tensor(q, dtype=torch.int64), torch.as_tensor(g, dtype=torch.int64))
            )
        return out
