"""Old module path, kept while ``configs/common/optim_cqdino.py`` imports it; import from
:mod:`cqdino.modeling` instead."""

from .cqdino.param_groups import *  # noqa: F401,F403
from .dino.param_groups import get_optimizer_params as get_cqdino_optimizer_params  # noqa: F401
