"""Access to the compiled extension ``cqdino._C`` (ops registered as ``torch.ops.cqdino.*``).

The package works without the extension: each op then falls back to its pure-PyTorch
reference and says so once with a warning.
"""

import warnings
from typing import Optional

try:
    from cqdino import _C  # noqa: F401  (registers torch.ops.cqdino.*)

    IMPORT_ERROR: Optional[BaseException] = None
except ImportError as e:  # not built, or built against another torch
    _C = None
    IMPORT_ERROR = e

_warned = set()


def has_ext() -> bool:
    """Whether ``cqdino._C`` is importable."""
    return _C is not None


def has_cuda_ext() -> bool:
    """Whether ``cqdino._C`` was compiled with its CUDA kernels."""
    return _C is not None and bool(_C.has_cuda())


def use_ext(op: str, device_type: str) -> bool:
    """Whether the compiled ``op`` can run on ``device_type``; warns once per (op, reason) when
    the caller must fall back to the pure-PyTorch reference."""
    if _C is None:
        reason = f"cqdino._C could not be imported ({IMPORT_ERROR})"
    elif device_type == "cuda" and not _C.has_cuda():
        reason = "cqdino._C was built without CUDA (rebuild with FORCE_CUDA=1)"
    elif device_type not in ("cpu", "cuda"):
        reason = f"cqdino._C has no kernels for device type {device_type!r}"
    else:
        return True
    key = (op, reason)
    if key not in _warned:
        _warned.add(key)
        warnings.warn(
            f"{op}: {reason}; using the pure-PyTorch reference (slower, more memory).",
            RuntimeWarning,
            stacklevel=3,
        )
    return False
