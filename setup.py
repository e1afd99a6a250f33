#!/usr/bin/env python
"""Build script for cqdino and its compiled ops ``cqdino._C``.

C++ sources under ``csrc/`` are always compiled.  CUDA sources (``*.cu``) are compiled, with
``WITH_CUDA`` defined, when ``FORCE_CUDA=1`` or when a CUDA toolkit is found (``FORCE_CUDA=0``
turns CUDA off).  No visible GPU is needed.  ``TORCH_CUDA_ARCH_LIST`` defaults to "9.0" and
``MAX_JOBS`` is honoured by torch's ninja build.
"""

import glob
import os
import shutil

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))
DEFAULT_ARCH_LIST = "9.0"


def _guess_cuda_home():
    """The toolkit root; the ``nvcc`` on PATH may be a wrapper script outside the toolkit."""
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(var):
            return os.environ[var]
    for candidate in ("/usr/local/cuda",):
        if os.path.exists(os.path.join(candidate, "bin", "nvcc")):
            return candidate
    nvcc = shutil.which("nvcc")
    if nvcc:
        return os.path.dirname(os.path.dirname(os.path.realpath(nvcc)))
    return None


if _guess_cuda_home() and not os.environ.get("CUDA_HOME"):
    # torch.utils.cpp_extension reads CUDA_HOME when imported.
    os.environ["CUDA_HOME"] = _guess_cuda_home()
# torch crashes when the arch list is unset and no GPU is visible.
os.environ.setdefault("TORCH_CUDA_ARCH_LIST", DEFAULT_ARCH_LIST)

import torch  # noqa: E402
from torch.utils.cpp_extension import (  # noqa: E402
    CUDA_HOME,
    BuildExtension,
    CppExtension,
    CUDAExtension,
)


def _want_cuda():
    force = os.environ.get("FORCE_CUDA", "")
    if force == "0":
        return False
    if force == "1":
        if CUDA_HOME is None:
            raise RuntimeError("FORCE_CUDA=1 but no CUDA toolkit found: set CUDA_HOME")
        return True
    return CUDA_HOME is not None and torch.version.cuda is not None


def _nvidia_pip_includes():
    """Headers of torch's ``nvidia-*`` pip packages (cuBLAS/cuSPARSE headers that some
    toolkits lack but torch's headers include)."""
    try:
        import nvidia
    except ImportError:
        return []
    dirs = []
    for base in nvidia.__path__:
        dirs += sorted(glob.glob(os.path.join(base, "*", "include")))
        dirs += sorted(glob.glob(os.path.join(base, "include")))
    return [d for d in dirs if os.path.isdir(d)]


def get_extensions():
    csrc = os.path.join(ROOT, "csrc")
    cpp = sorted(glob.glob(os.path.join(csrc, "**", "*.cpp"), recursive=True))
    cu = sorted(glob.glob(os.path.join(csrc, "**", "*.cu"), recursive=True))
    cxx_flags = ["-O3"]
    define_macros = []
    if os.environ.get("CQDINO_NATIVE", "0") == "1":
        cxx_flags.append("-march=native")
    if _want_cuda():
        arch_list = os.environ["TORCH_CUDA_ARCH_LIST"]
        define_macros += [("WITH_CUDA", None), ("CQDINO_CUDA_ARCH_LIST", f'"{arch_list}"')]
        nvcc_flags = ["-O3", "--expt-relaxed-constexpr", "-lineinfo"]
        extra_inc = _nvidia_pip_includes()
        for d in extra_inc:
            # after the toolkit's own headers: only headers missing there are taken from pip
            cxx_flags += ["-idirafter", d]
            nvcc_flags += [f"-Xcompiler=-idirafter{d}"]
        return [
            CUDAExtension(
                "cqdino._C",
                cpp + cu,
                include_dirs=[csrc],
                define_macros=define_macros,
                extra_compile_args={"cxx": cxx_flags, "nvcc": nvcc_flags},
            )
        ]
    return [
        CppExtension(
            "cqdino._C",
            cpp,
            include_dirs=[csrc],
            define_macros=define_macros,
            extra_compile_args={"cxx": cxx_flags},
        )
    ]


setup(
    name="cqdino",
    version="0.1.0",
    description="CQ-DINO: category queries for vast-vocabulary object detection (Detectron2)",
    packages=find_packages(exclude=("tests", "tests.*", "configs", "projects", "benchmarks")),
    python_requires=">=3.10",
    ext_modules=get_extensions(),
    extras_require={
        # Benchmark-only peer kernel (never imported by the library): pip install -e .[bench]
        "bench": ["torch-ms-deform-attn==0.1.1"],
        # ONNX export and ONNX Runtime (tools/export.py --format onnx): pip install -e .[export]
        "export": ["onnx==1.23.2", "onnxscript==0.7.2", "onnxruntime==1.31.1"],
    },
    cmdclass={"build_ext": BuildExtension},
    zip_safe=False,
)
