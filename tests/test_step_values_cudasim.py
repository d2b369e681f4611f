"""The CUDA set's ``*_values`` kernels and ``step_advance`` against its host-scalar kernels, bit
for bit, and a model trained through StepValues against the host-scalar path.

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

import step_values_cases as sc  # noqa: E402


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_values_kernels_same_bits(ops, dev, dtype):
    sc.check_ops_same_bits(ops, dev, np.random.default_rng(2), dtype)


def test_step_advance_kernel(ops, dev):
    sc.check_step_advance(ops, dev)


@pytest.mark.parametrize("name", ["sgd-nesterov-wd", "rmsprop-momentum-wd", "adamw",
                                  "adam-l2-clip"])
def test_training_with_step_values_same_bits(name):
    sc.check_train_same_bits("cuda", "fused", name)


def test_training_cuda_set_equals_reference_with_values():
    """The CUDA set read through StepValues against the CPU reference (tolerance: different
    GEMMs and reduction orders)."""
    cuda, _ = sc.train("cuda", "fused", sc.OPTIMIZERS["adamw"], True, "float64")
    ref, _ = sc.train("cpu", "reference", sc.OPTIMIZERS["adamw"], False, "float64")
    np.testing.assert_allclose(cuda, ref, rtol=1e-12, atol=1e-13)
