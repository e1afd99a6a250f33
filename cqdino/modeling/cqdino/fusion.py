"""Attention blocks that let image tokens and the K selected category tokens talk.

- :class:`ImageCategoryFusion`: the encoder's bi-directional image <-> category attention
  (GLIP / Grounding-DINO style), run before each deformable encoder layer.
- :class:`CategoryCrossAttention`: the decoder sublayer between self-attention and deformable
  attention (object queries attend to the category tokens), post-norm like DINO's sublayers.
- :class:`MultiheadCrossAttention`: plain multi-head cross-attention whose key/value projection
  can be computed once and reused over query chunks (the category selector needs that).

Mask conventions (the ones of the surrounding code): ``image_padding_mask`` is True at padded
image tokens (DETR), ``key_valid`` True at keys that take part. Masked keys never influence
any output; a row with no valid key at all receives a zero update instead of NaN. Every image
has exactly K category tokens, so category tokens are never masked.
"""

from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "MultiheadCrossAttention",
    "ImageCategoryFusion",
    "CategoryCrossAttention",
    "masked_softmax",
]

# Attention logits are clamped to this magnitude so that half-precision runs cannot overflow.
_LOGIT_CLAMP = 50000.0


def masked_softmax(logits: Tensor, keep: Optional[Tensor]) -> Tensor:
    """Softmax over the last dim restricted to ``keep``; rows with nothing kept become zeros.

    Args:
        logits: ``[..., L, N]``.
        keep: bool, broadcastable to ``logits`` (True = this key takes part), or None.
    """
    if keep is None:
        return logits.softmax(-1)
    keep = keep.expand_as(logits)
    any_keep = keep.any(-1, keepdim=True)
    # rows without any key are unmasked (finite softmax) and zeroed afterwards
    probs = logits.masked_fill(~(keep | ~any_keep), float("-inf")).softmax(-1)
    return probs * any_keep.to(probs.dtype)


def _drop_path(x: Tensor, p: float, training: bool) -> Tensor:
    """Stochastic depth over the batch dim (dim 0)."""
    if p == 0.0 or not training:
        return x
    keep = x.new_empty((x.shape[0],) + (1,) * (x.dim() - 1)).bernoulli_(1.0 - p)
    return x * keep / (1.0 - p)


def _check_mask(mask: Optional[Tensor], name: str, shape: Tuple[int, int]) -> None:
    if mask is None:
        return
    if mask.dtype != torch.bool or tuple(mask.shape) != tuple(shape):
        raise ValueError(
            f"{name} must be a bool tensor of shape {tuple(shape)}, "
            f"got {mask.dtype} {tuple(mask.shape)}"
        )


class MultiheadCrossAttention(nn.Module):
    """Multi-head cross-attention ``query [B, L, Dq]`` -> ``keys [B, N, Dk]``.

    Unlike ``nn.MultiheadAttention`` it exposes :meth:`project_keys` / :meth:`attend`, so the
    key/value projection of a fixed memory is computed once and reused for many query chunks,
    and it zeroes (instead of NaN) the output of a query whose keys are all masked.
    """

    def __init__(
        self,
        query_dim: int,
        key_dim: Optional[int] = None,
        num_heads: int = 8,
        dropout: float = 0.0,
    ):
        """
        Args:
            query_dim: width of the queries; also the attention width and the output width.
            key_dim: width of the keys/values (default ``query_dim``).
            num_heads: number of heads; must divide ``query_dim``.
            dropout: dropout on the attention probabilities.
        """
        super().__init__()
        key_dim = query_dim if key_dim is None else key_dim
        if query_dim % num_heads != 0:
            raise ValueError(f"query_dim={query_dim} is not divisible by num_heads={num_heads}")
        self.num_heads = num_heads
        self.dropout = dropout
        self.q_proj = nn.Linear(query_dim, query_dim)
        self.k_proj = nn.Linear(key_dim, query_dim)
        self.v_proj = nn.Linear(key_dim, query_dim)
        self.out_proj = nn.Linear(query_dim, query_dim)
        for lin in (self.q_proj, self.k_proj, self.v_proj, self.out_proj):
            nn.init.xavier_uniform_(lin.weight)
            nn.init.zeros_(lin.bias)

    def _split(self, x: Tensor) -> Tensor:
        B, L, D = x.shape
        return x.view(B, L, self.num_heads, D // self.num_heads).transpose(1, 2)

    def project_keys(self, keys: Tensor, values: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
        """``keys``/``values`` ``[B, N, Dk]`` -> per-head ``k, v`` ``[B, heads, N, Dh]``."""
        values = keys if values is None else values
        return self._split(self.k_proj(keys)), self._split(self.v_proj(values))

    def attend(self, query: Tensor, k: Tensor, v: Tensor, key_valid: Optional[Tensor]) -> Tensor:
        """``query [B, L, Dq]`` against projected ``k, v`` -> ``[B, L, Dq]``.

        ``key_valid``: optional ``[B, N]`` bool (True = key takes part).
        """
        B, L, _ = query.shape
        q = self._split(self.q_proj(query))  # (B, h, L, Dh)
        p = self.dropout if self.training else 0.0
        if key_valid is None:
            out = F.scaled_dot_product_attention(q, k, v, dropout_p=p)
        else:
            any_valid = key_valid.any(-1)  # (B,)
            # a batch row without valid keys is unmasked for the kernel and zeroed below
            mask = (key_valid | ~any_valid[:, None])[:, None, None, :]
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p)
            out = out * any_valid.to(out.dtype)[:, None, None, None]
        out = out.transpose(1, 2).reshape(B, L, -1)
        return self.out_proj(out)

    def forward(
        self,
        query: Tensor,
        keys: Tensor,
        values: Optional[Tensor] = None,
        key_valid: Optional[Tensor] = None,
    ) -> Tensor:
        """``query [B, L, Dq]``, ``keys``/``values`` ``[B, N, Dk]``, ``key_valid [B, N]``."""
        _check_mask(key_valid, "key_valid", keys.shape[:2])
        k, v = self.project_keys(keys, values)
        return self.attend(query, k, v, key_valid)


class ImageCategoryFusion(nn.Module):
    """Bi-directional attention between image tokens and category tokens (one encoder step).

    As the authors' bi-attention block: both inputs are LayerNormed first,
    ``v = LN(image)``, ``l = LN(category)``; both directions share one attention-logit matrix
    ``A = (W_q v)(W_k l)^T / sqrt(Dh)``: image tokens read the category values through
    ``softmax_K(A)``, category tokens read the image values through ``softmax_N(A^T)``
    (padded image tokens masked). The updates go onto the *normed* inputs through a learnable
    layer-scale vector (initialised to ``init_values``) and optional stochastic depth::

        image    <- LN(image)    + drop_path(gamma_v * dv)
        category <- LN(category) + drop_path(gamma_l * dl)

    so the category tokens pass through a LayerNorm in every encoder layer. Categories do not
    attend to each other here.
    """

    def __init__(
        self,
        image_dim: int = 256,
        category_dim: int = 256,
        embed_dim: int = 1024,
        num_heads: int = 4,
        dropout: float = 0.0,
        drop_path: float = 0.0,
        init_values: float = 1e-4,
    ):
        """
        Args:
            image_dim: width of the image tokens.
            category_dim: width of the category tokens.
            embed_dim: inner attention width (split over ``num_heads``).
            num_heads: attention heads.
            dropout: dropout on both attention-probability matrices.
            drop_path: stochastic-depth rate on both residual branches.
            init_values: initial value of the layer-scale vectors.
        """
        super().__init__()
        if embed_dim % num_heads != 0:
            raise ValueError(f"embed_dim={embed_dim} is not divisible by num_heads={num_heads}")
        self.num_heads = num_heads
        self.head_dim = embed_dim // num_heads
        self.dropout = dropout
        self.drop_path = drop_path
        self.image_norm = nn.LayerNorm(image_dim)
        self.category_norm = nn.LayerNorm(category_dim)
        self.image_query = nn.Linear(image_dim, embed_dim)
        self.category_key = nn.Linear(category_dim, embed_dim)
        self.image_value = nn.Linear(image_dim, embed_dim)
        self.category_value = nn.Linear(category_dim, embed_dim)
        self.image_out = nn.Linear(embed_dim, image_dim)
        self.category_out = nn.Linear(embed_dim, category_dim)
        for lin in (
            self.image_query,
            self.category_key,
            self.image_value,
            self.category_value,
            self.image_out,
            self.category_out,
        ):
            nn.init.xavier_uniform_(lin.weight)
            nn.init.zeros_(lin.bias)
        self.image_gamma = nn.Parameter(torch.full((image_dim,), float(init_values)))
        self.category_gamma = nn.Parameter(torch.full((category_dim,), float(init_values)))

    def _heads(self, x: Tensor) -> Tensor:
        B, L, _ = x.shape
        return x.view(B, L, self.num_heads, self.head_dim).transpose(1, 2)  # (B, h, L, Dh)

    def forward(
        self,
        image: Tensor,
        category: Tensor,
        image_padding_mask: Optional[Tensor] = None,
    ) -> Tuple[Tensor, Tensor]:
        """
        Args:
            image: ``[B, N, image_dim]`` flattened multi-scale image tokens.
            category: ``[B, K, category_dim]`` selected category tokens.
            image_padding_mask: optional ``[B, N]`` bool, True at padded image tokens.

        Returns:
            updated ``image [B, N, image_dim]`` and ``category [B, K, category_dim]``.
        """
        B, N, _ = image.shape
        K = category.shape[1]
        if category.shape[0] != B:
            raise ValueError(f"image batch {B} != category batch {category.shape[0]}")
        _check_mask(image_padding_mask, "image_padding_mask", (B, N))
        x_img = self.image_norm(image)
        x_cat = self.category_norm(category)
        q = self._heads(self.image_query(x_img)) * self.head_dim**-0.5
        k = self._heads(self.category_key(x_cat))
        logits = torch.matmul(q, k.transpose(-1, -2))  # (B, h, N, K)
        logits = logits.clamp(-_LOGIT_CLAMP, _LOGIT_CLAMP)

        img_keep = None if image_padding_mask is None else ~image_padding_mask[:, None, None, :]
        p = self.dropout if self.training else 0.0
        attn_img = F.dropout(logits.softmax(-1), p, self.training)  # (B, h, N, K)
        attn_cat = F.dropout(
            masked_softmax(logits.transpose(-1, -2), img_keep), p, self.training
        )  # (B, h, K, N)
        v_cat = self._heads(self.category_value(x_cat))
        v_img = self._heads(self.image_value(x_img))
        d_img = torch.matmul(attn_img, v_cat).transpose(1, 2).reshape(B, N, -1)
        d_cat = torch.matmul(attn_cat, v_img).transpose(1, 2).reshape(B, K, -1)
        d_img = self.image_gamma * self.image_out(d_img)
        d_cat = self.category_gamma * self.category_out(d_cat)
        image = x_img + _drop_path(d_img, self.drop_path, self.training)
        category = x_cat + _drop_path(d_cat, self.drop_path, self.training)
        return image, category


class CategoryCrossAttention(nn.Module):
    """Decoder sublayer: object queries attend to the category tokens (residual + LayerNorm).

    ``out = LayerNorm(query + Dropout(MHA(query + query_pos, categories, categories)))``.
    """

    def __init__(self, d_model: int = 256, num_heads: int = 8, dropout: float = 0.0):
        """
        Args:
            d_model: width of the object queries and of the category tokens.
            num_heads: attention heads.
            dropout: dropout on the attention probabilities and on the residual branch.
        """
        super().__init__()
        self.attn = MultiheadCrossAttention(d_model, d_model, num_heads, dropout)
        self.dropout = nn.Dropout(dropout)
        self.norm = nn.LayerNorm(d_model)

    def forward(
        self,
        query: Tensor,
        category: Tensor,
        query_pos: Optional[Tensor] = None,
    ) -> Tensor:
        """
        Args:
            query: ``[B, Q, D]`` object queries (content part).
            category: ``[B, K, D]`` category tokens.
            query_pos: optional ``[B, Q, D]`` positional embedding added to the attention query.

        Returns:
            ``[B, Q, D]``.
        """
        if category.shape[0] != query.shape[0]:
            raise ValueError(f"query batch {query.shape[0]} != category batch {category.shape[0]}")
        q = query if query_pos is None else query + query_pos
        out = self.attn(q, category)
        return self.norm(query + self.dropout(out))
