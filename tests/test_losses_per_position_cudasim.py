"""Per-position Dense and softmax-CE (ignore_index too) through the CUDA kernel set, in Numba's
simulator (or on a GPU), against the CPU reference set: a few training steps of a sequence model.

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


@pytest.mark.parametrize("ignore_index", [None, -1])
def test_steps_on_positions_match_the_reference_set(ignore_index):
    rng = np.random.default_rng(0)
    X = rng.normal(size=(12, 5, 3)).astype(np.float32)
    T = rng.integers(0, 4, (12, 5))
    if ignore_index is not None:
        T[:, 3:] = ignore_index
    results = {}
    for device, kernels in (("cuda", "fused"), ("cpu", "reference")):
        x = gb.Input((5, 3))
        y = gb.Dense(6, 4)(gb.Dense(3, 6, activation="gelu")(x))
        model = gb.Model(inputs=x, outputs=y, device=device, kernels=kernels, seed=3)
        loss = gb.SoftmaxCrossEntropy(ignore_index=ignore_index)
        history = gb.fit(model, loss, gb.Adam(0.01, clip_norm=1.0), X, T, epochs=3, batch_size=4,
                         shuffle=False, progress=False)
        results[device] = (history, model.get_params(), gb.evaluate(model, loss, X, T))
    (h_gpu, p_gpu, m_gpu), (h_ref, p_ref, m_ref) = results["cuda"], results["cpu"]
    np.testing.assert_allclose(h_gpu["loss"], h_ref["loss"], rtol=1e-5)
    # float32 sums in another order may flip one near-tied arg-max: at most one position of the
    # epoch's predictions
    n_pred = T.size if ignore_index is None else int((T != ignore_index).sum())
    np.testing.assert_allclose(h_gpu["accuracy"], h_ref["accuracy"], atol=1.01 / n_pred)
    for k in p_ref:
        np.testing.assert_allclose(p_gpu[k], p_ref[k], rtol=1e-4, atol=1e-6)
    assert m_gpu["loss"] == pytest.approx(m_ref["loss"], rel=1e-5)
