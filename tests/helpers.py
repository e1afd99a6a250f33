"""Helpers shared by the tests: a script of the repository loaded as a module, the one-line
error a command line stops with, and a small COCO json written to disk."""

import importlib.util
import json
from pathlib import Path
from types import ModuleType
from typing import Callable, List, Sequence

import pytest

ROOT = Path(__file__).resolve().parents[1]


def load_script(relpath: str, name: str) -> ModuleType:
    """The Python file ``ROOT / relpath`` (e.g. ``projects/train_net.py``) imported as the
    module ``name`` (a script is not in a package)."""
    spec = importlib.util.spec_from_file_location(name, ROOT / relpath)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def cli_error(cli: Callable[[List[str]], object], argv: Sequence) -> str:
    """The one-line message ``cli(argv)`` stops with (``SystemExit("error: ...")``, before any
    process starts), e.g. of ``train_net.cli``."""
    with pytest.raises(SystemExit) as e:
        cli([str(a) for a in argv])
    message = str(e.value.code)
    assert message.startswith("error: ") and "\n" not in message, message
    return message


def write_coco_json(path: Path, images: list, annotations: list, categories: list) -> Path:
    """A COCO-format json at ``path`` with these ``images``, ``annotations`` and
    ``categories``; returns ``path``."""
    path.write_text(
        json.dumps({"images": images, "annotations": annotations, "categories": categories})
    )
    return path
