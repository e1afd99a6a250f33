"""Image-level category selection loss of CQ-DINO.

Asymmetric loss (ASL, Ridnik et al. 2021) on the selector's ``[B, C]`` logits against the
image-level multi-label targets (categories present in the image), with optional *ancestor
masking*: an ancestor of a positive category that is not labelled itself is ignored (neither
positive nor negative). The COCO variant is plain BCE (ASL with ``gamma=0, clip=0``) weighted 0.1.
"""

from typing import Callable, Optional, Sequence, Union

import torch
from torch import Tensor, nn

__all__ = ["asymmetric_loss", "SelectionLoss", "image_level_targets"]

IgnoreSpec = Union[Tensor, Callable[[Tensor], Tensor], None]


def image_level_targets(gt_classes: Sequence[Tensor], num_categories: int) -> Tensor:
    """Multi-hot ``[B, C]`` bool targets from per-image ground-truth class indices.

    Args:
        gt_classes: B int tensors of contiguous class indices in ``[0, C)`` (any length).
        num_categories: C.
    """
    if len(gt_classes) == 0:
        raise ValueError("gt_classes is empty (need one tensor per image)")
    device = gt_classes[0].device
    cls = torch.cat([c.reshape(-1).long().to(device) for c in gt_classes])
    img = torch.cat(
        [
            torch.full((c.numel(),), i, dtype=torch.long, device=device)
            for i, c in enumerate(gt_classes)
        ]
    )
    # asynchronous on accelerators (no host sync per step); raises at once on the CPU
    torch._assert_async(
        ((cls >= 0) & (cls < num_categories)).all(),
        f"image_level_targets: a ground-truth class index is out of [0, {num_categories})",
    )
    out = torch.zeros(len(gt_classes), num_categories, dtype=torch.bool, device=device)
    out[img, cls.clamp(0, num_categories - 1)] = True
    return out


def asymmetric_loss(
    logits: Tensor,
    targets: Tensor,
    ignore: Optional[Tensor] = None,
    gamma_neg: float = 7.0,
    gamma_pos: float = 0.0,
    clip: float = 0.05,
    eps: float = 1e-8,
    logit_clamp: float = 88.0,
) -> Tensor:
    """Summed asymmetric loss.

    With ``p = sigmoid(clamp(x, +-logit_clamp))`` and the shifted negative probability
    ``p_m = max(p - clip, 0)``::

        loss = -sum_{not ignored} [ y * (1 - p)^gamma_pos * log(p)
                                    + (1 - y) * p_m^gamma_neg * log(1 - p_m) ]

    with the focusing weights ``(1 - p)^gamma_pos``, ``p_m^gamma_neg`` detached from the graph and
    ``log`` taken of ``max(., eps)``. ``gamma_neg = gamma_pos = clip = 0`` is binary cross-entropy.

    Args:
        logits: ``[B, C]``.
        targets: ``[B, C]`` bool or {0, 1} float.
        ignore: optional ``[B, C]`` bool, True = entry left out of the loss.

    Returns:
        a scalar (float32 or the logits' dtype if wider).
    """
    if logits.shape != targets.shape:
        raise ValueError(
            f"logits {tuple(logits.shape)} and targets {tuple(targets.shape)} differ in shape"
        )
    if ignore is not None and (ignore.shape != logits.shape or ignore.dtype != torch.bool):
        raise ValueError(
            f"ignore must be a bool mask of shape {tuple(logits.shape)}, "
            f"got {ignore.dtype} {tuple(ignore.shape)}"
        )
    x = logits.float() if logits.dtype in (torch.float16, torch.bfloat16) else logits
    x = x.clamp(-logit_clamp, logit_clamp)
    y = targets.to(x.dtype)
    p = torch.sigmoid(x)
    p_neg = (p - clip).clamp(min=0) if clip > 0 else p
    loss = y * torch.log(p.clamp(min=eps)) + (1 - y) * torch.log((1 - p_neg).clamp(min=eps))
    if gamma_neg > 0 or gamma_pos > 0:
        with torch.no_grad():
            base = torch.where(y > 0, 1 - p, p_neg)
            gamma = gamma_pos * y + gamma_neg * (1 - y)
            weight = torch.pow(base, gamma)
        loss = loss * weight
    if ignore is not None:
        loss = loss.masked_fill(ignore, 0.0)
    return -loss.sum()


class SelectionLoss(nn.Module):
    """Weighted selection loss with optional hierarchy masking.

    ``forward(logits, targets, ignore=None)`` returns ``weight * asymmetric_loss(...)``, where the
    ignore mask is, in order of precedence: the ``ignore`` argument (a ``[B, C]`` bool tensor or a
    callable ``targets -> [B, C] bool``), or the ``ignore_fn`` given at construction (e.g.
    ``CategoryTree.ancestor_mask``), or none. The callable receives the bool targets.
    """

    def __init__(
        self,
        gamma_neg: float = 7.0,
        gamma_pos: float = 0.0,
        clip: float = 0.05,
        weight: float = 1.0,
        ignore_fn: Optional[Callable[[Tensor], Tensor]] = None,
        eps: float = 1e-8,
        logit_clamp: float = 88.0,
    ):
        """
        Args:
            gamma_neg, gamma_pos: focusing exponents for negatives / positives.
            clip: probability shift of the negatives.
            weight: loss weight.
            ignore_fn: optional callable ``targets [B, C] bool -> ignore [B, C] bool``.
            eps: floor inside the logs.
            logit_clamp: logits are clamped to ``+-logit_clamp``.
        """
        super().__init__()
        self.gamma_neg = gamma_neg
        self.gamma_pos = gamma_pos
        self.clip = clip
        self.weight = weight
        self.ignore_fn = ignore_fn
        self.eps = eps
        self.logit_clamp = logit_clamp

    @classmethod
    def v3det(cls, ignore_fn: Optional[Callable[[Tensor], Tensor]] = None) -> "SelectionLoss":
        """The V3Det recipe: ASL gamma- 7, gamma+ 0, clip 0.05, weight 1, ancestor masking."""
        return cls(gamma_neg=7.0, gamma_pos=0.0, clip=0.05, weight=1.0, ignore_fn=ignore_fn)

    @classmethod
    def coco(cls) -> "SelectionLoss":
        """The COCO recipe: plain BCE (summed) with weight 0.1."""
        return cls(gamma_neg=0.0, gamma_pos=0.0, clip=0.0, weight=0.1)

    def extra_repr(self) -> str:
        return (
            f"gamma_neg={self.gamma_neg}, gamma_pos={self.gamma_pos}, clip={self.clip}, "
            f"weight={self.weight}, ignore_fn={self.ignore_fn is not None}"
        )

    def forward(self, logits: Tensor, targets: Tensor, ignore: IgnoreSpec = None) -> Tensor:
        """``logits [B, C]``, ``targets [B, C]`` (bool or 0/1) -> weighted scalar loss."""
        spec = self.ignore_fn if ignore is None else ignore
        if callable(spec):
            spec = spec(targets.bool() if targets.dtype != torch.bool else targets)
        loss = asymmetric_loss(
            logits,
            targets,
            ignore=spec,
            gamma_neg=self.gamma_neg,
            gamma_pos=self.gamma_pos,
            clip=self.clip,
            eps=self.eps,
            logit_clamp=self.logit_clamp,
        )
        return self.weight * loss
