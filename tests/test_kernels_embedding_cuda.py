"""The CUDA embedding kernels bit for bit against the NumPy reference (the gather; the weight
gradient's ordered segment sums, one thread per (row, feature), sizes over several blocks).

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

import embedding_cases as ec  # noqa: E402


@pytest.mark.parametrize("index_dtype", ec.INDEX_DTYPES)
@pytest.mark.parametrize("dtype", ec.DTYPES)
def test_forward_equals_reference(ops, dev, rng, dtype, index_dtype):
    for n, V, D in ec.SIZES:
        ec.check_forward(ops, dev, rng, n, V, D, dtype, index_dtype)


@pytest.mark.parametrize("accumulate", [False, True])
@pytest.mark.parametrize("padding_idx", [None, 0])
@pytest.mark.parametrize("index_dtype", ec.INDEX_DTYPES)
@pytest.mark.parametrize("dtype", ec.DTYPES)
def test_backward_equals_reference_bit_for_bit(ops, dev, rng, dtype, index_dtype, padding_idx,
                                               accumulate):
    for n, V, D in ec.SIZES:
        ec.check_backward(ops, dev, rng, n, V, D, dtype, index_dtype, padding_idx, accumulate)


def test_out_of_range_indices_are_memory_safe(ops, dev):
    ec.check_out_of_range_is_memory_safe(ops, dev, np.float32)


def test_errors(ops, dev):
    ec.check_errors(ops, dev)
