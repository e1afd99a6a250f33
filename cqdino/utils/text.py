"""Words of category names, shared by the name-embedding tables (``cqdino.data``) and the
compositional category queries (``cqdino.modeling``)."""

import re
from typing import List

__all__ = ["name_words"]

# Words that carry no meaning of their own in a category name.
STOP_WORDS = frozenset({"with", "a", "an", "the", "of", "and"})


def name_words(name: str) -> List[str]:
    """The words of a category name: lower case, split on anything but letters, digits, ``-``
    and ``_``; stop words dropped (a name of stop words only is one word, the name itself)."""
    words = re.findall(r"[\w-]+", name.lower())
    return [w for w in words if w not in STOP_WORDS] or [name]
