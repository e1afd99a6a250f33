"""Category-name embeddings that need no download: hashed bag-of-words vectors of the names.

The authors initialise the category queries from CLIP text embeddings of the class names (a
file users download). Offline, this module gives the same kind of table from the names alone:
every word gets a fixed pseudo-random unit vector (seeded by a hash of the word), and a name is
the normalised mean of its words' vectors. Categories sharing words (``"red striped circle"``,
``"red solid square"``) get correlated queries, which is what lets a contrastive head carry
what it learnt on frequent categories over to rare ones. It knows nothing about what words
mean: it is no substitute for a text encoder on real vocabularies.

Configs::

    model.class_head.init_embeddings = L(name_embedding_file)(dataset_name="synthetic_vocab_train")
"""

import hashlib
import os
from typing import Optional, Sequence

import numpy as np
from detectron2.data import DatasetCatalog, MetadataCatalog

from cqdino.utils.io import atomic_write
from cqdino.utils.text import name_words

__all__ = ["bag_of_words_embeddings", "name_embedding_file"]


def _word_vector(word: str, dim: int) -> np.ndarray:
    seed = int.from_bytes(hashlib.sha256(word.encode("utf-8")).digest()[:8], "little")
    v = np.random.default_rng(seed).standard_normal(dim)
    return v / np.linalg.norm(v)


def bag_of_words_embeddings(names: Sequence[str], dim: int = 256) -> np.ndarray:
    """``[C, dim]`` float32 table, unit rows: the normalised mean of the names' word vectors."""
    if dim <= 0:
        raise ValueError(f"dim must be positive, got {dim}")
    if not names:
        raise ValueError("bag_of_words_embeddings: no names given")
    cache = {}
    rows = []
    for name in names:
        vecs = [cache.setdefault(w, _word_vector(w, dim)) for w in name_words(name)]
        v = np.mean(vecs, axis=0)
        rows.append(v / np.linalg.norm(v))
    return np.stack(rows).astype(np.float32)


def default_cache_dir() -> str:
    """``$CQDINO_CACHE``, else ``$XDG_CACHE_HOME/cqdino``, else ``~/.cache/cqdino``."""
    if os.getenv("CQDINO_CACHE"):
        return os.path.expanduser(os.environ["CQDINO_CACHE"])
    xdg = os.getenv("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(xdg, "cqdino")


def name_embedding_file(dataset_name: str, dim: int = 256, cache_dir: Optional[str] = None) -> str:
    """Path of the bag-of-words table of a registered dataset's ``thing_classes``, written
    (atomically) into ``cache_dir`` (default :func:`default_cache_dir`; never the dataset's
    folder) on first use and reused afterwards; the file name holds a digest of the names.
    A dataset registered lazily (``register_coco_instances``) is loaded once to learn its
    classes."""
    if dataset_name not in DatasetCatalog.list():
        raise ValueError(f"name_embedding_file: dataset {dataset_name!r} is not registered")
    names = MetadataCatalog.get(dataset_name).get("thing_classes")
    if names is None:  # detectron2's lazy registrations set the classes when loaded
        DatasetCatalog.get(dataset_name)
        names = MetadataCatalog.get(dataset_name).get("thing_classes")
    if not names:
        raise ValueError(
            f"name_embedding_file: dataset {dataset_name!r} has no thing_classes in its "
            "metadata, even after loading it; set model.class_head.init_embeddings=None "
            "(random initial category queries) or give a [C, d] .npy/.pth file"
        )
    digest = hashlib.sha256("\n".join(names).encode("utf-8")).hexdigest()[:12]
    folder = cache_dir or default_cache_dir()
    path = os.path.join(folder, f"name_embeddings_bow{dim}_{digest}.npy")
    if not os.path.isfile(path):
        table = bag_of_words_embeddings(names, dim)
        atomic_write(path, lambda f: np.save(f, table))
    return path
