"""The device a run uses: ``train.device``, or the CPU when it asks for CUDA and there is none."""

import logging
from typing import Any

import torch

__all__ = ["resolve_device"]

logger = logging.getLogger(__name__)


def resolve_device(cfg: Any) -> torch.device:
    """``cfg.train.device`` (default ``"cuda"``; ``cfg`` may also be the device name itself) as a
    :class:`torch.device`; a CUDA device without CUDA available is the CPU (logged once here).

    The one device rule of ``projects/train_net.py`` and ``projects/demo.py``."""
    if isinstance(cfg, (str, torch.device)):
        device = str(cfg)
    else:
        train = cfg.get("train", None) if hasattr(cfg, "get") else None
        device = str(train.get("device", "cuda")) if train is not None else "cuda"
    if device.startswith("cuda") and not torch.cuda.is_available():
        logger.info("CUDA is not available: running on the CPU")
        return torch.device("cpu")
    return torch.device(device)
