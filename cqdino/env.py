"""Print the environment cqdino runs in: ``python -m cqdino.env``."""

import os
import platform
import sys

import torch

from cqdino import __version__, _ext


def _detectron2_info():
    try:
        import detectron2
    except ImportError as e:
        return "not installed", str(e)
    root = os.path.dirname(detectron2.__file__)
    try:
        from importlib.metadata import PackageNotFoundError, distribution

        try:
            dist = distribution("pb1-detectron2")
            source = f"registry sdist pb1-detectron2=={dist.version} (patched, no compiled ops)"
        except PackageNotFoundError:
            source = "official checkout / package"
    except ImportError:  # pragma: no cover
        source = "unknown"
    return detectron2.__version__, f"{source} at {root}"


def collect_env() -> list:
    rows = [
        ("python", sys.version.split()[0]),
        ("platform", platform.platform()),
        ("cqdino", f"{__version__} at {os.path.dirname(os.path.abspath(__file__))}"),
        ("torch", f"{torch.__version__} (CUDA {torch.version.cuda})"),
        ("torch threads", str(torch.get_num_threads())),
        ("GPU available", str(torch.cuda.is_available())),
    ]
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            rows.append((f"GPU {i}", torch.cuda.get_device_name(i)))
    if _ext.has_ext():
        rows.append(("cqdino._C", _ext._C.__file__))
        rows.append(("cqdino._C CUDA", str(_ext.has_cuda_ext())))
        rows.append(("cqdino._C arch list", _ext._C.cuda_arch_list() or "-"))
    else:
        rows.append(("cqdino._C", f"not available ({_ext.IMPORT_ERROR})"))
    ver, where = _detectron2_info()
    rows.append(("detectron2", ver))
    rows.append(("detectron2 source", where))
    return rows


def main() -> None:
    rows = collect_env()
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"{k:<{width}}  {v}")


if __name__ == "__main__":
    main()
