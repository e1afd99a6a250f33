"""Words of category names, shared by the name-embedding tables (``cqdino.data``) and the
compositional category queries (``cqdino.modeling``)."""

import re
from typing import List, Sequence, Tuple, Union

__all__ = ["name_words", "name_tokens", "word_vocabulary"]

# Words that carry no meaning of their own in a category name.
STOP_WORDS = frozenset({"with", "a", "an", "the", "of", "and"})


def name_words(name: str) -> List[str]:
    """The words of a category name: lower case, split on anything but letters, digits, ``-``
    and ``_``; stop words dropped (a name of stop words only is one word, the name itself)."""
    words = re.findall(r"[\w-]+", name.lower())
    return [w for w in words if w not in STOP_WORDS] or [name]


def name_tokens(name: Union[str, Sequence[str]]) -> List[str]:
    """The words of one category: a string is split by :func:`name_words`; a sequence of
    tokens (e.g. :func:`cqdino.data.build.category_words`: name words and tree nodes) is used
    as it is."""
    if isinstance(name, str):
        return name_words(name)
    tokens = [str(t) for t in name]
    if not tokens:
        raise ValueError("a category has no words (an empty token list)")
    return tokens


def word_vocabulary(
    names: Sequence[Union[str, Sequence[str]]],
) -> Tuple[List[str], List[List[int]]]:
    """The distinct words of ``names`` (strings, or token lists: :func:`name_tokens`) in order
    of first appearance, and each name's words as indices into that list (in the name's order,
    repeats kept)."""
    vocab: dict = {}
    rows = [[vocab.setdefault(w, len(vocab)) for w in name_tokens(n)] for n in names]
    return list(vocab), rows
