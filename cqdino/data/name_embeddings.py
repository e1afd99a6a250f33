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
import re
from typing import List, Sequence

import numpy as np
from detectron2.data import DatasetCatalog, MetadataCatalog

__all__ = ["bag_of_words_embeddings", "name_embedding_file"]


def _word_vector(word: str, dim: int) -> np.ndarray:
    seed = int.from_bytes(hashlib.sha256(word.encode("utf-8")).digest()[:8], "little")
    v = np.random.default_rng(seed).standard_normal(dim)
    return v / np.linalg.norm(v)


def _words(name: str) -> List[str]:
    words = re.findall(r"[\w-]+", name.lower())
    return [w for w in words if w not in {"with", "a", "an", "the", "of", "and"}] or [name]


def bag_of_words_embeddings(names: Sequence[str], dim: int = 256) -> np.ndarray:
    """``[C, dim]`` float32 table, unit rows: the normalised mean of the names' word vectors."""
    if dim <= 0:
        raise ValueError(f"dim must be positive, got {dim}")
    if not names:
        raise ValueError("bag_of_words_embeddings: no names given")
    cache = {}
    rows = []
    for name in names:
        vecs = [cache.setdefault(w, _word_vector(w, dim)) for w in _words(name)]
        v = np.mean(vecs, axis=0)
        rows.append(v / np.linalg.norm(v))
    return np.stack(rows).astype(np.float32)


def name_embedding_file(dataset_name: str, dim: int = 256) -> str:
    """Path of the bag-of-words table of a registered dataset's ``thing_classes``, written
    (atomically) next to its annotation json on first use and reused afterwards."""
    if dataset_name not in DatasetCatalog.list():
        raise ValueError(f"name_embedding_file: dataset {dataset_name!r} is not registered")
    meta = MetadataCatalog.get(dataset_name)
    names = meta.get("thing_classes")
    json_file = meta.get("json_file")
    if names is None or json_file is None:
        raise ValueError(
            f"name_embedding_file: dataset {dataset_name!r} has no thing_classes / json_file "
            "metadata"
        )
    digest = hashlib.sha256("\n".join(names).encode("utf-8")).hexdigest()[:12]
    path = os.path.join(os.path.dirname(json_file), f"name_embeddings_bow{dim}_{digest}.npy")
    if not os.path.isfile(path):
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = f"{path}.{os.getpid()}.tmp"
        with open(tmp, "wb") as f:
            np.save(f, bag_of_words_embeddings(names, dim))
        os.replace(tmp, path)
    return path
