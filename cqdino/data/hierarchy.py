"""Category hierarchy: a DAG of tree nodes (WordNet-style ids), some of which are categories.

The V3Det tree json layout has the structural keys ``categoryid2treeid`` (dataset category id ->
node id), ``id2name``, ``father2child``, ``child2father``, ``ancestor2descendant`` and
``descendant2ancestor``; a node may have several parents. :class:`CategoryTree` loads it (or a
plain parent list), validates it, and derives what CQ-DINO needs:

* per category: parents / children / ancestors / descendants over tree nodes;
* :class:`CategoryDAG`: the category-only DAG (nearest category descendants, heights, levels)
  for bottom-up tree aggregation of category queries;
* :meth:`CategoryTree.ancestor_mask`: which categories the selection loss must ignore.
"""

import json
import logging
import os
from collections import deque
from dataclasses import dataclass
from typing import Dict, Hashable, Iterable, List, Optional, Sequence

import torch

__all__ = ["CategoryTree", "CategoryDAG"]

logger = logging.getLogger(__name__)

_STRUCTURAL_KEYS = ("categoryid2treeid", "father2child", "child2father")


@dataclass(frozen=True)
class CategoryDAG:
    """The category-only DAG over contiguous category indices ``0..C-1``.

    Attributes:
        children: per category, its nearest category descendants: categories reached by walking
            down the tree without passing through another category (non-category nodes are
            skipped through). Sorted.
        num_descendants: per category, the number of distinct category descendants (all depths).
        height: 0 for a category without category descendants, else 1 + max(height of children).
        levels: categories grouped by height, leaves (height 0) first; processing the levels in
            order guarantees every child is final before a parent reads it.
    """

    children: List[List[int]]
    num_descendants: List[int]
    height: List[int]
    levels: List[List[int]]

    @property
    def num_categories(self) -> int:
        return len(self.children)


class CategoryTree:
    """A category hierarchy. Build it with :meth:`from_v3det_json` or :meth:`from_parents`.

    Categories are addressed by dataset category id (``category_ids[i]`` is contiguous index
    ``i``); tree nodes by their node id (a string in the V3Det layout). A category absent from the
    tree becomes an isolated node (with a warning), so every category has exactly one node.
    """

    def __init__(
        self,
        parents: Dict[Hashable, Sequence[Hashable]],
        category_ids: Sequence[int],
        node_of_category: Dict[int, Hashable],
        source: str = "<parents>",
    ):
        """
        Args:
            parents: node id -> list of parent node ids (every node should be a key; parent ids
                that are not keys become root nodes).
            category_ids: dataset category ids in contiguous order.
            node_of_category: dataset category id -> node id, for every id in ``category_ids``
                (ids missing here become isolated nodes with a warning).
            source: a name for error messages (the file the tree came from).
        """
        self.source = source
        category_ids = [int(c) for c in category_ids]
        if len(set(category_ids)) != len(category_ids):
            dup = sorted({c for c in category_ids if category_ids.count(c) > 1})[:5]
            raise ValueError(f"{source}: duplicate category ids {dup}")
        self._category_ids = category_ids
        self._contiguous = {c: i for i, c in enumerate(category_ids)}

        # Collect nodes (keys first, then parents that are not keys) in a stable order.
        nodes: List[Hashable] = []
        index: Dict[Hashable, int] = {}

        def add(node: Hashable) -> int:
            if node not in index:
                index[node] = len(nodes)
                nodes.append(node)
            return index[node]

        for node in parents:
            add(node)
        for node, ps in parents.items():
            if isinstance(ps, (str, bytes)) or not isinstance(ps, Iterable):
                raise ValueError(
                    f"{source}: parents of node {node!r} must be a list of node ids, got {ps!r}"
                )
            for p in ps:
                add(p)

        missing = [c for c in category_ids if c not in node_of_category]
        if missing:
            logger.warning(
                f"{source}: {len(missing)} categories are not in the tree and become isolated "
                f"nodes: ids {missing[:10]}{' ...' if len(missing) > 10 else ''}"
            )
        self._category_node: List[int] = []
        for c in category_ids:
            if c in node_of_category:
                node = node_of_category[c]
                if node not in index:
                    raise ValueError(
                        f"{source}: category {c} maps to unknown tree node {node!r} "
                        "(not a node of the parent/child lists)"
                    )
                self._category_node.append(index[node])
            else:
                # An isolated node of its own, named so it cannot clash with a real node id.
                self._category_node.append(add(("__isolated_category__", c)))
        dup_nodes = len(set(self._category_node)) != len(self._category_node)
        if dup_nodes:
            seen: Dict[int, int] = {}
            for c, n in zip(category_ids, self._category_node):
                if n in seen:
                    raise ValueError(
                        f"{source}: categories {seen[n]} and {c} map to the same tree node "
                        f"{nodes[n]!r}"
                    )
                seen[n] = c

        n = len(nodes)
        self._nodes = nodes
        self._node_index = index
        par: List[List[int]] = [[] for _ in range(n)]
        chi: List[List[int]] = [[] for _ in range(n)]
        for node, ps in parents.items():
            i = index[node]
            for p in dict.fromkeys(ps):  # de-duplicate, keep order
                j = index[p]
                if j == i:
                    raise ValueError(f"{source}: node {node!r} is its own parent (cycle)")
                par[i].append(j)
                chi[j].append(i)
        self._par = par
        self._chi = chi
        self._node_category = {node: k for k, node in enumerate(self._category_node)}
        self._topo = self._topological_order()
        self._dag: Optional[CategoryDAG] = None
        self._cat_ancestors: Optional[List[List[int]]] = None
        self._mask_index: Dict[torch.device, tuple] = {}
        self._closure_cache: Dict[tuple, frozenset] = {}

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_v3det_json(
        cls, path: str, category_ids: Optional[Sequence[int]] = None
    ) -> "CategoryTree":
        """Load a tree in the V3Det tree-json layout (only the structural keys are read).

        Args:
            path: the json file.
            category_ids: dataset category ids in contiguous order; default: the sorted integer
                keys of ``categoryid2treeid``.
        """
        path = os.fspath(path)
        try:
            with open(path, encoding="utf-8") as f:
                data = json.load(f)
        except (OSError, json.JSONDecodeError) as e:
            raise ValueError(f"cannot read category tree {path}: {e}") from e
        return cls.from_v3det_dict(data, category_ids, source=path)

    @classmethod
    def from_v3det_dict(
        cls, data: dict, category_ids: Optional[Sequence[int]] = None, source: str = "<dict>"
    ) -> "CategoryTree":
        """Like :meth:`from_v3det_json` for an already-loaded dict."""
        if not isinstance(data, dict) or "categoryid2treeid" not in data:
            raise ValueError(f"{source}: not a V3Det category tree (no 'categoryid2treeid' key)")
        if "child2father" not in data and "father2child" not in data:
            raise ValueError(f"{source}: needs 'child2father' or 'father2child'")
        try:
            cat2node = {int(k): v for k, v in data["categoryid2treeid"].items()}
        except (TypeError, ValueError) as e:
            raise ValueError(f"{source}: categoryid2treeid keys must be integer ids: {e}") from e
        known = set(data.get("id2name", {}))
        # Union of both edge lists (they should agree; either one alone is enough).
        parents: Dict[str, List[str]] = {node: [] for node in known}
        for child, ps in data.get("child2father", {}).items():
            parents.setdefault(child, []).extend(ps)
        for father, cs in data.get("father2child", {}).items():
            parents.setdefault(father, [])
            for c in cs:
                parents.setdefault(c, []).append(father)
        if known:
            for node, ps in parents.items():
                for x in (node, *ps):
                    if x not in known:
                        raise ValueError(
                            f"{source}: tree node {x!r} is used in the parent/child lists but "
                            "is not in id2name"
                        )
        if category_ids is None:
            category_ids = sorted(cat2node)
        else:
            extra = sorted(set(cat2node) - set(int(c) for c in category_ids))
            if extra:
                logger.warning(
                    f"{source}: {len(extra)} tree categories are not dataset categories and are "
                    f"treated as plain nodes: ids {extra[:10]}"
                )
                cat2node = {c: v for c, v in cat2node.items() if c not in set(extra)}
        return cls(parents, category_ids, cat2node, source=source)

    @classmethod
    def from_parents(
        cls,
        parents: Dict[Hashable, List[Hashable]],
        category_ids: Sequence[int],
        node_of_category: Optional[Dict[int, Hashable]] = None,
    ) -> "CategoryTree":
        """A tree from a plain parent list.

        Args:
            parents: node id -> parent node ids.
            category_ids: dataset category ids in contiguous order.
            node_of_category: dataset category id -> node id; default: the node id is the
                category id itself (categories that are no node become isolated nodes).
        """
        if node_of_category is None:
            nodes = set(parents)
            for ps in parents.values():
                nodes.update(ps)
            node_of_category = {int(c): c for c in category_ids if c in nodes}
        return cls(parents, category_ids, node_of_category, source="<parents>")

    def _topological_order(self) -> List[int]:
        """Nodes ordered parents-first; raises on a cycle, naming a node on it."""
        n = len(self._nodes)
        indeg = [len(p) for p in self._par]
        queue = deque(i for i in range(n) if indeg[i] == 0)
        order = []
        while queue:
            i = queue.popleft()
            order.append(i)
            for c in self._chi[i]:
                indeg[c] -= 1
                if indeg[c] == 0:
                    queue.append(c)
        if len(order) != n:
            # Walk parents among the unresolved nodes until one repeats: that one is on a cycle.
            left = {i for i in range(n) if indeg[i] > 0}
            i = next(iter(sorted(left)))
            seen = set()
            while i not in seen:
                seen.add(i)
                i = next(p for p in self._par[i] if p in left)
            raise ValueError(
                f"{self.source}: the category tree has a cycle through node {self._nodes[i]!r}"
            )
        return order

    # ------------------------------------------------------------------ per-category queries
    @property
    def num_categories(self) -> int:
        return len(self._category_ids)

    @property
    def category_ids(self) -> List[int]:
        return list(self._category_ids)

    @property
    def num_nodes(self) -> int:
        return len(self._nodes)

    def node(self, cid: int) -> Hashable:
        """The tree node id of dataset category ``cid``."""
        return self._nodes[self._category_node[self._cidx(cid)]]

    def category_of_node(self, node: Hashable) -> Optional[int]:
        """The dataset category id of a tree node, or None for a non-category node."""
        k = self._node_category.get(self._node_index.get(node, -1))
        return None if k is None else self._category_ids[k]

    def _cidx(self, cid: int) -> int:
        try:
            return self._contiguous[int(cid)]
        except (KeyError, TypeError, ValueError):
            raise KeyError(f"{self.source}: unknown category id {cid!r}") from None

    def _ids(self, idx: Iterable[int]) -> List[Hashable]:
        """Node ids, sorted (by ``repr`` when the ids are of mixed types)."""
        nodes = [self._nodes[i] for i in idx]
        try:
            return sorted(nodes)
        except TypeError:
            return sorted(nodes, key=repr)

    def parents(self, cid: int) -> List[Hashable]:
        """Node ids of the direct parents of category ``cid``'s node."""
        return self._ids(self._par[self._category_node[self._cidx(cid)]])

    def children(self, cid: int) -> List[Hashable]:
        """Node ids of the direct children of category ``cid``'s node."""
        return self._ids(self._chi[self._category_node[self._cidx(cid)]])

    def ancestors(self, cid: int) -> List[Hashable]:
        """Node ids of all ancestors of category ``cid``'s node (every path to a root)."""
        return self._ids(self._closure(self._category_node[self._cidx(cid)], up=True))

    def node_ancestors(self, node: Hashable) -> List[Hashable]:
        """Node ids of all ancestors of any tree node (category or not)."""
        if node not in self._node_index:
            raise KeyError(f"{self.source}: unknown tree node {node!r}")
        return self._ids(self._closure(self._node_index[node], up=True))

    def descendants(self, cid: int) -> List[Hashable]:
        """Node ids of all descendants of category ``cid``'s node."""
        return self._ids(self._closure(self._category_node[self._cidx(cid)], up=False))

    def _closure(self, i: int, up: bool) -> frozenset:
        key = (i, up)
        if key in self._closure_cache:
            return self._closure_cache[key]
        edges = self._par if up else self._chi
        seen = set()
        stack = list(edges[i])
        while stack:
            j = stack.pop()
            if j not in seen:
                seen.add(j)
                stack.extend(edges[j])
        self._closure_cache[key] = frozenset(seen)
        return self._closure_cache[key]

    # ------------------------------------------------------------------ category-only DAG
    def category_dag(self) -> CategoryDAG:
        """The category-only DAG over contiguous indices (see :class:`CategoryDAG`)."""
        if self._dag is not None:
            return self._dag
        n, C = len(self._nodes), self.num_categories
        cat_of = [self._node_category.get(i, -1) for i in range(n)]
        # Bottom-up (children first): the category descendants of every node, and the nearest
        # categories below it ("frontier"; a category node is its own frontier for its parents).
        desc: List[frozenset] = [frozenset()] * n
        frontier: List[frozenset] = [frozenset()] * n
        for i in reversed(self._topo):
            d, f = set(), set()
            for c in self._chi[i]:
                d |= desc[c]
                if cat_of[c] >= 0:
                    d.add(cat_of[c])
                    f.add(cat_of[c])
                else:
                    f |= frontier[c]
            desc[i], frontier[i] = frozenset(d), frozenset(f)
        children = [sorted(frontier[self._category_node[k]]) for k in range(C)]
        num_desc = [len(desc[self._category_node[k]]) for k in range(C)]
        height = [0] * C
        for i in reversed(self._topo):  # children before parents
            k = cat_of[i]
            if k >= 0 and children[k]:
                height[k] = 1 + max(height[c] for c in children[k])
        levels: List[List[int]] = [[] for _ in range(max(height, default=-1) + 1)]
        for k, h in enumerate(height):
            levels[h].append(k)
        ancestors: List[List[int]] = [[] for _ in range(C)]
        for k in range(C):
            for d in desc[self._category_node[k]]:
                ancestors[d].append(k)
        self._cat_ancestors = [sorted(a) for a in ancestors]
        self._dag = CategoryDAG(children, num_desc, height, levels)
        return self._dag

    def category_ancestors(self) -> List[List[int]]:
        """Per contiguous index, the sorted contiguous indices of all its category ancestors."""
        if self._cat_ancestors is None:
            self.category_dag()
        return [list(a) for a in self._cat_ancestors]

    def ancestor_mask(self, labels: torch.Tensor) -> torch.Tensor:
        """Categories to ignore in the selection loss.

        Args:
            labels: (B, C) bool, image-level multi-label targets (contiguous indices).
        Returns:
            (B, C) bool: True where the category is an ancestor of a positive category of that
            image and is not itself positive.
        """
        if labels.dim() != 2 or labels.shape[1] != self.num_categories:
            raise ValueError(
                f"ancestor_mask expects labels of shape (B, {self.num_categories}), "
                f"got {tuple(labels.shape)}"
            )
        labels = labels.bool()
        desc_idx, anc_idx = self._pair_index(labels.device)
        B, C = labels.shape
        if desc_idx.numel() == 0:
            return torch.zeros_like(labels)
        # For every (descendant, ancestor) pair, whether the descendant is positive; OR-reduce
        # onto the ancestor column. (B, P) -> (B, C).
        hits = labels.index_select(1, desc_idx).to(torch.int32)
        counts = torch.zeros(B, C, dtype=torch.int32, device=labels.device)
        counts.index_add_(1, anc_idx, hits)
        return (counts > 0) & ~labels

    def _pair_index(self, device: torch.device) -> tuple:
        if device not in self._mask_index:
            anc = self.category_ancestors()
            d = [k for k, a in enumerate(anc) for _ in a]
            a = [j for aa in anc for j in aa]
            self._mask_index[device] = (
                torch.tensor(d, dtype=torch.long, device=device),
                torch.tensor(a, dtype=torch.long, device=device),
            )
        return self._mask_index[device]

    def __repr__(self) -> str:
        return (
            f"CategoryTree(source={self.source!r}, num_categories={self.num_categories}, "
            f"num_nodes={self.num_nodes})"
        )
