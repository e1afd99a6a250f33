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

The package's modules: :mod:`.categories` (the vocabulary and its tree), :mod:`.render` (the
images and the category quotas), :mod:`.workers` (the rendering processes), :mod:`.generation`
(:func:`generate`, :func:`read_meta`, :func:`ensure_generated`; the folder's layout) and
:mod:`.cli` (the command line).
"""

# ``python -m cqdino.data.synthetic`` imports the package ``cqdino.data``, which imports this
# module before detectron2: hiding fvcore's import-time ``torch.jit.script`` FutureWarning here
# keeps ``--help`` (and every run) free of it
from cqdino.utils import quiet_imports  # noqa: F401

from .categories import (
    BORDERS,
    CATEGORY_RANGE,
    COLOURS,
    MAX_CATEGORIES,
    NAME_STYLES,
    NUM_COMBINATIONS,
    SHAPE_FAMILIES,
    SHAPES,
    TEXTURES,
    category_attributes,
    category_tree_dict,
    opaque_tokens,
    vocabulary,
)
from .cli import main
from .generation import (
    DEMO_CONFIG,
    FORMAT_VERSION,
    check_replaceable,
    ensure_generated,
    generate,
    read_meta,
)
from .render import category_quotas
from .workers import WorkerError

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
    "check_replaceable",
    "FORMAT_VERSION",
    "SHAPE_FAMILIES",
    "SHAPES",
    "COLOURS",
    "TEXTURES",
    "BORDERS",
    "NUM_COMBINATIONS",
    "MAX_CATEGORIES",
    "CATEGORY_RANGE",
]
