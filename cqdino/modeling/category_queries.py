"""Learnable category queries and the image-guided category selector of CQ-DINO.

- :class:`CategoryQueries`: the ``[C, 768]`` category-query parameters, refined by
  ``relu(Linear)``, a relation module (:class:`TreeAggregation` over the category hierarchy or
  :class:`CategorySelfAttention`, or none) and a final LayerNorm.
- :class:`CategorySelector`: category queries cross-attend to the last backbone stage
  (2 layers of cross-attention + FFN, no self-attention), score every category per image, keep
  the top-K per image and project the selected rows to the detector width.

Neither module imports ``cqdino.data``: the hierarchy enters as plain child lists.
"""

import logging
import math
import os
from typing import Any, List, NamedTuple, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from cqdino.layers.topk_gather import topk_category_gather

from .fusion import MultiheadCrossAttention

__all__ = [
    "TreeAggregation",
    "CategorySelfAttention",
    "CategoryQueries",
    "CategorySelector",
    "SelectorOutput",
    "load_category_embeddings",
]

logger = logging.getLogger(__name__)


def _tree_weights(num_descendants: Sequence[int], num_categories: int) -> Tensor:
    """``w = 0.4 + 0.4 * log(2 + n_desc) / log(2 + C)`` per category, float64 ``[C]``."""
    n = torch.tensor([float(x) for x in num_descendants], dtype=torch.float64)
    return 0.4 + 0.4 * torch.log(2.0 + n) / math.log(2.0 + num_categories)


def _heights(children: List[List[int]]) -> List[int]:
    """Height of every node of a DAG given as child lists (leaf = 0); raises on a cycle."""
    C = len(children)
    height = [-1] * C
    state = [0] * C  # 0 new, 1 on stack, 2 done
    for root in range(C):
        if state[root]:
            continue
        stack = [(root, 0)]
        state[root] = 1
        while stack:
            node, i = stack[-1]
            if i < len(children[node]):
                stack[-1] = (node, i + 1)
                child = children[node][i]
                if state[child] == 1:
                    raise ValueError(f"category DAG has a cycle through category index {child}")
                if state[child] == 0:
                    state[child] = 1
                    stack.append((child, 0))
            else:
                stack.pop()
                height[node] = 1 + max((height[c] for c in children[node]), default=-1)
                state[node] = 2
    return height


def _count_descendants(children: List[List[int]], height: List[int]) -> List[int]:
    """Number of distinct descendants per node (bitsets as Python ints, leaves first)."""
    order = sorted(range(len(children)), key=height.__getitem__)
    reach = [0] * len(children)
    for node in order:
        bits = 0
        for c in children[node]:
            bits |= reach[c] | (1 << c)
        reach[node] = bits
    return [r.bit_count() for r in reach]


class TreeAggregation(nn.Module):
    """Bottom-up aggregation of category queries over the category-only DAG.

    For every category with children, in order of height (leaves first, so every child is
    final before its parents read it)::

        parent <- (1 - w) * parent + w * mean(children),
        w = 0.4 + 0.4 * log(2 + n_desc) / log(2 + C)

    where the children are the nearest category descendants and ``n_desc`` is the number of
    distinct category descendants.

    The recursion is linear in the input, so by default it is folded once, height level by
    height level, into a sparse ``[C, C]`` operator ``M`` (row ``p`` holds ``p`` and its
    descendants; ``nnz = C + sum(n_desc)``) and the forward is one sparse-dense product
    ``M @ x`` (backward ``M^T @ grad``). When ``nnz`` exceeds ``max_operator_nnz`` (very deep
    hierarchies) it runs the recursion itself: one ``index_add``/``index_copy`` per height level
    over all parents of that level (never a Python loop per node). Both paths are exact up to
    float rounding. The DAG lives in non-persistent buffers: it is rebuilt from the hierarchy, so
    checkpoints do not depend on it.
    """

    def __init__(
        self,
        children: Union[Sequence[Sequence[int]], Any],
        num_descendants: Optional[Sequence[int]] = None,
        num_categories: Optional[int] = None,
        max_operator_nnz: int = 4_000_000,
    ):
        """
        Args:
            children: per category index ``0..C-1`` the list of its nearest category
                descendants; or an object with attributes ``children`` (and optionally
                ``num_descendants``), e.g. ``CategoryTree.category_dag()``.
            num_descendants: per category the number of distinct category descendants (used in
                ``w``); computed from ``children`` when omitted.
            num_categories: C, checked against ``len(children)`` (default ``len(children)``).
            max_operator_nnz: largest sparse operator to precompute; above it (or with 0) the
                level-by-level recursion is used.
        """
        super().__init__()
        if hasattr(children, "children"):
            dag = children
            children = dag.children
            if num_descendants is None:
                num_descendants = getattr(dag, "num_descendants", None)
        children = [sorted({int(c) for c in ch}) for ch in children]
        C = len(children) if num_categories is None else int(num_categories)
        if len(children) != C:
            raise ValueError(f"children has {len(children)} entries but num_categories={C}")
        for p, ch in enumerate(children):
            for c in ch:
                if not 0 <= c < C:
                    raise ValueError(f"category {p} has child index {c} outside [0, {C})")
                if c == p:
                    raise ValueError(f"category {p} lists itself as a child")
        height = _heights(children)
        counted = _count_descendants(children, height)
        if num_descendants is None:
            num_descendants = counted
        if len(num_descendants) != C:
            raise ValueError(f"num_descendants has {len(num_descendants)} entries, expected {C}")
        if list(num_descendants) != counted:
            bad = next(i for i in range(C) if num_descendants[i] != counted[i])
            logger.warning(
                "TreeAggregation: given num_descendants differ from the child lists "
                f"(category {bad}: given {num_descendants[bad]}, reachable {counted[bad]}); "
                "using the given counts in w"
            )
        self.num_categories = C
        w = _tree_weights(num_descendants, C)
        self.register_buffer("weight", w.float(), persistent=False)

        # Per height level h >= 1: the parents of that height and their (parent, child) edges,
        # concatenated over levels; `level_*_offsets` delimit the levels.
        num_levels = max(height, default=0)
        parents, edge_parent, edge_child, inv_count = [], [], [], []
        p_off, e_off = [0], [0]
        by_height: List[List[int]] = [[] for _ in range(num_levels + 1)]
        for node, h in enumerate(height):
            by_height[h].append(node)
        for h in range(1, num_levels + 1):
            for local, node in enumerate(by_height[h]):
                parents.append(node)
                inv_count.append(1.0 / len(children[node]))
                edge_parent.extend([local] * len(children[node]))
                edge_child.extend(children[node])
            p_off.append(len(parents))
            e_off.append(len(edge_child))
        self.level_parent_offsets = p_off
        self.level_edge_offsets = e_off
        self.num_levels = num_levels
        self.use_operator = C + sum(counted) <= max_operator_nnz
        as_long = lambda x: torch.tensor(x, dtype=torch.long)  # noqa: E731
        if self.use_operator:
            rows, cols, vals = self._fold(children, by_height, w.tolist())
            self.register_buffer("op_indices", as_long([rows, cols]), persistent=False)
            self.register_buffer(
                "op_values", torch.tensor(vals, dtype=torch.float64), persistent=False
            )
        else:
            self.register_buffer("parents", as_long(parents), persistent=False)
            self.register_buffer("edge_parent", as_long(edge_parent), persistent=False)
            self.register_buffer("edge_child", as_long(edge_child), persistent=False)
            self.register_buffer(
                "parent_inv_count", torch.tensor(inv_count, dtype=torch.float64), persistent=False
            )
            self.register_buffer("parent_weight", w[parents], persistent=False)

    @staticmethod
    def _fold(children, by_height, w):
        """Rows of the aggregation operator, level by level (float64, COO, row-sorted)."""
        rows: List[dict] = [None] * len(children)  # type: ignore[list-item]
        for level in by_height:
            for p in level:
                r = {p: 1.0}
                if children[p]:
                    r[p] = 1.0 - w[p]
                    s = w[p] / len(children[p])
                    for c in children[p]:  # children are final: they have a lower height
                        for j, v in rows[c].items():
                            r[j] = r.get(j, 0.0) + s * v
                rows[p] = r
        ri, ci, vals = [], [], []
        for p, r in enumerate(rows):
            for j in sorted(r):
                ri.append(p)
                ci.append(j)
                vals.append(r[j])
        return ri, ci, vals

    @classmethod
    def from_dag(cls, dag: Any, **kwargs: Any) -> "TreeAggregation":
        """Build from an object with ``children`` and ``num_descendants`` attributes."""
        return cls(dag.children, getattr(dag, "num_descendants", None), len(dag.children), **kwargs)

    def extra_repr(self) -> str:
        size = f"nnz={self.op_values.numel()}" if self.use_operator else "level-wise"
        return f"num_categories={self.num_categories}, levels={self.num_levels}, {size}"

    def forward(self, x: Tensor) -> Tensor:
        """``x [..., C, D]`` -> aggregated ``[..., C, D]`` (out of place, differentiable)."""
        C = self.num_categories
        if x.dim() < 2 or x.shape[-2] != C:
            raise ValueError(f"TreeAggregation built for C={C} got {tuple(x.shape)}")
        if self.use_operator:
            # indices are built sorted and unique in __init__, so the per-call check is skipped
            op = torch.sparse_coo_tensor(
                self.op_indices,
                self.op_values,
                (C, C),
                is_coalesced=True,
                check_invariants=False,
            )
            # half precision goes through float32 (sparse kernels, and sums of up to C rows)
            dtype = x.dtype if x.dtype in (torch.float32, torch.float64) else torch.float32
            op = op.to(dtype)
            flat = x.movedim(-2, 0).reshape(C, -1).to(dtype)  # (C, prod(batch) * D)
            with torch.autocast(device_type=x.device.type, enabled=False):
                y = torch.sparse.mm(op, flat).to(x.dtype)
            return y.reshape((C,) + x.movedim(-2, 0).shape[1:]).movedim(0, -2)
        dim = x.dim() - 2
        for h in range(self.num_levels):
            p0, p1 = self.level_parent_offsets[h], self.level_parent_offsets[h + 1]
            e0, e1 = self.level_edge_offsets[h], self.level_edge_offsets[h + 1]
            parents = self.parents[p0:p1]
            child_feat = x.index_select(dim, self.edge_child[e0:e1])  # (..., E_h, D)
            shape = list(x.shape)
            shape[dim] = p1 - p0
            sums = x.new_zeros(shape).index_add(dim, self.edge_parent[e0:e1], child_feat)
            mean = sums * self.parent_inv_count[p0:p1, None].to(x.dtype)
            w = self.parent_weight[p0:p1, None].to(x.dtype)
            new = (1 - w) * x.index_select(dim, parents) + w * mean
            x = x.index_copy(dim, parents, new)
        return x


class CategorySelfAttention(nn.Module):
    """One multi-head self-attention over all C category queries, residual, LayerNorm.

    Quadratic in C: meant for small vocabularies (COCO); use :class:`TreeAggregation` or no
    relation module at V3Det scale.
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
    ):
        """
        Args:
            num_categories: C.
            embed_dim: output width (768 in the recipe).
            relation: module mapping ``[C, embed_dim]`` to the same shape
                (:class:`TreeAggregation`, :class:`CategorySelfAttention`) or None.
            init_embeddings: optional path of a ``.pth``/``.npy`` ``[C, d]`` table, or a tensor.
        """
        super().__init__()
        if num_categories <= 0:
            raise ValueError(f"num_categories must be positive, got {num_categories}")
        self.num_categories = num_categories
        if init_embeddings is not None:
            table = load_category_embeddings(init_embeddings, num_categories)
        else:
            table = torch.randn(num_categories, embed_dim) * embed_dim**-0.5
        self.embeddings = nn.Parameter(table)
        self.proj = nn.Linear(table.shape[1], embed_dim)
        n = getattr(relation, "num_categories", num_categories)
        if n != num_categories:
            raise ValueError(
                f"relation module built for C={n}, CategoryQueries has C={num_categories}"
            )
        self.relation = relation
        self.norm = nn.LayerNorm(embed_dim)

    def forward(self) -> Tensor:
        """Returns the refined category queries ``[C, embed_dim]``."""
        x = F.relu(self.proj(self.embeddings))
        if self.relation is not None:
            x = self.relation(x)
        return self.norm(x)


class SelectorOutput(NamedTuple):
    """Result of :class:`CategorySelector`.

    scores: ``[B, C]`` selection logits (input of the selection loss).
    indices: ``[B, K]`` int64 selected category indices, best first.
    tokens: ``[B, K, out_dim]`` projected selector outputs of the selected categories.
    """

    scores: Tensor
    indices: Tensor
    tokens: Tensor


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
        self.score = nn.Linear(query_dim, 1)
        self.out_proj = nn.Linear(query_dim, out_dim)

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

    def forward(
        self,
        queries: Tensor,
        features: Tensor,
        padding_mask: Optional[Tensor] = None,
        force: Optional[Tensor] = None,
    ) -> SelectorOutput:
        """
        Args:
            queries: ``[C, query_dim]`` category queries (output of :class:`CategoryQueries`).
            features: ``[B, in_channels, H, W]`` last backbone stage.
            padding_mask: optional ``[B, H, W]`` bool, True at padded pixels.
            force: optional ``[B, C]`` bool, categories that must be selected (the training
                option "force GT categories into the top-K", off by default; pass e.g.
                ``image_level_targets(gt_classes, C)`` from ``selection_loss``).

        Returns:
            :class:`SelectorOutput` with ``scores [B, C]``, ``indices [B, K]``,
            ``tokens [B, K, out_dim]``, ``K = min(num_topk, C)``.
        """
        encoded = self.encode(queries, features, padding_mask)  # (B, C, D)
        scores = self.score(encoded).squeeze(-1)  # (B, C)
        k = min(self.num_topk, queries.shape[0])
        indices, selected = topk_category_gather(scores, encoded, k, force=force)
        return SelectorOutput(scores, indices, self.out_proj(selected))
