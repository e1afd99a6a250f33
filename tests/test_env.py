"""The build: cqdino._C is importable, and carries CUDA whenever a toolkit was there to build it."""

import os
import shutil
import subprocess
import sys

import pytest
import torch

from cqdino import _ext


def test_extension_is_built():
    assert _ext.has_ext(), f"cqdino._C failed to import: {_ext.IMPORT_ERROR}"
    assert torch.ops.cqdino._has_cuda() == _ext.has_cuda_ext()


def test_cuda_compiled_in_when_toolkit_present():
    toolkit = os.environ.get("CUDA_HOME") or (
        "/usr/local/cuda" if os.path.exists("/usr/local/cuda/bin/nvcc") else shutil.which("nvcc")
    )
    if os.environ.get("FORCE_CUDA") == "0" or not toolkit or torch.version.cuda is None:
        pytest.skip("no CUDA toolkit (or FORCE_CUDA=0): a CPU-only build is expected")
    assert _ext.has_cuda_ext(), "a CUDA toolkit is present but cqdino._C was built without CUDA"
    assert _ext._C.cuda_arch_list() != ""


def test_env_report_runs():
    out = subprocess.run(
        [sys.executable, "-m", "cqdino.env"], capture_output=True, text=True, check=True
    ).stdout
    for key in ("torch", "cqdino._C CUDA", "detectron2 source"):
        assert key in out
