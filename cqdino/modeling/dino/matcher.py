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

    def _focal_cost(self, logits: Tensor, labels: Tensor) -> Tensor:
        """Focal classification cost of the gathered logits; 0 where ``labels < 0``."""
        prob = logits.float().sigmoid()
        neg = (1 - self.alpha) * prob**self.gamma * -(1 - prob + 1e-8).log()
        pos = self.alpha * (1 - prob) ** self.gamma * -(prob + 1e-8).log()
        return (pos - neg) * (labels >= 0)

    def _weighted(self, cls: Tensor, boxes: Tensor, gt_boxes: Tensor) -> Tensor:
        """``w_class * cls + w_bbox * L1 - w_giou * GIoU`` of broadcast ``(cx, cy, w, h)``."""
        boxes, gt_boxes = boxes.float(), gt_boxes.float()
        l1 = (boxes - gt_boxes).abs().sum(-1)
        giou = elementwise_generalized_box_iou(
            box_cxcywh_to_xyxy(boxes), box_cxcywh_to_xyxy(gt_boxes)
        )
        return self.cost_class * cls + self.cost_bbox * l1 - self.cost_giou * giou

    @torch.no_grad()
    def cost_matrix(
        self, logits: Tensor, boxes: Tensor, labels: Tensor, gt_boxes: Tensor
    ) -> Tensor:
        """``[Q, N_col]`` logits, ``[Q, 4]`` boxes, ``[G]`` labels, ``[G, 4]`` GT -> ``[Q, G]``."""
        cls = self._focal_cost(logits[:, labels.clamp(min=0)], labels)
        return self._weighted(cls, boxes[:, None, :], gt_boxes[None, :, :])

    @torch.no_grad()
    def batched_cost(
        self, logits: Tensor, boxes: Tensor, labels: Tensor, gt_boxes: Tensor, image: Tensor
    ) -> Tensor:
        """The cost of every query against every GT box *of its own image*, for a stack of
        prediction sets at once (a few tensor operations whatever the number of images).

        Args:
            logits: ``[S, B, Q, N_col]``; boxes: ``[S, B, Q, 4]``.
            labels, gt_boxes, image: the GT of all images concatenated: ``[G]`` labels,
                ``[G, 4]`` boxes and ``[G]`` the image index of each.

        Returns:
            ``[S, Q, G]``: column ``g`` holds :meth:`cost_matrix`'s column for GT ``g`` against
            the queries of image ``image[g]``.
        """
        # two index tensors apart: their dimension comes first, (G, S, Q)
        gathered = logits[:, image, :, labels.clamp(min=0)].transpose(0, 1)  # (S, G, Q)
        cls = self._focal_cost(gathered, labels[:, None])
        cost = self._weighted(cls, boxes[:, image], gt_boxes[:, None, :])  # (S, G, Q)
        return cost.transpose(1, 2)

    @torch.no_grad()
    def match_sets(
        self,
        predictions: Sequence[Tuple[Tensor, Tensor]],
        targets: List[Dict[str, Tensor]],
    ) -> List[List[Tuple[Tensor, Tensor]]]:
        """Match several prediction sets (e.g. every decoder layer) against the same targets
        with one device-to-host transfer: the cost matrices of all images are built together
        (:meth:`batched_cost`, sets of one shape stacked), copied to the host once, and solved
        there image by image.

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
        # sets of one shape (the decoder layers, usually the proposals too) in one stack
        groups: Dict[Tuple, List[int]] = {}
        for i, (logits, boxes) in enumerate(predictions):
            groups.setdefault((tuple(logits.shape), tuple(boxes.shape)), []).append(i)
        costs, order = [], []
        for members in groups.values():
            logits = torch.stack([predictions[i][0] for i in members])
            boxes = torch.stack([predictions[i][1] for i in members])
            costs.append(self.batched_cost(logits, boxes, labels, gt_boxes, image).flatten())
            order += [(i, logits.shape[2]) for i in members]
        host = torch.cat(costs).cpu().numpy()  # the one transfer
        if not np.isfinite(host).all():
            raise FloatingPointError(
                "HungarianMatcher: non-finite matching cost (NaN/inf in the predictions?)"
            )
        G = len(labels)
        bounds = np.concatenate([[0], np.cumsum(counts)])
        solved, start = {}, 0
        for i, q in order:
            set_cost = host[start : start + q * G].reshape(q, G)
            start += q * G
            solved[i] = []
            for b in range(len(targets)):
                c = set_cost[:, bounds[b] : bounds[b + 1]]
                rows, cols = linear_sum_assignment(c) if c.size else ([], [])
                solved[i].append(np.stack([np.asarray(rows, np.int64), np.asarray(cols, np.int64)]))
        pairs = [p for i in range(len(predictions)) for p in solved[i]]
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
