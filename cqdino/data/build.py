"""Training and test data loaders that resume exactly.

detectron2's infinite ``TrainingSampler`` restarts from its seed when a run is resumed, and the
augmentation randomness of each sample depends on the worker and the process RNG. Here:

* :class:`ResumableTrainingSampler` is one infinite, seeded stream of dataset indices shared by
  all ranks (rank ``r`` of ``W`` takes stream positions ``r, r + W, ...``), optionally with
  class-aware repeat factors; every item carries its global stream position.
* :class:`SeededMapDataset` maps an item with the process RNGs (``random``, ``numpy``, ``torch``)
  seeded from ``(seed, position)``, so a sample's augmentation is the same whatever the number of
  workers, the number of ranks, or where a run was resumed.
* :class:`ResumableBatchLoader` batches the mapped stream (grouped by aspect ratio like
  detectron2's ``AspectRatioGroupedDataset``) and has a ``state_dict``: the number of stream
  items this rank has consumed and the items waiting in the aspect-ratio buckets. Loading it
  before the first iteration continues the stream exactly where the checkpoint left it.

The test loader is detectron2's ``build_detection_test_loader`` (batch 1, inference sampler).
Reading registered datasets (:func:`get_dataset_dicts`, :func:`check_datasets`) belongs to
:mod:`cqdino.data.datasets` (re-exported here); imports run one way, from here to there.
"""

import itertools
import logging
import os
import random
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch
from detectron2.data import DatasetCatalog, MetadataCatalog, build_detection_test_loader
from detectron2.data.build import worker_init_reset_seed
from detectron2.utils import comm
from torch.utils.data import DataLoader, Dataset, Sampler

from cqdino.utils.io import InputError

from .datasets import (
    DatasetNotFoundError,
    check_datasets,
    get_dataset_dicts,
    json_category_names,
    register_coco_json,
)
from .sampler import repeat_factors_from_category_frequency

__all__ = [
    "DatasetNotFoundError",
    "check_datasets",
    "get_dataset_dicts",
    "ResumableTrainingSampler",
    "resolve_seed",
    "SeededMapDataset",
    "ResumableBatchLoader",
    "build_train_loader",
    "build_test_loader",
    "dataset_class_names",
    "category_words",
    "register_config_datasets",
]

logger = logging.getLogger(__name__)


def resolve_seed(seed: Optional[int]) -> int:
    """``seed`` itself when ``>= 0``; None or negative (detectron2's ``-1``: "random") draws one
    seed shared by all ranks (:func:`detectron2.utils.comm.shared_random_seed`)."""
    if seed is None or int(seed) < 0:
        return int(comm.shared_random_seed())
    return int(seed)


class ResumableTrainingSampler(Sampler):
    """Infinite stream of ``(index, position)`` for this rank.

    Args:
        size: dataset length.
        shuffle: a new permutation every epoch (else ``0..size-1`` repeated).
        seed: stream seed; must be the same on all ranks (None or negative: a random seed
            shared by all ranks).
        repeat_factors: optional (size,) float tensor (class-aware repeat-factor sampling); each
            epoch repeats image ``i`` ``floor(r_i)`` times plus once more with probability
            ``frac(r_i)``.
        start: stream items this rank has already consumed (resume).
    """

    def __init__(
        self,
        size: int,
        shuffle: bool = True,
        seed: Optional[int] = None,
        repeat_factors: Optional[torch.Tensor] = None,
        start: int = 0,
    ):
        if size <= 0:
            raise ValueError(f"ResumableTrainingSampler: dataset size must be > 0, got {size}")
        if repeat_factors is not None and len(repeat_factors) != size:
            raise ValueError(
                f"repeat_factors has {len(repeat_factors)} entries for a dataset of {size}"
            )
        self._size = size
        self._shuffle = shuffle
        self._seed = resolve_seed(seed)
        self._repeat = None if repeat_factors is None else torch.as_tensor(repeat_factors)
        self._rank = comm.get_rank()
        self._world = comm.get_world_size()
        self.start = int(start)

    def _epochs(self) -> Iterator[int]:
        g = torch.Generator()
        g.manual_seed(self._seed)
        while True:
            if self._repeat is None:
                indices = torch.arange(self._size)
            else:
                whole = self._repeat.floor()
                extra = torch.rand(self._size, generator=g) < (self._repeat - whole)
                indices = torch.repeat_interleave(torch.arange(self._size), (whole + extra).long())
            if self._shuffle:
                indices = indices[torch.randperm(len(indices), generator=g)]
            yield from indices.tolist()

    def __iter__(self) -> Iterator[Tuple[int, int]]:
        first = self._rank + self.start * self._world
        stream = itertools.islice(enumerate(self._epochs()), first, None, self._world)
        for position, index in stream:
            yield index, position


class SeededMapDataset(Dataset):
    """``mapper(dataset[index])`` with the RNGs seeded by ``(seed, position)``.

    The caller's RNG states are restored afterwards, so mapping in the main process
    (``num_workers=0``) does not disturb the model's random stream. Items are indexed by the
    ``(index, position)`` pairs of :class:`ResumableTrainingSampler`.
    """

    def __init__(self, dataset: Sequence[dict], mapper, seed: int):
        self.dataset = dataset
        self.mapper = mapper
        self.seed = int(seed)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: Tuple[int, int]) -> Tuple[int, int, Optional[dict]]:
        index, position = key
        seed = np.random.SeedSequence([self.seed, position]).generate_state(2)
        py_state, np_state = random.getstate(), np.random.get_state()
        try:
            with torch.random.fork_rng(devices=[]):
                random.seed(int(seed[0]))
                np.random.seed(int(seed[1]))
                torch.manual_seed(int(seed[0]) << 32 | int(seed[1]))
                out = self.mapper(self.dataset[index])
        finally:
            random.setstate(py_state)
            np.random.set_state(np_state)
        return index, position, out


def _first(batch):
    return batch[0]


class ResumableBatchLoader:
    """Batches of ``batch_size`` mapped items from a loader of ``(position, item)``, grouped by
    aspect ratio (``w > h`` or not) when ``aspect_ratio_grouping``; ``None`` items (bad records
    the mapper skipped) are dropped. ``state_dict()`` describes where this rank's stream is."""

    def __init__(
        self,
        dataset: SeededMapDataset,
        sampler: ResumableTrainingSampler,
        batch_size: int,
        aspect_ratio_grouping: bool = True,
        num_workers: int = 0,
    ):
        self.dataset = dataset
        self.sampler = sampler
        self.batch_size = batch_size
        self.aspect_ratio_grouping = aspect_ratio_grouping
        self.num_workers = num_workers
        self._consumed = sampler.start
        self._pending: List[List[List[int]]] = [[], []]  # [index, position] waiting per bucket
        self._restored: List[Tuple[int, int]] = []  # (index, position) to re-map on resume

    def state_dict(self) -> Dict[str, Any]:
        return {
            "consumed": self._consumed,
            "pending": [[list(k) for k in b] for b in self._pending],
        }

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        self._consumed = int(state["consumed"])
        self.sampler.start = self._consumed
        self._pending = [[], []]
        self._restored = [(int(i), int(p)) for b in state["pending"] for i, p in b]

    def _mapped(self) -> Iterator[Tuple[int, int, Optional[dict]]]:
        for key in self._restored:  # bucket contents at the checkpoint: not new stream items
            yield self.dataset[key]
        self._restored = []
        loader = DataLoader(
            self.dataset,
            sampler=self.sampler,
            batch_size=1,
            num_workers=self.num_workers,
            collate_fn=_first,
            worker_init_fn=worker_init_reset_seed,
            # its own generator: creating the iterator draws no number from the global RNG
            # (a resumed run would otherwise draw it after the restored RNG state)
            generator=torch.Generator().manual_seed(self.dataset.seed),
        )
        for mapped in loader:
            self._consumed += 1
            yield mapped

    def __iter__(self) -> Iterator[List[dict]]:
        buckets: List[List[dict]] = [[], []]
        for index, position, item in self._mapped():
            if item is None:
                continue
            b = 0 if not self.aspect_ratio_grouping or item["width"] > item["height"] else 1
            buckets[b].append(item)
            self._pending[b].append([index, position])
            if len(buckets[b]) == self.batch_size:
                self._pending[b] = []
                out, buckets[b] = buckets[b], []
                yield out


def build_train_loader(
    dataset: Sequence[dict],
    mapper,
    total_batch_size: int,
    *,
    num_workers: int = 0,
    aspect_ratio_grouping: bool = True,
    repeat_threshold: Optional[float] = None,
    seed: Optional[int] = None,
    shuffle: bool = True,
) -> ResumableBatchLoader:
    """The training loader: infinite, exactly resumable (see the module docstring).

    Args:
        dataset: dataset dicts (e.g. ``L(get_dataset_dicts)(names=...)``).
        mapper: dict -> model input dict, or None to skip a bad record.
        total_batch_size: images per iteration over all ranks (divisible by the world size).
        num_workers: data-loading processes per rank.
        aspect_ratio_grouping: batch images with ``w > h`` apart from the others.
        repeat_threshold: class-aware repeat-factor sampling threshold (V3Det baselines: 1e-3);
            None samples every image once per epoch.
        seed: stream and augmentation seed (None or negative: one random seed shared by all
            ranks).
    """
    world = comm.get_world_size()
    if total_batch_size <= 0 or total_batch_size % world:
        raise ValueError(
            f"dataloader.train.total_batch_size={total_batch_size} must be a positive multiple "
            f"of the number of processes ({world})"
        )
    if not len(dataset):
        raise ValueError(
            "build_train_loader: the training dataset is empty (get_dataset_dicts with "
            "filter_empty=True drops images without boxes)"
        )
    repeat = None
    if repeat_threshold:
        repeat = repeat_factors_from_category_frequency(list(dataset), repeat_threshold)
    seed = resolve_seed(seed)
    sampler = ResumableTrainingSampler(len(dataset), shuffle, seed, repeat)
    mapped = SeededMapDataset(dataset, mapper, seed)
    logger.info(
        f"Training loader: {len(dataset)} images, batch {total_batch_size // world} per rank "
        f"x {world} ranks, {num_workers} workers"
        + (f", repeat factors with threshold {repeat_threshold}" if repeat is not None else "")
    )
    return ResumableBatchLoader(
        mapped, sampler, total_batch_size // world, aspect_ratio_grouping, num_workers
    )


def build_test_loader(dataset: Sequence[dict], mapper, num_workers: int = 0):
    """detectron2's test loader (batch 1 per rank, every image once over all ranks)."""
    return build_detection_test_loader(dataset, mapper=mapper, num_workers=num_workers)


def register_config_datasets(cfg) -> None:
    """Register the datasets a LazyConfig gives by path (``dataloader.{train,test}.dataset``
    nodes with ``names``, ``json_file`` and ``image_root``, e.g. ``configs/custom_coco.py``),
    so their names resolve before anything is instantiated. A path left unset or not found is
    an :class:`~cqdino.utils.io.InputError` naming the key."""
    from omegaconf import DictConfig, OmegaConf

    for split in ("train", "test"):
        key = f"dataloader.{split}.dataset"
        node = OmegaConf.select(cfg, key, default=None)
        if not isinstance(node, DictConfig) or not {"names", "json_file", "image_root"} <= set(
            node.keys()
        ):
            continue
        for k in ("json_file", "image_root"):
            if OmegaConf.is_missing(node, k) or not node[k]:
                raise InputError(f"{key}.{k} is not set: give it as an override ({key}.{k}=...)")
        if not os.path.isfile(node.json_file):
            raise InputError(f"{key}.json_file={node.json_file}: no such file")
        if not os.path.isdir(node.image_root):
            raise InputError(f"{key}.image_root={node.image_root}: no such folder")
        register_coco_json(node.names, node.json_file, node.image_root)


def dataset_class_names(
    dataset_name: str, num_classes: int, required: bool = False
) -> Optional[List[str]]:
    """The class names of a registered dataset, checked against the model's class count (a
    mismatch raises, naming both config keys): its ``thing_classes``, else, for a dataset
    registered lazily from a COCO json (detectron2's ``register_coco_instances``: the names
    exist only once the json is loaded), the names of the json's ``categories`` in sorted-id
    order (:func:`~cqdino.data.datasets.json_category_names`; the annotations are not read).

    Returns None when the metadata has neither, unless ``required`` (what a model that needs
    the names asks for): then :class:`~cqdino.utils.io.InputError` names the dataset, as it
    does for an unregistered dataset or a json whose categories cannot be read."""
    names = _metadata_class_names(dataset_name, required)
    if names is not None and len(names) != num_classes:
        raise InputError(
            f"the model has {num_classes} classes (model.class_head.num_categories / "
            f"num_classes) but dataset {dataset_name!r} (dataloader.train.dataset.names) has "
            f"{len(names)} categories"
        )
    return None if names is None else list(names)


def _metadata_class_names(dataset_name: str, required: bool) -> Optional[List[str]]:
    """``thing_classes``, else the categories of the metadata's ``json_file``, of a registered
    dataset (see :func:`dataset_class_names`)."""
    meta = MetadataCatalog.get(dataset_name)
    names = meta.get("thing_classes", None)
    if names is not None:
        return list(names)
    json_file = meta.get("json_file", None)
    if json_file:
        try:
            return json_category_names(json_file)
        except ValueError as e:
            raise InputError(f"dataset {dataset_name!r}: class names: {e}") from None
    if not required:
        return None
    if dataset_name not in DatasetCatalog.list():
        raise InputError(
            f"dataset {dataset_name!r} is not registered, so its class names are unknown "
            "(register it before the config is instantiated, e.g. with detectron2's "
            "register_coco_instances)"
        )
    raise InputError(
        f"dataset {dataset_name!r} has no class names: its metadata has neither thing_classes "
        f"nor a COCO json_file to read them from (set MetadataCatalog.get({dataset_name!r})"
        ".thing_classes when registering it)"
    )


TREE_TOKEN_PREFIX = "tree:"


def category_words(
    dataset_name: str,
    num_classes: int,
    names: bool = True,
    tree: bool = True,
) -> List[List[str]]:
    """Each category's words for the compositional category queries and the word head
    (``model.class_head.category_names``, ``model.word_head.category_names``): the words of
    its name and/or the nodes of the category tree on its path.

    With ``tree``, category c's words include one token per node on its path in the dataset's
    tree (``metadata.category_tree_file``; V3Det's tree, the synthetic one): its ancestors from
    the top down, then its own node. A node's vector is then trained by the boxes of every
    category below it (a parent learns from all its children's boxes, a rare leaf starts from
    what its ancestors learnt) and the word head's targets make every box a positive for its
    ancestors. Nodes above every category (the root) carry nothing and are left out. Tree
    tokens are ``"tree:<node id>"`` and never split, so node ids cannot leak words into the
    vocabulary; a token's parent is the token before it (what
    :class:`~cqdino.modeling.NameWordHead` ``tree_softmax`` reads).

    Args:
        dataset_name: the training dataset (its class names and tree).
        num_classes: C of the model (checked against the dataset).
        names: the words of the category names (:func:`cqdino.utils.text.name_words`).
        tree: the tree's nodes on the category's path.
    Returns:
        C token lists in contiguous order: name words first, then tree tokens.
    """
    if not (names or tree):
        raise ValueError("category_words: names and tree are both off (no words)")
    from cqdino.utils.text import name_words

    from .datasets import category_tree_file
    from .hierarchy import CategoryTree

    class_names = dataset_class_names(dataset_name, num_classes, required=True)
    words: List[List[str]] = [name_words(n) if names else [] for n in class_names]
    if not tree:
        return words
    path = category_tree_file(dataset_name)
    meta = MetadataCatalog.get(dataset_name)
    id_map = meta.get("thing_dataset_id_to_contiguous_id", None)
    ids = sorted(id_map, key=id_map.get) if id_map else None
    try:
        hierarchy = CategoryTree.from_v3det_json(path, ids)
    except ValueError as e:
        raise InputError(f"dataset {dataset_name!r}: {e}") from None
    if hierarchy.num_categories != num_classes:
        raise InputError(
            f"category tree {path} of dataset {dataset_name!r} has {hierarchy.num_categories} "
            f"categories, the model has {num_classes}"
        )
    ancestors = [hierarchy.ancestors(c) for c in hierarchy.category_ids]
    everywhere = set.intersection(*(set(a) for a in ancestors)) if ancestors else set()
    depth: Dict[Any, int] = {}
    for c, (cid, nodes) in enumerate(zip(hierarchy.category_ids, ancestors)):
        for n in nodes:
            if n not in depth:
                depth[n] = len(hierarchy.node_ancestors(n))
        chain = sorted((n for n in nodes if n not in everywhere), key=lambda n: depth[n])
        words[c] += [f"{TREE_TOKEN_PREFIX}{n}" for n in chain + [hierarchy.node(cid)]]
    return words
