"""The CUDA normalization kernels against the NumPy reference.

Runs in its own process under Numba's CUDA simulator (NUMBA_ENABLE_CUDASIM=1), on NumPy arrays;
with a real GPU and CuPy, on CuPy arrays (marked ``gpu``). The simulator runs every CUDA thread
in Python, so the sizes are tiny, but chosen to need several blocks' worth of groups (grid-stride
over channels and rows), more values per group than the block has threads (each thread sums
several, then the tree) and ragged row chunks in layer norm's column sums.
"""

import numpy as np
import pytest

from gpubackprop.backend import has_cupy_gpu, is_cudasim

pytestmark = pytest.mark.cudasim

if not (is_cudasim() or has_cupy_gpu()):
    pytest.skip("needs NUMBA_ENABLE_CUDASIM=1 (set before import) or a CUDA GPU with CuPy",
                allow_module_level=True)

import norm_cases as nc  # noqa: E402

# 5·9 = 45 values a channel (> 32 simulated threads), 3 channels on 2 blocks; (2, 1): two values.
BN_SHAPES = [(1, 1), (2, 1), (5, 3, 9), (2, 3, 2, 3)]
LN_SHAPES = [(1, 1), (3, 40), (17, 5)]  # 17 rows: 3 chunks of 8 rows, the last ragged


@pytest.mark.parametrize("dtype", nc.DTYPES)
def test_batch_norm(ops, dev, rng, dtype):
    for shape in BN_SHAPES:
        nc.check_batch_norm_train(ops, dev, rng, shape, dtype)
        nc.check_batch_norm_eval(ops, dev, rng, shape, dtype)
        nc.check_norm_backward(ops, dev, rng, "batch", shape, dtype)
    nc.check_norm_backward(ops, dev, rng, "batch", (5, 3, 9), dtype, accumulate=True)


@pytest.mark.parametrize("dtype", nc.DTYPES)
def test_layer_norm(ops, dev, rng, dtype):
    for shape in LN_SHAPES:
        nc.check_layer_norm(ops, dev, rng, shape, dtype)
        nc.check_norm_backward(ops, dev, rng, "layer", shape, dtype)
    nc.check_norm_backward(ops, dev, rng, "layer", (17, 5), dtype, accumulate=True)


def test_backward_in_place(ops, dev, rng):
    nc.check_norm_in_place(ops, dev, rng, np.float64)


def test_errors(ops, dev):
    nc.check_norm_errors(ops, dev)
