"""Image-guided category selection of CQ-DINO: the C category queries cross-attend to the last
backbone stage (2 layers of cross-attention + FFN, no self-attention), every category is scored
per image, the top-K are kept and their rows projected to the detector width."""

import math
from typing import List, NamedTuple, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from cqdino.layers.topk_gather import topk_category_gather

from .fusion import MultiheadCrossAttention
from .inference_cache import InferenceCache

__all__ = ["CategorySelector", "SelectorOutput", "SCORE_FORMS"]

SCORE_FORMS = ("linear", "bilinear", "dense", "dense+bilinear")


def _prior_logits(num_categories: int, prior: Optional[Sequence[float]]) -> Tensor:
    """``[C]`` logits of each category's image frequency (clamped to ``[1e-4, 0.5]``), or
    zeros without a prior."""
    if prior is None:
        return torch.zeros(num_categories)
    p = torch.as_tensor(list(prior), dtype=torch.float32)
    if p.shape != (num_categories,):
        raise ValueError(f"prior has {p.numel()} entries for {num_categories} categories")
    p = p.clamp(1e-4, 0.5)
    return torch.log(p) - torch.log1p(-p)


class SelectorOutput(NamedTuple):
    """Result of :class:`CategorySelector`.

    scores: ``[B, C]`` selection logits (input of the selection loss).
    indices: ``[B, K]`` int64 selected category indices, best first.
    tokens: ``[B, K, out_dim]`` projected selector outputs of the selected categories.
    dense: ``[B, C, H * W]`` per-location logits of the ``"dense"`` score forms (before the
        max over locations and without the per-category bias), else None.
    """

    scores: Tensor
    indices: Tensor
    tokens: Tensor
    dense: Optional[Tensor] = None


class _SelectorLayer(nn.Module):
    """Cross-attention (queries -> image tokens) + FFN, post-norm; no self-attention."""

    def __init__(self, dim: int, memory_dim: int, num_heads: int, ffn_dim: int, dropout: float):
        super().__init__()
        self.cross_attn = MultiheadCrossAttention(dim, memory_dim, num_heads, dropout)
        self.norm1 = nn.LayerNorm(dim)
        self.linear1 = nn.Linear(dim, ffn_dim)
        self.linear2 = nn.Linear(ffn_dim, dim)
        self.norm2 = nn.LayerNorm(dim)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: Tensor, k: Tensor, v: Tensor, key_valid: Optional[Tensor]) -> Tensor:
        x = self.norm1(x + self.dropout(self.cross_attn.attend(x, k, v, key_valid)))
        y = self.linear2(self.dropout(F.relu(self.linear1(x))))
        return self.norm2(x + self.dropout(y))


class CategorySelector(nn.Module):
    """Image-guided top-K category selection.

    Image tokens are the last backbone stage flattened, with its (valid-pixel) average prepended,
    projected to ``memory_dim``. The C category queries cross-attend to them through
    ``num_layers`` (cross-attention + FFN) layers without self-attention, so categories are
    independent and processed in chunks of ``chunk_size`` (bounding the ``[B, heads, chunk, N]``
    attention and ``[B, chunk, ffn_dim]`` FFN memory). ``Linear(dim, 1)`` scores every category;
    the K best per image are gathered from the per-image selector output ``[B, C, dim]`` with
    :func:`cqdino.layers.topk_category_gather` and projected to ``out_dim``.

    Memory: without grad, the working set is the ``[B, C, dim]`` output plus one chunk. With
    grad, every chunk's activations are kept for backward unless ``checkpoint_chunks=True``
    (each chunk's forward is recomputed in backward: bounded memory for one extra forward).
    At recipe widths and C = 13,204 the saved activations are roughly 1 GB per image without it
    (estimate: ~10k floats per category and layer).
    """

    def __init__(
        self,
        in_channels: int,
        num_topk: int = 100,
        query_dim: int = 768,
        memory_dim: int = 512,
        num_heads: int = 4,
        ffn_dim: int = 3072,
        num_layers: int = 2,
        out_dim: int = 256,
        dropout: float = 0.0,
        chunk_size: int = 2048,
        checkpoint_chunks: bool = False,
        query_skip: bool = False,
        score_form: str = "linear",
        num_categories: Optional[int] = None,
        prior: Optional[Sequence[float]] = None,
    ):
        """
        Args:
            in_channels: channels of the backbone's last stage.
            num_topk: K, categories kept per image (``min(K, C)`` is used).
            query_dim: width of the category queries (768 in the recipe).
            memory_dim: width the image tokens are projected to (512 in the recipe).
            num_heads: cross-attention heads (4).
            ffn_dim: FFN hidden width (3072).
            num_layers: cross-attention + FFN layers (2).
            out_dim: width of the selected category tokens (the detector width, 256).
            dropout: dropout in the layers (0 by default).
            chunk_size: categories processed at once.
            checkpoint_chunks: recompute chunk activations in backward to bound training memory.
            query_skip: tokens ``T = out_proj(selector output) + query_proj(category query)``:
                a category's identity reaches the detector directly, not only through the
                image-conditioned selector output (where, early in training from scratch, the
                image content dominates and the K tokens of an image are nearly parallel). Off
                in the recipe (the authors project the selector output alone).
            score_form: how a category is scored from the image:

                * ``"linear"`` (the authors'): ``Linear(query_dim, 1)`` of the category's
                  selector output ``x_c``;
                * ``"bilinear"``: ``<W q_c, LN(x_c)> / sqrt(d) + b_c``: the output is read
                  through the category's own query, so categories that attend to the same
                  image content still score apart;
                * ``"dense"``: ``max_n <W q_c, LN(m_n)> / sqrt(d) + b_c`` over the image
                  tokens ``m_n`` (every location, not the pooled cross-attention output): a
                  small object lights up its location, whatever the rest of the image holds;
                * ``"dense+bilinear"``: the sum of the two image terms, plus ``b_c``.

                ``b_c`` is a per-category bias (needs ``num_categories``), initialised at the
                logit of ``prior`` (each category's fraction of training images) when given.
            num_categories: C (the forms with a per-category bias).
            prior: optional ``[C]`` fraction of training images holding each category.
        """
        super().__init__()
        if num_topk <= 0 or chunk_size <= 0:
            raise ValueError(
                f"num_topk and chunk_size must be positive, got {num_topk}, {chunk_size}"
            )
        self.num_topk = num_topk
        self.chunk_size = chunk_size
        self.checkpoint_chunks = checkpoint_chunks
        self.query_dim = query_dim
        self.input_proj = nn.Linear(in_channels, memory_dim)
        self.layers = nn.ModuleList(
            [
                _SelectorLayer(query_dim, memory_dim, num_heads, ffn_dim, dropout)
                for _ in range(num_layers)
            ]
        )
        if score_form not in SCORE_FORMS:
            raise ValueError(f"score_form must be one of {SCORE_FORMS}, got {score_form!r}")
        self.score_form = score_form
        self.score = nn.Linear(query_dim, 1) if score_form == "linear" else None
        self.score_query = self.score_norm = self.dense_query = self.dense_norm = None
        self.category_bias = None
        if score_form == "linear" and prior is not None:
            raise ValueError("a category prior needs a score form with a per-category bias")
        if score_form != "linear":
            if num_categories is None:
                raise ValueError(f"score_form={score_form!r} needs num_categories")
            if "bilinear" in score_form:
                self.score_query = nn.Linear(query_dim, query_dim, bias=False)
                self.score_norm = nn.LayerNorm(query_dim)
            if "dense" in score_form:
                self.dense_query = nn.Linear(query_dim, memory_dim, bias=False)
                self.dense_norm = nn.LayerNorm(memory_dim)
            self.category_bias = nn.Parameter(_prior_logits(num_categories, prior))
        self.out_proj = nn.Linear(query_dim, out_dim)
        self.query_proj = nn.Linear(query_dim, out_dim) if query_skip else None
        # the score forms' projections of the category queries: the same for every image
        self._cache = InferenceCache()

    def image_tokens(
        self, features: Tensor, padding_mask: Optional[Tensor] = None
    ) -> Tuple[Tensor, Optional[Tensor]]:
        """``features [B, Cin, H, W]`` -> tokens ``[B, 1 + H*W, memory_dim]`` and key validity.

        ``padding_mask``: optional ``[B, H, W]`` bool, True at padded pixels; padded pixels are
        left out of the pooled token and masked as keys.
        """
        B, _, H, W = features.shape
        tokens = features.flatten(2).transpose(1, 2)  # (B, H*W, Cin)
        if padding_mask is None:
            pooled = tokens.mean(1, keepdim=True)
            valid = None
        else:
            if padding_mask.shape != (B, H, W) or padding_mask.dtype != torch.bool:
                raise ValueError(
                    f"padding_mask must be bool [B, H, W] = [{B}, {H}, {W}], "
                    f"got {padding_mask.dtype} {tuple(padding_mask.shape)}"
                )
            keep = (~padding_mask).flatten(1)  # (B, H*W)
            w = keep.to(tokens.dtype)[..., None]
            pooled = (tokens * w).sum(1, keepdim=True) / w.sum(1, keepdim=True).clamp(min=1)
            valid = torch.cat([keep.new_ones(B, 1), keep], dim=1)
        return self.input_proj(torch.cat([pooled, tokens], dim=1)), valid

    def _run_chunk(self, q: Tensor, kv: List[Tensor], valid: Optional[Tensor]) -> Tensor:
        for i, layer in enumerate(self.layers):
            q = layer(q, kv[2 * i], kv[2 * i + 1], valid)
        return q

    def encode(
        self, queries: Tensor, features: Tensor, padding_mask: Optional[Tensor] = None
    ) -> Tensor:
        """Per-image category features ``[B, C, query_dim]`` for queries ``[C, query_dim]``."""
        if queries.dim() != 2 or queries.shape[1] != self.query_dim:
            raise ValueError(f"queries must be [C, {self.query_dim}], got {tuple(queries.shape)}")
        memory, valid = self.image_tokens(features, padding_mask)
        B = memory.shape[0]
        kv: List[Tensor] = []
        for layer in self.layers:  # the memory is fixed: project its keys/values once
            kv.extend(layer.cross_attn.project_keys(memory))
        chunks = queries.split(self.chunk_size, dim=0)
        if not torch.is_grad_enabled():  # write chunks in place: no second [B, C, D] copy
            out = memory.new_empty(B, queries.shape[0], self.query_dim)
            start = 0
            for q in chunks:
                out[:, start : start + len(q)] = self._run_chunk(
                    q[None].expand(B, -1, -1), kv, valid
                )
                start += len(q)
            return out
        outs = []
        for q in chunks:
            q = q[None].expand(B, -1, -1)  # (B, chunk, D)
            if self.checkpoint_chunks:
                outs.append(checkpoint(self._run_chunk, q, kv, valid, use_reentrant=False))
            else:
                outs.append(self._run_chunk(q, kv, valid))
        return torch.cat(outs, dim=1) if len(outs) > 1 else outs[0]

    def score_categories(
        self,
        queries: Tensor,
        encoded: Tensor,
        features: Tensor,
        padding_mask: Optional[Tensor] = None,
    ) -> Tuple[Tensor, Optional[Tensor]]:
        """Selection logits ``[B, C]`` of the ``score_form`` (constructor) from the queries
        ``[C, query_dim]``, their selector outputs ``encoded [B, C, query_dim]`` and the image
        ``features [B, Cin, H, W]``, and the dense forms' per-location logits
        ``[B, C, H * W]`` (else None)."""
        if self.score is not None:
            return self.score(encoded).squeeze(-1), None
        scores = self.category_bias.to(encoded.dtype).expand(encoded.shape[0], -1)
        if self.score_query is not None:
            w = self._cache.get(
                "score", self.score_query, (queries,), lambda: self.score_query(queries)
            )  # (C, D)
            bil = torch.einsum("bcd,cd->bc", self.score_norm(encoded), w)
            scores = scores + bil / math.sqrt(w.shape[-1])
        if self.dense_query is not None:
            memory, valid = self.image_tokens(features, padding_mask)  # (B, 1 + N, M)
            m = self.dense_norm(memory[:, 1:])  # (B, N, M), the pooled token left out
            w = self._cache.get(
                "dense", self.dense_query, (queries,), lambda: self.dense_query(queries)
            )  # (C, M)
            sim = torch.einsum("bnm,cm->bcn", m, w) / math.sqrt(w.shape[-1])  # (B, C, N)
            if valid is not None:
                pooled = sim.masked_fill(~valid[:, None, 1:], float("-inf")).amax(-1)
            else:
                pooled = sim.amax(-1)
            return scores + pooled, sim
        return scores, None

    def forward(
        self,
        queries: Tensor,
        features: Tensor,
        padding_mask: Optional[Tensor] = None,
        force: Optional[Tensor] = None,
        num_topk: Optional[int] = None,
    ) -> SelectorOutput:
        """
        Args:
            queries: ``[C, query_dim]`` category queries (output of :class:`CategoryQueries`).
            features: ``[B, in_channels, H, W]`` last backbone stage.
            padding_mask: optional ``[B, H, W]`` bool, True at padded pixels.
            force: optional ``[B, C]`` bool, categories that must be selected (the training
                option "force GT categories into the top-K", off by default; pass e.g.
                ``image_level_targets(gt_classes, C)`` from ``selection_loss``).
            num_topk: K for this call (default: the constructor's).

        Returns:
            :class:`SelectorOutput` with ``scores [B, C]``, ``indices [B, K]``,
            ``tokens [B, K, out_dim]``, ``K = min(num_topk, C)``.
        """
        encoded = self.encode(queries, features, padding_mask)  # (B, C, D)
        scores, dense = self.score_categories(queries, encoded, features, padding_mask)
        k = min(self.num_topk if num_topk is None else num_topk, queries.shape[0])
        indices, selected = topk_category_gather(scores, encoded, k, force=force)
        tokens = self.out_proj(selected)
        if self.query_proj is not None:
            tokens = tokens + self.query_proj(queries[indices])  # (B, K, out_dim)
        return SelectorOutput(scores, indices, tokens, dense)
