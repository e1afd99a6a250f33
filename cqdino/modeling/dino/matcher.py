"""Hungarian matcher of DINO: one-to-one assignment of queries to GT boxes minimising
``w_class * focal_cost + w_bbox * L1 + w_giou * (-GIoU)`` (scipy's linear_sum_assignment)."""

from typing import Dict, List, Sequence, Tuple

import numpy as np
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

    A target whose label is ``-1`` (no logit column, see :mod:`cqdino.modeling.dino.heads`) has
    class cost 0: it is matched on its box only.
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
    def match_sets(
        self,
        predictions: Sequence[Tuple[Tensor, Tensor]],
        targets: List[Dict[str, Tensor]],
    ) -> List[List[Tuple[Tensor, Tensor]]]:
        """Match several prediction sets (e.g. every decoder layer) against the same targets
        with one device-to-host transfer: all cost matrices are built on the device,
        concatenated, copied to the host once, and solved there.

        Args:
            predictions: ``(pred_logits [B, Q, N_col], pred_boxes [B, Q, 4])`` per set.
            targets: per image ``{"labels": [G_i] int64 (-1 allowed), "boxes": [G_i, 4]}``.

        Returns:
            per set, per image ``(query_idx, target_idx)``, int64 on the predictions' device,
            each of length ``min(Q, G_i)``.
        """
        costs, shapes = [], []
        for logits, boxes in predictions:
            for b, t in enumerate(targets):
                c = self.cost_matrix(logits[b], boxes[b], t["labels"], t["boxes"])  # (Q, G)
                costs.append(c.flatten())
                shapes.append(tuple(c.shape))
        device = predictions[0][0].device if predictions else torch.device("cpu")
        if sum(q * g for q, g in shapes) == 0:  # nothing to solve (no GT): no transfer either
            empty = torch.zeros(0, dtype=torch.int64, device=device)
            return [[(empty, empty) for _ in targets] for _ in predictions]
        host = torch.cat(costs).cpu().numpy()  # the one transfer
        if not np.isfinite(host).all():
            raise FloatingPointError(
                "HungarianMatcher: non-finite matching cost (NaN/inf in the predictions?)"
            )
        pairs, lengths, start = [], [], 0
        for q, g in shapes:
            c = host[start : start + q * g].reshape(q, g)
            start += q * g
            rows, cols = linear_sum_assignment(c) if c.size else ([], [])
            pairs.append(np.stack([np.asarray(rows, np.int64), np.asarray(cols, np.int64)]))
            lengths.append(len(rows))
        # all assignments back to the device in one non-blocking copy
        idx = torch.from_numpy(np.concatenate(pairs, 1)).to(device, non_blocking=True)
        out = [(r, c) for r, c in zip(idx[0].split(lengths), idx[1].split(lengths))]
        B = len(targets)
        return [out[i * B : (i + 1) * B] for i in range(len(predictions))]

    def forward(
        self, pred_logits: Tensor, pred_boxes: Tensor, targets: List[Dict[str, Tensor]]
    ) -> List[Tuple[Tensor, Tensor]]:
        """One prediction set (see :meth:`match_sets`): ``pred_logits [B, Q, N_col]``,
        ``pred_boxes [B, Q, 4]`` normalised (cx, cy, w, h) -> per image
        ``(query_idx, target_idx)``."""
        return self.match_sets([(pred_logits, pred_boxes)], targets)[0]
