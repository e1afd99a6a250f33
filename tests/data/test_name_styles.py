"""Opaque category names (issue 30, item 1): ``--names opaque`` changes the names only (same
images, boxes and tree nodes, byte for byte), and the tree words of ``category_words`` come
from the tree, not from the names."""

import hashlib
import json
import os

import pytest

from cqdino.data import synthetic
from cqdino.utils.text import name_words, word_vocabulary

ARGS = ["--num-categories", "60", "--num-train-images", "6", "--num-val-images", "3"]
ARGS += ["--image-size", "48", "64", "--workers", "1"]


@pytest.fixture(scope="module")
def both(tmp_path_factory):
    root = tmp_path_factory.mktemp("names")
    for style in ("descriptive", "opaque"):
        synthetic.main(ARGS + ["--out", str(root / style), "--names", style])
    return root / "descriptive", root / "opaque"


def _files(folder):
    out = {}
    for dirpath, _, files in os.walk(folder):
        for f in files:
            path = os.path.join(dirpath, f)
            out[os.path.relpath(path, folder)] = path
    return out


def _json(path):
    with open(path) as f:
        return json.load(f)


def test_images_are_identical_byte_for_byte(both):
    desc, opq = (_files(f) for f in both)
    images = sorted(k for k in desc if k.startswith("images"))
    assert images and images == sorted(k for k in opq if k.startswith("images"))
    for k in images:
        with open(desc[k], "rb") as a, open(opq[k], "rb") as b:
            assert hashlib.sha256(a.read()).digest() == hashlib.sha256(b.read()).digest(), k


def test_annotations_differ_only_in_category_names(both):
    for split in ("train", "val"):
        rel = os.path.join("annotations", f"synthetic_vocab_{split}.json")
        a, b = (_json(os.path.join(f, rel)) for f in both)
        assert a["images"] == b["images"] and a["annotations"] == b["annotations"]
        assert [c["id"] for c in a["categories"]] == [c["id"] for c in b["categories"]]
        assert all(x["name"] != y["name"] for x, y in zip(a["categories"], b["categories"]))


def test_tree_nodes_and_edges_are_identical(both):
    a, b = (_json(os.path.join(f, "category_tree.json")) for f in both)
    assert set(a) == set(b)
    for key in a:
        if key != "id2name":
            assert a[key] == b[key], key
    assert set(a["id2name"]) == set(b["id2name"])


def test_opaque_names_share_no_word_and_spell_nothing(both):
    desc, opq = both
    descriptive = (desc / "category_names.txt").read_text().splitlines()
    opaque = (opq / "category_names.txt").read_text().splitlines()
    tree_names = list(_json(opq / "category_tree.json")["id2name"].values())
    assert len(opaque) == len(descriptive) == 60
    # every category and every tree node is one distinct word
    words, rows = word_vocabulary(opaque + tree_names[: len(tree_names)])
    assert all(len(r) == 1 for r in rows)
    assert len(set(tree_names)) == len(tree_names) and set(opaque) <= set(tree_names)
    appearance = {w for n in descriptive for w in name_words(n)}
    appearance |= set(synthetic.COLOURS) | set(synthetic.SHAPES) | set(synthetic.TEXTURES)
    assert not appearance & set(words)
    assert not any(w in t for t in tree_names for w in synthetic.COLOURS)
    meta = _json(opq / "meta.json")
    assert meta["names"] == "opaque" and synthetic.read_meta(str(opq))["names"] == "opaque"


def test_descriptive_is_the_default_and_older_folders_read_as_descriptive(tmp_path, both):
    assert synthetic.read_meta(str(both[0]))["names"] == "descriptive"
    old = tmp_path / "old"
    old.mkdir()
    meta = _json(both[0] / "meta.json")
    del meta["names"]
    (old / "meta.json").write_text(json.dumps(meta))
    assert synthetic.read_meta(str(old))["names"] == "descriptive"


def test_bad_name_style_is_refused(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        synthetic.main(ARGS + ["--out", str(tmp_path / "x"), "--names", "numbered"])
    assert e.value.code == 2 and "--names" in capsys.readouterr().err
    with pytest.raises(ValueError, match="names must be one of"):
        synthetic.vocabulary(60, 0, names="numbered")


def test_category_words_follow_the_tree(both, tmp_path):
    """Checked against the tree file's parent lists: each category's tree tokens are its
    path from the top down (the root above all categories left out), then its own node."""
    from detectron2.data import DatasetCatalog, MetadataCatalog

    from cqdino.data.build import category_words
    from cqdino.data.datasets import register_coco_json

    opq = both[1]
    name = "test_name_styles_opaque_train"
    if name in DatasetCatalog.list():
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)
    register_coco_json(
        name, str(opq / "annotations" / "synthetic_vocab_train.json"), str(opq / "images")
    )
    MetadataCatalog.get(name).set(category_tree_file=str(opq / "category_tree.json"))
    tree = _json(opq / "category_tree.json")
    names = (opq / "category_names.txt").read_text().splitlines()
    up = tree["child2father"]

    def ancestors(node):
        out = []
        while node in up:
            node = up[node][0]
            out.append(node)
        return out

    both_words = category_words(name, 60, names=True, tree=True)
    tree_only = category_words(name, 60, names=False, tree=True)
    names_only = category_words(name, 60, names=True, tree=False)
    assert names_only == [[n] for n in names]
    for cid in range(1, 61):
        node = tree["categoryid2treeid"][str(cid)]
        # the path from the top down, the root above every category left out, then the node
        path = [f"tree:{a}" for a in reversed(ancestors(node)) if a != "syn.object"]
        path.append(f"tree:{node}")
        assert both_words[cid - 1] == [names[cid - 1]] + path
        assert tree_only[cid - 1] == path
    # a leaf: family, shape category, shape+colour node, itself; a shape category: family, itself
    assert len(tree_only[-1]) == 4 and len(tree_only[0]) == 2
    with pytest.raises(ValueError, match="both off"):
        category_words(name, 60, names=False, tree=False)
    from cqdino.utils.io import InputError

    with pytest.raises(InputError, match="60 categories"):
        category_words(name, 59)


def test_token_lists_are_not_split():
    words, rows = word_vocabulary([["tree:syn.circle.red", "kotavu"], "red dotted star"])
    assert words == ["tree:syn.circle.red", "kotavu", "red", "dotted", "star"]
    assert rows == [[0, 1], [2, 3, 4]]
    with pytest.raises(ValueError, match="no words"):
        word_vocabulary([[]])
