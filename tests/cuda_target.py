"""Fixtures of the CUDA kernel test files (a plugin that tests/conftest.py loads): ``target`` is
(the CUDA kernel set, numpy -> its array type), ``ops`` and ``dev`` its two halves.

Under Numba's simulator the set runs on NumPy arrays ("sim"); on a real GPU on CuPy arrays ("gpu",
marked ``gpu``, skipped elsewhere). The CPU kernel test files define ``ops``/``dev`` of their own.
"""

import numpy as np
import pytest

from gpubackprop.backend import cupy_module, is_cudasim


def _targets():
    if is_cudasim():
        return [pytest.param("sim", id="sim")]
    return [pytest.param("gpu", id="gpu", marks=pytest.mark.gpu)]


@pytest.fixture(params=_targets(), scope="module")
def target(request):
    """(CudaOps, numpy -> device array)."""
    from gpubackprop.kernels.cuda import CudaOps

    if request.param == "sim":
        return CudaOps(np), np.ascontiguousarray
    cp = cupy_module()
    return CudaOps(cp), cp.asarray


@pytest.fixture
def ops(target):
    return target[0]


@pytest.fixture
def dev(target):
    return target[1]
