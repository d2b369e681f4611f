"""The whole GPU training path through the CUDA kernel set, in Numba's simulator (or on a GPU).

Run by `make test` in its own process with NUMBA_ENABLE_CUDASIM=1.
"""

import numpy as np
import pytest

import gpubackprop as gb
from gpubackprop.backend import has_cupy_gpu, is_cudasim

pytestmark = pytest.mark.cudasim

if not (is_cudasim() or has_cupy_gpu()):
    pytest.skip("needs NUMBA_ENABLE_CUDASIM=1 (set before import) or a CUDA GPU",
                allow_module_level=True)


def every_activation():
    return [gb.Dense(6, 9, activation="relu"), gb.Dense(9, 7, activation="tanh"),
            gb.Residual(gb.Dense(7, 7, activation="gelu")), gb.Dense(7, 5, activation="sigmoid"),
            gb.Dense(5, 4, activation="leaky_relu"), gb.Dense(4, 3)]


def two_layers():
    return [gb.Dense(6, 8, activation="relu"), gb.Dense(8, 3)]


# The simulator runs each CUDA thread as a Python thread: networks stay small to keep this quick.
@pytest.mark.parametrize("layers,make_opt", [
    (every_activation, lambda: gb.SGD(lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-3)),
    (two_layers, lambda: gb.AdamW(lr=0.01, clip_norm=0.5)),
    (two_layers, lambda: gb.RMSprop(lr=0.01, momentum=0.5)),
], ids=["nesterov-every-activation", "adamw-clip", "rmsprop"])
def test_twenty_steps_match_the_reference_set(layers, make_opt):
    rng = np.random.default_rng(0)
    X = rng.normal(size=(40, 6)).astype(np.float32)
    y = rng.integers(0, 3, 40)
    params = {}
    for device, kernels in (("cuda", "fused"), ("cpu", "reference")):
        model = gb.Sequential(layers(), device=device, kernels=kernels, seed=0)
        assert model.backend.ops.name == ("fused-cuda" if device == "cuda" else "reference")
        loss, opt = gb.SoftmaxCrossEntropy(), make_opt()
        for step in range(20):
            rows = slice(step % 4 * 10, step % 4 * 10 + 10)
            gb.train_step(model, loss, opt, X[rows], y[rows])
        params[device] = model.get_params()
    for k, v in params["cpu"].items():
        np.testing.assert_allclose(params["cuda"][k], v, rtol=1e-4, atol=1e-5, err_msg=k)


def test_fit_learns_through_the_cuda_set():
    rng = np.random.default_rng(1)
    X = rng.normal(size=(64, 2))
    y = (X[:, 0] * X[:, 1] > 0).astype(int)  # XOR of the signs
    model = gb.Sequential([gb.Dense(2, 16, activation="tanh"), gb.Dense(16, 2)], device="cuda",
                          seed=0)
    loss = gb.SoftmaxCrossEntropy()
    hist = gb.fit(model, loss, gb.Adam(lr=0.05), X, y, epochs=25, batch_size=64, progress=False)
    assert hist["loss"][-1] < 0.5 * hist["loss"][0]
    assert gb.evaluate(model, loss, X, y)["accuracy"] >= 0.9
