"""The fast launch path of the CUDA kernel set (kernels/cuda/launch.py: ``FastLaunch``) against
Numba's dispatcher, on a real GPU (skipped elsewhere: the simulator launches through Numba)."""

import numpy as np
import pytest

import gpubackprop as gb
from gpubackprop.backend import cupy_module, has_cupy_gpu

pytestmark = pytest.mark.gpu


@pytest.fixture
def pair():
    """(fast, dispatcher): two CudaOps on CuPy, one launching through FastLaunch."""
    if not has_cupy_gpu():
        pytest.skip("needs a real CUDA GPU with CuPy")
    from gpubackprop.kernels.cuda import CudaOps

    cp = cupy_module()
    fast, numba = CudaOps(cp), CudaOps(cp)
    numba.fast = False
    assert fast.fast, "numba-cuda with cuda.core: the fast path should be on"
    return fast, numba


def _every_argument_kind(ops, host):
    """Kernels with arrays of 1 and 2 dims, int/float/bool/uint64 scalars, int32/int64 labels."""
    cp = cupy_module()
    Z, b, p, g = (cp.asarray(host[k]) for k in ("Z", "b", "p", "g"))
    A = cp.empty_like(Z)
    ops.bias_act(Z, b, "tanh", A)
    dZ = cp.empty_like(Z)
    ops.act_backward(A, A, "tanh", dZ)
    db = cp.ones_like(b)
    ops.bias_grad(dZ, db, accumulate=True)
    out = [A, dZ, db]
    for label_dtype in (np.int32, np.int64):
        d, rows = cp.empty_like(Z), cp.empty(Z.shape[0], Z.dtype)
        ops.softmax_ce(Z, cp.asarray(host["labels"].astype(label_dtype)), d, rows)
        out += [d, rows]
    out.append(ops.dropout(Z, cp.empty_like(Z), 0.3, seed=7, layer=2, step=11))
    m, v, scale = cp.zeros_like(p), cp.zeros_like(p), cp.ones(1, p.dtype)
    ops.adam(p, g, m, v, 1e-3, 0.9, 0.999, 1e-8, 0.01, True, 3, scale)
    return [cp.asnumpy(a) for a in out + [p, m, v]]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_every_argument_kind_gives_the_dispatchers_result(pair, rng, dtype):
    host = {"Z": rng.normal(size=(37, 53)).astype(dtype), "b": rng.normal(size=53).astype(dtype),
            "p": rng.normal(size=301).astype(dtype), "g": rng.normal(size=301).astype(dtype),
            "labels": rng.integers(0, 53, 37)}
    fast, numba = (_every_argument_kind(ops, host) for ops in pair)
    for a, b in zip(fast, numba, strict=True):
        np.testing.assert_array_equal(a, b)


def test_a_wrong_array_is_refused_before_launch(pair):
    from gpubackprop.kernels.cuda.dense import _bias_act

    cp = cupy_module()
    fast = pair[0]
    Z = cp.zeros((4, 6), np.float32)
    b = cp.zeros(6, np.float32)
    with pytest.raises(TypeError, match=r"_bias_act argument 1: expected a C-contiguous 1-d float32 "
                                        r"array, got a C-contiguous 1-d float64 array"):
        fast.launch(_bias_act, Z.size, np.dtype(np.float32), Z, b.astype(np.float64), Z, 0)
    with pytest.raises(TypeError, match=r"_bias_act argument 0: expected a C-contiguous 2-d float32 "
                                        r"array, got a strided 2-d float32 array"):
        fast.launch(_bias_act, Z.size, np.dtype(np.float32), cp.zeros((4, 12), np.float32)[:, ::2], b,
                    Z, 0)
    with pytest.raises(TypeError, match=r"_bias_act argument 2: expected a CuPy array, got ndarray"):
        fast.launch(_bias_act, Z.size, np.dtype(np.float32), Z, b, np.zeros((4, 6), np.float32), 0)
    with pytest.raises(TypeError, match=r"_bias_act: expected 4 kernel arguments, got 3"):
        fast.launch(_bias_act, Z.size, np.dtype(np.float32), Z, b, Z)


def test_training_is_the_same_either_way(pair, rng, monkeypatch):
    X, y = rng.normal(size=(64, 12)), rng.integers(0, 3, 64)
    params = []
    for mode in ("fast", "numba"):
        monkeypatch.setenv("GPUBACKPROP_CUDA_LAUNCH", mode)
        model = gb.Sequential([gb.Dense(12, 16, activation="relu"), gb.Dropout(0.2), gb.Dense(16, 3)],
                              device="cuda", dtype="float64", seed=0)
        assert model.backend.ops.fast == (mode == "fast")
        gb.fit(model, gb.SoftmaxCrossEntropy(), gb.Adam(lr=1e-2, clip_norm=1.0), X, y, epochs=3,
               batch_size=16, progress=False)
        params.append(model.get_params())
    for k in params[0]:
        np.testing.assert_array_equal(params[0][k], params[1][k], err_msg=k)


def test_a_numba_cuda_without_the_internals_falls_back_to_the_dispatcher(pair, rng, monkeypatch):
    from gpubackprop.kernels.cuda import launch

    def missing(*args):
        raise AttributeError("'_Kernel' object has no attribute '_codelibrary'")

    cp = cupy_module()
    fast, numba = pair
    monkeypatch.setattr(launch, "FastLaunch", missing)
    monkeypatch.setattr(launch, "_FAST", {})
    Z, b = cp.asarray(rng.normal(size=(5, 7))), cp.asarray(rng.normal(size=7))
    A, expected = cp.empty_like(Z), cp.empty_like(Z)
    with pytest.warns(RuntimeWarning, match="launch through Numba's dispatcher: this numba-cuda lacks"):
        fast.bias_act(Z.copy(), b, "relu", A)
    assert not fast.fast
    numba.bias_act(Z.copy(), b, "relu", expected)  # (bias_act may write Z)
    np.testing.assert_array_equal(cp.asnumpy(A), cp.asnumpy(expected))
