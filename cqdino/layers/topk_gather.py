"""Top-K category selection with gather.

:func:`topk_category_gather` runs the fused ``torch.ops.cqdino.topk_category_gather`` kernel
(CPU and CUDA, one launch on CUDA, no host sync) and falls back to its pure-PyTorch reference
when the compiled extension is unavailable.
"""

import math
from typing import Optional, Tuple

import torch
from torch import Tensor

from cqdino import _ext

__all__ = [
    "topk_category_gather",
    "topk_category_gather_reference",
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
                f"per-image embeddings must be [B, C, D] = [{B}, {C}, D], "
                f"got {tuple(embeddings.shape)}"
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
    if isinstance(k, bool) or not isinstance(k, int) or k <= 0 or k > C:
        raise ValueError(
            f"k must be an int in [1, C={C}], got {k!r} (pass min(k, C) for 'k or fewer')"
        )
    if force is not None:
        if force.shape != (B, C) or force.dtype != torch.bool:
            raise ValueError(
                f"force must be a bool [B, C] = [{B}, {C}] mask, "
                f"got {force.dtype} {tuple(force.shape)}"
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
        differentiable w.r.t. ``embeddings``. The gradient is scattered back to the selected
        rows; with shared ``[C, D]`` embeddings, rows picked by several images accumulate in a
        fixed order (bitwise deterministic on CPU and CUDA). ``scores`` get no gradient.

    On CUDA the op makes no host sync; ``check_finite`` is then ignored (NaN scores still rank
    lowest) and ``k`` may be at most 8192 (4096 with float64 scores).
    """
    _check_topk_inputs(scores, embeddings, k, force)
    if check_finite and scores.device.type == "cpu" and bool(torch.isnan(scores).any()):
        raise ValueError("topk_category_gather: scores contain NaN")
    if not _ext.use_ext("topk_category_gather", scores.device.type):
        return topk_category_gather_reference(scores, embeddings, k, force, check_finite=False)
    return torch.ops.cqdino.topk_category_gather(scores.detach(), embeddings, k, force)


if _ext.has_ext():

    @torch.library.register_fake("cqdino::topk_category_gather")
    def _topk_fake(scores, embeddings, k, force=None):
        B = scores.shape[0]
        return (
            scores.new_empty((B, k), dtype=torch.long),
            embeddings.new_empty((B, k, embeddings.shape[-1])),
        )

    @torch.library.register_fake("cqdino::topk_category_gather_backward")
    def _topk_backward_fake(grad_gathered, indices, num_categories, shared):
        B, _, D = grad_gathered.shape
        shape = (num_categories, D) if shared else (B, num_categories, D)
        return grad_gathered.new_empty(shape)

    def _topk_setup_context(ctx, inputs, output):
        scores, embeddings, _, _ = inputs
        indices, _ = output
        ctx.mark_non_differentiable(indices)
        ctx.save_for_backward(indices)
        ctx.num_categories = scores.shape[1]
        ctx.shared = embeddings.dim() == 2
        ctx.emb_dtype = embeddings.dtype

    def _topk_backward(ctx, grad_indices, grad_gathered):
        if grad_gathered is None or not ctx.needs_input_grad[1]:
            return None, None, None, None
        (indices,) = ctx.saved_tensors
        grad = torch.ops.cqdino.topk_category_gather_backward(
            grad_gathered.to(ctx.emb_dtype).contiguous(),
            indices,
            ctx.num_categories,
            ctx.shared,
        )
        return None, grad, None, None

    torch.library.register_autograd(
        "cqdino::topk_category_gather", _topk_backward, setup_context=_topk_setup_context
    )

    # The backward is linear in grad_gathered; its own gradient gathers the incoming rows again
    # (this makes double backward work, e.g. for gradient penalties).
    def _topk_backward_setup_context(ctx, inputs, output):
        _, indices, _, shared = inputs
        ctx.save_for_backward(indices)
        ctx.shared = shared

    def _topk_backward_backward(ctx, grad_grad):
        (indices,) = ctx.saved_tensors
        if ctx.shared:
            g = grad_grad[indices]
        else:
            g = grad_grad.gather(1, indices[..., None].expand(-1, -1, grad_grad.shape[-1]))
        return g, None, None, None

    torch.library.register_autograd(
        "cqdino::topk_category_gather_backward",
        _topk_backward_backward,
        setup_context=_topk_backward_setup_context,
    )
