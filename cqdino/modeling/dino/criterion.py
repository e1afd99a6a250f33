"""DINO's set criterion: sigmoid focal classification + L1 + GIoU box losses, on the final
decoder layer, every auxiliary decoder layer, the encoder proposals and the denoising groups.

Losses are sums normalised by the number of GT boxes in the batch, all-reduced over GPUs and
clamped to >= 1 (DN losses by that number times the number of DN groups), so an image or a whole
batch without GT gives finite losses (the focal term then pushes every query to background).
"""

from contextlib import contextmanager
from typing import Callable, Dict, Iterator, List, Optional, Tuple, Union

import torch
import torch.nn.functional as F
from detectron2.utils import comm
from torch import Tensor, nn

from .box_ops import box_cxcywh_to_xyxy, elementwise_box_iou, elementwise_generalized_box_iou
from .matcher import HungarianMatcher

__all__ = ["SetCriterion", "sigmoid_focal_loss", "quality_focal_loss"]


def sigmoid_focal_loss(
    logits: Tensor, targets: Tensor, alpha: float = 0.25, gamma: float = 2.0
) -> Tensor:
    """Element-wise focal loss (no reduction); ``targets`` in {0, 1}, same shape as logits."""
    prob = logits.sigmoid()
    ce = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
    p_t = prob * targets + (1 - prob) * (1 - targets)
    loss = ce * (1 - p_t) ** gamma
    if alpha >= 0:
        loss = (alpha * targets + (1 - alpha) * (1 - targets)) * loss
    return loss


def _binary_cross_entropy_sum(logits: Tensor, targets: Tensor) -> Tensor:
    return F.binary_cross_entropy_with_logits(logits, targets.to(logits.dtype), reduction="sum")


def quality_focal_loss(
    logits: Tensor, targets: Tensor, alpha: float = 0.25, gamma: float = 2.0
) -> Tensor:
    """Element-wise focal loss with soft targets ``t`` in [0, 1] (no reduction):
    ``BCE(p, t) * |t - p| ** gamma``, weighted ``alpha`` where ``t > 0`` and ``1 - alpha``
    elsewhere. With ``t`` in {0, 1} it equals :func:`sigmoid_focal_loss`."""
    prob = logits.sigmoid()
    ce = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
    loss = ce * (targets - prob).abs() ** gamma
    if alpha >= 0:
        pos = (targets > 0).to(logits.dtype)
        loss = (alpha * pos + (1 - alpha) * (1 - pos)) * loss
    return loss


IOU_TARGETS = ("none", "iou", "align")


class SetCriterion(nn.Module):
    """
    Args:
        matcher: assigns queries to GT boxes.
        loss_class_weight, loss_bbox_weight, loss_giou_weight: weights of the focal, L1 and GIoU
            terms; every auxiliary copy (``_0.._{L-2}``, ``_enc``, ``_dn``, ``_dn_i``) uses the
            same weights.
        focal_alpha, focal_gamma: focal loss parameters.
        iou_target: the matched column's classification target (DN groups keep 1):
            ``"none"`` 1 (DINO); ``"iou"`` the IoU of the predicted and GT boxes (a quality
            target, as Stable-DINO's position-supervised loss); ``"align"``
            ``p ** a * IoU ** (1 - a)`` with ``a = iou_target_alpha`` (Align-DETR), ``p`` the
            predicted probability. Both detached; the loss is then :func:`quality_focal_loss`.
        iou_target_alpha: ``a`` of ``"align"``.
        loss_word_weight: weight of ``loss_word``, the auxiliary name-word loss
            (:class:`~cqdino.modeling.dino.word_head.NameWordHead`): binary cross-entropy of a
            matched query's word logits (``pred_words``) against the words of its GT's name
            (``targets[i]["words"]``), summed over words and normalised like the other terms
            (or the word head's own loss, given with :meth:`use_word_loss`, e.g. its tree
            softmax). Computed only for prediction sets that carry ``pred_words``.
    """

    def __init__(
        self,
        matcher: HungarianMatcher,
        *,
        loss_class_weight: float = 1.0,
        loss_bbox_weight: float = 5.0,
        loss_giou_weight: float = 2.0,
        focal_alpha: float = 0.25,
        focal_gamma: float = 2.0,
        iou_target: str = "none",
        iou_target_alpha: float = 0.25,
        loss_word_weight: float = 1.0,
    ):
        super().__init__()
        if iou_target not in IOU_TARGETS:
            raise ValueError(f"iou_target must be one of {IOU_TARGETS}, got {iou_target!r}")
        self.iou_target, self.iou_target_alpha = iou_target, iou_target_alpha
        self.matcher = matcher
        self.weights = {
            "loss_class": loss_class_weight,
            "loss_bbox": loss_bbox_weight,
            "loss_giou": loss_giou_weight,
            "loss_word": loss_word_weight,
        }
        self.focal_alpha, self.focal_gamma = focal_alpha, focal_gamma
        self.word_loss: Callable[[Tensor, Tensor], Tensor] = _binary_cross_entropy_sum
        self._observers: List[Callable[..., None]] = []

    def use_word_loss(self, fn: Callable[[Tensor, Tensor], Tensor]) -> None:
        """``loss_word`` becomes ``fn(logits [N, W], targets [N, W]) -> summed loss`` (the word
        head's own, e.g. :meth:`~cqdino.modeling.dino.word_head.NameWordHead.loss`) instead of
        the summed binary cross-entropy."""
        if not callable(fn):
            raise TypeError(f"the word loss must be callable, got {type(fn).__name__}")
        self.word_loss = fn

    @contextmanager
    def observe(self, fn: Callable[..., None]) -> Iterator[None]:
        """Within the block, ``fn(pred_logits, targets, indices, num_boxes, quality)`` is called
        with the arguments of :meth:`loss_single` for every prediction set, before its loss is
        computed (in :meth:`forward`'s order: last layer, aux layers, encoder, DN layers). For
        diagnostics that need the logits of each set (e.g. ``tools/gradient_dilution_runs.py``
        keeps their gradients); the losses are unchanged."""
        self._observers.append(fn)
        try:
            yield
        finally:
            self._observers.remove(fn)

    def loss_single(
        self,
        pred_logits: Tensor,
        pred_boxes: Tensor,
        targets: List[Dict[str, Tensor]],
        indices: List[Tuple[Tensor, Tensor]],
        num_boxes: Union[float, Tensor],
        quality: bool = True,
        pred_words: Optional[Tensor] = None,
    ) -> Dict[str, Tensor]:
        """Unweighted losses of one prediction set (no host sync).

        Args:
            pred_logits: ``[B, Q, N_col]``; pred_boxes: ``[B, Q, 4]`` normalised cxcywh.
            targets: per image ``{"labels": [G] (-1 = no class target), "boxes": [G, 4]}``.
            indices: per image ``(query_idx, target_idx)``.
            num_boxes: normaliser.
            quality: apply ``iou_target`` (False for the DN groups).
            pred_words: optional ``[B, Q, W]`` word logits; then every target has ``"words"``
                ``[G, W]`` and ``loss_word`` is returned too.
        """
        for fn in self._observers:
            fn(pred_logits, targets, indices, num_boxes, quality)
        B, Q, N = pred_logits.shape
        device = pred_logits.device
        batch_idx = torch.cat([torch.full_like(q, b) for b, (q, _) in enumerate(indices)]).to(
            device
        )
        query_idx = torch.cat([q for q, _ in indices]).to(device)
        labels = torch.cat([t["labels"][g.to(device)] for t, (_, g) in zip(targets, indices)])
        gt_boxes = torch.cat([t["boxes"][g.to(device)] for t, (_, g) in zip(targets, indices)])

        # one-hot targets; a -1 label (no column) writes 0 into column 0 of its own row (each
        # matched query appears once), so no boolean-mask indexing (a host sync) is needed
        src = pred_boxes[batch_idx, query_idx]  # (M, 4)
        src_xyxy, gt_xyxy = box_cxcywh_to_xyxy(src), box_cxcywh_to_xyxy(gt_boxes)
        giou = elementwise_generalized_box_iou(src_xyxy, gt_xyxy)

        onehot = torch.zeros(B, Q, N, dtype=pred_logits.dtype, device=device)
        pos = (labels >= 0).to(pred_logits.dtype)
        cols = labels.clamp(min=0)
        if quality and self.iou_target != "none":
            with torch.no_grad():
                t = elementwise_box_iou(src_xyxy, gt_xyxy).clamp(min=0.01).to(pos.dtype)
                if self.iou_target == "align":
                    a = self.iou_target_alpha
                    p = pred_logits[batch_idx, query_idx, cols].sigmoid().to(pos.dtype)
                    t = p**a * t ** (1 - a)
            onehot.index_put_((batch_idx, query_idx, cols), pos * t)
            cls = quality_focal_loss(pred_logits, onehot, self.focal_alpha, self.focal_gamma)
        else:
            onehot.index_put_((batch_idx, query_idx, cols), pos)
            cls = sigmoid_focal_loss(pred_logits, onehot, self.focal_alpha, self.focal_gamma)
        losses = {"loss_class": cls.sum() / num_boxes}
        losses["loss_bbox"] = F.l1_loss(src, gt_boxes, reduction="sum") / num_boxes
        losses["loss_giou"] = (1 - giou).sum() / num_boxes
        if pred_words is not None:
            words = torch.cat([t["words"][g.to(device)] for t, (_, g) in zip(targets, indices)])
            matched = pred_words[batch_idx, query_idx]
            losses["loss_word"] = self.word_loss(matched, words) / num_boxes
        return losses

    def _weighted(self, losses: Dict[str, Tensor], suffix: str) -> Dict[str, Tensor]:
        return {k + suffix: v * self.weights[k] for k, v in losses.items()}

    def num_boxes(
        self, targets: List[Dict[str, Tensor]], device: torch.device
    ) -> Union[float, Tensor]:
        """GT boxes in the batch, averaged over GPUs (sum / world size), clamped to >= 1: a
        Python float on one process, a device scalar after the all-reduce (never read back)."""
        n = float(sum(len(t["boxes"]) for t in targets))
        world = comm.get_world_size()
        if world == 1:
            return max(n, 1.0)
        total = torch.tensor(n, dtype=torch.float, device=device)
        torch.distributed.all_reduce(total)
        return (total / world).clamp(min=1.0)

    def forward(
        self,
        outputs: Dict,
        targets: List[Dict[str, Tensor]],
        dn_meta: Optional[Dict] = None,
    ) -> Dict[str, Tensor]:
        """
        Args:
            outputs: ``pred_logits`` ``[B, Q, N_col]`` and ``pred_boxes`` ``[B, Q, 4]`` of the last
                decoder layer; ``aux_outputs``: list of such dicts for layers ``0..L-2``;
                ``enc_outputs``: the selected encoder proposals; ``dn_outputs``: list over all
                L layers of the DN queries' predictions.
            targets: per image ``{"labels", "boxes"}`` (labels mapped by the class head).
            dn_meta: ``{"num_groups": int, "indices": per image (dn_query_idx, target_idx)}``
                for the positive DN queries, or None without DN.

        Returns:
            weighted losses ``loss_{class,bbox,giou}`` with suffixes ``""`` (last layer),
            ``_i`` (aux layer i), ``_enc``, ``_dn`` (last layer), ``_dn_i``.

        All prediction sets are matched by one matcher call (one device-to-host transfer per
        step, the only host sync of the training step).
        """
        device = outputs["pred_logits"].device
        num_boxes = self.num_boxes(targets, device)
        sets = [(outputs, "")]
        sets += [(aux, f"_{i}") for i, aux in enumerate(outputs.get("aux_outputs", []))]
        if "enc_outputs" in outputs:
            sets.append((outputs["enc_outputs"], "_enc"))
        matches = self.matcher.match_sets(
            [(out["pred_logits"], out["pred_boxes"]) for out, _ in sets], targets
        )
        losses = {}
        for (out, suffix), indices in zip(sets, matches):
            single = self.loss_single(
                out["pred_logits"],
                out["pred_boxes"],
                targets,
                indices,
                num_boxes,
                pred_words=out.get("pred_words"),
            )
            losses.update(self._weighted(single, suffix))

        dn_outputs = outputs.get("dn_outputs")
        if dn_outputs is not None and dn_meta is not None:
            num_dn = num_boxes * dn_meta["num_groups"]
            for i, out in enumerate(dn_outputs):
                suffix = "_dn" if i == len(dn_outputs) - 1 else f"_dn_{i}"
                single = self.loss_single(
                    out["pred_logits"],
                    out["pred_boxes"],
                    targets,
                    dn_meta["indices"],
                    num_dn,
                    quality=False,
                    pred_words=out.get("pred_words"),
                )
                losses.update(self._weighted(single, suffix))
        return losses
