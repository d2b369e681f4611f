"""A functional graph (a branch, a skip, a concatenation, a conv used twice, two outputs) trained
through the CUDA kernel set, in Numba's simulator (or on a GPU), against the reference set on the CPU.

Run in its own process with NUMBA_ENABLE_CUDASIM=1 (`make test` does).
"""

import numpy as np
import pytest

import gpubackprop as gb
from gpubackprop.backend import has_cupy_gpu, is_cudasim

pytestmark = pytest.mark.cudasim

if not (is_cudasim() or has_cupy_gpu()):
    pytest.skip("needs NUMBA_ENABLE_CUDASIM=1 (set before import) or a CUDA GPU",
                allow_module_level=True)


def two_headed(device, kernels, dtype):
    x = gb.Input((1, 5, 5))
    h = gb.Conv2d(1, 2, 3, padding=1, activation="relu")(x)
    shared = gb.Conv2d(2, 2, 3, padding=1, activation="tanh")
    a = gb.Add()([shared(h), h])                  # a skip around the shared conv
    b = shared(gb.MaxPool2d(3, stride=1, padding=1)(h))   # the same weights at a second place
    joint = gb.Flatten()(gb.Concatenate(axis=0)([a, b]))   # 4 channels of 5x5
    cls = gb.Dense(4 * 5 * 5, 3)(joint)
    reg = gb.Dense(4 * 5 * 5, 1)(gb.BatchNorm1d(4 * 5 * 5)(joint))
    return gb.Model(inputs=x, outputs=[cls, reg], device=device, kernels=kernels, dtype=dtype,
                    seed=0)


@pytest.mark.parametrize("dtype,tol", [("float64", 1e-9), ("float32", 1e-4)])
def test_graph_steps_match_the_reference_set(dtype, tol):
    rng = np.random.default_rng(0)
    X = rng.normal(size=(6, 1, 5, 5)).astype(dtype)
    ys = [rng.integers(0, 3, 6), rng.normal(size=(6, 1))]
    results = {}
    for device, kernels in (("cuda", "fused"), ("cpu", "reference")):
        model = two_headed(device, kernels, dtype)
        assert model.backend.ops.name == ("fused-cuda" if device == "cuda" else "reference")
        loss = gb.MultiLoss([gb.SoftmaxCrossEntropy(), gb.MSE()], weights=[1.0, 0.5])
        opt = gb.Adam(lr=0.01)
        for step in range(3):
            rows = slice(step % 2 * 3, step % 2 * 3 + 3)
            gb.train_step(model, loss, opt, X[rows], [y[rows] for y in ys])
        results[device] = (model.get_params(), model.get_grads(), model.predict(X))
    ref, got = results["cpu"], results["cuda"]
    for part in (0, 1):
        assert sorted(got[part]) == sorted(ref[part]) and ref[part]
        for k, v in ref[part].items():
            np.testing.assert_allclose(got[part][k], v, rtol=tol, atol=tol, err_msg=k)
    for g, r in zip(got[2], ref[2], strict=True):
        np.testing.assert_allclose(g, r, rtol=tol, atol=tol)
