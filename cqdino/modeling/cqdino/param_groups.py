"""Stage-1 selection and the recipe's optimizer multipliers for the category modules.

Stage 1 (selector pre-training) trains only the category queries and the category selector
with the selection loss::

    names = freeze_for_stage1(model)          # everything else gets requires_grad=False

The optimizer groups come from the one builder of DINO and CQ-DINO,
:func:`cqdino.modeling.get_optimizer_params`; :func:`recipe_multipliers` gives its
``multipliers`` for the recipe (pretrained initialisation: ``lr x 0.01`` and
``weight decay x 10`` on the backbone and the category-query module; from scratch all 1).
"""

from typing import Dict, List, Sequence, Tuple

from torch import nn

from ..dino.param_groups import under_prefix
from .category_queries import CategoryQueries
from .selector import CategorySelector

__all__ = [
    "category_module_names",
    "stage1_trainable",
    "freeze_for_stage1",
    "recipe_multipliers",
    "cqdino_recipe_multipliers",
    "frozen_modules",
]


def category_module_names(model: nn.Module) -> Dict[str, List[str]]:
    """Names of the :class:`CategoryQueries` and :class:`CategorySelector` submodules.

    Returns ``{"category_queries": [...], "category_selector": [...]}`` (outermost only).
    """
    out: Dict[str, List[str]] = {"category_queries": [], "category_selector": []}
    for name, mod in model.named_modules():
        for key, cls in (
            ("category_queries", CategoryQueries),
            ("category_selector", CategorySelector),
        ):
            if isinstance(mod, cls) and not any(under_prefix(name, p) for p in out[key]):
                out[key].append(name)
    return out


def stage1_trainable(model: nn.Module, extra_prefixes: Sequence[str] = ()) -> List[str]:
    """Parameter names trained in stage 1: category queries + selector (+ ``extra_prefixes``).

    ``extra_prefixes`` adds module-name prefixes, e.g. ``("backbone",)`` to also train the
    backbone in stage 1 (useful from scratch, where a frozen random backbone is meaningless).
    Raises if the model holds no category module.
    """
    mods = category_module_names(model)
    prefixes = mods["category_queries"] + mods["category_selector"] + list(extra_prefixes)
    if not mods["category_queries"] and not mods["category_selector"]:
        raise ValueError(
            f"{type(model).__name__} has no CategoryQueries/CategorySelector submodule"
        )
    return [n for n, _ in model.named_parameters() if any(under_prefix(n, p) for p in prefixes)]


def freeze_for_stage1(model: nn.Module, extra_prefixes: Sequence[str] = ()) -> List[str]:
    """Set ``requires_grad`` to train only :func:`stage1_trainable`; returns those names."""
    names = set(stage1_trainable(model, extra_prefixes))
    for n, p in model.named_parameters():
        p.requires_grad_(n in names)
    return sorted(names)


def recipe_multipliers(
    pretrained: bool,
    backbone: str = "backbone",
    category_queries: str = "category_queries",
    lr_mult: float = 0.01,
    wd_mult: float = 10.0,
) -> Dict[str, Tuple[float, float]]:
    """``{prefix: (lr multiplier, weight-decay multiplier)}`` of the recipe.

    Pretrained: backbone and category-query module at ``lr x 0.01``, ``weight decay x 10``.
    From scratch: empty (all multipliers 1). The prefixes are the module names in the model.
    """
    if not pretrained:
        return {}
    return {backbone: (lr_mult, wd_mult), category_queries: (lr_mult, wd_mult)}


def cqdino_recipe_multipliers(pretrained: bool) -> Dict[str, Tuple[float, float]]:
    """``{module prefix: (lr mult, weight-decay mult)}`` of the recipe for
    :func:`~cqdino.modeling.get_optimizer_params`: with pretrained
    initialisation the backbone and the category queries (``class_head.category_queries``) at
    lr x 0.01 and weight decay x 10; from scratch all 1 (empty dict)."""
    return recipe_multipliers(
        pretrained, backbone="backbone", category_queries="class_head.category_queries"
    )


def frozen_modules(model: nn.Module) -> List[str]:
    """Names of the outermost submodules that hold parameters, all of them frozen
    (``requires_grad=False``): what stage 1 keeps in eval mode (BatchNorm statistics fixed)."""
    out: List[str] = []
    for name, mod in model.named_modules():
        if name == "" or any(under_prefix(name, p) for p in out):
            continue
        params = list(mod.parameters())
        if params and not any(p.requires_grad for p in params):
            out.append(name)
    return out
