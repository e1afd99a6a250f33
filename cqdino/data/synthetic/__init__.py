"""A synthetic vast-vocabulary detection dataset (the project's embedded default).

Categories are combinations ``shape x colour x texture x border`` (12 x 16 x 8 x 9 = 13,824
combinations; ``num_categories`` up to 13,204 by default 1,000), organised in a category tree in
the V3Det tree-json layout::

    object -> shape family (round / polygon / symbol) -> shape -> shape+colour -> category

The 12 shape nodes are categories too (coarse labels, as V3Det has parent categories); family,
root and shape+colour nodes are not (so the category DAG must skip through them). Category
frequencies are long-tailed as in V3Det's regime: every category has training boxes (a floor of
``min_train_objects``), the rest follow a Zipf law over a seeded random ranking (a few frequent,
most rare; the most frequent has ~100x the boxes of the least at the demo size). Images hold
several objects at log-uniform scales from ``min_object_size`` (24 px, so texture and border
stay visible); later objects occlude earlier ones, boxes are
the *visible* extent, and objects less than ``min_visible`` visible are dropped.

This data is for demos, smoke tests and controlled studies (e.g. how AP on rare categories reacts
to a change); it is not a substitute for real data: the shapes are trivially separable by colour
and texture once seen, and no claim about V3Det/COCO should be drawn from numbers on it.

Generate with ``python -m cqdino.data.synthetic --out $DETECTRON2_DATASETS/synthetic_vocab``
(``--help`` lists the sizes and their defaults); the registered ``synthetic_vocab_{train,val}``
datasets read whatever the folder holds (its ``meta.json``), and generate the default demo on
first use when the folder is absent. Output is written to a temporary folder and renamed into
place (never partial).

Layout of ``out_dir``::

    annotations/synthetic_vocab_{train,val}.json   COCO json (categories ids 1..C)
    images/{train,val}/<image_id>.jpg
    category_tree.json                             V3Det tree-json layout
    category_names.txt                             line i = name of category id i+1
    meta.json                                      generation parameters
"""

import argparse
import ctypes
import json
import logging
import math
import multiprocessing
import os
import random
import re
import shutil
import signal
import socket
import sys
import tempfile
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from contextlib import contextmanager
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
from PIL import Image, ImageDraw

# ``python -m cqdino.data.synthetic`` imports the package ``cqdino.data``, which imports this
# module before detectron2: hiding fvcore's import-time ``torch.jit.script`` FutureWarning here
# keeps ``--help`` (and every run) free of it
from cqdino.utils import quiet_imports  # noqa: F401
from cqdino.utils.io import InputError, check_output_dir, make_temp_dir

__all__ = [
    "generate",
    "vocabulary",
    "category_tree_dict",
    "DEMO_CONFIG",
    "ensure_generated",
    "read_meta",
    "category_quotas",
    "category_attributes",
    "opaque_tokens",
    "NAME_STYLES",
    "main",
    "WorkerError",
]

logger = logging.getLogger(__name__)

FORMAT_VERSION = 2

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

DEMO_CONFIG = dict(
    num_categories=1000,
    num_train_images=4000,
    num_val_images=500,
    image_size=(256, 320),
    seed=0,
    image_seed=0,
    names="descriptive",
)


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


# ---------------------------------------------------------------------------- rendering
def _shape_polygon(shape: str, size: int, rng: np.random.Generator) -> List[Tuple[float, float]]:
    r = size / 2.0
    cx = cy = r
    if shape == "triangle":
        n, start = 3, -math.pi / 2
    elif shape == "square":
        n, start = 4, math.pi / 4
    elif shape == "diamond":
        n, start = 4, 0.0
    elif shape == "pentagon":
        n, start = 5, -math.pi / 2
    elif shape == "hexagon":
        n, start = 6, 0.0
    elif shape == "star":
        pts = []
        for i in range(10):
            a = -math.pi / 2 + i * math.pi / 5
            rr = r if i % 2 == 0 else r * 0.42
            pts.append((cx + rr * math.cos(a), cy + rr * math.sin(a)))
        return pts
    elif shape == "cross":
        a, b = r * 0.35, r
        rel = [(-a, -b), (a, -b), (a, -a), (b, -a), (b, a), (a, a), (a, b), (-a, b), (-a, a)]
        rel += [(-b, a), (-b, -a), (-a, -a)]
        return [(cx + x, cy + y) for x, y in rel]
    elif shape == "arrow":
        rel = [(-r, -0.3 * r), (0.1 * r, -0.3 * r), (0.1 * r, -r), (r, 0), (0.1 * r, r)]
        rel += [(0.1 * r, 0.3 * r), (-r, 0.3 * r)]
        return [(cx + x, cy + y) for x, y in rel]
    else:  # pragma: no cover
        raise ValueError(shape)
    return [
        (
            cx + r * math.cos(start + 2 * math.pi * i / n),
            cy + r * math.sin(start + 2 * math.pi * i / n),
        )
        for i in range(n)
    ]


def _shape_mask(shape: str, w: int, h: int, rng: np.random.Generator) -> np.ndarray:
    """(h, w) bool mask of a shape filling a w x h patch."""
    size = max(w, h) * 2  # draw large, then resize (cheap anti-aliasing, any aspect ratio)
    img = Image.new("L", (size, size), 0)
    d = ImageDraw.Draw(img)
    if shape == "circle":
        d.ellipse([0, 0, size - 1, size - 1], fill=255)
    elif shape == "ellipse":
        d.ellipse([0, size * 0.2, size - 1, size * 0.8], fill=255)
    elif shape == "ring":
        d.ellipse([0, 0, size - 1, size - 1], fill=255)
        d.ellipse([size * 0.3, size * 0.3, size * 0.7, size * 0.7], fill=0)
    elif shape == "crescent":
        d.ellipse([0, 0, size - 1, size - 1], fill=255)
        d.ellipse([size * 0.3, -size * 0.05, size * 1.2, size * 0.95], fill=0)
    else:
        d.polygon(_shape_polygon(shape, size - 1, rng), fill=255)
    img = img.resize((w, h), Image.BILINEAR)
    return np.asarray(img) >= 128


def _texture(texture: str, colour: np.ndarray, w: int, h: int, period: int) -> np.ndarray:
    """(h, w, 3) float32 colour patch with the texture."""
    yy, xx = np.mgrid[0:h, 0:w]
    dark = colour * 0.45
    if texture == "solid":
        sel = np.zeros((h, w), bool)
    elif texture == "h-striped":
        sel = (yy // period) % 2 == 1
    elif texture == "v-striped":
        sel = (xx // period) % 2 == 1
    elif texture == "diagonal":
        sel = ((xx + yy) // period) % 2 == 1
    elif texture == "checkered":
        sel = ((xx // period) + (yy // period)) % 2 == 1
    elif texture == "dotted":
        sel = ((xx % (2 * period) - period) ** 2 + (yy % (2 * period) - period) ** 2) < (
            0.5 * period
        ) ** 2
    elif texture == "grid":
        sel = (xx % (2 * period) == 0) | (yy % (2 * period) == 0)
    elif texture == "shaded":
        t = (xx / max(w - 1, 1))[..., None].astype(np.float32)
        return (colour * (1 - 0.6 * t)).astype(np.float32)
    else:  # pragma: no cover
        raise ValueError(texture)
    out = np.broadcast_to(colour, (h, w, 3)).astype(np.float32).copy()
    out[sel] = dark
    return out


def _border_mask(mask: np.ndarray, width: int) -> np.ndarray:
    """Pixels of ``mask`` within ``width`` pixels of its outside."""
    inner = mask.copy()
    for _ in range(width):
        shrunk = inner.copy()
        shrunk[1:, :] &= inner[:-1, :]
        shrunk[:-1, :] &= inner[1:, :]
        shrunk[:, 1:] &= inner[:, :-1]
        shrunk[:, :-1] &= inner[:, 1:]
        shrunk[0, :] = shrunk[-1, :] = False
        shrunk[:, 0] = shrunk[:, -1] = False
        inner = shrunk
    return mask & ~inner


def _render_image(
    rng: np.random.Generator,
    width: int,
    height: int,
    cats: List[dict],
    leaf_ids: np.ndarray,
    min_object_size: float,
    coarse_label_prob: float,
    min_visible: float,
) -> Tuple[np.ndarray, List[dict]]:
    """One image with the objects ``cats[leaf_ids]`` and its annotations (bbox xywh of the
    visible extent, category id)."""
    colours = np.asarray(list(COLOURS.values()), np.float32)
    # Background: a smooth random gradient plus mild noise.
    c0, c1 = rng.uniform(60, 200, size=(2, 3)).astype(np.float32)
    t = np.linspace(0, 1, width, dtype=np.float32)[None, :, None]
    img = np.broadcast_to(c0 * (1 - t) + c1 * t, (height, width, 3)).copy()
    img += rng.standard_normal(size=img.shape, dtype=np.float32) * 6

    owner = np.full((height, width), -1, np.int32)  # which object each pixel shows
    objects = []
    short = min(width, height)
    for k, ci in enumerate(leaf_ids):
        cat = cats[ci]
        s, c, tex, b = cat["combo"]
        # Log-uniform scale from min_object_size to ~70% of the short side; mild aspect jitter.
        lo = min(float(min_object_size), 0.7 * short)
        size = float(np.exp(rng.uniform(np.log(lo), np.log(0.7 * short))))
        aspect = float(np.exp(rng.uniform(-0.3, 0.3)))
        w = max(6, min(width, int(round(size * aspect))))
        h = max(6, min(height, int(round(size / aspect))))
        x0 = int(rng.integers(0, width - w + 1))
        y0 = int(rng.integers(0, height - h + 1))
        mask = _shape_mask(SHAPES[s], w, h, rng)
        if not mask.any():
            continue
        period = max(2, int(round(min(w, h) / rng.uniform(5, 9))))
        patch = _texture(TEXTURES[tex], colours[c], w, h, period)
        _, bw, bcol = BORDERS[b]
        if bw:
            bm = _border_mask(mask, bw)
            if isinstance(bcol, str):
                bcol = 255 - colours[c]
            patch[bm] = bcol
        region = img[y0 : y0 + h, x0 : x0 + w]
        region[mask] = patch[mask]
        owner[y0 : y0 + h, x0 : x0 + w][mask] = k
        label = cat["id"]
        if coarse_label_prob > 0 and rng.random() < coarse_label_prob:
            label = s + 1  # annotated only at the shape level (a parent category)
        objects.append((k, int(mask.sum()), label, x0, y0, w, h))

    anns = []
    for k, full_area, label, x0, y0, w, h in objects:
        ys, xs = np.nonzero(owner[y0 : y0 + h, x0 : x0 + w] == k)
        if len(ys) < max(min_visible * full_area, 4):
            continue  # mostly occluded: not annotated (like a real annotator would skip it)
        x1, y1 = x0 + xs.min(), y0 + ys.min()
        x2, y2 = x0 + xs.max() + 1, y0 + ys.max() + 1
        anns.append(
            dict(
                bbox=[float(x1), float(y1), float(x2 - x1), float(y2 - y1)],
                category_id=int(label),
                area=float((x2 - x1) * (y2 - y1)),
                iscrowd=0,
            )
        )
    return np.clip(img, 0, 255).astype(np.uint8), anns


def _zipf_probs(num: int, alpha: float, seed: int) -> np.ndarray:
    rng = np.random.default_rng([seed, 2])
    rank = rng.permutation(num) + 1
    p = 1.0 / rank.astype(np.float64) ** alpha
    return p / p.sum()


def category_quotas(total: int, probs: np.ndarray, floor: int) -> np.ndarray:
    """Objects per leaf category for ``total`` objects: ``floor`` each (lowered when
    ``total`` cannot give every category that many), the rest split in proportion to
    ``probs`` by largest remainders. Sums to ``total``."""
    num = len(probs)
    floor = max(0, min(int(floor), total // num))
    rest = total - floor * num
    exact = rest * probs
    counts = np.floor(exact).astype(np.int64)
    short = rest - int(counts.sum())
    if short > 0:
        counts[np.argsort(-(exact - counts), kind="stable")[:short]] += 1
    return counts + floor


def _split_objects(
    num_images: int,
    max_objects: int,
    probs: np.ndarray,
    floor: int,
    rng: np.random.Generator,
) -> List[np.ndarray]:
    """Leaf indices of each image's objects: 1..max_objects objects per image (uniform), the
    categories drawn without replacement from the split's quotas (:func:`category_quotas`), so
    every category gets at least ``floor`` objects when the split is large enough."""
    per_image = rng.integers(1, max_objects + 1, size=num_images)
    quotas = category_quotas(int(per_image.sum()), probs, floor)
    pool = rng.permutation(np.repeat(np.arange(len(probs)), quotas))
    return np.split(pool, np.cumsum(per_image)[:-1])


# Images per task sent to a rendering process, and the smallest job worth starting processes.
_CHUNK = 50
_MIN_PARALLEL_IMAGES = 200
_WORKER_STATE: dict = {}


def _exit_with_parent(parent_pid: int) -> None:
    """Make this worker end when the process that started it dies (a parent killed with
    SIGKILL cannot stop its workers, which would wait for work forever): Linux delivers SIGKILL
    on the parent's death (``prctl(PR_SET_PDEATHSIG)``); elsewhere a thread polls the parent
    pid every second. A parent already gone ends the worker at once."""
    watch = True
    if sys.platform.startswith("linux"):
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            watch = libc.prctl(1, signal.SIGKILL, 0, 0, 0) != 0  # 1 = PR_SET_PDEATHSIG
        except (OSError, AttributeError):
            pass
    if os.getppid() != parent_pid:  # died before the signal was armed
        os._exit(1)
    if watch:

        def poll() -> None:
            while os.getppid() == parent_pid:
                time.sleep(1.0)
            os._exit(1)

        threading.Thread(target=poll, daemon=True).start()


def _init_worker(state: dict, parent_pid: int) -> None:
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, signal.SIG_DFL)  # not the parent's handler (fork)
    _exit_with_parent(parent_pid)
    _WORKER_STATE.clear()
    _WORKER_STATE.update(state)


def _render_chunk(state: dict, split: str, split_idx: int, first: int, objects) -> List[tuple]:
    """Render and save images ``first, first + 1, ...`` of a split (one per entry of
    ``objects``); returns ``(image record, annotations without ids)`` per image."""
    lo, hi = state["image_size"]
    out = []
    for k, leaf_ids in enumerate(objects):
        i = first + k
        rng = np.random.default_rng([state["seed"], state["image_seed"], 100 + split_idx, i])
        w = int(rng.integers(lo, hi + 1))
        h = int(rng.integers(lo, hi + 1))
        pixels, anns = _render_image(
            rng,
            w,
            h,
            state["leaves"],
            leaf_ids,
            state["min_object_size"],
            state["coarse_label_prob"],
            state["min_visible"],
        )
        file_name = f"{split}/{i + 1:06d}.jpg"
        Image.fromarray(pixels).save(os.path.join(state["root"], file_name), quality=92)
        out.append((dict(id=i + 1, file_name=file_name, width=w, height=h), anns))
    return out


def _render_chunk_in_worker(split: str, split_idx: int, first: int, objects) -> List[tuple]:
    return _render_chunk(_WORKER_STATE, split, split_idx, first, objects)


def _spawn_blocker() -> Optional[str]:
    """None when a spawned worker can start, else the reason it cannot: spawn re-imports the
    main script from its path, which a script read from standard input (``python - <<EOF``,
    path ``<stdin>``) does not have."""
    main = sys.modules.get("__main__")
    if main is None or getattr(getattr(main, "__spec__", None), "name", None):
        return None  # ``python -m``: imported by module name
    path = getattr(main, "__file__", None)
    if path is None:
        return None  # ``python -c`` or interactive: nothing to re-import
    path = os.path.join(getattr(multiprocessing.process, "ORIGINAL_DIR", None) or "", path)
    if os.path.isfile(path):
        return None
    return f"the main script {getattr(main, '__file__', path)} is not a file a worker can import"


# "fork" or "spawn" instead of the choice of :func:`_pool_context` (tests)
_START_METHOD: Optional[str] = None


def _pool_context():
    """fork when this process runs a single thread (Linux, ``/proc/self/task``; the command
    line's case): workers start at once, share the imported modules, and need not import the
    main script; else spawn (forking a process that runs other threads can deadlock)."""
    if _START_METHOD is not None:
        return multiprocessing.get_context(_START_METHOD)
    if sys.platform.startswith("linux") and "fork" in multiprocessing.get_all_start_methods():
        try:
            if len(os.listdir("/proc/self/task")) == 1:
                return multiprocessing.get_context("fork")
        except OSError:
            pass
    return multiprocessing.get_context("spawn")


def _render_pool(workers: Optional[int], total: int, state: dict):
    """A process pool for the rendering, or None to render in this process."""
    requested = workers
    if workers is None:
        workers = min(os.cpu_count() or 1, 8) if total >= _MIN_PARALLEL_IMAGES else 1
    if workers <= 1:
        return None
    context = _pool_context()
    reason = _spawn_blocker() if context.get_start_method() != "fork" else None
    if reason is not None:
        log = logger.warning if requested is not None else logger.info
        log(f"rendering the images in this process, not in {workers} worker processes: {reason}")
        return None
    return ProcessPoolExecutor(
        max_workers=workers,
        mp_context=context,
        initializer=_init_worker,
        initargs=(state, os.getpid()),
    )


class WorkerError(RuntimeError):
    """A rendering worker process died (the message says what can cause it)."""


def _render_split(pool, state: dict, split: str, split_idx: int, objects) -> List[tuple]:
    """Every image of a split, in order (in chunks over ``pool`` when there is one)."""
    chunks = [(first, objects[first : first + _CHUNK]) for first in range(0, len(objects), _CHUNK)]
    if pool is None:
        return [
            r for first, objs in chunks for r in _render_chunk(state, split, split_idx, first, objs)
        ]
    try:
        futures = [pool.submit(_render_chunk_in_worker, split, split_idx, f, o) for f, o in chunks]
        return [r for fut in futures for r in fut.result()]
    except BrokenProcessPool:
        raise WorkerError(
            "a process rendering the synthetic images died before finishing (its own error, if "
            "any, is printed above): killed (e.g. out of memory), or it could not start because "
            "the calling script cannot be imported again by a new process (a script needs its "
            'work under `if __name__ == "__main__":`); workers=1 (--workers 1) renders in '
            "this process"
        ) from None


# Temporary folders: .synthetic_vocab-[old-]<host>-<pid>-<random> next to the output; the host
# and pid say whose they are, so the next run removes the ones a killed run left.
_TMP_PREFIX = ".synthetic_vocab-"
_TMP_NAME = re.compile(r"^\.synthetic_vocab-(?:old-)?(?P<host>.+)-(?P<pid>\d+)-[a-z0-9_]+$")


def _host() -> str:
    return re.sub(r"[^A-Za-z0-9.]", "_", socket.gethostname()) or "host"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's process
    try:  # a zombie (killed, not yet reaped by its parent) is dead
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def _remove_stale_temporaries(parent: str) -> None:
    """Remove the temporary folders in ``parent`` that a generator run on this host left when it
    was killed (its pid no longer runs); a live run's, or another host's, are left alone."""
    try:
        names = os.listdir(parent)
    except OSError:
        return
    host = _host()
    for name in names:
        m = _TMP_NAME.match(name)
        if m is None or m["host"] != host or _pid_alive(int(m["pid"])):
            continue
        path = os.path.join(parent, name)
        if os.path.isdir(path) and not os.path.islink(path):
            logger.warning(
                f"removing {path}, left by a generator run (pid {m['pid']}) that was killed"
            )
            shutil.rmtree(path, ignore_errors=True)


def generate(
    out_dir: str,
    num_categories: int = 1000,
    num_train_images: int = 2000,
    num_val_images: int = 500,
    seed: int = 0,
    image_size: Tuple[int, int] = (256, 320),
    max_objects: int = 8,
    zipf_alpha: float = 0.8,
    coarse_label_prob: float = 0.03,
    min_visible: float = 0.3,
    min_object_size: float = 24.0,
    min_train_objects: int = 5,
    image_seed: int = 0,
    splits: Sequence[str] = ("train", "val"),
    overwrite: bool = False,
    workers: Optional[int] = None,
    names: str = "descriptive",
) -> str:
    """Generate the dataset into ``out_dir`` (atomically: temp folder, then rename).

    Args:
        out_dir: destination folder (must not exist unless ``overwrite``).
        num_categories: total categories C (12 shape categories + C-12 leaves), 13 .. 13,836.
        num_train_images, num_val_images: images per split.
        seed: the vocabulary (which combinations are categories, the tree, the frequency
            ranking) and, with ``image_seed``, the images; everything is a deterministic
            function of the arguments.
        image_size: (min, max) of the random image width and height in pixels.
        max_objects: objects per image are uniform in 1..max_objects (before occlusion drops).
        zipf_alpha: long-tail exponent of the leaf-category frequencies (on top of the floor).
        coarse_label_prob: probability an object is labelled with its shape category (parent).
        min_visible: objects with a smaller visible fraction are not annotated.
        min_object_size: smallest object side in pixels (log-uniform up to 70% of the short
            side), so that texture and border stay visible.
        min_train_objects: every leaf category gets at least this many train objects (V3Det
            has training images for every category; the val split gets at least one each when
            it has enough objects), the rest follow the Zipf frequencies; occlusion may drop a
            few.
        image_seed: other renderings of the same vocabulary and frequencies (new images,
            layouts and object placements; same categories, tree and long tail).
        splits: the splits to write (``("val",)``: a val split alone, e.g. another rendering
            to evaluate a model trained on ``image_seed=0``).
        overwrite: replace an existing ``out_dir`` written by this generator.
        workers: processes rendering the images (default: the CPU cores, at most 8; a few
            images are rendered in this process). Every image is a function of its own seed,
            so the output is the same, byte for byte, for any number of workers. Workers end
            when this process dies; a script read from standard input (which spawned workers
            cannot import) renders in this process.
        names: "descriptive" (names spell the appearance) or "opaque" (a unique made-up token
            per category and tree node): only the names differ (``category_names.txt``, the
            json's ``categories`` and the tree's ``id2name``); images, boxes and the tree's
            nodes and edges are the same byte for byte.
    Returns:
        ``out_dir``.
    Raises:
        WorkerError when a worker process dies (nothing is left behind). The temporary folders
        of a killed run (``.synthetic_vocab-<host>-<pid>-*`` next to ``out_dir``, pid no longer
        running) are removed by the next run.
    """
    out_dir = os.path.abspath(os.fspath(out_dir))
    if os.path.exists(out_dir) and not overwrite:
        raise FileExistsError(f"{out_dir} exists; pass overwrite=True to replace it")
    if overwrite and os.path.exists(out_dir):
        check_replaceable(out_dir)
    for key, num in (("num_train_images", num_train_images), ("num_val_images", num_val_images)):
        if isinstance(num, bool) or not isinstance(num, (int, np.integer)) or num < 1:
            raise ValueError(f"{key} must be an integer >= 1, got {num!r}")
    lo, hi = image_size
    if not 16 <= lo <= hi:
        raise ValueError(f"image_size must be (min, max) with 16 <= min <= max, got {image_size}")
    for key, value in (("seed", seed), ("image_seed", image_seed)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
            raise ValueError(f"{key} must be an integer >= 0, got {value!r}")
    if max_objects < 1:
        raise ValueError(f"max_objects must be >= 1, got {max_objects}")
    if not min_object_size >= 4:
        raise ValueError(f"min_object_size must be >= 4 pixels, got {min_object_size}")
    if min_train_objects < 0:
        raise ValueError(f"min_train_objects must be >= 0, got {min_train_objects}")
    if workers is not None and (
        isinstance(workers, bool) or not isinstance(workers, int) or workers < 1
    ):
        raise ValueError(f"workers must be an integer >= 1 or None, got {workers!r}")
    _check_names(names)
    splits = list(splits)
    if not splits or any(sp not in ("train", "val") for sp in splits):
        raise ValueError(f"splits must be a non-empty subset of ('train', 'val'), got {splits}")
    cats = vocabulary(num_categories, seed, names)
    leaves = [c for c in cats if c["combo"] is not None]
    probs = _zipf_probs(len(leaves), zipf_alpha, seed)
    params = dict(
        format_version=FORMAT_VERSION,
        num_categories=num_categories,
        num_train_images=num_train_images,
        num_val_images=num_val_images,
        seed=seed,
        image_size=list(image_size),
        max_objects=max_objects,
        zipf_alpha=zipf_alpha,
        coarse_label_prob=coarse_label_prob,
        min_visible=min_visible,
        min_object_size=min_object_size,
        min_train_objects=min_train_objects,
        image_seed=image_seed,
        splits=splits,
        names=names,
    )
    parent = os.path.dirname(out_dir)
    os.makedirs(parent, exist_ok=True)
    _remove_stale_temporaries(parent)
    tmp = make_temp_dir(f"{_TMP_PREFIX}{_host()}-{os.getpid()}-", parent)
    pool = None
    try:
        os.makedirs(os.path.join(tmp, "annotations"))
        categories = [dict(id=c["id"], name=c["name"]) for c in cats]
        ann_id = 1
        state = dict(
            seed=seed,
            image_seed=image_seed,
            image_size=(lo, hi),
            leaves=leaves,
            min_object_size=min_object_size,
            coarse_label_prob=coarse_label_prob,
            min_visible=min_visible,
            root=os.path.join(tmp, "images"),
        )
        total = sum(
            n for sp, n in (("train", num_train_images), ("val", num_val_images)) if sp in splits
        )
        pool = _render_pool(workers, total, state)
        for split_idx, (split, num) in enumerate(
            [("train", num_train_images), ("val", num_val_images)]
        ):
            if split not in splits:
                continue
            os.makedirs(os.path.join(tmp, "images", split))
            images, annotations = [], []
            floor = min_train_objects if split == "train" else 1
            objects = _split_objects(
                num,
                max_objects,
                probs,
                floor,
                np.random.default_rng([seed, image_seed, 3, split_idx]),
            )
            for image, anns in _render_split(pool, state, split, split_idx, objects):
                images.append(image)
                for a in anns:
                    a.update(id=ann_id, image_id=image["id"])
                    ann_id += 1
                    annotations.append(a)
            with open(os.path.join(tmp, "annotations", f"synthetic_vocab_{split}.json"), "w") as f:
                json.dump(dict(images=images, annotations=annotations, categories=categories), f)
        with open(os.path.join(tmp, "category_tree.json"), "w") as f:
            json.dump(category_tree_dict(cats, seed if names == "opaque" else None), f)
        with open(os.path.join(tmp, "category_names.txt"), "w") as f:
            f.write("".join(c["name"] + "\n" for c in cats))
        with open(os.path.join(tmp, "meta.json"), "w") as f:
            json.dump(params, f, indent=1)
        if os.path.exists(out_dir):  # overwrite: move the old one away first
            check_replaceable(out_dir)  # still a generated dataset (not swapped meanwhile)
            old = tempfile.mkdtemp(prefix=f"{_TMP_PREFIX}old-{_host()}-{os.getpid()}-", dir=parent)
            os.rename(out_dir, os.path.join(old, "d"))
            os.rename(tmp, out_dir)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, out_dir)
    except BaseException:
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)  # no worker writes into tmp after this
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if pool is not None:
        pool.shutdown()
    return out_dir


def check_replaceable(out_dir: str) -> None:
    """Raise :class:`~cqdino.utils.io.InputError` unless ``out_dir`` is a folder holding a
    dataset this generator wrote (a ``meta.json`` with its ``format_version``): ``overwrite``
    replaces nothing else, whatever path it is given."""
    meta_file = os.path.join(out_dir, "meta.json")
    meta = None
    if os.path.isdir(out_dir) and not os.path.islink(out_dir) and os.path.isfile(meta_file):
        try:
            with open(meta_file) as f:
                meta = json.load(f)
        except (OSError, ValueError):
            meta = None
    if not isinstance(meta, dict) or "format_version" not in meta:
        kind = "a file" if not os.path.isdir(out_dir) or os.path.islink(out_dir) else "a folder"
        raise InputError(
            f"{out_dir} is {kind} that does not hold a dataset written by this generator (no "
            "readable meta.json): --overwrite replaces only such a dataset; choose another --out "
            "or remove it yourself"
        )


@contextmanager
def _sigterm_as_exit():
    """Inside: SIGTERM raises ``SystemExit(143)`` (in the main thread), so the temporary
    folder is removed as on Ctrl-C instead of being left behind."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def read_meta(out_dir: str) -> dict:
    """The generation parameters of a generated folder (its ``meta.json``).

    Raises:
        FileNotFoundError if ``out_dir`` has no ``meta.json``; ValueError naming the file if it
        is unreadable, incomplete or of another format version.
    """
    meta_file = os.path.join(out_dir, "meta.json")
    if not os.path.exists(meta_file):
        raise FileNotFoundError(f"{meta_file} does not exist: {out_dir} is not a generated dataset")
    try:
        with open(meta_file) as f:
            meta = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"cannot read {meta_file}: {e}") from e
    regenerate = f"regenerate with `python -m cqdino.data.synthetic --out {out_dir} --overwrite`"
    if not isinstance(meta, dict) or meta.get("format_version") != FORMAT_VERSION:
        version = meta.get("format_version") if isinstance(meta, dict) else None
        raise ValueError(
            f"{meta_file}: format version {version!r}, this code reads {FORMAT_VERSION}; "
            + regenerate
        )
    meta.setdefault("names", "descriptive")  # written before the name styles existed
    missing = [k for k in DEMO_CONFIG if k not in meta]
    if missing:
        raise ValueError(f"{meta_file}: missing generation parameters {missing}; " + regenerate)
    return meta


def ensure_generated(out_dir: str, **kwargs) -> str:
    """Generate ``out_dir`` with :data:`DEMO_CONFIG` (overridden by ``kwargs``) unless it exists.

    An existing generated folder is used as it is (its ``meta.json`` holds the parameters it
    was made with); only parameters passed explicitly in ``kwargs`` are compared with it, and a
    difference is an error.
    """
    meta_file = os.path.join(out_dir, "meta.json")
    if os.path.exists(meta_file):
        meta = read_meta(out_dir)
        want = {k: (list(v) if isinstance(v, tuple) else v) for k, v in kwargs.items()}
        diff = {k: (meta.get(k), v) for k, v in want.items() if meta.get(k) != v}
        if diff:
            raise ValueError(
                f"{out_dir} was generated with other parameters {diff} (found, wanted); use the "
                "folder as it is (pass no generation arguments), or replace it with "
                f"`python -m cqdino.data.synthetic --out {out_dir} --overwrite ...`"
            )
        return out_dir
    if os.path.exists(out_dir):
        raise FileExistsError(f"{out_dir} exists but has no meta.json: not a generated dataset")
    cfg = {**DEMO_CONFIG, **kwargs}
    logger.info(f"Generating the synthetic vast-vocabulary dataset into {out_dir} ...")
    t0 = time.perf_counter()
    try:
        with _sigterm_as_exit():
            generate(out_dir, **cfg)
    except OSError:
        if not os.path.exists(meta_file):  # not another process finishing first
            raise
    logger.info(f"... done in {time.perf_counter() - t0:.1f} s")
    return out_dir


def main(argv: Optional[List[str]] = None) -> None:
    """Command line of :func:`generate` (``python -m cqdino.data.synthetic --help``)."""
    p = argparse.ArgumentParser(
        prog="python -m cqdino.data.synthetic",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument(
        "--out",
        required=True,
        default=argparse.SUPPRESS,  # required: no default to show
        help="output folder, e.g. $DETECTRON2_DATASETS/synthetic_vocab",
    )
    p.add_argument(
        "--num-categories",
        type=int,
        default=DEMO_CONFIG["num_categories"],
        help=f"categories C, {CATEGORY_RANGE}",
    )
    p.add_argument(
        "--num-train-images",
        type=int,
        default=DEMO_CONFIG["num_train_images"],
        help="images in the train split",
    )
    p.add_argument(
        "--num-val-images",
        type=int,
        default=DEMO_CONFIG["num_val_images"],
        help="images in the val split",
    )
    p.add_argument(
        "--image-size",
        type=int,
        nargs=2,
        metavar=("MIN", "MAX"),
        default=list(DEMO_CONFIG["image_size"]),
        help="range of the random image width and height in pixels",
    )
    p.add_argument(
        "--seed",
        type=int,
        default=DEMO_CONFIG["seed"],
        help="the vocabulary, tree and frequencies (and, with --image-seed, the images); -1: a "
        "random seed, printed and saved in meta.json",
    )
    p.add_argument(
        "--image-seed",
        type=int,
        default=DEMO_CONFIG["image_seed"],
        help="other renderings of the same vocabulary: new images, same categories and tree; "
        "-1: a random seed, printed and saved in meta.json",
    )
    p.add_argument(
        "--names",
        choices=NAME_STYLES,
        default=DEMO_CONFIG["names"],
        help="category names: descriptive ones spell the appearance ('red dotted star'), opaque "
        "ones are a unique made-up token per category (same images, boxes and tree)",
    )
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace an existing --out folder that holds a dataset written by this generator",
    )
    p.add_argument(
        "--workers",
        type=int,
        default=None,
        help="processes rendering the images (default: the CPU cores, at most 8); the output "
        "does not depend on it",
    )
    a = p.parse_args(argv)
    # every argument checked before any work, each error one line naming the argument
    if a.workers is not None and a.workers < 1:
        p.error(f"--workers must be >= 1, got {a.workers}")
    if not len(SHAPES) < a.num_categories <= MAX_CATEGORIES:
        p.error(f"--num-categories must be in {CATEGORY_RANGE}, got {a.num_categories}")
    for flag, num in (
        ("--num-train-images", a.num_train_images),
        ("--num-val-images", a.num_val_images),
    ):
        if num < 1:
            p.error(f"{flag} must be >= 1, got {num}")
    if not 16 <= a.image_size[0] <= a.image_size[1]:
        p.error(
            f"--image-size MIN MAX needs 16 <= MIN <= MAX, got {a.image_size[0]} {a.image_size[1]}"
        )
    for flag, value in (("--seed", a.seed), ("--image-seed", a.image_seed)):
        if value < -1:
            p.error(f"{flag} must be >= 0, or -1 for a random seed, got {value}")
    out = os.path.abspath(os.path.expanduser(a.out))
    try:
        if os.path.lexists(out):
            if not a.overwrite:
                raise InputError(
                    f"--out {out} exists; pass --overwrite to replace it (only a dataset written "
                    "by this generator is replaced) or choose another --out"
                )
            check_replaceable(out)
        check_output_dir(os.path.dirname(out), "--out (its parent folder)")
    except InputError as e:
        p.exit(2, f"{p.prog}: error: {e}\n")
    for flag in ("seed", "image_seed"):
        if getattr(a, flag) == -1:  # random, but repeatable: printed and kept in meta.json
            setattr(a, flag, random.SystemRandom().randrange(2**31))
            print(f"--{flag.replace('_', '-')} -1: using the random seed {getattr(a, flag)}")
    t0 = time.perf_counter()
    try:
        with _sigterm_as_exit():
            generate(
                out,
                num_categories=a.num_categories,
                num_train_images=a.num_train_images,
                num_val_images=a.num_val_images,
                image_size=tuple(a.image_size),
                seed=a.seed,
                image_seed=a.image_seed,
                overwrite=a.overwrite,
                workers=a.workers,
                names=a.names,
            )
    except WorkerError as e:
        p.exit(1, f"{p.prog}: error: {e}\n")
    print(f"wrote {out} in {time.perf_counter() - t0:.1f} s")
