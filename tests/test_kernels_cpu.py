"""The fused Numba CPU kernel set (kernels/cpu.py) against the NumPy reference."""

import kernel_cases as kc
import numba
import numpy as np
import pytest
from kernel_cases import cpu_ops  # noqa: F401  (the ops fixture: the fused CPU set)
from kernel_cases import host as dev

from gpubackprop.kernels.cpu import CpuOps, pooling

SHAPES = [(1, 1), (7, 13), (33, 257), (128, 1000)]


@pytest.mark.parametrize("dtype", kc.DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("activation", kc.ALL_ACTIVATIONS)
def test_bias_act(ops, rng, shape, dtype, activation):
    kc.check_bias_act(ops, dev, rng, shape, dtype, activation)


@pytest.mark.parametrize("dtype", kc.DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("activation", kc.ALL_ACTIVATIONS)
def test_act_backward(ops, rng, shape, dtype, activation):
    kc.check_act_backward(ops, dev, rng, shape, dtype, activation)


@pytest.mark.parametrize("dtype", kc.DTYPES)
@pytest.mark.parametrize("shape", SHAPES + [(3, 5, 7, 11), (2, 16, 9, 9)])
@pytest.mark.parametrize("activation", kc.ALL_ACTIVATIONS)
def test_activation(ops, rng, shape, dtype, activation):
    kc.check_activation(ops, dev, rng, shape, dtype, activation)
    kc.check_activation(ops, dev, rng, shape, dtype, activation, in_place=True)


@pytest.mark.parametrize("dtype", kc.DTYPES)
@pytest.mark.parametrize("activation", kc.ALL_ACTIVATIONS)
def test_activation_edges_and_thread_count(rng, dtype, activation):
    """z = ±0, |z| > 100, ±inf, NaN; and the same bits serial and in 1..4 ragged chunks."""
    X = kc.random(rng, (5, 3, 7, 13), dtype)
    want = CpuOps(np, num_threads=1).activation(X, activation, np.empty_like(X))
    kc.check_activation(kc.REF, dev, rng, (7, 13), dtype, activation)  # the reference's own two
    for threads in (1, 2, 3, 4):
        par = CpuOps(np, num_threads=threads, parallel_min=0)
        kc.check_activation(par, dev, rng, None, dtype, activation, edges=True)
        np.testing.assert_array_equal(par.activation(X, activation, np.empty_like(X)), want)


@pytest.mark.parametrize("dtype", kc.DTYPES)
@pytest.mark.parametrize("activation", kc.ALL_ACTIVATIONS)
def test_in_place(ops, rng, dtype, activation):
    if not kc.saves_input(activation):  # the gelus' backward needs Z, so A cannot overwrite it
        kc.check_bias_act(ops, dev, rng, (9, 31), dtype, activation, in_place=True)
    kc.check_act_backward(ops, dev, rng, (9, 31), dtype, activation, in_place=True)


@pytest.mark.parametrize("activation", kc.ALL_ACTIVATIONS)
def test_in_place_equals_out_of_place(ops, rng, activation):
    """The in-place kernels (one name for the one buffer: dZ is dA, A is Z, or a view of it from
    the same start) give the bits of the separate-buffer ones; ragged chunks in the parallel set."""
    shape = (33, 257)
    dA, S = kc.random(rng, shape, np.float32), kc.random(rng, shape, np.float32)
    want = ops.act_backward(dA, S, activation, np.empty_like(dA))
    for dZ in (dA.copy(), None):
        if dZ is None:  # a view of the same buffer
            buf = dA.copy()
            dZ, dAv = buf.reshape(-1).reshape(shape), buf
        else:
            dAv = dZ
        ops.act_backward(dAv, S, activation, dZ)
        np.testing.assert_array_equal(dZ, want)
    if not kc.saves_input(activation):
        Z, b = kc.random(rng, shape, np.float32), kc.random(rng, shape[1], np.float32)
        Zs = Z.copy()
        want = ops.bias_act(Zs, b, activation, np.empty_like(Z))
        Zi = Z.copy()
        ops.bias_act(Zi, b, activation, Zi.reshape(-1).reshape(shape))
        np.testing.assert_array_equal(Zi, want)


@pytest.mark.parametrize("dtype", kc.DTYPES)
@pytest.mark.parametrize("activation", kc.ALL_ACTIVATIONS)
def test_activation_edges(ops, dtype, activation):
    kc.check_edges(ops, dev, dtype, activation)


@pytest.mark.parametrize("dtype", kc.DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_softmax_ce(ops, rng, shape, dtype):
    kc.check_softmax_ce(ops, dev, rng, shape, dtype)


@pytest.mark.parametrize("dtype", kc.DTYPES)
@pytest.mark.parametrize("shape", [(7, 13), (64, 10)])
def test_softmax_ce_large_logits(ops, rng, shape, dtype):
    kc.check_softmax_ce(ops, dev, rng, shape, dtype, scale=1e4)
    kc.check_softmax_ce(ops, dev, rng, shape, dtype, in_place=True)


def test_softmax_ce_bad_label_is_memory_safe(ops):
    logits = np.zeros((2, 3), np.float32)
    dl, loss = np.empty_like(logits), np.empty(2, np.float32)
    ops.softmax_ce(logits, np.array([1, 7]), dl, loss)
    assert np.isfinite(loss[0]) and np.isnan(loss[1])


@pytest.mark.parametrize("dtype", kc.DTYPES)
@pytest.mark.parametrize("shape", SHAPES + [(0, 5), (300, 2000)])
def test_bias_grad(ops, rng, shape, dtype):
    kc.check_bias_grad(ops, dev, rng, shape, dtype)


@pytest.mark.parametrize("dtype", kc.DTYPES)
@pytest.mark.parametrize("n", [1, 5, 1000, 70001])
def test_sq_norm_clip_scale(ops, rng, n, dtype):
    kc.check_sq_norm_clip(ops, dev, rng, n, dtype)


@pytest.mark.parametrize("dtype", kc.DTYPES)
@pytest.mark.parametrize("n", [1, 1001, 40000])
@pytest.mark.parametrize("case", kc.OPTIMIZER_CASES, ids=kc.OPTIMIZER_IDS)
def test_optimizers(ops, rng, n, dtype, case):
    kc.check_optimizer(ops, dev, rng, n, dtype, *case)


def test_unused_momentum_buffer_may_be_none(ops, rng):
    p, g = rng.standard_normal(10), rng.standard_normal(10)
    ref = p - 0.1 * g
    ops.sgd(p, g, None, 0.1, 0.0, False, 0.0, np.ones(1))
    np.testing.assert_allclose(p, ref, rtol=1e-15)


def test_errors(ops):
    kc.check_errors(ops, dev)
    with pytest.raises(TypeError, match="xp: expected numpy"):
        CpuOps(object)


def test_name_and_repr():
    ops = CpuOps(np)
    assert ops.name == "fused-cpu"
    assert repr(ops) == "CpuOps(xp=numpy)"


def test_info_describe_and_compile_time():
    from gpubackprop.kernels.info import compile_time, describe

    assert describe("cpu", "fused")["set"] == "fused-cpu"
    assert describe("cpu", "reference")["set"] == "reference"
    assert describe("cuda", "fused")["set"] == "fused-cuda"
    seconds = compile_time("cpu", "float64")
    assert 0 < seconds < 600


def test_run_every_op_calls_every_family_with_valid_arguments():
    # On the reference set (nothing to compile): the warm-up's calls fit every op's signature.
    from gpubackprop.kernels.info import run_every_op
    from gpubackprop.kernels.reference import ReferenceOps

    calls = []

    class Recording(ReferenceOps):
        def __getattribute__(self, name):
            attr = super().__getattribute__(name)
            if callable(attr) and not name.startswith("_"):
                calls.append(name)
            return attr

    for dtype in ("float32", "float64"):
        run_every_op(Recording(np), dtype)
    for op in ("im2col", "col2im", "max_pool2d_backward", "avg_pool2d_backward",
               "channel_bias_act", "batch_norm_backward", "layer_norm_backward",
               "dropout_backward", "lstm_cell_backward", "gru_cell_backward", "embedding_backward",
               "masked_softmax_backward", "adam", "winograd_input_backward",
               "winograd_output_backward", "winograd_filter_backward", "rnn_backward_steps",
               "lstm_forward_steps", "gru_backward_steps", "rows_gemm", "weight_gemm", "activation"):
        assert op in calls, op


# ---- max pooling's backward: a scatter that adds in the reference's order ----------------------
# Overlapping windows (stride < kernel) give a pixel up to kh·kw terms; small-integer "ties" data
# makes many pixels the argmax of several outputs. W = 4099: a·(1/W) as a float is off by one for
# some a, which the kernel corrects (a wrong row would drop or misplace terms).
MAX_POOL_SUMS = [
    ((3, 2, 11, 13), (3, 3), (1, 1), (1, 1), (1, 1)),
    ((2, 3, 9, 10), (3, 2), (1, 1), (0, 1), (2, 1)),
    ((1, 2, 7, 9), (4, 3), (1, 2), (2, 1), (1, 2)),
    ((1, 1, 3, 4099), (2, 3), (1, 1), (0, 1), (1, 1)),
]


def _ties(rng, shape, dtype):
    return rng.integers(-2, 3, shape).astype(dtype)


@pytest.mark.parametrize("dtype", kc.DTYPES)
@pytest.mark.parametrize("case", MAX_POOL_SUMS, ids=str)
def test_max_pool_backward_equals_reference_bit_for_bit(ops, rng, case, dtype):
    shape, k, s, p, d = case
    N, C, H, W = shape
    OH = (H + 2 * p[0] - d[0] * (k[0] - 1) - 1) // s[0] + 1
    OW = (W + 2 * p[1] - d[1] * (k[1] - 1) - 1) // s[1] + 1
    out = (N, C, OH, OW)
    X = _ties(rng, shape, dtype)
    Y, am = np.empty(out, dtype), np.empty(out, np.int64)
    Yr, amr = kc.REF.max_pool2d(X, np.empty(out, dtype), np.empty(out, np.int64), k, s, p, d)
    ops.max_pool2d(X, Y, am, k, s, p, d)
    np.testing.assert_array_equal(am, amr)
    dY = rng.standard_normal(out).astype(dtype) * 1e3
    ref = kc.REF.max_pool2d_backward(dY, amr, np.empty(shape, dtype), k, s, p, d)
    got = ops.max_pool2d_backward(dY, am, np.full(shape, np.nan, dtype), k, s, p, d)
    np.testing.assert_array_equal(got.view(np.uint8), ref.view(np.uint8))


@pytest.mark.parametrize("dilation", [(1, 1), (2, 2)])
def test_max_pool_backward_ignores_an_argmax_outside_its_window(ops, rng, dilation):
    # What the reference does: only an argmax equal to a pixel of the output's own window counts.
    shape, k, s, p = (2, 2, 9, 8), (3, 2), (2, 2), (1, 1)
    out = (2, 2, (9 + 2 - dilation[0] * 2 - 1) // 2 + 1, (8 + 2 - dilation[1] - 1) // 2 + 1)
    _, am = kc.REF.max_pool2d(rng.standard_normal(shape), np.empty(out), np.empty(out, np.int64),
                              k, s, p, dilation)
    wrong = rng.random(out) < 0.5  # half of them: other windows' pixels, padding, outside the plane
    am[wrong] = rng.integers(-3, 9 * 8 + 3, out)[wrong]
    dY = rng.standard_normal(out)
    ref = kc.REF.max_pool2d_backward(dY, am, np.empty(shape), k, s, p, dilation)
    got = ops.max_pool2d_backward(dY, am, np.empty(shape), k, s, p, dilation)
    np.testing.assert_array_equal(got, ref)
    assert np.count_nonzero(ref) > 0
    naive = np.zeros(shape)  # a scatter that trusts the argmax: what the test must tell apart
    for idx in np.ndindex(out):
        if 0 <= am[idx] < 9 * 8:
            naive[idx[:2]].flat[am[idx]] += dY[idx]
    assert not np.allclose(naive, ref)


# ---- max pooling over tiling windows (kernel == stride, no padding): the tiling kernels ---------
# At least TILES_MIN elements, so the launcher takes them; ragged: the last rows and columns of a
# plane in no window (cropped), kernels 2 and 3 (unrolled) and others (the generic body), rows of
# fewer than 8 outputs (rounded up to 8 where that stays in the plane: some rows, all but the
# last, none), ties, NaNs, signed zeros.
TILES_CASES = [
    ((3, 5, 33, 35), (2, 2)),
    ((2, 4, 31, 34), (3, 3)),
    ((64, 4, 10, 11), (2, 2)),
    ((3, 3, 40, 27), (2, 3)),
    ((1, 2, 64, 97), (4, 4)),
    ((1, 1, 8200, 1), (1, 1)),
    ((2, 3, 300, 5), (2, 2)),
    ((8, 8, 13, 14), (3, 3)),
    ((5, 3, 9, 35), (2, 2)),  # 17 outputs a row: the backward's tiling kernel, rows rounded to 24
]


def _tiles_input(rng, shape, dtype, data):
    if data == "ties":
        return rng.integers(-2, 3, shape).astype(dtype)
    if data == "zeros":  # +0.0 and -0.0 compare equal: the first of the window stays
        return np.where(rng.random(shape) < 0.5, -0.0, 0.0).astype(dtype)
    X = rng.standard_normal(shape).astype(dtype)
    if data == "nan":
        X[rng.random(shape) < 0.2] = np.nan
    elif data == "-inf":
        X[rng.random(shape) < 0.5] = -np.inf
    return X


@pytest.mark.parametrize("data", ["normal", "ties", "nan", "-inf", "zeros"])
@pytest.mark.parametrize("dtype", kc.DTYPES)
@pytest.mark.parametrize("case", TILES_CASES, ids=str)
def test_max_pool_tiles_equal_reference_bit_for_bit(ops, rng, monkeypatch, case, dtype, data):
    shape, k = case
    assert np.prod(shape) >= pooling.TILES_MIN
    win = (k, k, (0, 0), (1, 1))
    out = shape[:2] + (shape[2] // k[0], shape[3] // k[1])
    taken = []
    for name in ("_max_pool_tiles", "_max_pool_tiles_backward"):
        kernel = getattr(pooling, name)
        monkeypatch.setattr(pooling, name, lambda *a, _k=kernel, _n=name: taken.append(_n) or _k(*a))
    threads = numba.get_num_threads()
    X = _tiles_input(rng, shape, dtype, data)
    Yr, amr = kc.REF.max_pool2d(X, np.empty(out, dtype), np.empty(out, np.int64), *win)
    Y, am = ops.max_pool2d(X, np.full(out, 7, dtype), np.full(out, -7, np.int64), *win)
    np.testing.assert_array_equal(Y.view(np.uint8), Yr.view(np.uint8))
    np.testing.assert_array_equal(am, amr)
    dY = (rng.standard_normal(out) * 1e3).astype(dtype)
    dY[rng.random(out) < 0.1] = -0.0  # 0 + -0.0 is +0.0 in the reference's sum
    dY.flat[::7] = np.nan
    ref = kc.REF.max_pool2d_backward(dY, amr, np.empty(shape, dtype), *win)
    got = ops.max_pool2d_backward(dY, am, np.full(shape, np.nan, dtype), *win)
    np.testing.assert_array_equal(got.view(np.uint8), ref.view(np.uint8))
    # the backward's tiling kernel from rows of TILES_BACKWARD_MIN_OW outputs (else the gather)
    wide = out[3] >= pooling.TILES_BACKWARD_MIN_OW
    assert taken == ["_max_pool_tiles"] + ["_max_pool_tiles_backward"] * wide
    assert numba.get_num_threads() == threads


@pytest.mark.parametrize("k", [(2, 2), (3, 3), (2, 3)])
def test_max_pool_tiles_backward_ignores_an_argmax_outside_its_window(ops, rng, k):
    # As the reference: an argmax elsewhere in the plane, past it or negative adds nothing.
    shape = (4, 3, 29, 31)
    out = shape[:2] + (shape[2] // k[0], shape[3] // k[1])
    win = (k, k, (0, 0), (1, 1))
    _, am = kc.REF.max_pool2d(rng.standard_normal(shape), np.empty(out), np.empty(out, np.int64),
                              *win)
    wrong = rng.random(out) < 0.5
    am[wrong] = rng.integers(-3, 29 * 31 + 3, out)[wrong]
    dY = rng.standard_normal(out)
    ref = kc.REF.max_pool2d_backward(dY, am, np.empty(shape), *win)
    got = ops.max_pool2d_backward(dY, am, np.full(shape, np.nan), *win)
    np.testing.assert_array_equal(got, ref)
    assert np.count_nonzero(ref) > 0


# ---- average pooling: the reference's sums, in its order ----------------------------------------
AVG_POOL_SUMS = [
    ((3, 2, 11, 13), (3, 3), (1, 1), (1, 1)),
    ((2, 3, 9, 10), (3, 2), (2, 1), (1, 1)),
    ((1, 2, 7, 9), (4, 3), (1, 2), (2, 1)),
]


@pytest.mark.parametrize("count_include_pad", [True, False])
@pytest.mark.parametrize("dtype", kc.DTYPES)
@pytest.mark.parametrize("case", AVG_POOL_SUMS, ids=str)
def test_avg_pool_equals_reference_bit_for_bit(ops, rng, case, dtype, count_include_pad):
    shape, k, s, p = case
    N, C, H, W = shape
    out = (N, C, (H + 2 * p[0] - k[0]) // s[0] + 1, (W + 2 * p[1] - k[1]) // s[1] + 1)
    X = (rng.standard_normal(shape) * 1e3).astype(dtype)
    ref = kc.REF.avg_pool2d(X, np.empty(out, dtype), k, s, p, count_include_pad)
    got = ops.avg_pool2d(X, np.full(out, np.nan, dtype), k, s, p, count_include_pad)
    np.testing.assert_array_equal(got, ref)
    dY = (rng.standard_normal(out) * 1e3).astype(dtype)
    ref = kc.REF.avg_pool2d_backward(dY, np.empty(shape, dtype), k, s, p, count_include_pad)
    got = ops.avg_pool2d_backward(dY, np.full(shape, np.nan, dtype), k, s, p, count_include_pad)
    np.testing.assert_array_equal(got, ref)


def _blas_threads():
    """The set of thread counts of the BLAS libraries loaded now."""
    from threadpoolctl import threadpool_info

    return {i["num_threads"] for i in threadpool_info() if i["user_api"] == "blas"}


def test_dense_gemm_threads_take_one_blas_thread_for_small_gemms(monkeypatch):
    """The fused set runs Dense's GEMMs of more than OpenBLAS's one-thread size and fewer than
    ``dense_one_thread_below`` multiply-adds on one BLAS thread (kernels/cpu/dense.py says why),
    restored afterwards, and leaves BLAS as it is elsewhere and in the reference set; a Dense layer
    runs its forward (training and inference), BP3 and input-gradient GEMMs inside that context."""
    import scipy.linalg.cython_blas  # noqa: F401 (every BLAS the context limits, loaded first)
    from threadpoolctl import threadpool_limits

    import gpubackprop as gb
    from gpubackprop.kernels.cpu.dense import BLAS_THREADS_FROM, DENSE_ONE_THREAD_BELOW
    from gpubackprop.kernels.reference import ReferenceOps

    ops = CpuOps(np)
    with threadpool_limits(limits=2, user_api="blas"):
        assert _blas_threads() == {2}
        for macs, want in ((BLAS_THREADS_FROM, 2), (BLAS_THREADS_FROM + 1, 1),
                           (DENSE_ONE_THREAD_BELOW - 1, 1), (DENSE_ONE_THREAD_BELOW, 2)):
            with ops.dense_gemm_threads(macs):
                assert _blas_threads() == {want}, macs
            assert _blas_threads() == {2}
            with ReferenceOps(np).dense_gemm_threads(macs):
                assert _blas_threads() == {2}
        for n_in, want in ((400, 1), (4000, 2)):  # 128·n_in·120 multiply-adds a GEMM
            model = gb.Sequential([gb.Dense(n_in, 120, activation="relu")], input_shape=(n_in,),
                                  kernels="fused", dtype="float32")
            seen, matmul = [], model.backend.matmul

            def recording(*args, matmul=matmul, seen=seen, **kw):
                seen.append(_blas_threads())
                return matmul(*args, **kw)
            monkeypatch.setattr(model.backend, "matmul", recording)
            X = np.ones((128, n_in), np.float32)
            Y, backprop = model.forward(X, train=True)
            backprop(np.ones_like(Y))
            model(X)
            assert seen == [{want}] * 4, n_in  # forward, BP3, dX, inference
            assert _blas_threads() == {2}
