"""The learnable category queries of CQ-DINO: ``LayerNorm(relation(relu(Linear(E))))`` with a
``[C, 768]`` table ``E`` and a relation module (:class:`~.tree_aggregation.TreeAggregation`
over the category hierarchy, :class:`CategorySelfAttention`, or none).

``E`` is either one free parameter row per category (the recipe; optionally initialised from
text embeddings of the names) or, compositionally, built from the words of the category names
(:class:`BagOfWordsEncoder`: ``E_c`` = mean of learnable word vectors), so that a category with
few or no training boxes moves with its words.

This module does not import ``cqdino.data``: the hierarchy enters through the relation module.
"""

import os
from typing import List, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cqdino.utils.text import name_words, word_vocabulary

from .inference_cache import InferenceCache

__all__ = [
    "BagOfWordsEncoder",
    "CategorySelfAttention",
    "CategoryQueries",
    "load_category_embeddings",
    "name_words",
]


class BagOfWordsEncoder(nn.Module):
    """A learnable bag-of-words text encoder: ``E_c = mean of the vectors of the words of name
    c`` (``nn.EmbeddingBag``, mode mean), ``[C, dim]``.

    The offline stand-in for the text embeddings the authors initialise the category queries
    with, made learnable: every word's vector is trained by all categories whose names hold
    it, so a category with few or no boxes of its own ("red dotted star") is moved by what its
    words learnt elsewhere. Memory is one row per distinct word (V3Det's 13,204 names hold far
    fewer distinct words than categories) plus the word index of every name. With
    ``category_residual`` each category also gets its own free row, initialised to zero.
    """

    def __init__(
        self, names: Sequence[str], dim: int, category_residual: bool = False, init_std=None
    ):
        """
        Args:
            names: the C category names in model (contiguous) order.
            dim: width of the word vectors (and of ``E``).
            category_residual: add a free per-category row (zero at initialisation).
            init_std: std of the word vectors at initialisation (default ``dim ** -0.5``:
                rows of about unit norm).
        """
        super().__init__()
        names = list(names)
        if not names:
            raise ValueError("BagOfWordsEncoder: no category names given")
        self.words, rows = word_vocabulary(names)
        index: List[int] = [i for row in rows for i in row]
        offsets: List[int] = [0]
        for row in rows[:-1]:
            offsets.append(offsets[-1] + len(row))
        self.table = nn.EmbeddingBag(len(self.words), dim, mode="mean")
        std = dim**-0.5 if init_std is None else float(init_std)
        nn.init.normal_(self.table.weight, std=std)
        self.register_buffer("word_index", torch.tensor(index, dtype=torch.long), persistent=False)
        self.register_buffer("offsets", torch.tensor(offsets, dtype=torch.long), persistent=False)
        self.num_categories = len(rows)
        self.residual = nn.Parameter(torch.zeros(len(rows), dim)) if category_residual else None

    @property
    def dim(self) -> int:
        return self.table.embedding_dim

    def extra_repr(self) -> str:
        return f"num_categories={self.num_categories}, num_words={len(self.words)}"

    def forward(self) -> Tensor:
        """``[C, dim]`` category vectors."""
        e = self.table(self.word_index, self.offsets)
        return e if self.residual is None else e + self.residual


class CategorySelfAttention(nn.Module):
    """One multi-head self-attention over all C category queries, residual, LayerNorm.

    Quadratic in C: meant for small vocabularies (COCO); use
    :class:`~.tree_aggregation.TreeAggregation` or no relation module at V3Det scale.
    """

    def __init__(self, embed_dim: int = 768, num_heads: int = 8, dropout: float = 0.0):
        super().__init__()
        self.attn = nn.MultiheadAttention(embed_dim, num_heads, dropout=dropout, batch_first=True)
        self.norm = nn.LayerNorm(embed_dim)

    def forward(self, x: Tensor) -> Tensor:
        """``x [C, D]`` or ``[B, C, D]`` -> same shape."""
        squeeze = x.dim() == 2
        y = x[None] if squeeze else x
        y = self.norm(y + self.attn(y, y, y, need_weights=False)[0])
        return y[0] if squeeze else y


def load_category_embeddings(
    source: Union[str, os.PathLike, Tensor], num_categories: int
) -> Tensor:
    """Load a ``[C, d]`` float embedding table from a ``.pth``/``.pt`` or ``.npy`` file.

    A ``.pth`` may hold a tensor, or a dict with exactly one tensor (or an ``"embeddings"``
    entry). Raises ``ValueError`` naming the file on a wrong shape, C mismatch or non-finite
    values.
    """
    name = "given tensor"
    if isinstance(source, Tensor):
        table = source
    else:
        path = os.fspath(source)
        name = path
        if not os.path.isfile(path):
            raise FileNotFoundError(f"category embedding file {path} does not exist")
        ext = os.path.splitext(path)[1].lower()
        if ext == ".npy":
            import numpy as np

            table = torch.from_numpy(np.load(path, allow_pickle=False))
        elif ext in (".pth", ".pt"):
            obj = torch.load(path, map_location="cpu", weights_only=True)
            if isinstance(obj, dict):
                tensors = {k: v for k, v in obj.items() if isinstance(v, Tensor)}
                if "embeddings" in tensors:
                    obj = tensors["embeddings"]
                elif len(tensors) == 1:
                    obj = next(iter(tensors.values()))
                else:
                    raise ValueError(
                        f"{path}: expected a tensor or a dict with one tensor (or key "
                        f"'embeddings'), got keys {sorted(obj)[:10]}"
                    )
            if not isinstance(obj, Tensor):
                raise ValueError(f"{path}: expected a tensor, got {type(obj).__name__}")
            table = obj
        else:
            raise ValueError(f"category embedding file {path}: unsupported extension {ext!r}")
    if table.dim() != 2 or not (table.is_floating_point()):
        raise ValueError(
            f"category embeddings from {name} must be a float [C, d] table, "
            f"got {table.dtype} {tuple(table.shape)}"
        )
    if table.shape[0] != num_categories:
        raise ValueError(
            f"category embeddings from {name} have {table.shape[0]} rows but the model has "
            f"C={num_categories} categories"
        )
    if not torch.isfinite(table).all():
        raise ValueError(f"category embeddings from {name} contain NaN or Inf")
    return table.detach().float().clone()


class CategoryQueries(nn.Module):
    """The C learnable category queries, refined into ``[C, embed_dim]`` category features.

    ``LayerNorm(relation(relu(Linear(E))))`` with ``E`` a ``[C, d]`` parameter. ``E`` is random
    (``N(0, 1/d)``, rows of about unit norm like normalised text embeddings) unless
    ``init_embeddings`` gives a table (e.g. text embeddings of the class names); when its width
    ``d`` differs from ``embed_dim`` the refining Linear projects ``d -> embed_dim``.
    """

    def __init__(
        self,
        num_categories: int,
        embed_dim: int = 768,
        relation: Optional[nn.Module] = None,
        init_embeddings: Optional[Union[str, os.PathLike, Tensor]] = None,
        name_encoder: Optional[BagOfWordsEncoder] = None,
    ):
        """
        Args:
            num_categories: C.
            embed_dim: output width (768 in the recipe).
            relation: module mapping ``[C, embed_dim]`` to the same shape
                (:class:`~.tree_aggregation.TreeAggregation`, :class:`CategorySelfAttention`) or
                None.
            init_embeddings: optional path of a ``.pth``/``.npy`` ``[C, d]`` table, or a tensor.
            name_encoder: compositional queries: ``E`` comes from this
                :class:`BagOfWordsEncoder` over the category names instead of a ``[C, d]``
                parameter (exclusive with ``init_embeddings``).
        """
        super().__init__()
        if num_categories <= 0:
            raise ValueError(f"num_categories must be positive, got {num_categories}")
        self.num_categories = num_categories
        self.name_encoder = name_encoder
        if name_encoder is not None:
            if init_embeddings is not None:
                raise ValueError("give init_embeddings or name_encoder, not both")
            if name_encoder.num_categories != num_categories:
                raise ValueError(
                    f"name_encoder has {name_encoder.num_categories} category names, "
                    f"CategoryQueries has C={num_categories}"
                )
            self.embeddings = None
            in_dim = name_encoder.dim
        else:
            if init_embeddings is not None:
                table = load_category_embeddings(init_embeddings, num_categories)
            else:
                table = torch.randn(num_categories, embed_dim) * embed_dim**-0.5
            self.embeddings = nn.Parameter(table)
            in_dim = table.shape[1]
        self.proj = nn.Linear(in_dim, embed_dim)
        n = getattr(relation, "num_categories", num_categories)
        if n != num_categories:
            raise ValueError(
                f"relation module built for C={n}, CategoryQueries has C={num_categories}"
            )
        self.relation = relation
        self.norm = nn.LayerNorm(embed_dim)
        self._cache = InferenceCache()

    def forward(self) -> Tensor:
        """Returns the refined category queries ``[C, embed_dim]``.

        They do not depend on the image: in inference (eval mode, no grad, eager) the result
        is kept and returned again while no parameter or buffer of the module has changed
        (same storage, same in-place version), so a forward at C = 13,204 does not rebuild
        them per image. Training, autograd, tracing and export always recompute."""
        return self._cache.get("queries", self, (), self._compute)

    def _compute(self) -> Tensor:
        e = self.embeddings if self.name_encoder is None else self.name_encoder()
        x = F.relu(self.proj(e))
        if self.relation is not None:
            x = self.relation(x)
        return self.norm(x)
