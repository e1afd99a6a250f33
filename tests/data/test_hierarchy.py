import json
import logging

import pytest
import torch

from cqdino.data import CategoryTree


@pytest.fixture(scope="module")
def lvis(shared_data):
    path = shared_data / "categories" / "lvis_v1_wordnet_tree.json"
    with open(path) as f:
        raw = json.load(f)
    return CategoryTree.from_v3det_json(path), raw


def _brute_category_closure(raw, tree):
    """Category ancestors per contiguous index from the file's own descendant2ancestor."""
    node_to_k = {tree.node(c): k for k, c in enumerate(tree.category_ids)}
    out = []
    for c in tree.category_ids:
        anc = raw["descendant2ancestor"].get(tree.node(c), [])
        out.append(sorted(node_to_k[a] for a in anc if a in node_to_k))
    return out


def test_lvis_tree_matches_file_closures(lvis):
    tree, raw = lvis
    assert tree.num_categories == len(raw["categoryid2treeid"]) == 1202
    assert tree.num_nodes == len(raw["id2name"])
    for c in tree.category_ids[::7]:
        node = raw["categoryid2treeid"][str(c)]
        assert tree.node(c) == node
        assert tree.parents(c) == sorted(raw["child2father"].get(node, []))
        assert tree.children(c) == sorted(raw["father2child"].get(node, []))
        assert tree.ancestors(c) == sorted(raw["descendant2ancestor"].get(node, []))
        assert tree.descendants(c) == sorted(raw["ancestor2descendant"].get(node, []))
    anc = tree.category_ancestors()
    assert anc == _brute_category_closure(raw, tree)
    # README: 421 categories with a category ancestor; 95 multi-parent nodes (a DAG).
    assert sum(1 for a in anc if a) == 421
    assert sum(1 for ps in raw["child2father"].values() if len(ps) > 1) == 95


def test_lvis_category_dag_against_dfs(lvis):
    tree, raw = lvis
    dag = tree.category_dag()
    node_to_k = {tree.node(c): k for k, c in enumerate(tree.category_ids)}
    kids = raw["father2child"]
    for k, c in enumerate(tree.category_ids):
        # Nearest categories: DFS that stops at category nodes.
        near, stack, seen = set(), list(kids.get(tree.node(c), [])), set()
        while stack:
            n = stack.pop()
            if n in seen:
                continue
            seen.add(n)
            if n in node_to_k:
                near.add(node_to_k[n])
            else:
                stack.extend(kids.get(n, []))
        assert dag.children[k] == sorted(near)
        all_desc = raw["ancestor2descendant"].get(tree.node(c), [])
        assert dag.num_descendants[k] == sum(1 for n in all_desc if n in node_to_k)
        expect_h = 0 if not near else 1 + max(dag.height[j] for j in near)
        assert dag.height[k] == expect_h
    assert sorted(k for lvl in dag.levels for k in lvl) == list(range(tree.num_categories))
    for h, lvl in enumerate(dag.levels):
        assert all(dag.height[k] == h for k in lvl)


def test_coco_tree_missing_category_becomes_isolated(shared_data, caplog):
    with open(shared_data / "categories" / "coco80_categories.json") as f:
        ids = [c["id"] for c in json.load(f)]
    path = shared_data / "categories" / "coco80_wordnet_tree.json"
    with open(path) as f:
        in_tree = {int(k) for k in json.load(f)["categoryid2treeid"]}
    (missing,) = set(ids) - in_tree
    with caplog.at_level(logging.WARNING):
        tree = CategoryTree.from_v3det_json(path, category_ids=ids)
    assert "isolated" in caplog.text and str(missing) in caplog.text
    assert tree.num_categories == 80
    assert tree.parents(missing) == [] and tree.children(missing) == []
    k = ids.index(missing)
    dag = tree.category_dag()
    assert dag.children[k] == [] and dag.height[k] == 0
    assert tree.category_ancestors()[k] == []
    assert all(k not in a for a in tree.category_ancestors())


def _toy():
    # root (node) -> animal(1) -> mammal (node) -> dog(2), cat(3)
    #                animal(1) -> pet (node) -> dog(2)        (dog has two parents: a DAG)
    #                dog(2) -> puppy(4);  root -> rock(5)
    parents = {
        "root": [],
        "animal": ["root"],
        "mammal": ["animal"],
        "pet": ["animal"],
        "dog": ["mammal", "pet"],
        "cat": ["mammal"],
        "puppy": ["dog"],
        "rock": ["root"],
    }
    node_of = {1: "animal", 2: "dog", 3: "cat", 4: "puppy", 5: "rock"}
    return CategoryTree.from_parents(parents, [1, 2, 3, 4, 5], node_of)


def test_hand_built_dag():
    tree = _toy()
    assert tree.parents(2) == ["mammal", "pet"]
    assert tree.ancestors(4) == ["animal", "dog", "mammal", "pet", "root"]
    assert tree.descendants(1) == ["cat", "dog", "mammal", "pet", "puppy"]
    dag = tree.category_dag()
    # contiguous: animal 0, dog 1, cat 2, puppy 3, rock 4
    assert dag.children == [[1, 2], [3], [], [], []]
    assert dag.num_descendants == [3, 1, 0, 0, 0]
    assert dag.height == [2, 1, 0, 0, 0]
    assert dag.levels == [[2, 3, 4], [1], [0]]
    assert tree.category_ancestors() == [[], [0], [0], [0, 1], []]


def test_ancestor_mask_hand_and_random(lvis):
    tree = _toy()
    labels = torch.tensor(
        [[0, 0, 0, 1, 0], [1, 0, 1, 0, 0], [0, 0, 0, 0, 1], [0, 1, 0, 1, 0]], dtype=torch.bool
    )
    expect = torch.tensor(
        [[1, 1, 0, 0, 0], [0, 0, 0, 0, 0], [0, 0, 0, 0, 0], [1, 0, 0, 0, 0]], dtype=torch.bool
    )
    assert torch.equal(tree.ancestor_mask(labels), expect)

    big, raw = lvis
    anc = _brute_category_closure(raw, big)
    g = torch.Generator().manual_seed(0)
    labels = torch.rand(6, big.num_categories, generator=g) < 0.02
    ref = torch.zeros_like(labels)
    for b in range(labels.shape[0]):
        for k in labels[b].nonzero().flatten().tolist():
            for a in anc[k]:
                ref[b, a] = True
    ref &= ~labels
    assert ref.any()
    assert torch.equal(big.ancestor_mask(labels), ref)
    with pytest.raises(ValueError, match="shape"):
        big.ancestor_mask(labels[:, :10])


def test_invalid_trees_name_the_node(tmp_path):
    with pytest.raises(ValueError, match="cycle through node 'b'|cycle through node 'a'"):
        CategoryTree.from_parents({"a": ["b"], "b": ["a"], "c": ["a"]}, [1], {1: "c"})
    with pytest.raises(ValueError, match="own parent"):
        CategoryTree.from_parents({"a": ["a"]}, [1], {1: "a"})
    with pytest.raises(ValueError, match="unknown tree node 'zz'"):
        CategoryTree.from_parents({"a": []}, [1], {1: "zz"})
    bad = {
        "categoryid2treeid": {"1": "n1"},
        "id2name": {"n0": "root", "n1": "x"},
        "child2father": {"n1": ["n9"]},
        "father2child": {},
    }
    p = tmp_path / "tree.json"
    p.write_text(json.dumps(bad))
    with pytest.raises(ValueError, match="'n9'"):
        CategoryTree.from_v3det_json(p)
    p.write_text("{not json")
    with pytest.raises(ValueError, match="tree.json"):
        CategoryTree.from_v3det_json(p)


def test_from_parents_identity_nodes_and_wordtree_scale(shared_data):
    # The YOLO9000 WordTree: 9,418 nodes, every node a category, parent by line index.
    lines = (shared_data / "categories" / "darknet_wordtree9k" / "9k.tree").read_text().split("\n")
    rows = [ln.split() for ln in lines if ln.strip()]
    parents = {i: ([int(p)] if int(p) >= 0 else []) for i, (_, p) in enumerate(rows)}
    tree = CategoryTree.from_parents(parents, list(range(len(rows))))
    dag = tree.category_dag()
    assert tree.num_categories == 9418
    # Every node is a category, so nearest category children are the direct children.
    for k in range(0, 9418, 97):
        assert dag.children[k] == sorted(j for j, ps in parents.items() if k in ps)
    assert all(dag.height[p[0]] > dag.height[k] for k, p in parents.items() if p)
