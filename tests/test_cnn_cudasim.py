"""A tiny CNN trained through the CUDA kernel set (conv, pooling, normalization, dropout ops), in
Numba's simulator (or on a GPU), against the reference set on the CPU.

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


def conv_pool():
    chunked = gb.Conv2d(2, 4, (3, 2), stride=(1, 2), padding=1, groups=2, activation="tanh")
    chunked.max_cols_bytes = 1  # one sample a chunk: the chunked im2col/col2im path
    return [gb.Conv2d(1, 2, 3, padding=1, activation="relu"), gb.MaxPool2d(2, stride=1),
            chunked, gb.AvgPool2d(2, padding=1, count_include_pad=False), gb.Flatten(),
            gb.Dense(4 * 3 * 2, 3)]


def with_norm_and_dropout():
    return [gb.Conv2d(1, 3, 3, padding=1, bias=False), gb.BatchNorm2d(3),
            gb.MaxPool2d(3, stride=2, padding=1, dilation=1), gb.Dropout(0.3),
            gb.Conv2d(3, 3, 1, activation="gelu"), gb.GlobalAvgPool2d(), gb.Dense(3, 3)]


# The simulator runs each CUDA thread as a Python thread: the network and batches stay tiny.
@pytest.mark.parametrize("layers", [conv_pool, with_norm_and_dropout],
                         ids=["conv-pool", "batchnorm-dropout"])
@pytest.mark.parametrize("dtype,tol", [("float64", 1e-9), ("float32", 1e-4)])
def test_steps_match_the_reference_set(layers, dtype, tol):
    rng = np.random.default_rng(0)
    X = rng.normal(size=(8, 1, 6, 6)).astype(dtype)
    y = rng.integers(0, 3, 8)
    results = {}
    for device, kernels in (("cuda", "fused"), ("cpu", "reference")):
        model = gb.Sequential(layers(), device=device, kernels=kernels, dtype=dtype, seed=0,
                              input_shape=(1, 6, 6))
        assert model.backend.ops.name == ("fused-cuda" if device == "cuda" else "reference")
        loss, opt = gb.SoftmaxCrossEntropy(), gb.SGD(lr=0.1, momentum=0.9)
        for step in range(3):
            rows = slice(step % 2 * 4, step % 2 * 4 + 4)
            gb.train_step(model, loss, opt, X[rows], y[rows])
        results[device] = (model.get_params(), model.get_state(), model.predict(X))
    for part in range(3):
        ref = results["cpu"][part]
        got = results["cuda"][part]
        if isinstance(ref, dict):
            assert sorted(got) == sorted(ref)
            for k, v in ref.items():
                np.testing.assert_allclose(got[k], v, rtol=tol, atol=tol, err_msg=k)
        else:
            np.testing.assert_allclose(got, ref, rtol=tol, atol=tol)


def test_gradcheck_through_the_cuda_set():
    rng = np.random.default_rng(1)
    model = gb.Sequential([gb.Conv2d(1, 2, (2, 3), padding=(1, 0), activation="sigmoid"),
                           gb.AvgPool2d(2), gb.Flatten(), gb.Dense(2 * 2 * 2, 2)],
                          device="cuda", dtype="float64", input_shape=(1, 4, 6))
    err = gb.gradcheck(model, gb.SoftmaxCrossEntropy(), rng.normal(size=(2, 1, 4, 6)), [0, 1])
    assert err < 1e-6
