"""Top-K category selection with gather, and batched contrastive logits.

This file fixes the public API; the functions currently run their pure-PyTorch references.
"""

import math
from typing import Optional, Tuple

import torch
from torch import Tensor

__all__ = [
    "topk_category_gather",
    "topk_category_gather_reference",
    "contrastive_logits",
    "contrastive_logits_reference",
]


def _check_topk_inputs(scores: Tensor, embeddings: Tensor, k: int, force: Optional[Tensor]):
    if scores.dim() != 2 or not scores.is_floating_point():
        raise ValueError(
            f"scores must be a float [B, C] tensor, got {scores.dtype} {tuple(scores.shape)}"
        )
    B, C = scores.shape
    if embeddings.dim() == 3:
        if embeddings.shape[:2] != (B, C):
            raise ValueError(
                f"per-image embeddings must be [B, C, D] = [{B}, {C}, D], got {tuple(embeddings.shape)}"
            )
    elif embeddings.dim() == 2:
        if embeddings.shape[0] != C:
            raise ValueError(
                f"shared embeddings must be [C, D] with C = {C}, got {tuple(embeddings.shape)}"
            )
    else:
        raise ValueError(f"embeddings must be [B, C, D] or [C, D], got {tuple(embeddings.shape)}")
    if embeddings.device != scores.device:
        raise ValueError(f"scores are on {scores.device} but embeddings on {embeddings.device}")
    if not isinstance(k, int) or k <= 0 or k > C:
        raise ValueError(
            f"k must be an int in [1, C={C}], got {k!r} (pass min(k, C) for 'k or fewer')"
        )
    if force is not None:
        if force.shape != (B, C) or force.dtype != torch.bool:
            raise ValueError(
                f"force must be a bool [B, C] = [{B}, {C}] mask, got {force.dtype} {tuple(force.shape)}"
            )
        if force.device != scores.device:
            raise ValueError(f"force is on {force.device} but scores on {scores.device}")


def topk_category_gather_reference(
    scores: Tensor,
    embeddings: Tensor,
    k: int,
    force: Optional[Tensor] = None,
    check_finite: bool = False,
) -> Tuple[Tensor, Tensor]:
    """Pure-PyTorch top-K selection + gather (see :func:`topk_category_gather`)."""
    _check_topk_inputs(scores, embeddings, k, force)
    if check_finite and torch.isnan(scores).any():
        raise ValueError("topk_category_gather: scores contain NaN")
    s = scores.detach().double()
    nan = torch.isnan(s)
    s = s.masked_fill(nan, -math.inf)
    # rank: score descending (stable, so ties keep the lower index first), NaN last
    order = torch.sort(s, dim=1, descending=True, stable=True).indices
    order = order.gather(
        1, torch.sort(nan.gather(1, order).to(torch.int8), dim=1, stable=True).indices
    )
    if force is not None:
        not_forced = (~force).gather(1, order).to(torch.int8)
        chosen = order.gather(1, torch.sort(not_forced, dim=1, stable=True).indices)[:, :k]
        rank = torch.empty_like(order)
        rank.scatter_(1, order, torch.arange(order.shape[1], device=order.device).expand_as(order))
        indices = chosen.gather(1, torch.sort(rank.gather(1, chosen), dim=1).indices)
    else:
        indices = order[:, :k]
    if embeddings.dim() == 3:
        gathered = embeddings.gather(1, indices[..., None].expand(-1, -1, embeddings.shape[-1]))
    else:
        gathered = embeddings[indices]
    return indices, gathered


def topk_category_gather(
    scores: Tensor,
    embeddings: Tensor,
    k: int,
    force: Optional[Tensor] = None,
    check_finite: bool = False,
) -> Tuple[Tensor, Tensor]:
    """Select each image's ``k`` best-scoring categories and gather their embeddings.

    Args:
        scores: ``[B, C]`` category scores (any float dtype); not differentiated.
        embeddings: ``[B, C, D]`` per-image or ``[C, D]`` shared category embeddings.
        k: number of categories to keep, ``1 <= k <= C``.
        force: optional ``[B, C]`` bool mask of categories that must be selected (training);
            with more than ``k`` forced, the ``k`` best-scoring forced ones are kept.
        check_finite: raise if ``scores`` hold NaN (CPU only; on CUDA it would need a host sync).

    Returns:
        ``indices`` ``[B, k]`` int64 sorted by score descending (ties: lower index first;
        NaN ranks lowest) and ``gathered`` ``[B, k, D]`` in the embeddings' dtype,
        differentiable w.r.t. ``embeddings``.
    """
    return topk_category_gather_reference(scores, embeddings, k, force, check_finite)


def contrastive_logits_reference(
    queries: Tensor, categories: Tensor, bias: Tensor, valid: Optional[Tensor] = None
) -> Tensor:
    """Pure-PyTorch contrastive logits (see :func:`contrastive_logits`)."""
    D = queries.shape[-1]
    logits = torch.matmul(
        queries,
        (
            categories.transpose(-1, -2).unsqueeze(0)
            if queries.dim() == 4
            else categories.transpose(-1, -2)
        ),
    )
    logits = logits / math.sqrt(D) + bias
    if valid is not None:
        logits = logits.masked_fill(~valid[:, None, :], -math.inf)
    return logits


def contrastive_logits(
    queries: Tensor, categories: Tensor, bias: Tensor, valid: Optional[Tensor] = None
) -> Tensor:
    """Contrastive classification logits ``q · c / sqrt(D) + bias``.

    Args:
        queries: ``[B, Q, D]`` or ``[N, B, Q, D]`` (N decoder layers at once).
        categories: ``[B, K, D]`` selected category embeddings.
        bias: scalar tensor.
        valid: optional ``[B, K]`` bool; invalid (padded) slots get ``-inf``.

    Returns:
        ``[B, Q, K]`` or ``[N, B, Q, K]``; differentiable in queries, categories and bias.
    """
    return contrastive_logits_reference(queries, categories, bias, valid)
