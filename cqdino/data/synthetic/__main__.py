"""``python -m cqdino.data.synthetic``: generate the synthetic vocabulary dataset.

A separate ``__main__`` so that running the package does not execute a module that
``cqdino.data`` has already imported (runpy's ``RuntimeWarning``).
"""

from .cli import main

main()
