"""BatchNorm with a fused activation on the CUDA set (which composes the batch norm kernels with
its activation kernels) against the CPU sets: training steps, gradients and inference.

Runs in its own process under Numba's CUDA simulator (NUMBA_ENABLE_CUDASIM=1), on NumPy arrays;
with a real GPU and CuPy, on CuPy arrays.
"""

import numpy as np
import pytest

import gpubackprop as gb
from gpubackprop.backend import has_cupy_gpu, is_cudasim

pytestmark = pytest.mark.cudasim

if not (is_cudasim() or has_cupy_gpu()):
    pytest.skip("needs NUMBA_ENABLE_CUDASIM=1 (set before import) or a CUDA GPU with CuPy",
                allow_module_level=True)


def bn_net(device, kernels, dtype, act):
    return gb.Sequential([gb.Conv2d(1, 3, 3, padding=1), gb.BatchNorm2d(3, activation=act),
                          gb.Flatten(), gb.Dense(3 * 3 * 5, 6),
                          gb.BatchNorm1d(6, momentum=0.3, activation=act), gb.Dense(6, 3)],
                         input_shape=(1, 3, 5), device=device, kernels=kernels, dtype=dtype,
                         seed=0)


@pytest.mark.parametrize("act", ["relu", "gelu"])
def test_batch_norm_activation_steps_match_the_cpu_sets(act):
    rng = np.random.default_rng(0)
    X = rng.normal(size=(8, 1, 3, 5))
    y = rng.integers(0, 3, 8)
    results = {}
    for device, kernels in (("cuda", "fused"), ("cpu", "fused"), ("cpu", "reference")):
        model = bn_net(device, kernels, "float64", act)
        opt = gb.Adam(lr=0.01)
        for step in range(3):
            rows = slice(step % 2 * 4, step % 2 * 4 + 4)
            gb.train_step(model, gb.SoftmaxCrossEntropy(), opt, X[rows], y[rows])
        results[device, kernels] = (model.get_params(), model.get_grads(), model.get_state(),
                                    model.predict(X))
    ref = results["cpu", "reference"]
    for key in (("cuda", "fused"), ("cpu", "fused")):
        got = results[key]
        for part in (0, 1, 2):
            assert sorted(got[part]) == sorted(ref[part]) and ref[part]
            for k, v in ref[part].items():
                np.testing.assert_allclose(got[part][k], v, rtol=1e-9, atol=1e-9,
                                           err_msg=f"{key} {k}")
        np.testing.assert_allclose(got[3], ref[3], rtol=1e-9, atol=1e-9)
