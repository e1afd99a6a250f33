"""Old module path, kept while ``benchmarks/bench_category_modules.py`` imports it; import from
:mod:`cqdino.modeling` instead."""

from .cqdino.category_queries import *  # noqa: F401,F403
from .cqdino.selector import CategorySelector, SelectorOutput  # noqa: F401
from .cqdino.tree_aggregation import TreeAggregation  # noqa: F401
