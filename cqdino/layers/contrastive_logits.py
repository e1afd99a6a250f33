"""Contrastive classification logits of CQ-DINO: ``q · c / sqrt(D) + bias`` for every decoder
layer's queries against the image's K selected category tokens, as one batched GEMM with the
scale and bias fused (``baddbmm``). Every image has exactly K category slots (K = min(K, C)),
so there is no padding mask."""

import math

import torch
from torch import Tensor

__all__ = ["contrastive_logits", "contrastive_logits_reference"]


def contrastive_logits_reference(queries: Tensor, categories: Tensor, bias: Tensor) -> Tensor:
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
    return logits


def contrastive_logits(queries: Tensor, categories: Tensor, bias: Tensor) -> Tensor:
    """Contrastive classification logits ``q · c / sqrt(D) + bias``.

    Args:
        queries: ``[B, Q, D]`` or ``[N, B, Q, D]`` (N decoder layers at once).
        categories: ``[B, K, D]`` selected category embeddings.
        bias: scalar tensor.

    Returns:
        ``[B, Q, K]`` or ``[N, B, Q, K]``; differentiable in queries, categories and bias.
    """
    _check_logits_inputs(queries, categories, bias)
    D = queries.shape[-1]
    B, K = categories.shape[:2]
    if queries.dim() == 4:
        N = queries.shape[0]
        q = queries.reshape(N * B, queries.shape[2], D)
        c = categories.unsqueeze(0).expand(N, B, K, D).reshape(N * B, K, D)
    else:
        q, c = queries, categories
    out = torch.baddbmm(bias.reshape(1, 1, 1), q, c.transpose(1, 2), alpha=1.0 / math.sqrt(D))
    out = out.view(*queries.shape[:-1], K)
    return out


def _check_logits_inputs(queries: Tensor, categories: Tensor, bias: Tensor) -> None:
    if queries.dim() not in (3, 4):
        raise ValueError(f"queries must be [B, Q, D] or [N, B, Q, D], got {tuple(queries.shape)}")
    if categories.dim() != 3:
        raise ValueError(f"categories must be [B, K, D], got {tuple(categories.shape)}")
    B, K, D = categories.shape
    qB, qD = queries.shape[-3], queries.shape[-1]
    if qB != B or qD != D:
        raise ValueError(
            f"queries {tuple(queries.shape)} do not match categories [B, K, D] = [{B}, {K}, {D}]"
        )
    if not isinstance(bias, Tensor) or bias.numel() != 1:
        raise ValueError(f"bias must be a one-element (scalar) tensor, got {bias!r}")
    for name, t in (("categories", categories), ("bias", bias)):
        if t.device != queries.device:
            raise ValueError(f"{name} is on {t.device} but queries on {queries.device}")
