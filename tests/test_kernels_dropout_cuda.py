"""The CUDA dropout kernels bit for bit against the NumPy reference (and so against the CPU set).

Runs in its own process under Numba's CUDA simulator (NUMBA_ENABLE_CUDASIM=1), on NumPy arrays;
with a real GPU and CuPy, on CuPy arrays (marked ``gpu``).
"""

import numpy as np
import pytest

from gpubackprop.backend import has_cupy_gpu, is_cudasim

pytestmark = pytest.mark.cudasim

if not (is_cudasim() or has_cupy_gpu()):
    pytest.skip("needs NUMBA_ENABLE_CUDASIM=1 (set before import) or a CUDA GPU with CuPy",
                allow_module_level=True)

import norm_cases as nc  # noqa: E402

from gpubackprop.backend import to_numpy  # noqa: E402
from gpubackprop.kernels.cpu import CpuOps  # noqa: E402

SHAPES = [(1,), (7, 13), (3, 4, 5)]  # 91 elements: more than the 64 simulated threads


@pytest.mark.parametrize("dtype", nc.DTYPES)
@pytest.mark.parametrize("p", [0.0, 0.3, 1.0])
def test_dropout_bit_identical(ops, dev, rng, dtype, p):
    for shape in SHAPES:
        nc.check_dropout(ops, dev, rng, shape, dtype, p)


@pytest.mark.parametrize("seed,layer,step", [(0, 0, 0), (2**64 - 1, 5, 2**40), (-3, 1, 1)])
def test_mask_same_as_cpu_set(ops, seed, layer, step):
    cpu = CpuOps(np, num_threads=1).dropout_mask((150,), 0.5, seed, layer, step)
    np.testing.assert_array_equal(to_numpy(ops.dropout_mask((150,), 0.5, seed, layer, step)), cpu)


def test_errors(ops, dev):
    nc.check_dropout_errors(ops, dev)
