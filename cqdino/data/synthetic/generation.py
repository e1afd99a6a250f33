"""Writing a generated dataset and reading its parameters back.

:func:`generate` writes into a temporary folder next to the output and renames it into place
(never partial); :func:`read_meta` reads a folder's generation parameters, and
:func:`ensure_generated` generates the default demo on first use.

Layout of ``out_dir``::

    annotations/synthetic_vocab_{train,val}.json   COCO json (categories ids 1..C)
    images/{train,val}/<image_id>.jpg
    category_tree.json                             V3Det tree-json layout
    category_names.txt                             line i = name of category id i+1
    meta.json                                      generation parameters
"""

import json
import logging
import os
import re
import shutil
import signal
import socket
import tempfile
import threading
import time
from contextlib import contextmanager
from typing import Optional, Sequence, Tuple

import numpy as np

from cqdino.utils.io import InputError, make_temp_dir

from .categories import _check_names, category_tree_dict, vocabulary
from .render import _split_objects, _zipf_probs
from .workers import _render_pool, _render_split

logger = logging.getLogger(__name__)


FORMAT_VERSION = 2

DEMO_CONFIG = dict(
    num_categories=1000,
    num_train_images=4000,
    num_val_images=500,
    image_size=(256, 320),
    seed=0,
    image_seed=0,
    names="descriptive",
)


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
