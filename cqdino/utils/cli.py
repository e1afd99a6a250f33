"""Command-line helpers shared by the entry points (``projects/train_net.py``,
``projects/demo.py``)."""

import argparse
import os
import re
from typing import List, Sequence

__all__ = ["OVERRIDE", "options_first"]

# a ``key=value`` config override (``train.max_iter=10``, ``+model.x=1``)
OVERRIDE = re.compile(r"^\+?[A-Za-z_][\w]*(\.[\w]+)*=")


def options_first(
    parser: argparse.ArgumentParser, argv: Sequence[str], keep_paths: bool = False
) -> List[str]:
    """``... key=value --resume``: argparse hands everything after the first override to a
    ``REMAINDER`` positional; move the overrides behind the options (an option's own value
    stays with it, and with ``keep_paths`` so does an item that names an existing file)."""
    takes_value = {
        s for a in parser._actions if a.nargs != 0 and a.option_strings for s in a.option_strings
    }
    argv = list(argv)
    options, overrides = [], []
    for i, item in enumerate(argv):
        after_option = i > 0 and argv[i - 1] in takes_value
        is_path = keep_paths and os.path.exists(item)
        override = OVERRIDE.match(item) and not after_option and not is_path
        (overrides if override else options).append(item)
    return options + overrides
