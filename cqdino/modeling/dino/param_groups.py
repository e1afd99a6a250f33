"""Optimizer parameter groups: one builder for DINO and CQ-DINO.

:func:`get_optimizer_params` is a drop-in for detectron2's ``get_default_optimizer_params``
(same ``weight_decay_norm`` / ``overrides`` semantics) that also scales lr and weight decay of
the parameters under given module-name prefixes. :func:`get_dino_optimizer_params` is the DINO
recipe on top of it (backbone lr multiplier); CQ-DINO's recipe multipliers come from
:func:`cqdino.modeling.cqdino_recipe_multipliers`. LazyConfig example::

    optimizer = L(torch.optim.AdamW)(
        params=L(get_optimizer_params)(
            base_lr=4e-4, weight_decay=1e-4, weight_decay_norm=0.0,
            multipliers=L(cqdino_recipe_multipliers)(pretrained=True),
        ),
        lr=4e-4, weight_decay=1e-4,
    )
    # the training script sets optimizer.params.model = model (as detectron2's
    # tools/lazyconfig_train_net.py does) before instantiating the optimizer
"""

from typing import Any, Dict, List, Mapping, Optional, Tuple

import torch
from torch import nn

__all__ = ["get_optimizer_params", "get_dino_optimizer_params", "under_prefix"]

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


def under_prefix(name: str, prefix: str) -> bool:
    """Whether the dotted ``name`` is ``prefix`` or lies under it (``""`` matches all)."""
    return prefix == "" or name == prefix or name.startswith(prefix + ".")


def get_optimizer_params(
    model: nn.Module,
    base_lr: Optional[float] = None,
    weight_decay: Optional[float] = None,
    weight_decay_norm: Optional[float] = None,
    multipliers: Optional[Mapping[str, Tuple[float, float]]] = None,
    overrides: Optional[Dict[str, Dict[str, float]]] = None,
    module_multipliers: Optional[Mapping[str, Tuple[float, float]]] = None,
) -> List[Dict[str, Any]]:
    """detectron2-style parameter groups with per-module-prefix lr / weight-decay multipliers.

    Like ``detectron2.solver.get_default_optimizer_params``: parameters of normalisation layers
    get ``weight_decay_norm``; ``overrides`` maps a parameter's local name (e.g. ``"bias"``) to
    hyper-parameters; groups are merged by identical hyper-parameters; frozen parameters are
    left out. In addition, a parameter whose full name lies under a key of ``multipliers``
    (longest matching prefix wins) gets ``lr = base_lr * lr_mult`` and
    ``weight_decay = wd * wd_mult`` (``wd`` is the norm or plain weight decay). Multipliers need
    ``base_lr`` and ``weight_decay``.

    ``module_multipliers`` maps a module *name* (one dotted component, e.g.
    ``"sampling_offsets"``, wherever it occurs) to ``(lr_mult, wd_mult)`` applied on top:
    Deformable-DETR's ``lr x 0.1`` on the sampling offsets is
    ``module_multipliers={"sampling_offsets": (0.1, 1.0)}``.

    Raises ``ValueError`` if a multiplier prefix or module name matches no parameter (a misspelt
    module name would otherwise silently train at the full lr).
    """
    multipliers = dict(multipliers or {})
    module_multipliers = dict(module_multipliers or {})
    if module_multipliers and (base_lr is None or weight_decay is None):
        raise ValueError("module_multipliers need base_lr and weight_decay")
    used_modules = {k: False for k in module_multipliers}
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
            prefix = next((p for p in by_len if under_prefix(full, p)), None)
            if prefix is not None:
                used[prefix] = True
                lr_mult, wd_mult = multipliers[prefix]
                hp["lr"] = hp["lr"] * lr_mult
                hp["weight_decay"] = hp["weight_decay"] * wd_mult
            for part in mod_name.split(".") if module_multipliers else ():
                if part in module_multipliers:
                    used_modules[part] = True
                    lr_mult, wd_mult = module_multipliers[part]
                    hp["lr"] = hp["lr"] * lr_mult
                    hp["weight_decay"] = hp["weight_decay"] * wd_mult
            hp.update(overrides.get(local, {}))
            groups.append({"params": [value], **hp})
    unused = [k for k, v in used.items() if not v]
    unused += [f"module {k!r}" for k, v in used_modules.items() if not v]
    if unused:
        raise ValueError(
            f"multiplier prefixes {unused} match no trainable parameter of {type(model).__name__}"
        )
    return _reduce(groups)


def get_dino_optimizer_params(
    model: nn.Module,
    base_lr: float,
    weight_decay: float = 1e-4,
    weight_decay_norm: float = 0.0,
    backbone_lr_multiplier: float = 1.0,
    backbone_prefix: str = "backbone",
    module_multipliers: Optional[Mapping[str, Tuple[float, float]]] = None,
) -> List[Dict[str, Any]]:
    """DINO's groups: :func:`get_optimizer_params` with the backbone's lr scaled by
    ``backbone_lr_multiplier`` (1.0 from scratch, 0.01 in the pretrained recipe) and the
    optional ``module_multipliers`` (e.g. ``{"sampling_offsets": (0.1, 1.0)}``). Use as
    ``optimizer.params = L(get_dino_optimizer_params)(base_lr=..., backbone_lr_multiplier=...)``
    (detectron2's ``lazyconfig_train_net`` fills ``model``)."""
    prefix = backbone_prefix.rstrip(".")
    mult = {prefix: (backbone_lr_multiplier, 1.0)} if backbone_lr_multiplier != 1.0 else {}
    return get_optimizer_params(
        model,
        base_lr,
        weight_decay,
        weight_decay_norm,
        mult,
        module_multipliers=module_multipliers,
    )


def _reduce(groups: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
    """Merge groups with identical hyper-parameters (as detectron2's ``reduce_param_groups``)."""
    merged: Dict[Tuple, List[torch.nn.Parameter]] = {}
    for g in groups:
        key = tuple(sorted((k, v) for k, v in g.items() if k != "params"))
        merged.setdefault(key, []).extend(g["params"])
    return [{**dict(k), "params": v} for k, v in merged.items()]
