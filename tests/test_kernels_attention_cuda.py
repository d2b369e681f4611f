"""The CUDA masked softmax kernels (a block a row) against the NumPy reference, on ragged rows
with masks and fully masked rows, lengths over several blocks' worth of threads.

Runs in its own process under Numba's CUDA simulator (NUMBA_ENABLE_CUDASIM=1), on NumPy arrays;
with a real GPU and CuPy, on CuPy arrays (marked ``gpu``).
"""

import pytest

from gpubackprop.backend import has_cupy_gpu, is_cudasim

pytestmark = pytest.mark.cudasim

if not (is_cudasim() or has_cupy_gpu()):
    pytest.skip("needs NUMBA_ENABLE_CUDASIM=1 (set before import) or a CUDA GPU with CuPy",
                allow_module_level=True)

import attention_cases as ac  # noqa: E402

SIM_SHAPES = [(1, 1), (7, 3), (5, 70)]  # the simulator is slow: fewer, smaller rows


@pytest.mark.parametrize("with_mask", [False, True])
@pytest.mark.parametrize("dtype", ac.DTYPES)
def test_forward_equals_reference(ops, dev, rng, dtype, with_mask):
    for R, L in SIM_SHAPES if is_cudasim() else ac.SHAPES:
        ac.check_forward(ops, dev, rng, R, L, dtype, with_mask)


@pytest.mark.parametrize("dtype", ac.DTYPES)
def test_backward_equals_reference(ops, dev, rng, dtype):
    for R, L in SIM_SHAPES if is_cudasim() else ac.SHAPES:
        ac.check_backward(ops, dev, rng, R, L, dtype)


def test_nan_propagates(ops, dev):
    ac.check_nan_propagates(ops, dev)


def test_errors(ops, dev):
    ac.check_errors(ops, dev)
