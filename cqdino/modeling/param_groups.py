"""Training helpers for the category modules: stage-1 selection and optimizer parameter groups.

Stage 1 (selector pre-training) trains only the category queries and the category selector
with the selection loss::

    names = freeze_for_stage1(model)          # everything else gets requires_grad=False

Parameter groups: :func:`get_cqdino_optimizer_params` is a drop-in for detectron2's
``get_default_optimizer_params`` (same ``weight_decay_norm`` / ``overrides`` semantics) that also
scales lr and weight decay of parameters under given module-name prefixes. The recipe with
pretrained initialisation (ImageNet backbone, text-embedding category queries) uses
``lr x 0.01`` and ``weight decay x 10`` on the backbone and the category-query module; from
scratch every multiplier is 1 (see :func:`recipe_multipliers`). LazyConfig example::

    optimizer = L(torch.optim.AdamW)(
        params=L(get_cqdino_optimizer_params)(
            base_lr=4e-4, weight_decay=1e-4, weight_decay_norm=0.0,
            multipliers=L(recipe_multipliers)(pretrained=True),
        ),
        lr=4e-4, weight_decay=1e-4,
    )
    # the training script sets optimizer.params.model = model (as detectron2's
    # tools/lazyconfig_train_net.py does) before instantiating the optimizer
"""

from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import torch
from torch import nn

from .category_queries import CategoryQueries, CategorySelector

__all__ = [
    "category_module_names",
    "stage1_trainable",
    "freeze_for_stage1",
    "recipe_multipliers",
    "get_cqdino_optimizer_params",
]

_NORM_TYPES = (
    nn.BatchNorm1d,
    nn.BatchNorm2d,
    nn.BatchNorm3d,
    nn.SyncBatchNorm,
    nn.GroupNorm,
    nn.InstanceNorm1d,
    nn.InstanceNorm2d,
    nn.InstanceNorm3d,
    nn.LayerNorm,
    nn.LocalResponseNorm,
)


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
            if isinstance(mod, cls) and not any(_under(name, p) for p in out[key]):
                out[key].append(name)
    return out


def _under(name: str, prefix: str) -> bool:
    return prefix == "" or name == prefix or name.startswith(prefix + ".")


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
    return [n for n, _ in model.named_parameters() if any(_under(n, p) for p in prefixes)]


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


def get_cqdino_optimizer_params(
    model: nn.Module,
    base_lr: Optional[float] = None,
    weight_decay: Optional[float] = None,
    weight_decay_norm: Optional[float] = None,
    multipliers: Optional[Mapping[str, Tuple[float, float]]] = None,
    overrides: Optional[Dict[str, Dict[str, float]]] = None,
) -> List[Dict[str, Any]]:
    """detectron2-style parameter groups with per-module-prefix lr / weight-decay multipliers.

    Like ``detectron2.solver.get_default_optimizer_params``: parameters of normalisation layers
    get ``weight_decay_norm``; ``overrides`` maps a parameter's local name (e.g. ``"bias"``) to
    hyper-parameters; groups are merged by identical hyper-parameters. In addition, a parameter
    whose full name lies under a key of ``multipliers`` (longest matching prefix wins) gets
    ``lr = base_lr * lr_mult`` and ``weight_decay = wd * wd_mult`` (``wd`` is the norm or plain
    weight decay). Multipliers need ``base_lr`` and ``weight_decay``.

    Raises ``ValueError`` if a multiplier prefix matches no parameter (a misspelt module name
    would otherwise silently train at the full lr).
    """
    multipliers = dict(multipliers or {})
    overrides = overrides or {}
    if multipliers and (base_lr is None or weight_decay is None):
        raise ValueError("multipliers need base_lr and weight_decay")
    used = {k: False for k in multipliers}
    by_len = sorted(multipliers, key=len, reverse=True)
    groups: List[Dict[str, Any]] = []
    memo = set()
    for mod_name, module in model.named_modules():
        for local, value in module.named_parameters(recurse=False):
            if not value.requires_grad or value in memo:
                continue
            memo.add(value)
            hp: Dict[str, Any] = {}
            if base_lr is not None:
                hp["lr"] = base_lr
            if weight_decay is not None:
                hp["weight_decay"] = weight_decay
            if isinstance(module, _NORM_TYPES) and weight_decay_norm is not None:
                hp["weight_decay"] = weight_decay_norm
            full = f"{mod_name}.{local}" if mod_name else local
            prefix = next((p for p in by_len if _under(full, p)), None)
            if prefix is not None:
                used[prefix] = True
                lr_mult, wd_mult = multipliers[prefix]
                hp["lr"] = hp["lr"] * lr_mult
                hp["weight_decay"] = hp["weight_decay"] * wd_mult
            hp.update(overrides.get(local, {}))
            groups.append({"params": [value], **hp})
    unused = [k for k, v in used.items() if not v]
    if unused:
        raise ValueError(
            f"multiplier prefixes {unused} match no trainable parameter of {type(model).__name__}"
        )
    return _reduce(groups)


def _reduce(groups: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
    """Merge groups with identical hyper-parameters (as detectron2's ``reduce_param_groups``)."""
    merged: Dict[Tuple, List[torch.nn.Parameter]] = {}
    for g in groups:
        key = tuple(sorted((k, v) for k, v in g.items() if k != "params"))
        merged.setdefault(key, []).extend(g["params"])
    return [{**dict(k), "params": v} for k, v in merged.items()]
