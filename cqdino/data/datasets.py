"""Dataset registration: V3Det (``v3det_{train,val}``) and the synthetic vocabulary dataset.

COCO uses detectron2's built-in ``coco_2017_*`` registrations (created by importing detectron2).
Roots come from ``$DETECTRON2_DATASETS`` (default ``./datasets``)::

    $DETECTRON2_DATASETS/V3Det/annotations/v3det_2023_v1_{train,val}.json
    $DETECTRON2_DATASETS/V3Det/images/<category_node>/...        (file_name in the json)
    $DETECTRON2_DATASETS/V3Det/category_name_13204_v3det_2023_v1.txt   (display names; optional)
    $DETECTRON2_DATASETS/V3Det/annotations/v3det_2023_v1_category_tree.json   (optional)
    $DETECTRON2_DATASETS/synthetic_vocab/...   (see cqdino.data.synthetic; generated on first use)
    $DETECTRON2_DATASETS/synthetic_vocab_val_img1/...   (the same vocabulary's val split rendered
                                                         with image seed 1; on first use)
    $DETECTRON2_DATASETS/synthetic_vocab_opaque/...   (the demo data with opaque category names,
                                                       ``--names opaque``; on first use)

Your own COCO-format data needs no Python: :func:`coco_json_dataset` registers a json and its
image folder under a name when a config is instantiated (``configs/custom_coco.py``).

The loader reads the json once with the standard library and builds detectron2 dataset dicts
directly (no COCO API index, no per-annotation copies beyond the dicts detectron2 needs).
"""

import json
import logging
import os
import re
import time
from contextlib import contextmanager
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Union

import numpy as np
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.build import filter_images_with_only_crowd_annotations
from detectron2.structures import BoxMode

from cqdino.utils.io import InputError

from . import synthetic

__all__ = [
    "DatasetNotFoundError",
    "check_datasets",
    "get_dataset_dicts",
    "load_detection_json",
    "read_category_names",
    "image_counts_from_json",
    "register_v3det",
    "register_synthetic_vocab",
    "register_synthetic_rendering",
    "register_coco_json",
    "coco_json_dataset",
    "coco_json_num_categories",
    "json_category_names",
    "category_tree_file",
    "generation_disabled",
    "V3DET_SPLITS",
]

logger = logging.getLogger(__name__)

V3DET_SPLITS = {
    "v3det_train": "V3Det/annotations/v3det_2023_v1_train.json",
    "v3det_val": "V3Det/annotations/v3det_2023_v1_val.json",
}
V3DET_NAMES_FILES = (
    "V3Det/category_name_13204_v3det_2023_v1.txt",
    "V3Det/annotations/category_name_13204_v3det_2023_v1.txt",
)
V3DET_TREE_FILES = (
    "V3Det/annotations/v3det_2023_v1_category_tree.json",
    "V3Det/v3det_2023_v1_category_tree.json",
)


def _datasets_root(root: Optional[str]) -> str:
    if root is None:
        root = os.getenv("DETECTRON2_DATASETS", "datasets")
    return os.path.expanduser(root)


def read_category_names(path: str) -> List[str]:
    """Names from a txt file, line i = category id i+1 (CRLF or LF line ends)."""
    with open(path, encoding="utf-8") as f:
        names = [line.rstrip("\r\n") for line in f]
    while names and names[-1] == "":
        names.pop()
    if any(not n for n in names):
        raise ValueError(f"{path}: empty category name on line {names.index('') + 1}")
    return names


def _load_json(json_file: str) -> dict:
    """A COCO detection json; an unreadable file or invalid JSON is an :class:`InputError`
    naming the file (and the line and column of the first JSON error)."""
    t0 = time.perf_counter()
    try:
        with open(json_file, encoding="utf-8") as f:
            data = json.load(f)
    except json.JSONDecodeError as e:
        raise InputError(
            f"annotation file {json_file}: invalid JSON at line {e.lineno} column {e.colno} "
            f"({e.msg})"
        ) from None
    except UnicodeDecodeError as e:
        raise InputError(
            f"annotation file {json_file}: not UTF-8 text (byte {e.start}: {e.reason})"
        ) from None
    except OSError as e:
        raise InputError(f"cannot read annotation file {json_file}: {e.strerror or e}") from None
    if not isinstance(data, dict):
        raise InputError(
            f"{json_file}: not a COCO detection json (a JSON {type(data).__name__}, not an object)"
        )
    for key in ("images", "annotations", "categories"):
        if key not in data:
            raise InputError(f"{json_file}: not a COCO detection json (no {key!r})")
    logger.info(f"Loaded {json_file} in {time.perf_counter() - t0:.1f} s")
    return data


_IMAGE_COUNT_CACHE: Dict[tuple, Dict[int, int]] = {}


def image_counts_from_json(json_file: str) -> Dict[int, int]:
    """Number of images per category id (the frequency-group statistic) of a COCO json.

    Cached per (path, mtime, size), since evaluation asks for it after every eval round.
    """
    st = os.stat(json_file)
    key = (os.path.abspath(json_file), st.st_mtime_ns, st.st_size)
    if key not in _IMAGE_COUNT_CACHE:
        data = _load_json(json_file)
        counts = _image_counts(data["annotations"], [c["id"] for c in data["categories"]])
        _IMAGE_COUNT_CACHE[key] = counts
    return dict(_IMAGE_COUNT_CACHE[key])


def _image_counts(annotations: list, category_ids: Sequence[int]) -> Dict[int, int]:
    if not annotations:
        return {int(c): 0 for c in category_ids}
    img = np.fromiter((a["image_id"] for a in annotations), np.int64, len(annotations))
    cat = np.fromiter((a["category_id"] for a in annotations), np.int64, len(annotations))
    pairs = np.unique(np.stack([cat, img], 1), axis=0)
    ids, counts = np.unique(pairs[:, 0], return_counts=True)
    out = {int(c): 0 for c in category_ids}
    out.update(zip(ids.tolist(), counts.tolist()))
    return out


def _sorted_categories(json_file: str, data: dict) -> List[dict]:
    """The ``categories`` of a loaded json in id order; duplicate ids are an error."""
    cats = sorted(data["categories"], key=lambda c: c["id"])
    ids = [int(c["id"]) for c in cats]
    if len(set(ids)) != len(ids):
        dup = sorted({i for i, j in zip(ids, ids[1:]) if i == j})
        raise InputError(f"{json_file}: duplicate category ids {_some(dup)}")
    return cats


def _check_image_ids(json_file: str, images: list) -> None:
    """Each image id once (annotations refer to images by id)."""
    first: Dict[int, int] = {}
    for k, im in enumerate(images):
        if im["id"] in first:
            raise InputError(
                f"{json_file}: duplicate image id {im['id']} (entries {first[im['id']]} and {k} "
                "of its 'images', counting from 0)"
            )
        first[im["id"]] = k


def load_detection_json(
    json_file: str,
    image_root: str,
    dataset_name: Optional[str] = None,
    category_names: Optional[Sequence[str]] = None,
    record_image_count: bool = False,
) -> List[dict]:
    """Load a COCO-format detection json (V3Det, synthetic_vocab) as detectron2 dataset dicts.

    Category ids are mapped to contiguous ids in sorted-id order. Display names come from
    ``category_names`` (indexed by sorted position) when given, else from the json.

    Args:
        json_file: COCO json with ``images``, ``annotations`` (xywh ``bbox``), ``categories``.
        image_root: folder the images' ``file_name`` is relative to.
        dataset_name: when given, its metadata gets ``thing_classes`` and
            ``thing_dataset_id_to_contiguous_id``.
        category_names: display names.
        record_image_count: also set ``image_count`` (images per category, contiguous order)
            in the metadata; only for a *training* split (frequency groups count train images).
    Returns:
        list of dicts with ``file_name``, ``height``, ``width``, ``image_id`` and
        ``annotations`` (``bbox`` xywh, ``bbox_mode`` XYWH_ABS, contiguous ``category_id``,
        ``iscrowd``). Box validity is checked by the mapper (it knows the real image size).
    Raises:
        :class:`~cqdino.utils.io.InputError` (a ``ValueError``) naming the file and the
        annotation, image or category: invalid JSON (line and column), duplicate image or
        category ids, an unknown category or image id, or categories other than the ones
        ``dataset_name`` is registered with (its ``thing_dataset_id_to_contiguous_id``).
    """
    data = _load_json(json_file)
    t0 = time.perf_counter()
    cats = _sorted_categories(json_file, data)
    cat_ids = [int(c["id"]) for c in cats]
    id_map = {c: i for i, c in enumerate(cat_ids)}
    if dataset_name is not None:
        registered = MetadataCatalog.get(dataset_name).get("thing_dataset_id_to_contiguous_id")
        if registered is not None and set(registered) != set(id_map):
            diff = _id_difference(set(registered), set(id_map), "the registration", "the json")
            raise InputError(
                f"{json_file}: its category ids differ from those dataset {dataset_name!r} is "
                f"registered with: {diff}"
            )
    if category_names is not None:
        if len(category_names) != len(cats):
            raise InputError(
                f"{json_file}: {len(cats)} categories but {len(category_names)} display names"
            )
        names = list(category_names)
    else:
        names = [c["name"] for c in cats]

    images = data["images"]
    _check_image_ids(json_file, images)
    per_image: Dict[int, list] = {}
    dicts = []
    for im in images:
        anns: list = []
        image_id = im["id"]
        per_image[image_id] = anns
        dicts.append(
            {
                "file_name": os.path.join(image_root, im["file_name"]),
                "height": im["height"],
                "width": im["width"],
                "image_id": image_id,
                "annotations": anns,
            }
        )
    xywh = BoxMode.XYWH_ABS
    for a in data["annotations"]:
        try:
            target = per_image[a["image_id"]]
        except KeyError:
            raise InputError(
                f"{json_file}: annotation {a.get('id')} refers to unknown image id "
                f"{a.get('image_id')}"
            ) from None
        try:
            cid = id_map[a["category_id"]]
        except KeyError:
            raise InputError(
                f"{json_file}: annotation {a.get('id')} of image {a['image_id']} has unknown "
                f"category id {a.get('category_id')}"
            ) from None
        target.append(
            {
                "bbox": a["bbox"],
                "bbox_mode": xywh,
                "category_id": cid,
                "iscrowd": a.get("iscrowd", 0),
            }
        )
    if dataset_name is not None:
        meta = MetadataCatalog.get(dataset_name)
        meta.set(thing_classes=names, thing_dataset_id_to_contiguous_id=id_map)
        if record_image_count:
            counts = _image_counts(data["annotations"], cat_ids)
            meta.set(image_count=[counts[c] for c in cat_ids])
    logger.info(
        f"Built {len(dicts)} dataset dicts ({len(data['annotations'])} boxes) from {json_file} "
        f"in {time.perf_counter() - t0:.1f} s"
    )
    return dicts


def _replace(name: str, loader, **metadata) -> None:
    if name in DatasetCatalog.list():
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)
    DatasetCatalog.register(name, loader)
    MetadataCatalog.get(name).set(**metadata)


def _first_existing(root: str, candidates: Sequence[str]) -> Optional[str]:
    for c in candidates:
        p = os.path.join(root, c)
        if os.path.exists(p):
            return p
    return None


def register_v3det(root: Optional[str] = None) -> None:
    """Register ``v3det_train`` and ``v3det_val`` (re-registers if already there).

    Metadata: ``json_file``, ``image_root``, ``evaluator_type="v3det"``, ``category_tree_file``
    (the tree json; may not exist), ``train_json_file`` (frequency groups come from it) and,
    when the names txt exists, ``thing_classes`` / ``thing_dataset_id_to_contiguous_id``
    (ids 1..13204 -> 0..13203). ``image_count`` is set when ``v3det_train`` is loaded.
    """
    root = _datasets_root(root)
    names_file = _first_existing(root, V3DET_NAMES_FILES)
    tree_file = _first_existing(root, V3DET_TREE_FILES) or os.path.join(root, V3DET_TREE_FILES[0])
    names = read_category_names(names_file) if names_file else None
    image_root = os.path.join(root, "V3Det", "images")
    for name, rel in V3DET_SPLITS.items():
        json_file = os.path.join(root, rel)
        meta = dict(
            json_file=json_file,
            image_root=image_root,
            evaluator_type="v3det",
            category_tree_file=tree_file,
            train_json_file=os.path.join(root, V3DET_SPLITS["v3det_train"]),
        )
        if names is not None:
            meta.update(
                thing_classes=names,
                thing_dataset_id_to_contiguous_id={i + 1: i for i in range(len(names))},
                category_names_file=names_file,
            )

        def load(json_file=json_file, name=name):
            if names is None:
                logger.warning(
                    f"No V3Det category-name txt under {root} ({V3DET_NAMES_FILES}); display "
                    "names come from the json, where some names repeat"
                )
            return load_detection_json(
                json_file, image_root, name, names, record_image_count=name == "v3det_train"
            )

        _replace(name, load, **meta)


def _synthetic_metadata(out: str, generate_kwargs: dict, on_import: bool = False) -> dict:
    """Category metadata of the synthetic dataset in ``out``: read from the folder when it is
    generated (the folder is the truth), else the vocabulary that loading will generate.
    ``on_import``: a folder that cannot be read falls back to the latter (registration runs on
    import; loading reports the problem)."""
    names = None
    if os.path.exists(os.path.join(out, "meta.json")):
        try:
            synthetic.read_meta(out)  # a readable generated folder of this format
            names = read_category_names(os.path.join(out, "category_names.txt"))
        except (OSError, ValueError):
            if not on_import:
                raise
    if names is None:
        cfg = {**synthetic.DEMO_CONFIG, **generate_kwargs}
        vocabulary = synthetic.vocabulary(cfg["num_categories"], cfg["seed"], cfg["names"])
        names = [c["name"] for c in vocabulary]
    return dict(
        thing_classes=names,
        thing_dataset_id_to_contiguous_id={i + 1: i for i in range(len(names))},
    )


def _update_metadata(name: str, **metadata) -> None:
    """Set ``metadata`` of ``name``, replacing stale values (detectron2's ``Metadata.set``
    refuses to change a value); ``image_count`` is dropped with them (it is recounted)."""
    meta = MetadataCatalog.get(name)
    if all(getattr(meta, k, None) == v for k, v in metadata.items()):
        return
    keep = {k: v for k, v in meta.as_dict().items() if k not in ("name", "image_count")}
    keep.update(metadata)
    MetadataCatalog.remove(name)
    MetadataCatalog.get(name).set(**keep)


def _register_synthetic_split(
    name: str,
    out: str,
    split: str,
    train_json_file: str,
    prepare: Callable[[], None],
    generate_kwargs: dict,
) -> None:
    """Register ``name`` = ``split`` of the generated folder ``out`` (generated by ``prepare``
    on first load; frequency groups counted from ``train_json_file``)."""
    json_file = os.path.join(out, "annotations", f"synthetic_vocab_{split}.json")

    def load():
        prepare()
        # The folder may have been (re)generated since registration: its categories win.
        categories = _synthetic_metadata(out, generate_kwargs)
        _update_metadata(name, **categories)
        return load_detection_json(
            json_file,
            os.path.join(out, "images"),
            name,
            categories["thing_classes"],
            record_image_count=json_file == train_json_file,
        )

    _replace(
        name,
        load,
        json_file=json_file,
        image_root=os.path.join(out, "images"),
        evaluator_type="v3det",
        category_tree_file=os.path.join(out, "category_tree.json"),
        train_json_file=train_json_file,
        **_synthetic_metadata(out, generate_kwargs, on_import=True),
    )
    _PREPARE[name] = prepare


def register_synthetic_vocab(
    root: Optional[str] = None, folder: str = "synthetic_vocab", **generate_kwargs
) -> None:
    """Register ``<folder>_{train,val}`` at ``<root>/<folder>`` (default
    ``synthetic_vocab_{train,val}``).

    A generated folder is used as it is: its categories (``category_names.txt``) and sizes
    (``meta.json``) are whatever ``python -m cqdino.data.synthetic`` was run with. Loading
    either split generates the dataset first when the folder is absent (the demo size
    :data:`cqdino.data.synthetic.DEMO_CONFIG`, overridable by ``generate_kwargs``; explicit
    ``generate_kwargs`` that differ from an existing folder are an error). The default folder
    also registers its second rendering (:func:`register_synthetic_rendering`); importing
    ``cqdino.data`` registers ``synthetic_vocab_opaque_{train,val}`` too: the same data with
    opaque names (``names="opaque"``).
    """
    root = _datasets_root(root)
    out = os.path.join(root, folder)

    def prepare():
        synthetic.ensure_generated(out, **generate_kwargs)

    train_json = os.path.join(out, "annotations", "synthetic_vocab_train.json")
    for split in ("train", "val"):
        _register_synthetic_split(
            f"{folder}_{split}", out, split, train_json, prepare, generate_kwargs
        )
    if folder == "synthetic_vocab":
        register_synthetic_rendering(1, root, **generate_kwargs)


# The generation parameters a second rendering takes from the main folder (its vocabulary).
_VOCABULARY_KEYS = (
    "num_categories",
    "num_val_images",
    "seed",
    "image_size",
    "max_objects",
    "zipf_alpha",
    "coarse_label_prob",
    "min_visible",
    "min_object_size",
)


def register_synthetic_rendering(
    image_seed: int, root: Optional[str] = None, **generate_kwargs
) -> str:
    """Register ``synthetic_vocab_val_img<seed>``: the val split of the synthetic vocabulary
    rendered with another image seed (same categories, tree and frequencies, other images), at
    ``<root>/synthetic_vocab_val_img<seed>``, to check that a model trained on
    ``synthetic_vocab_train`` holds on renderings it was not tuned on.

    Generated on first use (after the main folder, generated first if absent, with
    ``generate_kwargs`` as :func:`register_synthetic_vocab`) with the main folder's parameters
    (its ``meta.json``); frequency groups come from the main training split. Returns the
    dataset name.
    """
    root = _datasets_root(root)
    main = os.path.join(root, "synthetic_vocab")
    name = f"synthetic_vocab_val_img{image_seed}"
    out = os.path.join(root, name)

    def prepare():
        synthetic.ensure_generated(main, **generate_kwargs)
        params = synthetic.read_meta(main)
        kwargs = {k: params[k] for k in _VOCABULARY_KEYS if k in params}
        if isinstance(kwargs.get("image_size"), list):
            kwargs["image_size"] = tuple(kwargs["image_size"])
        synthetic.ensure_generated(out, image_seed=image_seed, splits=["val"], **kwargs)

    main_train = os.path.join(main, "annotations", "synthetic_vocab_train.json")
    _register_synthetic_split(name, out, "val", main_train, prepare, {})
    return name


# Dataset name -> callable that creates the dataset's files on demand (synthetic_vocab).
_PREPARE: Dict[str, Callable[[], None]] = {}
_GENERATE = [True]


@contextmanager
def generation_disabled() -> Iterator[None]:
    """Inside, a missing synthetic dataset is an error instead of being generated (inference
    must not create a dataset under the current folder because a path is unset)."""
    _GENERATE.append(False)
    try:
        yield
    finally:
        _GENERATE.pop()


def _read_categories(json_file: str) -> List[dict]:
    if not os.path.isfile(json_file):
        raise FileNotFoundError(f"annotation file {json_file}: no such file")
    cats = _load_json(json_file)["categories"]
    return sorted(cats, key=lambda c: c["id"])


# a JSON string (skipped whole), an opening or a closing bracket
_JSON_TOKEN = re.compile(r'"(?:[^"\\]|\\.)*"|([\[{])|([\]}])', re.S)
_JSON_WS = re.compile(r"\s*")
_JSON_SCALAR = re.compile(r"[^,}\]\s]*")
_JSON_END = re.compile(r"\s*}\s*\Z")
_CATEGORY_NAMES_CACHE: Dict[tuple, List[str]] = {}


def _skip_json_value(text: str, i: int) -> int:
    """The index just past the JSON value that starts at ``text[i]`` (nothing is decoded)."""
    if text[i] == '"':
        m = _JSON_TOKEN.match(text, i)
        if m is None:
            raise ValueError(f"unterminated string at character {i}")
        return m.end()
    if text[i] not in "[{":
        return _JSON_SCALAR.match(text, i).end()
    depth = 0
    for m in _JSON_TOKEN.finditer(text, i):
        if m.lastindex == 1:
            depth += 1
        elif m.lastindex == 2:
            depth -= 1
            if depth == 0:
                return m.end()
    raise ValueError(f"the value at character {i} does not end")


def _last_member(text: str, wanted: str):
    """``(True, value)`` when ``wanted`` is the last key of the top-level JSON object ``text``
    (COCO's own files end with their categories), found from the end without reading the rest;
    ``(False, None)`` otherwise."""
    p = text.rfind(f'"{wanted}"')
    if p < 0:
        return False, None
    j = p
    while j > 0 and text[j - 1] == "\\":
        j -= 1
    if (p - j) % 2:  # an escaped quote inside a string
        return False, None
    # an unescaped quote followed by a name and ':' opens a key; a key whose value is followed
    # by the closing brace at the end of the text is a member of the top-level object
    i = _JSON_WS.match(text, p + len(wanted) + 2).end()
    if text[i : i + 1] != ":":
        return False, None
    try:
        value, end = json.JSONDecoder().raw_decode(text, _JSON_WS.match(text, i + 1).end())
    except ValueError:
        return False, None
    return (True, value) if _JSON_END.match(text, end) else (False, None)


def _top_level_value(text: str, wanted: str):
    """The value of the top-level key ``wanted`` of the JSON object ``text``, decoding that
    value only (the others, e.g. a COCO json's annotations, are skipped over)."""
    found, value = _last_member(text, wanted)
    if found:
        return value
    ws = _JSON_WS.match
    i = ws(text, 0).end()
    if text[i : i + 1] != "{":
        raise ValueError("not a JSON object")
    i = ws(text, i + 1).end()
    while text[i : i + 1] != "}":
        if text[i : i + 1] != '"':
            raise ValueError(f"expected a key at character {i}")
        key, i = json.decoder.scanstring(text, i + 1)
        i = ws(text, i).end()
        if text[i : i + 1] != ":":
            raise ValueError(f"expected ':' at character {i}")
        i = ws(text, i + 1).end()
        if key == wanted:
            return json.JSONDecoder().raw_decode(text, i)[0]
        i = _skip_json_value(text, i)
        i = ws(text, i).end()
        if text[i : i + 1] == ",":
            i = ws(text, i + 1).end()
        elif text[i : i + 1] != "}":
            raise ValueError(f"expected ',' or '}}' at character {i}")
    raise KeyError(wanted)


def json_category_names(json_file: str) -> List[str]:
    """The category names of a COCO-format json in contiguous-id order (sorted category ids,
    as detectron2's ``load_coco_json`` and :func:`load_detection_json` number them), read from
    its ``categories`` without decoding the images and annotations; cached per (path, mtime,
    size). For datasets registered lazily (detectron2's ``register_coco_instances``), whose
    ``thing_classes`` exist only once the json is loaded.

    Raises:
        ValueError naming the file when it cannot be read or its categories are not a list of
        ``{"id": int, "name": str}`` with distinct ids.
    """
    try:
        st = os.stat(json_file)
        key = (os.path.abspath(json_file), st.st_mtime_ns, st.st_size)
        if key in _CATEGORY_NAMES_CACHE:
            return list(_CATEGORY_NAMES_CACHE[key])
        with open(json_file, encoding="utf-8") as f:
            text = f.read()
        cats = _top_level_value(text, "categories")
    except KeyError:
        raise ValueError(f"{json_file}: not a COCO detection json (no 'categories')") from None
    except (OSError, ValueError) as e:
        raise ValueError(f"cannot read annotation file {json_file}: {e}") from None
    ok = isinstance(cats, list) and all(
        isinstance(c, dict)
        and isinstance(c.get("id"), int)
        and not isinstance(c.get("id"), bool)
        and isinstance(c.get("name"), str)
        for c in cats
    )
    if not ok:
        raise ValueError(
            f'{json_file}: \'categories\' must be a list of {{"id": int, "name": str}}'
        )
    ids = [c["id"] for c in cats]
    if len(set(ids)) != len(ids):
        raise ValueError(f"{json_file}: duplicate category ids")
    names = [c["name"] for c in sorted(cats, key=lambda c: c["id"])]
    _CATEGORY_NAMES_CACHE[key] = names
    return list(names)


def register_coco_json(name: str, json_file: str, image_root: str) -> str:
    """Register a COCO-format detection json and its image folder as dataset ``name`` (again if
    the paths changed; nothing to do if they did not). The categories are read now, so the
    metadata has ``thing_classes`` before the dataset is loaded; evaluation is detectron2's
    ``COCOEvaluator`` on ``json_file``. Returns ``name``."""
    json_file, image_root = os.path.abspath(json_file), os.path.abspath(image_root)
    if name in DatasetCatalog.list():
        meta = MetadataCatalog.get(name)
        if meta.get("json_file") == json_file and meta.get("image_root") == image_root:
            return name
    if not os.path.isdir(image_root):
        raise FileNotFoundError(f"dataset {name!r}: image folder {image_root} does not exist")
    if not os.path.isfile(json_file):
        raise FileNotFoundError(f"annotation file {json_file}: no such file")
    data = _load_json(json_file)
    cats = _sorted_categories(json_file, data)
    _check_image_ids(json_file, data["images"])  # now, not once training has started
    _replace(
        name,
        lambda: load_detection_json(json_file, image_root, name),
        json_file=json_file,
        image_root=image_root,
        evaluator_type="coco",
        thing_classes=[c["name"] for c in cats],
        thing_dataset_id_to_contiguous_id={int(c["id"]): i for i, c in enumerate(cats)},
    )
    return name


class DatasetNotFoundError(RuntimeError):
    """A registered dataset whose files are not where its registration looks."""


def _missing_message(name: str, path: str) -> str:
    root = os.getenv("DETECTRON2_DATASETS")
    where = f"$DETECTRON2_DATASETS={root}" if root else "./datasets ($DETECTRON2_DATASETS is unset)"
    return (
        f"dataset {name!r}: {path} does not exist (looked under {where}). Put the dataset there "
        "or set DETECTRON2_DATASETS to the folder that holds it; the expected layout is in "
        "docs/data_and_evaluation.md."
    )


def check_datasets(names: Union[str, Sequence[str]]) -> None:
    """Fail early, with one clear message, when a dataset's files are missing.

    A dataset whose ``json_file`` is absent is loaded once (the synthetic vocabulary generates
    itself on first use); if that fails too, :class:`DatasetNotFoundError` names the dataset,
    the path and ``$DETECTRON2_DATASETS``.
    """
    for name in [names] if isinstance(names, str) else names:
        if name not in DatasetCatalog.list():
            raise DatasetNotFoundError(
                f"dataset {name!r} is not registered (import cqdino.data registers v3det_* and "
                "synthetic_vocab_*; detectron2 registers coco_2017_*)"
            )
        meta = MetadataCatalog.get(name)
        json_file = meta.get("json_file")
        if json_file is None or os.path.isfile(json_file):
            continue
        try:
            DatasetCatalog.get(name)
        except Exception as e:
            raise DatasetNotFoundError(_missing_message(name, json_file)) from e
        if not os.path.isfile(json_file):
            raise DatasetNotFoundError(_missing_message(name, json_file))


def get_dataset_dicts(
    names: Union[str, Sequence[str]], filter_empty: bool = True
) -> List[Dict[str, Any]]:
    """Dataset dicts of one or more registered datasets, concatenated (missing files raise
    :class:`DatasetNotFoundError`); ``filter_empty`` drops images without non-crowd boxes."""
    names = [names] if isinstance(names, str) else list(names)
    if not names:
        raise ValueError("get_dataset_dicts: no dataset names given")
    check_datasets(names)
    dicts = []
    for name in names:
        d = DatasetCatalog.get(name)
        if not d:
            raise InputError(f"dataset {name!r} is empty (no images)")
        dicts.extend(d)
    if filter_empty:
        total = len(dicts)
        dicts = filter_images_with_only_crowd_annotations(dicts)
        dropped = total - len(dicts)
        which = " + ".join(names)
        if not dicts:
            raise InputError(
                f"dataset {which}: none of its {total} images has a box (crowd boxes do not "
                "count); training drops images without boxes (filter_empty=True), so nothing "
                "is left to train on: check the annotation file's 'annotations'"
            )
        if dropped:
            logger.info(
                f"dataset {which}: {dropped} of {total} images have no box and are not used "
                f"for training; {len(dicts)} remain"
            )
    return dicts


def coco_json_dataset(
    names: str, json_file: str, image_root: str, filter_empty: bool = True
) -> List[dict]:
    """Dataset dicts of a COCO-format json (registered as ``names`` first, see
    :func:`register_coco_json`); the dataset of ``configs/custom_coco.py``, where the paths
    are overrides. ``filter_empty`` drops images without boxes (training)."""
    register_coco_json(names, json_file, image_root)
    return get_dataset_dicts(names, filter_empty=filter_empty)


def coco_json_num_categories(json_file: str) -> int:
    """The number of categories of a COCO-format json (the model's class count)."""
    return len(_read_categories(json_file))


def _some(items: Sequence, n: int = 5) -> str:
    """At most ``n`` items for a one-line message, with the count when there are more."""
    items = list(items)
    more = f", ... ({len(items)} in all)" if len(items) > n else ""
    return "[" + ", ".join(str(x) for x in items[:n]) + more + "]"


def _id_difference(a: set, b: set, a_name: str, b_name: str) -> str:
    parts = []
    if a - b:
        parts.append(f"ids only in {a_name}: {_some(sorted(a - b))}")
    if b - a:
        parts.append(f"ids only in {b_name}: {_some(sorted(b - a))}")
    return "; ".join(parts)


def dataset_categories(name: str) -> Optional[Dict[int, str]]:
    """Category id -> name of a registered dataset, from its metadata
    (``thing_dataset_id_to_contiguous_id`` and ``thing_classes``); None when the metadata does
    not have both (a lazily registered json before it is loaded)."""
    if name not in DatasetCatalog.list():
        return None
    meta = MetadataCatalog.get(name)
    id_map = meta.get("thing_dataset_id_to_contiguous_id", None)
    classes = meta.get("thing_classes", None)
    if id_map is None or classes is None or len(id_map) != len(classes):
        return None
    return {int(i): classes[c] for i, c in id_map.items()}


def _describe(name: str) -> str:
    json_file = MetadataCatalog.get(name).get("json_file", None)
    return f"dataset {name!r}" + (f" ({json_file})" if json_file else "")


def check_same_categories(train_names: Sequence[str], test_names: Sequence[str] = ()) -> None:
    """Every dataset of ``test_names`` (and every further training dataset) must have the
    categories of the first training dataset: the same ids with the same names (the order of a
    json's ``categories`` list does not matter: ids are numbered in sorted order). Otherwise the
    model's class ``i`` would be another category in evaluation.

    Datasets whose metadata has no categories yet are skipped (a json is also checked against
    the categories its dataset is registered with when it is loaded).

    Raises:
        :class:`~cqdino.utils.io.InputError`, one line naming both datasets and their files,
        the ids found in one only and the ids whose names differ.
    """
    train_names, test_names = list(train_names), list(test_names)
    if not train_names:
        return
    ref_name = train_names[0]
    ref = dataset_categories(ref_name)
    if ref is None:
        return
    for name in train_names[1:] + test_names:
        cats = dataset_categories(name)
        if cats is None or cats == ref:
            continue
        diffs = [_id_difference(set(ref), set(cats), repr(ref_name), repr(name))]
        common = sorted(set(ref) & set(cats))
        renamed = [f"{i}: {ref[i]!r} vs {cats[i]!r}" for i in common if ref[i] != cats[i]]
        if renamed:
            diffs.append(f"ids named differently: {_some(renamed, 3)}")
        raise InputError(
            f"{_describe(name)} has other categories than the training {_describe(ref_name)} "
            f"({len(cats)} vs {len(ref)}): {'; '.join(d for d in diffs if d)}; its class "
            "numbers would mean other categories: give it the training json's categories"
        )


def check_config_categories(cfg) -> None:
    """:func:`check_same_categories` for the datasets of a LazyConfig
    (``dataloader.train.dataset.names`` and ``dataloader.test.dataset.names``)."""
    from omegaconf import OmegaConf

    def names(split: str) -> List[str]:
        value = OmegaConf.select(cfg, f"dataloader.{split}.dataset.names", default=None)
        return [] if value is None else [value] if isinstance(value, str) else list(value)

    check_same_categories(names("train"), names("test"))


def category_tree_file(dataset_name: str, must_exist: bool = True) -> str:
    """The category-tree json of a registered dataset (``metadata.category_tree_file``).

    The dataset registration is the one source of truth for the path (V3Det:
    ``$DETECTRON2_DATASETS/V3Det/annotations/v3det_2023_v1_category_tree.json``). For use in
    LazyConfig: ``tree_file=L(category_tree_file)(dataset_name="v3det_train")``. A synthetic
    dataset is generated first if its folder is absent.

    Args:
        dataset_name: a registered dataset.
        must_exist: also require the file to exist.
    Raises:
        KeyError if the dataset is not registered; ValueError if its metadata has no
        ``category_tree_file``; FileNotFoundError (with ``must_exist``) if the file is missing.
    """
    if dataset_name not in DatasetCatalog.list():
        raise KeyError(
            f"dataset {dataset_name!r} is not registered (import cqdino.data for v3det_* and "
            "synthetic_vocab_*)"
        )
    path = MetadataCatalog.get(dataset_name).get("category_tree_file", None)
    if not path:
        raise ValueError(
            f"dataset {dataset_name!r} has no category tree (no category_tree_file in its "
            "metadata): without a tree set model.class_head.relation=self_attn (or none) and "
            "model.class_head.tree_file=None (yacs: MODEL.CQDINO.RELATION), or give a tree json "
            "in the V3Det layout as model.class_head.tree_file=... (MODEL.CQDINO.TREE_FILE)"
        )
    if must_exist and not os.path.exists(path) and dataset_name in _PREPARE and _GENERATE[-1]:
        _PREPARE[dataset_name]()
    if must_exist and not os.path.exists(path):
        unset = "" if os.getenv("DETECTRON2_DATASETS") else " ($DETECTRON2_DATASETS is unset)"
        raise FileNotFoundError(
            f"category tree of dataset {dataset_name!r} not found: {path} does not exist"
            f"{unset}; set DETECTRON2_DATASETS to the folder that holds the dataset (see "
            "docs/data_and_evaluation.md for where the dataset files go)"
        )
    return path
