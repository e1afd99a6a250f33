"""Import first in an entry point (before detectron2): hides the ``torch.jit.script``
deprecation ``FutureWarning`` that fvcore's ``focal_loss`` module triggers at import time (twice,
even for ``--help``); it says nothing about the user's run."""

import warnings

warnings.filterwarnings(
    "ignore", message=r"`torch\.jit\.script` is deprecated", category=FutureWarning
)
