"""PositionalEmbedding trained through the CUDA kernel set (Embedding -> PositionalEmbedding ->
Dense, Adam), in Numba's simulator (or on a GPU), against the reference set on the CPU: the batch
sum of its weight gradient runs the CUDA bias-gradient column sum, in one chunk and in several.

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

V, L, D, T = 9, 6, 3, 4


def _model(device, kernels, dtype):
    x = gb.Input((T,), dtype="int64")
    h = gb.PositionalEmbedding(L, D)(gb.Embedding(V, D)(x))
    y = gb.Dense(T * D, 3)(gb.Flatten()(h))
    return gb.Model(inputs=x, outputs=y, device=device, kernels=kernels, dtype=dtype, seed=0)


@pytest.mark.parametrize("batch", [5, 19], ids=["one_chunk", "three_chunks"])
@pytest.mark.parametrize("dtype,tol", [("float64", 1e-9), ("float32", 1e-4)])
def test_steps_match_the_reference_set(batch, dtype, tol):
    rng = np.random.default_rng(0)
    X, y = rng.integers(0, V, (2 * batch, T)), rng.integers(0, 3, 2 * batch)
    results = {}
    for device, kernels in (("cuda", "fused"), ("cpu", "reference")):
        model = _model(device, kernels, dtype)
        assert model.backend.ops.name == ("fused-cuda" if device == "cuda" else "reference")
        opt = gb.Adam(lr=0.05)
        for step in range(3):
            rows = slice(step % 2 * batch, step % 2 * batch + batch)
            gb.train_step(model, gb.SoftmaxCrossEntropy(), opt, X[rows], y[rows])
        results[device] = (model.get_params(), model.get_grads(), model.predict(X))
    ref, got = results["cpu"], results["cuda"]
    assert not ref[1]["1.weight"][T:].any() and ref[1]["1.weight"][:T].any()
    for part in (0, 1):
        assert sorted(got[part]) == sorted(ref[part])
        for k, v in ref[part].items():
            np.testing.assert_allclose(got[part][k], v, rtol=tol, atol=tol, err_msg=k)
    np.testing.assert_allclose(got[2], ref[2], rtol=tol, atol=tol)
