"""Models of cqdino, in two packages:

* :mod:`cqdino.modeling.dino`: the DINO core (detectron2 meta-architecture ``"DINO"``);
* :mod:`cqdino.modeling.cqdino`: CQ-DINO on top of it (meta-architecture ``"CQDINO"``).

Every public name of both is importable from here (configs and users import from
``cqdino.modeling``); importing this package registers both meta-architectures.
"""

from .cqdino import *  # noqa: F401,F403
from .cqdino import __all__ as _cqdino_all
from .dino import *  # noqa: F401,F403
from .dino import __all__ as _dino_all

# one optimizer-group builder for both models; the CQ-DINO configs know it by this name
get_cqdino_optimizer_params = get_optimizer_params  # noqa: F405

__all__ = list(_dino_all) + list(_cqdino_all) + ["get_cqdino_optimizer_params"]
