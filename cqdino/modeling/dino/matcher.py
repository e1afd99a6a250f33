"""Hungarian matcher of DINO: one-to-one assignment of queries to GT boxes minimising
``w_class * focal_cost + w_bbox * L1 + w_giou * (-GIoU)`` (scipy's linear_sum_assignment)."""

from typing import Dict, List, Sequence, Tuple

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment
from torch import Tensor, nn

from .box_ops import box_cxcywh_to_xyxy, elementwise_generalized_box_iou

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
        image = torch.zeros(len(labels), dtype=torch.int64, device=labels.device)
        return self.batched_cost(logits[None], boxes[None], labels, gt_boxes, image)

    @torch.no_grad()
    def batched_cost(
        self, logits: Tensor, boxes: Tensor, labels: Tensor, gt_boxes: Tensor, image: Tensor
    ) -> Tensor:
        """The cost of every query against every GT box *of its own image*, for all images of
        a prediction set at once (a few tensor operations whatever the number of images).

        Args:
            logits: ``[B, Q, N_col]``; boxes: ``[B, Q, 4]``.
            labels, gt_boxes, image: the GT of all images concatenated: ``[G]`` labels,
                ``[G, 4]`` boxes and ``[G]`` the image index of each.

        Returns:
            ``[Q, G]``: column ``g`` is GT ``g`` against the queries of image ``image[g]``.
        """
        prob = logits[image, :, labels.clamp(min=0)].float().sigmoid()  # (G, Q): G columns only
        neg = (1 - self.alpha) * prob**self.gamma * -(1 - prob + 1e-8).log()
        pos = self.alpha * (1 - prob) ** self.gamma * -(prob + 1e-8).log()
        cls = (pos - neg) * (labels >= 0)[:, None]
        pred, gt = boxes[image].float(), gt_boxes.float()[:, None, :]  # (G, Q, 4), (G, 1, 4)
        l1 = (pred - gt).abs().sum(-1)
        giou = elementwise_generalized_box_iou(box_cxcywh_to_xyxy(pred), box_cxcywh_to_xyxy(gt))
        cost = self.cost_class * cls + self.cost_bbox * l1 - self.cost_giou * giou
        return cost.t()

    @torch.no_grad()
    def match_sets(
        self,
        predictions: Sequence[Tuple[Tensor, Tensor]],
        targets: List[Dict[str, Tensor]],
    ) -> List[List[Tuple[Tensor, Tensor]]]:
        """Match several prediction sets (e.g. every decoder layer) against the same targets
        with one device-to-host transfer: each set's costs for all its images are built at once
        (:meth:`batched_cost`), copied to the host together, and solved there image by image.

        Args:
            predictions: ``(pred_logits [B, Q, N_col], pred_boxes [B, Q, 4])`` per set.
            targets: per image ``{"labels": [G_i] int64 (-1 allowed), "boxes": [G_i, 4]}``.

        Returns:
            per set, per image ``(query_idx, target_idx)``, int64 on the predictions' device,
            each of length ``min(Q, G_i)``.
        """
        device = predictions[0][0].device if predictions else torch.device("cpu")
        counts = [len(t["labels"]) for t in targets]
        if sum(counts) == 0 or not predictions:  # nothing to solve: no transfer either
            empty = torch.zeros(0, dtype=torch.int64, device=device)
            return [[(empty, empty) for _ in targets] for _ in predictions]
        labels = torch.cat([t["labels"] for t in targets])
        gt_boxes = torch.cat([t["boxes"] for t in targets])
        # each GT box's image, made on the device (no host-to-device copy, so no sync)
        image = torch.cat(
            [
                torch.full((n,), b, dtype=torch.int64, device=labels.device)
                for b, n in enumerate(counts)
            ]
        )
        costs = [self.batched_cost(lg, bx, labels, gt_boxes, image) for lg, bx in predictions]
        host = torch.cat([c.flatten() for c in costs]).cpu().numpy()  # the one transfer
        if not np.isfinite(host).all():
            raise FloatingPointError(
                "HungarianMatcher: non-finite matching cost (NaN/inf in the predictions?)"
            )
        bounds = np.concatenate([[0], np.cumsum(counts)])
        pairs, start = [], 0
        for c in costs:  # in set order, then image order: the order of the output
            q, G = c.shape
            set_cost = host[start : start + q * G].reshape(q, G)
            start += q * G
            for b in range(len(targets)):
                block = set_cost[:, bounds[b] : bounds[b + 1]]
                rows, cols = linear_sum_assignment(block) if block.size else ([], [])
                pairs.append(np.stack([np.asarray(rows, np.int64), np.asarray(cols, np.int64)]))
        lengths = [p.shape[1] for p in pairs]
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
