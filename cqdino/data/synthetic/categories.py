"""The synthetic vocabulary: categories ``shape x colour x texture x border`` (and the 12
shape categories), their names (descriptive, or a made-up token each) and their category tree in
the V3Det tree-json layout."""

from typing import Dict, List, Optional, Tuple

import numpy as np

SHAPE_FAMILIES = {
    "round shape": ["circle", "ellipse", "ring", "crescent"],
    "polygon": ["triangle", "square", "diamond", "pentagon", "hexagon"],
    "symbol": ["star", "cross", "arrow"],
}
SHAPES = [s for fam in SHAPE_FAMILIES.values() for s in fam]
COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 70, 220),
    "yellow": (235, 215, 40),
    "orange": (245, 140, 30),
    "purple": (140, 50, 180),
    "cyan": (40, 200, 210),
    "magenta": (220, 50, 180),
    "brown": (130, 80, 40),
    "pink": (245, 160, 190),
    "lime": (160, 230, 50),
    "navy": (20, 30, 110),
    "teal": (20, 120, 120),
    "olive": (120, 120, 30),
    "grey": (128, 128, 128),
    "white": (245, 245, 245),
}
TEXTURES = ["solid", "h-striped", "v-striped", "diagonal", "checkered", "dotted", "grid", "shaded"]
BORDERS = [
    ("", 0, None),
    ("thin dark border", 1, (10, 10, 10)),
    ("dark border", 2, (10, 10, 10)),
    ("thick dark border", 4, (10, 10, 10)),
    ("thin light border", 1, (250, 250, 250)),
    ("light border", 2, (250, 250, 250)),
    ("thick light border", 4, (250, 250, 250)),
    ("thin contrast border", 1, "complement"),
    ("thick contrast border", 4, "complement"),
]
NUM_COMBINATIONS = len(SHAPES) * len(COLOURS) * len(TEXTURES) * len(BORDERS)  # 13,824
MAX_CATEGORIES = len(SHAPES) + NUM_COMBINATIONS
CATEGORY_RANGE = f"{len(SHAPES) + 1}..{MAX_CATEGORIES}"  # as --help and the errors say it

NAME_STYLES = ("descriptive", "opaque")


def _leaf_combinations(num_leaves: int, seed: int) -> List[Tuple[int, int, int, int]]:
    """``num_leaves`` distinct (shape, colour, texture, border) index tuples, seeded."""
    rng = np.random.default_rng([seed, 1])
    chosen = np.sort(rng.choice(NUM_COMBINATIONS, size=num_leaves, replace=False))
    dims = (len(SHAPES), len(COLOURS), len(TEXTURES), len(BORDERS))
    return [tuple(int(x) for x in np.unravel_index(i, dims)) for i in chosen]


_SYLLABLE_ONSETS = "bdfgklmnprstvz"
_SYLLABLE_VOWELS = "aeiou"


def opaque_tokens(num: int, seed: int, stream: int = 7) -> List[str]:
    """``num`` distinct made-up lower-case tokens (three consonant-vowel syllables, e.g.
    ``"kotavu"``), seeded (``stream`` draws another list): opaque names that share no word
    with each other or with the descriptive names (no attribute, shape or colour word)."""
    rng = np.random.default_rng([seed, stream])
    syllables = [c + v for c in _SYLLABLE_ONSETS for v in _SYLLABLE_VOWELS]  # 70
    # 70^3 = 343,000 tokens; draw without replacement so every token is unique
    picks = rng.choice(len(syllables) ** 3, size=num, replace=False)
    out = []
    for p in picks:
        a, rest = divmod(int(p), len(syllables) ** 2)
        b, c = divmod(rest, len(syllables))
        out.append(syllables[a] + syllables[b] + syllables[c])
    return out


def _check_names(names: str) -> None:
    if names not in NAME_STYLES:
        raise ValueError(f"names must be one of {NAME_STYLES}, got {names!r}")


def vocabulary(num_categories: int = 1000, seed: int = 0, names: str = "descriptive") -> List[dict]:
    """The category list (without generating images).

    Args:
        num_categories: C.
        seed: which combinations are categories.
        names: "descriptive" names spell the appearance ("red dotted star with thin dark
            border"); "opaque" gives every category a unique made-up token (``opaque_tokens``;
            the categories, their tree and their images are the same).
    Returns:
        list of dicts ``{"id", "name", "node", "combo"}`` for ids 1..C: first the 12 shape
        categories (combo None), then the leaf categories.
    """
    if not len(SHAPES) < num_categories <= MAX_CATEGORIES:
        raise ValueError(f"num_categories must be in {CATEGORY_RANGE}, got {num_categories}")
    _check_names(names)
    cats = []
    for s, shape in enumerate(SHAPES):
        cats.append(dict(id=s + 1, name=shape, node=f"syn.{shape}", combo=None))
    colours = list(COLOURS)
    for combo in _leaf_combinations(num_categories - len(SHAPES), seed):
        s, c, t, b = combo
        name = f"{colours[c]} {TEXTURES[t]} {SHAPES[s]}"
        if BORDERS[b][0]:
            name += f" with {BORDERS[b][0]}"
        node = f"syn.{SHAPES[s]}.{colours[c]}.{TEXTURES[t]}.b{b}"
        cats.append(dict(id=len(cats) + 1, name=name, node=node, combo=combo))
    if names == "opaque":
        for cat, token in zip(cats, opaque_tokens(len(cats), seed)):
            cat["name"] = token
    return cats


def category_attributes(num_categories: int = 1000, seed: int = 0) -> Dict[int, tuple]:
    """Category id -> attribute indices ``(shape, colour, texture, border)`` of the vocabulary
    (``(shape,)`` for the 12 shape categories), for diagnostics such as
    :func:`cqdino.evaluation.diagnostics.attribute_accuracy`."""
    out = {}
    for c in vocabulary(num_categories, seed):
        out[c["id"]] = (c["id"] - 1,) if c["combo"] is None else tuple(c["combo"])
    return out


def category_tree_dict(cats: List[dict], opaque_seed: Optional[int] = None) -> dict:
    """The category tree of :func:`vocabulary` in the V3Det tree-json layout.

    Nodes that are categories carry the category's name; with ``opaque_seed`` (the vocabulary
    seed of opaque names) the other nodes (root, families, shape+colour) get made-up tokens
    too, distinct from the categories'. Only ``id2name`` depends on it: the nodes and edges
    are the same."""
    colours = list(COLOURS)
    parent: Dict[str, List[str]] = {"syn.object": []}
    names = {"syn.object": "object"}
    for fam, shapes in SHAPE_FAMILIES.items():
        fnode = "syn." + fam.replace(" ", "_")
        parent[fnode] = ["syn.object"]
        names[fnode] = fam
        for shape in shapes:
            parent[f"syn.{shape}"] = [fnode]
            names[f"syn.{shape}"] = shape
    for cat in cats:
        if cat["combo"] is None:
            continue
        s, c, _, _ = cat["combo"]
        mid = f"syn.{SHAPES[s]}.{colours[c]}"  # a non-category node between shape and leaf
        if mid not in parent:
            parent[mid] = [f"syn.{SHAPES[s]}"]
            names[mid] = f"{colours[c]} {SHAPES[s]}"
        parent[cat["node"]] = [mid]
        names[cat["node"]] = cat["name"]
    for cat in cats:
        names[cat["node"]] = cat["name"]
    if opaque_seed is not None:
        taken = {c["name"] for c in cats}
        others = [n for n in names if n not in {c["node"] for c in cats}]
        pool = [
            t for t in opaque_tokens(len(others) + len(taken), opaque_seed, 8) if t not in taken
        ]
        for node, token in zip(others, pool):
            names[node] = token
    children: Dict[str, List[str]] = {}
    for node, ps in parent.items():
        for p in ps:
            children.setdefault(p, []).append(node)
    anc: Dict[str, List[str]] = {}
    for node in parent:  # single-parent tree: walk up
        chain, x = [], node
        while parent[x]:
            x = parent[x][0]
            chain.append(x)
        anc[node] = chain
    desc: Dict[str, List[str]] = {}
    for node, chain in anc.items():
        for a in chain:
            desc.setdefault(a, []).append(node)
    return {
        "categoryid2treeid": {str(c["id"]): c["node"] for c in cats},
        "id2name": names,
        "father2child": children,
        "child2father": {k: v for k, v in parent.items() if v},
        "ancestor2descendant": desc,
        "descendant2ancestor": {k: v for k, v in anc.items() if v},
    }
