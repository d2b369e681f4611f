"""Device choice, dtypes, transfers."""

import subprocess
import sys

import numpy as np
import pytest

from gpubackprop.backend import Backend, has_cupy_gpu


def test_auto_without_a_gpu_says_so_in_one_line():
    if has_cupy_gpu():
        pytest.skip("this machine has a GPU")
    code = ("import gpubackprop as gb; m = gb.Sequential([gb.Dense(2, 2)]); m.backend;"
            "m2 = gb.Sequential([gb.Dense(2, 2)]); m2.backend; print(m.device)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "cpu"
    assert out.stderr.strip().splitlines() == ["gpubackprop: no CUDA GPU found (CuPy + Numba), "
                                               "using the CPU"]


def test_import_is_light():
    # Importing the library must not pull in CuPy, numba.cuda or compile kernels.
    code = ("import sys, gpubackprop; bad = [m for m in ('cupy', 'numba.cuda', 'numba', "
            "'gpubackprop.kernels.cpu') if m in sys.modules]; print(bad)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


@pytest.mark.parametrize("dtype", ["float32", "float64", np.float32])
def test_backend_dtype_and_transfers(dtype):
    be = Backend(device="cpu", dtype=dtype, kernels="reference")
    a = be.to_device([[1, 2], [3, 4]])
    assert a.dtype == np.dtype(dtype) and a.flags.c_contiguous
    np.testing.assert_array_equal(be.to_host(a), [[1, 2], [3, 4]])
    assert "device='cpu'" in repr(be)


def test_host_rng_is_seeded():
    a = Backend(device="cpu", seed=3).rng.permutation(10)
    b = Backend(device="cpu", seed=3).rng.permutation(10)
    np.testing.assert_array_equal(a, b)
