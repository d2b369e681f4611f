"""TransformerEncoderLayer trained through the CUDA kernel set (its attention's one q, k, v GEMM,
the masked softmax with key padding and a causal mask, dropout, bias adds and bias gradients,
layer norms), in Numba's simulator (or on a GPU), against the reference set on the CPU.

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

T, E, H, F, C = 4, 4, 2, 6, 3


def _model(device, kernels, dtype, **kw):
    x, pad = gb.Input((T, E)), gb.Input((T,), dtype="bool")
    h = gb.TransformerEncoderLayer(E, H, dim_feedforward=F, **kw)(x, src_key_padding_mask=pad)
    y = gb.Dense(T * E, C)(gb.Flatten()(h))
    return gb.Model(inputs=[x, pad], outputs=y, device=device, kernels=kernels, dtype=dtype, seed=0)


@pytest.mark.parametrize("kw", [{"dropout": 0.0},
                                {"dropout": 0.2, "norm_first": True, "is_causal": True,
                                 "activation": "gelu"}], ids=["post_norm", "pre_norm_causal_dropout"])
@pytest.mark.parametrize("dtype,tol", [("float64", 1e-9), ("float32", 1e-4)])
def test_steps_match_the_reference_set(kw, dtype, tol):
    rng = np.random.default_rng(0)
    N = 3
    X = rng.normal(size=(2 * N, T, E))
    pad = np.zeros((2 * N, T), bool)
    pad[0, -1] = pad[2, 2:] = pad[4] = True  # sample 4: all padding
    y = rng.integers(0, C, 2 * N)
    results = {}
    for device, kernels in (("cuda", "fused"), ("cpu", "reference")):
        model = _model(device, kernels, dtype, **kw)
        assert model.backend.ops.name == ("fused-cuda" if device == "cuda" else "reference")
        # SGD, not Adam: the key bias's gradient is 0 up to rounding (softmax ignores a constant
        # added to a row of scores), which Adam's normalisation would blow up to ±lr in float32
        opt = gb.SGD(lr=0.1, momentum=0.9)
        for step in range(3):
            rows = slice(step % 2 * N, step % 2 * N + N)
            gb.train_step(model, gb.SoftmaxCrossEntropy(), opt, [X[rows], pad[rows]], y[rows])
        results[device] = (model.get_params(), model.get_grads(), model.predict([X, pad]))
    ref, got = results["cpu"], results["cuda"]
    for part in (0, 1):
        assert sorted(got[part]) == sorted(ref[part])
        for k, v in ref[part].items():
            np.testing.assert_allclose(got[part][k], v, rtol=tol, atol=tol, err_msg=k)
    np.testing.assert_allclose(got[2], ref[2], rtol=tol, atol=tol)
    assert np.isfinite(got[2]).all()
