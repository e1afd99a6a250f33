"""Words of category names, shared by the name-embedding tables (``cqdino.data``) and the
compositional category queries (``cqdino.modeling``)."""

import re
from typing import List, Sequence, Tuple

__all__ = ["name_words", "word_vocabulary"]

# Words that carry no meaning of their own in a category name.
STOP_WORDS = frozenset({"with", "a", "an", "the", "of", "and"})


def name_words(name: str) -> List[str]:
    """The words of a category name: lower case, split on anything but letters, digits, ``-``
    and ``_``; stop words dropped (a name of stop words only is one word, the name itself)."""
    words = re.findall(r"[\w-]+", name.lower())
    return [w for w in words if w not in STOP_WORDS] or [name]


def word_vocabulary(names: Sequence[str]) -> Tuple[List[str], List[List[int]]]:
    """The distinct words of ``names`` in order of first appearance, and each name's words as
    indices into that list (in the name's order, repeats kept)."""
    vocab: dict = {}
    rows = [[vocab.setdefault(w, len(vocab)) for w in name_words(str(n))] for n in names]
    return list(vocab), rows
