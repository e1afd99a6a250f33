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
import fnmatch
import inspect
import math
import os
import tempfile
from typing import Any, Dict, List, Optional, Sequence, Tuple

from detectron2.config import LazyConfig
from omegaconf import DictConfig, ListConfig, OmegaConf

from cqdino.utils.io import InputError

__all__ = [
    "load_config",
    "apply_overrides",
    "validate_config",
    "config_num_classes",
    "config_differences",
    "RESUME_MAY_DIFFER",
]


def _target(node, path: str = "") -> Optional[Any]:
    """The callable of a ``LazyCall`` node (None for a plain dict).

    Raises:
        InputError naming ``path._target_`` when the target cannot be located (a misspelt or
        removed class, or a module that fails to import).
    """
    if not isinstance(node, DictConfig) or "_target_" not in node:
        return None
    target = node._target_
    if isinstance(target, str):
        from detectron2.utils.registry import locate

        try:
            target = locate(target)
        except Exception as e:
            # detectron2's message: "Error loading 'x':", the cause, a hint
            lines = [ln for ln in str(e).strip().splitlines() if ln.strip()] or [type(e).__name__]
            cause = (
                lines[1] if len(lines) > 1 and lines[0].startswith("Error loading") else lines[0]
            )
            key = f"{path}._target_" if path else "_target_"
            raise InputError(f"{key}: cannot locate {target!r} ({cause})") from None
    return target


def _named(fn, skip_self: bool) -> Optional[tuple]:
    """(names of the keyword arguments of ``fn``, whether it also takes ``**kwargs``); None
    without a signature."""
    try:
        params = list(inspect.signature(fn).parameters.values())
    except (TypeError, ValueError):
        return None
    if skip_self and params and params[0].kind is not inspect.Parameter.VAR_KEYWORD:
        params = params[1:]
    names = [
        p.name
        for p in params
        if p.kind not in (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)
    ]
    return names, any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params)


def _parameters(target) -> Optional[List[str]]:
    """Keyword arguments ``target`` accepts; None when that cannot be known (a function that
    takes ``**kwargs``, no signature: anything goes).

    A class whose ``__init__`` takes ``**kwargs`` forwards them to its parent's ``__init__``
    (``super().__init__(**kw)``, e.g. ``CQDINO`` to ``DINO``): its arguments are its own and
    those of the parents up to the first ``__init__`` without ``**kwargs``."""
    found = _named(target, skip_self=False)
    if found is None or not found[1]:
        return None if found is None else found[0]
    if not inspect.isclass(target):
        return None
    names: List[str] = []
    for klass in target.__mro__:
        if "__init__" not in vars(klass):
            continue
        if klass is object:
            return None  # **kwargs that reach object.__init__: unknown forwarding
        found = _named(vars(klass)["__init__"], skip_self=True)
        if found is None:
            return None
        names += [n for n in found[0] if n not in names]
        if not found[1]:
            return names
    return None


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
        target = _target(node, prefix[:-1])
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
        target = _target(node, path)
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
        (
            "train.eval_period",
            lambda v: _is_int(v) and v >= 0,
            "an integer >= 0 (0: only after the last iteration)",
        ),
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
    positive = (lambda v: _is_int(v) and v >= 1, "a positive integer")
    non_negative = (lambda v: _is_int(v) and v >= 0, "an integer >= 0")
    optional_positive = (lambda v: v is None or (_is_int(v) and v >= 1), "a positive integer")
    # model sizes (a zero or negative one fails deep inside the model, or trains nothing)
    for key, (ok, what) in (
        ("model.class_head.num_categories", positive),
        ("model.class_head.num_classes", positive),
        ("model.class_head.topk", positive),
        ("model.class_head.test_topk", optional_positive),
        ("model.class_head.query_dim", positive),
        ("model.class_head.selector_num_layers", positive),
        ("model.class_head.selector_num_heads", positive),
        ("model.transformer.num_queries", positive),
        ("model.transformer.embed_dim", positive),
        ("model.transformer.num_levels", positive),
        ("model.transformer.encoder.num_layers", non_negative),
        ("model.transformer.decoder.num_layers", positive),
        ("model.dn_number", non_negative),
        ("model.select_box_nums_for_evaluation", positive),
    ):
        checks.append((key, ok, what))
    for key, ok, what in checks:
        parent, _, leaf = key.rpartition(".")
        node = _select(cfg, parent)
        if not isinstance(node, DictConfig) or leaf not in node:
            continue  # a config without this part (no test loader, no checkpointer, ...)
        value = _select(cfg, key)
        if isinstance(value, DictConfig) and "_target_" in value:
            continue  # computed when the model is built (e.g. the class count of a json)
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


# Keys a resumed run may change: where things are written and how often, the device and the
# loader's worker count; nothing that changes what is computed. ``train.max_iter`` is not among
# them: the LR schedule is a function of it, so a longer resumed run would not be the run it
# continues (start a new run from the checkpoint with train.init_checkpoint instead).
RESUME_MAY_DIFFER = (
    "train.output_dir",
    "train.init_checkpoint",  # not read on --resume
    "train.device",
    "train.eval_period",
    "train.log_period",
    "train.checkpointer.period",
    "train.checkpointer.max_to_keep",
    "dataloader.*.num_workers",
)


def _flatten(node: Any, prefix: str, out: Dict[str, Any]) -> Dict[str, Any]:
    if isinstance(node, dict):
        for k, v in node.items():
            _flatten(v, f"{prefix}.{k}" if prefix else str(k), out)
    elif isinstance(node, list) and any(isinstance(v, (dict, list)) for v in node):
        for i, v in enumerate(node):
            _flatten(v, f"{prefix}.{i}", out)
    else:
        out[prefix] = node
    return out


def _saved_form(cfg: DictConfig) -> Dict[str, Any]:
    """``cfg`` as ``config.yaml`` holds it (saved and read back), flattened to dotted keys."""
    from detectron2.config import LazyConfig

    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "config.yaml")
        LazyConfig.save(cfg, path)
        return _flatten(OmegaConf.to_container(OmegaConf.load(path), resolve=False), "", {})


def _same_callable(a: Any, b: Any) -> bool:
    """Whether two ``_target_`` strings name the same object (a function that moved to another
    module and is still importable from the old one: a run saved before the move resumes)."""
    if not (isinstance(a, str) and isinstance(b, str)):
        return False
    from detectron2.utils.registry import locate

    try:
        return locate(a) is locate(b)
    except Exception:
        return False


def config_differences(
    cfg: DictConfig, saved_path: str, allowed: Sequence[str] = RESUME_MAY_DIFFER
) -> List[Tuple[str, Any, Any]]:
    """The keys whose value differs between ``cfg`` and the ``config.yaml`` at ``saved_path``
    (a run's saved config), as (key, saved value, value of ``cfg``), sorted by key; a key
    absent on one side has the value ``"<absent>"``. Keys matching a pattern of ``allowed``
    are left out, and so is ``train.seed`` when ``cfg`` asks for a random one (-1 or None: the
    resumed run keeps the seed its config.yaml recorded); two ``_target_`` names of one object
    (a function that moved, still importable from its old module) are the same value."""
    try:
        saved = _flatten(OmegaConf.to_container(OmegaConf.load(saved_path), resolve=False), "", {})
    except Exception as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise InputError(f"{saved_path}: cannot be read ({first})") from None
    new = _saved_form(cfg)
    diffs = []
    for key in sorted(set(saved) | set(new)):
        a, b = saved.get(key, "<absent>"), new.get(key, "<absent>")
        if a == b or any(fnmatch.fnmatchcase(key, pat) for pat in allowed):
            continue
        if key.rsplit(".", 1)[-1] == "_target_" and _same_callable(a, b):
            continue
        if key == "train.seed" and (b is None or (_is_int(b) and b < 0)):
            continue
        diffs.append((key, a, b))
    return diffs
