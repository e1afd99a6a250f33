"""Bottom-up aggregation of the category queries over the category hierarchy (V3Det relation
module of CQ-DINO). The hierarchy comes in as a :class:`cqdino.data.CategoryDAG` (children,
descendant counts, heights), whose derived quantities are used as they are."""

import logging
import math
from typing import Any, List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor, nn

__all__ = ["TreeAggregation", "category_dag_from_children"]

logger = logging.getLogger(__name__)


def category_dag_from_children(children: Sequence[Sequence[int]]) -> Any:
    """A :class:`cqdino.data.CategoryDAG` from plain per-category child lists (every node a
    category), through :class:`cqdino.data.CategoryTree` (which validates it: cycles, ...)."""
    from cqdino.data.hierarchy import CategoryTree  # the data package is optional for modeling

    C = len(children)
    parents = {i: [] for i in range(C)}
    for p, ch in enumerate(children):
        for c in ch:
            c = int(c)
            if not 0 <= c < C:
                raise ValueError(f"category {p} has child index {c} outside [0, {C})")
            if c == p:
                raise ValueError(f"category {p} lists itself as a child")
            parents[c].append(p)
    return CategoryTree.from_parents(parents, range(C)).category_dag()


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
    float rounding.

    The DAG lives in non-persistent buffers (rebuilt from the hierarchy, so checkpoints do not
    depend on it); the float64 ones keep their dtype through ``model.half()`` /
    ``.to(dtype)`` (only their device follows), so a half-precision model aggregates with the
    exact weights.
    """

    def __init__(
        self,
        dag: Union[Any, Sequence[Sequence[int]]],
        num_descendants: Optional[Sequence[int]] = None,
        max_operator_nnz: int = 4_000_000,
    ):
        """
        Args:
            dag: a :class:`cqdino.data.CategoryDAG` (``CategoryTree.category_dag()``: attributes
                ``children``, ``num_descendants``, ``height``, ``levels``), or plain per-category
                lists of nearest category descendants (turned into one by
                :func:`category_dag_from_children`).
            num_descendants: per category the ``n_desc`` used in ``w``, if not the DAG's
                (a warning names the first category where they differ).
            max_operator_nnz: largest sparse operator to precompute; above it (or with 0) the
                level-by-level recursion is used.
        """
        super().__init__()
        if not hasattr(dag, "levels"):
            dag = category_dag_from_children(dag)
        children, levels = dag.children, dag.levels
        C = len(children)
        counted = list(dag.num_descendants)
        if num_descendants is None:
            num_descendants = counted
        elif len(num_descendants) != C:
            raise ValueError(f"num_descendants has {len(num_descendants)} entries, expected {C}")
        elif list(num_descendants) != counted:
            bad = next(i for i in range(C) if num_descendants[i] != counted[i])
            logger.warning(
                "TreeAggregation: given num_descendants differ from the DAG's "
                f"(category {bad}: given {num_descendants[bad]}, reachable {counted[bad]}); "
                "using the given counts in w"
            )
        self.num_categories = C
        n = torch.tensor([float(x) for x in num_descendants], dtype=torch.float64)
        w = 0.4 + 0.4 * torch.log(2.0 + n) / math.log(2.0 + C)
        self.register_buffer("weight", w, persistent=False)

        # Per height level h >= 1: the parents of that height and their (parent, child) edges,
        # concatenated over levels; `level_*_offsets` delimit the levels.
        parents, edge_parent, edge_child, inv_count = [], [], [], []
        p_off, e_off = [0], [0]
        for level in levels[1:]:
            for local, node in enumerate(level):
                parents.append(node)
                inv_count.append(1.0 / len(children[node]))
                edge_parent.extend([local] * len(children[node]))
                edge_child.extend(children[node])
            p_off.append(len(parents))
            e_off.append(len(edge_child))
        self.level_parent_offsets = p_off
        self.level_edge_offsets = e_off
        self.num_levels = max(len(levels) - 1, 0)
        self.use_operator = C + sum(counted) <= max_operator_nnz
        as_long = lambda x: torch.tensor(x, dtype=torch.long)  # noqa: E731
        if self.use_operator:
            rows, cols, vals = self._fold(children, levels, w.tolist())
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
    def _fold(
        children: List[List[int]], levels: List[List[int]], w: List[float]
    ) -> Tuple[List[int], List[int], List[float]]:
        """Rows of the aggregation operator, level by level (float64, COO, row-sorted)."""
        rows: List[dict] = [None] * len(children)  # type: ignore[list-item]
        for level in levels:
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

    def _apply(self, fn, recurse: bool = True):
        # dtype casts (half(), to(dtype)) leave the float64 buffers alone; devices follow
        kept = {k: b for k, b in self._buffers.items() if b is not None and b.is_floating_point()}
        super()._apply(fn, recurse)
        for k, b in kept.items():
            self._buffers[k] = b.to(self._buffers[k].device)
        return self

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
