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


@pytest.mark.parametrize("activation", ["relu", "gelu"])
@pytest.mark.parametrize("precision", PRECISIONS)
def test_bias_act16_with_a_16_bit_bias(ops, dev, activation, precision):
    """b read from the 16-bit weight copy: the same as the float32 bias of its values."""
    rng = np.random.default_rng(2)
    Z = rng.normal(0, 2, (5, 37)).astype(np.float32)
    st = P.storage_dtype(precision)
    b16 = P.to_storage(np, rng.normal(0, 1, 37).astype(np.float32), precision)
    Zr = Z.copy()
    Ar = REF.bias_act16(Zr, P.from_storage(np, b16, precision), activation, np.empty(Z.shape, st),
                        precision)
    Zd = dev(Z.copy())
    Ad = ops.bias_act16(Zd, dev(b16), activation, dev(np.empty(Z.shape, st)), precision)
    np.testing.assert_array_equal(to_numpy(Zd), Zr)  # one float32 addition of the same values
    ulp = 2.0**-10 if precision == "fp16" else 2.0**-7
    np.testing.assert_allclose(P.from_storage(np, to_numpy(Ad), precision),
                               P.from_storage(np, Ar, precision), rtol=ulp, atol=1e-6)
    with pytest.raises(ValueError, match=r"b: expected shape \(37,\)"):
        ops.bias_act16(Zd, dev(b16[:5]), activation, dev(np.empty(Z.shape, st)), precision)


@pytest.mark.parametrize("rows", [1, 7, 8, 9, 70])  # one chunk, ragged chunks (BIAS_GRAD_ROWS 8)
@pytest.mark.parametrize("precision", PRECISIONS)
def test_bias_grad16_equals_the_float32_kernel_on_the_widened_values(ops, dev, rows, precision):
    rng = np.random.default_rng(rows)
    n = 45
    dZ = P.to_storage(np, rng.normal(0, 1, (rows, n)).astype(np.float32), precision)
    wide = P.from_storage(np, dZ, precision)
    db0 = rng.normal(size=n).astype(np.float32)
    for accumulate in (False, True):
        want = ops.bias_grad(dev(wide), dev(db0.copy()), accumulate=accumulate)
        got = ops.bias_grad16(dev(dZ), dev(db0.copy()), precision, accumulate=accumulate)
        np.testing.assert_array_equal(to_numpy(got), to_numpy(want))  # same sums, same order
        ref = REF.bias_grad16(dZ, db0.copy(), precision, accumulate=accumulate)
        np.testing.assert_allclose(to_numpy(got), ref, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(ref, wide.astype(np.float64).sum(0) + accumulate * db0,
                                   rtol=1e-5, atol=1e-5)
    with pytest.raises(TypeError, match=r"dZ: expected a C-contiguous"):
        ops.bias_grad16(dev(wide), dev(db0.copy()), precision)


@pytest.mark.parametrize("precision", PRECISIONS)
def test_widened16_matmul_reads_and_writes_16_bit_storage(ops, dev, precision):
    """The GEMM the CUDA set's Dense calls without GemmEx: 16-bit operands (transposed views
    too), float32 or 16-bit C; the float64 product of small integers / 8 is exact."""
    from gpubackprop.kernels.cuda.gemm16 import Widened16Matmul

    rng = np.random.default_rng(3)
    st = P.storage_dtype(precision)
    mm = Widened16Matmul(np, ops, precision)
    a = (rng.integers(-4, 5, (9, 6)) / 8).astype(np.float32)
    b = (rng.integers(-4, 5, (4, 6)) / 8).astype(np.float32)
    want = a.astype(np.float64) @ b.T.astype(np.float64)
    a16, b16 = dev(P.to_storage(np, a, precision)), dev(P.to_storage(np, b, precision))
    out = dev(np.empty((9, 4), np.float32))
    np.testing.assert_array_equal(to_numpy(mm(a16, b16.T, out=out)), want)
    np.testing.assert_array_equal(to_numpy(mm(dev(a), b16.T, out=out)), want)  # a float32 one
    out16 = dev(np.empty((9, 4), st))
    assert mm(a16, b16.T, out=out16) is out16
    np.testing.assert_array_equal(P.from_storage(np, to_numpy(out16), precision), want)
    g = mm(a16.T, dev(np.ones((9, 3), np.float32)))  # Δᵀ X as BP3 reads it
    np.testing.assert_array_equal(to_numpy(g), a.T.astype(np.float64) @ np.ones((9, 3)))


@pytest.mark.skipif(not is_cudasim(), reason="the simulator run (on a GPU: test_precision_gemm)")
@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # an overflowed fp16 step's inf
def test_the_cuda_sets_dense_keeps_16_bit_arrays_and_trains_as_the_emulation():
    """A 4-layer fp16 MLP on the CUDA set: the Dense layers hold 16-bit device arrays (the weight
    copy, the activations and Δ between adjacent Dense layers, a 16-bit BP2 GEMM output), float32
    only at the loss; its predictions before training equal the CPU emulation's bit for bit
    (relu/identity: the same float32 sums of the same 16-bit values, rounded once), and 4 Adam
    steps give losses within 16-bit rounding (2^-10 relative) and parameters to float32 noise."""
    import gpubackprop as gb
    from gpubackprop.layers.dense16 import Workspace16

    rng = np.random.default_rng(8)
    X, y = rng.normal(size=(36, 10)), rng.integers(0, 4, 36)
    runs = []
    for device, kernels in (("cuda", "fused"), ("cpu", "reference"), ("cpu", "fused")):
        model = gb.Sequential([gb.Dense(10, 24, activation="relu"),
                               gb.Dense(24, 20, activation="tanh"),
                               gb.Dense(20, 16, activation="relu"), gb.Dense(16, 4)],
                              device=device, kernels=kernels, seed=4, precision="fp16")
        before = model.predict(X)
        opt = gb.Adam(lr=0.01)
        losses = [gb.train_step(model, gb.SoftmaxCrossEntropy(), opt, X, y) for _ in range(4)]
        runs.append((before, losses, model.get_params(), model))
    sim = runs[0][3]
    st = np.dtype(np.float16)
    assert sim.flat_params16_storage.dtype == st and sim.flat_params16 is None
    layers = sim.dense_layers()
    assert [(d._out16, d._in16) for d in layers] == [(True, False), (True, True), (True, True),
                                                     (False, True)]
    spaces = [d._workspaces[36] for d in layers]
    assert all(isinstance(ws, Workspace16) for ws in spaces)
    assert [ws.A is None for ws in spaces] == [True, True, True, False]  # float32 only at the loss
    assert [ws.dX.dtype for ws in spaces[1:]] == [st] * 3  # 16-bit BP2 outputs
    assert all(ws.A16.dtype == st and ws.dZ16.dtype == st for ws in spaces)
    assert all("X16" not in ws.bufs for ws in spaces)  # 16-bit inputs: no cast in the layers
    assert [b.dtype for b in sim._workspaces.values()] == [st]  # the model's input cast once
    assert sim._input16 and sim._output_grad16
    sim.predict(X[:2])  # a forward: the copy made from the master weights as they are now
    np.testing.assert_array_equal(sim.flat_params16_storage, sim.flat_params.astype(np.float16))
    for before, losses, params, _ in runs[1:]:
        np.testing.assert_array_equal(runs[0][0], before)
        np.testing.assert_allclose(runs[0][1], losses, rtol=2.0**-10)
        for k in params:
            np.testing.assert_allclose(runs[0][2][k], params[k], rtol=1e-5, atol=1e-6)


def test_only_the_16_bit_dense_gemms_take_the_16_bit_gemm(monkeypatch):
    """A bf16/fp16 model on device='cuda' has two GEMMs: ``matmul16`` for the Dense layers that
    keep 16-bit arrays, and the float32 ``matmul`` for every other layer (the LSTM here computes in
    float32 from the master weights, precision.PATHS; on a GPU Matmul16 would round a float32
    operand to 16 bits, away from the CPU emulation). Every GEMM call is counted by which one ran."""
    import gpubackprop as gb

    rng = np.random.default_rng(3)
    X, y = rng.normal(size=(6, 5, 4)), rng.integers(0, 3, 6)
    model = gb.Sequential([gb.LSTM(4, 8), gb.LastStep(), gb.Dense(8, 8, activation="relu"),
                           gb.Dense(8, 3)], input_shape=(5, 4), device="cuda", seed=0,
                          precision="fp16")
    be = model.backend
    assert be.matmul is be.xp.matmul and be.matmul16 is not None
    calls = {"matmul": 0, "matmul16": 0}

    def counted(name, gemm):
        def run(*args, **kwargs):
            calls[name] += 1
            return gemm(*args, **kwargs)
        return run

    monkeypatch.setattr(be, "matmul", counted("matmul", be.matmul))
    monkeypatch.setattr(be, "matmul16", counted("matmul16", be.matmul16))
    gb.train_step(model, gb.SoftmaxCrossEntropy(), gb.SGD(lr=0.1), X, y)
    # The LSTM's GEMMs (input projection, each step, weight and input gradients) take matmul;
    # the two Dense layers' forward, BP3 and BP2 (the LSTM below needs its gradient) matmul16.
    assert calls["matmul"] > 0
    assert calls["matmul16"] == 6
