"""The CUDA set's 16-bit ops against the reference: in Numba's simulator (fp16 only: it has no
libdevice, which the bf16 bit moves call) and, on a real GPU with CuPy, both storages (marked gpu)."""

import numpy as np
import pytest

from gpubackprop.backend import has_cupy_gpu, is_cudasim

pytestmark = pytest.mark.cudasim

if not (is_cudasim() or has_cupy_gpu()):
    pytest.skip("needs NUMBA_ENABLE_CUDASIM=1 (set before import) or a CUDA GPU with CuPy",
                allow_module_level=True)

from gpubackprop import precision as P  # noqa: E402
from gpubackprop.backend import to_numpy  # noqa: E402
from gpubackprop.kernels.reference import ACTIVATIONS, ReferenceOps, saves_input  # noqa: E402

REF = ReferenceOps(np)
PRECISIONS = ["fp16"] if is_cudasim() else ["fp16", "bf16"]


def values(n, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(0, 30, n).astype(np.float32)
    x[:6] = [65504, 65520, 1e-7, -0.0, np.inf, np.nan]
    return x


@pytest.mark.parametrize("precision", PRECISIONS)
def test_round_cast_widen_equal_the_reference(ops, dev, precision):
    X = values(300)  # several blocks and a ragged tail under the simulator's 2 x 32 threads
    want = REF.round16(X, precision, np.empty_like(X))
    got = to_numpy(ops.round16(dev(X), precision, dev(np.empty_like(X))))
    np.testing.assert_array_equal(got, want)
    H = ops.cast16(dev(X), dev(np.empty(X.shape, P.storage_dtype(precision))), precision)
    Hr = REF.cast16(X, np.empty(X.shape, P.storage_dtype(precision)), precision)
    ok = ~np.isnan(want)
    np.testing.assert_array_equal(to_numpy(H).view(np.uint16)[ok], Hr.view(np.uint16)[ok])
    W = to_numpy(ops.widen16(H, dev(np.empty_like(X)), precision))
    np.testing.assert_array_equal(W[ok], want[ok])


@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("precision", PRECISIONS)
def test_bias_act16_and_act_backward16(ops, dev, activation, precision):
    rng = np.random.default_rng(1)
    B, n = 7, 23
    Z = rng.normal(0, 2, (B, n)).astype(np.float32)
    b = rng.normal(0, 1, n).astype(np.float32)
    st = P.storage_dtype(precision)
    Zr = Z.copy()
    Ar = REF.bias_act16(Zr, b, activation, np.empty(Z.shape, st), precision)
    Zd = dev(Z.copy())
    Ad = ops.bias_act16(Zd, dev(b), activation, dev(np.empty(Z.shape, st)), precision)
    ulp = 2.0**-10 if precision == "fp16" else 2.0**-7  # one 16-bit rounding apart at most
    np.testing.assert_allclose(to_numpy(Zd), Zr, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(P.from_storage(np, to_numpy(Ad), precision),
                               P.from_storage(np, Ar, precision), rtol=ulp, atol=1e-6)
    S = P.to_storage(np, Zr, precision) if saves_input(activation) else Ar
    dA = P.to_storage(np, rng.normal(0, 1, (B, n)).astype(np.float32), precision)
    want = REF.act_backward16(dA, S, activation, np.empty(Z.shape, st), precision)
    got = ops.act_backward16(dev(dA), dev(S), activation, dev(np.empty(Z.shape, st)), precision)
    np.testing.assert_allclose(P.from_storage(np, to_numpy(got), precision),
                               P.from_storage(np, want, precision), rtol=ulp, atol=1e-6)


@pytest.mark.parametrize("bad", [None, np.inf, np.nan])
def test_unscale_check_and_scale_update(ops, dev, bad):
    g = values(200)[6:] * 8
    if bad is not None:
        g[150] = bad
    state = np.array([8.0, 2.0, 0.0], np.float32)
    gr, sr = g.copy(), state.copy()
    REF.unscale_check(gr, sr)
    gd, sd = dev(g), dev(state)
    ops.unscale_check(gd, sd)
    np.testing.assert_array_equal(to_numpy(sd), sr)
    np.testing.assert_array_equal(to_numpy(gd), gr)
    REF.loss_scale_update(sr, 2.0, 0.5, 3)
    ops.loss_scale_update(sd, 2.0, 0.5, 3)
    np.testing.assert_array_equal(to_numpy(sd), sr)
    assert sr[0] == (4.0 if bad is not None else 16.0)


@pytest.mark.parametrize("found", [0.0, 1.0])
@pytest.mark.parametrize("clipping", [False, True])
def test_gate_and_skipping_updates(ops, dev, found, clipping):
    state = np.array([4.0, 0.0, found], np.float32)
    f = dev(np.array([0.5], np.float32))
    ops.loss_scale_gate(f, dev(state), clipping)
    want = P.SKIP if found else (0.5 if clipping else 1.0)
    assert to_numpy(f)[0] == want
    rng = np.random.default_rng(4)
    p0, g = rng.normal(size=70).astype(np.float32), rng.normal(size=70).astype(np.float32)
    m0, v0 = rng.normal(size=70).astype(np.float32), rng.random(70).astype(np.float32)
    p, m, v = dev(p0.copy()), dev(m0.copy()), dev(v0.copy())
    ops.adam(p, dev(g), m, v, 0.01, 0.9, 0.999, 1e-8, 0.0, False, 3, f)
    ops.sgd(p, dev(g), m, 0.1, 0.9, False, 0.0, f)
    ops.rmsprop(p, dev(g), v, m, 0.01, 0.99, 1e-8, 0.0, 0.5, f)
    changed = not np.array_equal(to_numpy(p), p0)
    assert changed != bool(found)
    if found:
        np.testing.assert_array_equal(to_numpy(m), m0)
        np.testing.assert_array_equal(to_numpy(v), v0)


@pytest.mark.skipif(not is_cudasim(), reason="the simulator run (on a GPU: test_precision_gemm)")
def test_fp16_training_through_the_cuda_set_equals_the_cpu_emulation():
    """An MLP trained in fp16 through the CUDA kernel set (the rounding, the loss scaler's
    unscale/gate/update, the skipping updates) against the reference set on the CPU: the scale
    grows after 4 finite steps, the 5th overflows and is skipped on both, and the parameters
    agree to float32 noise."""
    import gpubackprop as gb

    X = np.random.default_rng(5).normal(size=(40, 6))
    y = np.arange(40) % 3
    runs = []
    for device, kernels in (("cuda", "fused"), ("cpu", "reference")):
        model = gb.Sequential([gb.Dense(6, 16, activation="gelu"), gb.Dense(16, 3)],
                              device=device, kernels=kernels, seed=2, precision="fp16",
                              loss_scaler={"init_scale": 2.0**20, "growth_interval": 4})
        start = model.get_params()
        opt = gb.Adam(lr=0.01, clip_norm=1.0)
        scales = []
        for i in range(8):
            gb.train_step(model, gb.SoftmaxCrossEntropy(), opt, X[i % 2::2], y[i % 2::2])
            scales.append(model.loss_scaler.scale)
        runs.append((model.get_params(), scales))
    (p_sim, s_sim), (p_ref, s_ref) = runs
    assert s_sim == s_ref
    assert s_ref[3] == 2.0**21 and s_ref[4] == 2.0**20  # grown, then backed off (a skipped step)
    for k in p_ref:
        assert np.abs(p_ref[k] - start[k]).max() > 0.01  # the finite steps did update
        np.testing.assert_allclose(p_sim[k], p_ref[k], rtol=1e-5, atol=1e-6)
