"""Loading a LazyConfig with command-line overrides, checked before anything is built.

detectron2's ``LazyConfig.apply_overrides`` accepts any key: ``train.max_itr=3`` adds a key no
code reads, and the run silently trains for the configured ``max_iter``. Here an override must
name a key the config has, or an argument the callable of a ``LazyCall`` node accepts; anything
else is an :class:`~cqdino.utils.io.InputError` naming the closest existing key.
:func:`validate_config` checks the values the training loop relies on (and, in every
``LazyCall`` node, that the callable takes each argument) before the model is built, so a bad
value is one line instead of a traceback after minutes of set-up.
"""

import difflib
import inspect
import math
import os
from typing import Any, List, Optional, Sequence

from detectron2.config import LazyConfig
from omegaconf import DictConfig, ListConfig, OmegaConf

from cqdino.utils.io import InputError

__all__ = ["load_config", "apply_overrides", "validate_config", "config_num_classes"]


def _target(node) -> Optional[Any]:
    """The callable of a ``LazyCall`` node (None for a plain dict or an unknown target)."""
    if not isinstance(node, DictConfig) or "_target_" not in node:
        return None
    target = node._target_
    if isinstance(target, str):
        from detectron2.utils.registry import locate

        try:
            target = locate(target)
        except Exception:
            return None
    return target


def _parameters(target) -> Optional[List[str]]:
    """Keyword arguments ``target`` accepts; None when it takes ``**kwargs`` or has no
    signature (anything goes)."""
    try:
        params = inspect.signature(target).parameters.values()
    except (TypeError, ValueError):
        return None
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
        return None
    return [p.name for p in params if p.kind is not inspect.Parameter.VAR_POSITIONAL]


def _unknown(key: str, prefix: str, candidates: Sequence[str], what: str) -> InputError:
    close = difflib.get_close_matches(key.split(".")[-1], list(candidates), n=1, cutoff=0.5)
    hint = f" (did you mean {prefix}{close[0]}?)" if close else ""
    return InputError(f"{what}: no such key in the config{hint}")


def _check_key(cfg: DictConfig, key: str) -> None:
    parts = key.split(".")
    node = cfg
    for i, part in enumerate(parts):
        prefix = ".".join(parts[:i]) + "." if i else ""
        if isinstance(node, ListConfig):
            if part.isdigit() and int(part) < len(node):
                node = node[int(part)]
                continue
            raise InputError(f"override {key}: {prefix[:-1]} is a list; {part} is not an index")
        if not isinstance(node, DictConfig):
            raise InputError(f"override {key}: {prefix[:-1]} is a value, not a group of keys")
        if part in node:
            child = node._get_node(part)
            node = child if isinstance(child, (DictConfig, ListConfig)) else None
            continue
        target = _target(node)
        params = _parameters(target) if target is not None else []
        if i == len(parts) - 1 and target is not None and (params is None or part in params):
            return  # an argument of the node's callable that the config leaves at its default
        candidates = [k for k in node.keys() if k != "_target_"] + (params or [])
        raise _unknown(key, prefix, candidates, f"override {key}")


def apply_overrides(cfg: DictConfig, overrides: Sequence[str]) -> DictConfig:
    """``LazyConfig.apply_overrides`` that rejects unknown keys (see the module docstring)."""
    overrides = list(overrides)
    for o in overrides:
        if o.startswith("-"):
            raise InputError(
                f"{o!r} after the key=value overrides: put options before the overrides "
                "(or they are read as overrides)"
            )
        if "=" not in o:
            raise InputError(f"override {o!r} is not of the form key=value")
        key = o.split("=", 1)[0].lstrip("+")
        _check_key(cfg, key)
    try:
        return LazyConfig.apply_overrides(cfg, overrides)
    except Exception as e:  # hydra's parser: one line is enough
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise InputError(f"cannot apply the overrides {' '.join(overrides)}: {first}") from None


def load_config(config_file: str, overrides: Sequence[str] = ()) -> DictConfig:
    """``LazyConfig.load(config_file)`` with checked overrides; a missing file is one line."""
    if not os.path.isfile(config_file):
        raise InputError(f"--config-file {config_file!r}: no such file")
    cfg = LazyConfig.load(config_file)
    return apply_overrides(cfg, overrides)


def _select(cfg: DictConfig, key: str):
    try:
        return OmegaConf.select(cfg, key, default=None, throw_on_missing=False)
    except Exception as e:
        raise InputError(f"{key}: cannot be resolved ({str(e).splitlines()[0]})") from None


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _check_calls(node, path: str) -> None:
    """Every argument of every ``LazyCall`` node is one its callable takes."""
    if isinstance(node, DictConfig):
        target = _target(node)
        params = _parameters(target) if target is not None else None
        for k in node.keys():
            if k == "_target_":
                continue
            key = f"{path}.{k}" if path else str(k)
            if params is not None and k not in params:
                name = getattr(target, "__qualname__", str(target))
                candidates = [p for p in params if p != k]
                close = difflib.get_close_matches(str(k), candidates, n=1, cutoff=0.5)
                hint = f" (did you mean {path}.{close[0]}?)" if close else ""
                raise InputError(f"{key}: {name} has no argument {k!r}{hint}")
            if OmegaConf.is_interpolation(node, k) or OmegaConf.is_missing(node, k):
                continue
            _check_calls(node._get_node(k), key)
    elif isinstance(node, ListConfig):
        for i in range(len(node)):
            if not (OmegaConf.is_interpolation(node, i) or OmegaConf.is_missing(node, i)):
                _check_calls(node._get_node(i), f"{path}.{i}")
    elif hasattr(node, "_value") and isinstance(node._value(), (DictConfig, ListConfig)):
        _check_calls(node._value(), path)


def validate_config(cfg: DictConfig) -> None:
    """Raise :class:`~cqdino.utils.io.InputError` naming the key of the first value the
    training loop cannot use (see the module docstring)."""
    _check_calls(cfg, "")
    if "train" not in cfg:
        raise InputError("the config has no `train` group (configs/common/train.py)")
    checks = [
        ("train.max_iter", lambda v: _is_int(v) and v >= 1, "a positive integer"),
        ("train.eval_period", lambda v: _is_int(v) and v >= 0, "an integer >= 0 (0: never)"),
        ("train.log_period", lambda v: _is_int(v) and v >= 1, "a positive integer"),
        ("train.checkpointer.period", lambda v: _is_int(v) and v >= 1, "a positive integer"),
        (
            "train.checkpointer.max_to_keep",
            lambda v: v is None or (_is_int(v) and v >= 1),
            "a positive integer",
        ),
        (
            "dataloader.train.total_batch_size",
            lambda v: _is_int(v) and v >= 1,
            "a positive integer",
        ),
        (
            "optimizer.lr",
            lambda v: isinstance(v, (int, float))
            and not isinstance(v, bool)
            and math.isfinite(v)
            and v > 0,
            "a finite number > 0",
        ),
        ("train.output_dir", lambda v: isinstance(v, str) and v != "", "a folder"),
        ("train.init_checkpoint", lambda v: v is None or isinstance(v, str), "a file path or ''"),
        ("train.seed", lambda v: v is None or _is_int(v), "an integer (-1: random)"),
    ]
    for key, ok, what in checks:
        parent, _, leaf = key.rpartition(".")
        node = _select(cfg, parent)
        if not isinstance(node, DictConfig) or leaf not in node:
            continue  # a config without this part (no test loader, no checkpointer, ...)
        value = _select(cfg, key)
        if not ok(value):
            raise InputError(f"{key} must be {what}, got {value!r}")
    if _select(cfg, "train.ema.enabled"):
        decay = _select(cfg, "train.ema.decay")
        if not (isinstance(decay, (int, float)) and 0.0 < decay < 1.0):
            raise InputError(f"train.ema.decay must be in (0, 1), got {decay!r}")


def config_num_classes(cfg: DictConfig) -> Optional[int]:
    """The model's class count as the config sets it (``model.class_head.num_categories`` of
    CQ-DINO or ``num_classes`` of the linear head), None when not a plain integer."""
    for key in ("model.class_head.num_categories", "model.class_head.num_classes"):
        value = _select(cfg, key)
        if _is_int(value):
            return value
    return None
