"""The conv and pooling families: the NumPy reference against naive loops and PyTorch, and the fused
Numba CPU set (kernels/cpu/conv.py, pooling.py) against the reference.

The CUDA set runs the same checks (conv_cases.py) under the simulator in test_kernels_conv_cuda.py.
"""

import conv_cases as cc
import kernel_cases as kc
import numpy as np
import pytest
from kernel_cases import cpu_ops  # noqa: F401  (the ops fixture: the fused CPU set)
from kernel_cases import host as dev

from gpubackprop.kernels.reference import ReferenceOps

REF = cc.REF
CONV_IDS = [cc.case_id(c) for c in cc.CONV_CASES]
POOL_IDS = [cc.case_id(c) for c in cc.POOL_CASES]


# ---- the reference against naive loops (needs nothing but NumPy) ----------------------------------
@pytest.mark.parametrize("case", cc.CONV_CASES, ids=CONV_IDS)
def test_reference_im2col_col2im_match_naive_loops(rng, case):
    shape, k, s, p, d = case
    X = rng.standard_normal(shape)
    cols = REF.im2col(X, np.empty(cc.cols_shape(case)), k, s, p, d)
    np.testing.assert_array_equal(cols, cc.naive_im2col(X, k, s, p, d))
    dcols = rng.standard_normal(cc.cols_shape(case))
    dX = REF.col2im(dcols, np.empty(shape), k, s, p, d)
    np.testing.assert_allclose(dX, cc.naive_col2im(dcols, shape, k, s, p, d), rtol=1e-13, atol=1e-13)
    # The adjoint property, <im2col(X), dcols> == <X, col2im(dcols)>, in float64.
    np.testing.assert_allclose(np.vdot(cols, dcols), np.vdot(X, dX), rtol=1e-12)


@pytest.mark.parametrize("case", cc.CONV_CASES, ids=CONV_IDS)
def test_reference_batch_inner_columns_are_the_columns_transposed(rng, case):
    """Batch-inner columns (C·kh·kw, N, OH·OW) hold the same rows as (N, C·kh·kw, OH·OW) ones, and
    col2im of them is col2im of the transposed ones, bit for bit."""
    shape, k, s, p, d = case
    X = rng.standard_normal(shape)
    cols = REF.im2col(X, np.empty(cc.cols_shape(case, batch_inner=True)), k, s, p, d, batch_inner=True)
    np.testing.assert_array_equal(cols, cc.naive_im2col(X, k, s, p, d).transpose(1, 0, 2))
    dcols = rng.standard_normal(cc.cols_shape(case, batch_inner=True))
    dX = REF.col2im(dcols, np.empty(shape), k, s, p, d, batch_inner=True)
    want = REF.col2im(np.ascontiguousarray(dcols.transpose(1, 0, 2)), np.empty(shape), k, s, p, d)
    np.testing.assert_array_equal(dX, want)
    if cc.cols_shape(case) != cc.cols_shape(case, batch_inner=True):  # the other layout's buffer
        with pytest.raises(ValueError, match=r"cols: expected shape"):
            REF.im2col(X, np.empty(cc.cols_shape(case)), k, s, p, d, batch_inner=True)


@pytest.mark.parametrize("data", ["normal", "ties", "nan", "-inf"])
@pytest.mark.parametrize("case", cc.POOL_CASES, ids=POOL_IDS)
def test_reference_max_pool_matches_naive_loops(rng, case, data):
    shape, k, s, p, d = case
    X = cc.pool_input(rng, shape, np.float64, data)
    out = cc.pool_out(case)
    Y, idx = REF.max_pool2d(X, np.empty(out), np.empty(out, np.int64), k, s, p, d)
    Yn, idxn = cc.naive_max_pool(X, k, s, p, d)
    np.testing.assert_array_equal(Y, Yn)
    np.testing.assert_array_equal(idx, idxn)
    dY = rng.standard_normal(out)
    dX = REF.max_pool2d_backward(dY, idx, np.empty(shape), k, s, p, d)
    np.testing.assert_allclose(dX, cc.naive_max_pool_backward(dY, idx, shape), rtol=1e-13, atol=1e-13)


@pytest.mark.parametrize("count_include_pad", [True, False])
@pytest.mark.parametrize("case", cc.POOL_CASES, ids=POOL_IDS)
def test_reference_avg_pool_matches_naive_loops(rng, case, count_include_pad):
    shape, k, s, p, _ = case
    X = rng.standard_normal(shape)
    out = cc.pool_out(case, dilation=False)
    Y = REF.avg_pool2d(X, np.empty(out), k, s, p, count_include_pad)
    np.testing.assert_allclose(Y, cc.naive_avg_pool(X, k, s, p, count_include_pad), rtol=1e-13)
    dY = rng.standard_normal(out)
    dX = REF.avg_pool2d_backward(dY, np.empty(shape), k, s, p, count_include_pad)
    naive = cc.naive_avg_pool_backward(dY, shape, k, s, p, count_include_pad)
    np.testing.assert_allclose(dX, naive, rtol=1e-13, atol=1e-13)


@pytest.mark.parametrize("activation", kc.ALL_ACTIVATIONS)
def test_reference_channel_bias_act_and_grad(rng, activation):
    Z, b = rng.standard_normal((3, 4, 5)) * 3, rng.standard_normal(4)
    want = cc.naive_channel_bias_act(Z, b, activation)
    Zr, A = Z.copy(), np.empty_like(Z)
    REF.channel_bias_act(Zr, b, activation, A)
    np.testing.assert_array_equal(Zr, Z + b[None, :, None])
    np.testing.assert_allclose(A, want, rtol=1e-14, atol=1e-15)
    db = REF.channel_bias_grad(Z, np.empty(4))
    np.testing.assert_allclose(db, [Z[:, c, :].sum() for c in range(4)], rtol=1e-13)
    REF.channel_bias_grad(Z, db, accumulate=True)
    np.testing.assert_allclose(db, [2 * Z[:, c, :].sum() for c in range(4)], rtol=1e-13)


def test_reference_accepts_int_geometry(rng):
    X = rng.standard_normal((1, 2, 6, 6))
    a = REF.im2col(X, np.empty((1, 18, 9)), 3, 2, 1, 1)
    b = REF.im2col(X, np.empty((1, 18, 9)), (3, 3), [2, 2], (1, 1), (1, 1))
    np.testing.assert_array_equal(a, b)


# ---- the reference against PyTorch (optional) -------------------------------------------------------
@pytest.fixture(scope="module")
def torch():
    return pytest.importorskip("torch")


@pytest.mark.parametrize("dtype", cc.DTYPES)
@pytest.mark.parametrize("case", cc.CONV_CASES, ids=CONV_IDS)
def test_reference_im2col_col2im_match_torch_unfold_fold(torch, rng, case, dtype):
    F = torch.nn.functional
    shape, k, s, p, d = case
    X = cc.random(rng, shape, dtype)
    cols = REF.im2col(X, np.empty(cc.cols_shape(case), dtype), k, s, p, d)
    want = F.unfold(torch.from_numpy(X), k, dilation=d, padding=p, stride=s).numpy()
    np.testing.assert_array_equal(cols, want)
    dcols = cc.random(rng, cc.cols_shape(case), dtype)
    dX = REF.col2im(dcols, np.empty(shape, dtype), k, s, p, d)
    want = F.fold(torch.from_numpy(dcols), shape[2:], k, dilation=d, padding=p, stride=s).numpy()
    cc.assert_close(dX, want, "col2im vs torch fold")


@pytest.mark.parametrize("data", ["normal", "ties", "nan", "-inf"])
@pytest.mark.parametrize("dtype", cc.DTYPES)
@pytest.mark.parametrize("case", cc.POOL_CASES, ids=POOL_IDS)
def test_reference_max_pool_matches_torch(torch, rng, case, dtype, data):
    F = torch.nn.functional
    shape, k, s, p, d = case
    X = cc.pool_input(rng, shape, dtype, data)
    out = cc.pool_out(case)
    Y, idx = REF.max_pool2d(X, np.empty(out, dtype), np.empty(out, np.int64), k, s, p, d)
    Xt = torch.from_numpy(X).requires_grad_(True)
    Yt, It = F.max_pool2d(Xt, k, s, p, d, return_indices=True)
    np.testing.assert_array_equal(Y, Yt.detach().numpy())
    np.testing.assert_array_equal(idx, It.numpy())
    dY = cc.random(rng, out, dtype)
    Yt.backward(torch.from_numpy(dY))
    dX = REF.max_pool2d_backward(dY, idx, np.empty(shape, dtype), k, s, p, d)
    cc.assert_close(dX, Xt.grad.numpy(), "max_pool2d_backward vs torch")


@pytest.mark.parametrize("count_include_pad", [True, False])
@pytest.mark.parametrize("dtype", cc.DTYPES)
@pytest.mark.parametrize("case", cc.POOL_CASES, ids=POOL_IDS)
def test_reference_avg_pool_matches_torch(torch, rng, case, dtype, count_include_pad):
    F = torch.nn.functional
    shape, k, s, p, _ = case
    X = cc.random(rng, shape, dtype)
    out = cc.pool_out(case, dilation=False)
    Y = REF.avg_pool2d(X, np.empty(out, dtype), k, s, p, count_include_pad)
    Xt = torch.from_numpy(X).requires_grad_(True)
    Yt = F.avg_pool2d(Xt, k, s, p, count_include_pad=count_include_pad)
    cc.assert_close(Y, Yt.detach().numpy(), "avg_pool2d vs torch")
    dY = cc.random(rng, out, dtype)
    Yt.backward(torch.from_numpy(dY))
    dX = REF.avg_pool2d_backward(dY, np.empty(shape, dtype), k, s, p, count_include_pad)
    cc.assert_close(dX, Xt.grad.numpy(), "avg_pool2d_backward vs torch")


def test_reference_errors():
    cc.check_errors(ReferenceOps(np), dev, fused=False)


# ---- the fused CPU set against the reference ---------------------------------------------------------
@pytest.mark.parametrize("dtype", cc.DTYPES)
@pytest.mark.parametrize("case", cc.CONV_CASES, ids=CONV_IDS)
def test_im2col_col2im(ops, rng, case, dtype):
    cc.check_im2col_col2im(ops, dev, rng, case, dtype)


@pytest.mark.parametrize("dtype", cc.DTYPES)
@pytest.mark.parametrize("case", cc.CONV_CASES, ids=CONV_IDS)
def test_im2col_col2im_batch_inner(ops, rng, case, dtype):
    """The CPU set's batch-inner columns (Conv2d's one GEMM a chunk) against the reference's."""
    cc.check_im2col_col2im(ops, dev, rng, case, dtype, batch_inner=True)


@pytest.mark.parametrize("dtype", cc.DTYPES)
@pytest.mark.parametrize("activation", kc.ALL_ACTIVATIONS)
def test_channel_bias_act(ops, rng, dtype, activation):
    for shape in [(1, 1, 1), (2, 3, 7), (3, 7, 33)]:
        cc.check_channel_bias_act(ops, dev, rng, shape, dtype, activation)
    if not kc.saves_input(activation):  # the gelus' backward needs Z, so A cannot overwrite it
        cc.check_channel_bias_act(ops, dev, rng, (2, 5, 9), dtype, activation, in_place=True)
        cc.check_channel_bias_act(ops, dev, rng, (2, 5, 9), dtype, activation, in_place="view")


@pytest.mark.parametrize("dtype", cc.DTYPES)
def test_channel_bias_grad(ops, rng, dtype):
    # L >= 64: the lanes over each row (pairs of 64-blocks, ragged tails in both halves);
    # L < 64: the column sums of the short rows, in blocks of at most 1024 columns ((3, 70, 20):
    # 51 and 19 channels; (2, 1100, 1): 1024 and 76).
    for shape in [(1, 1, 1), (2, 3, 7), (4, 7, 65), (0, 3, 4), (2, 9, 1), (3, 5, 200),
                  (2, 4, 128), (2, 3, 191), (3, 6, 63), (5, 70, 3), (3, 70, 20), (2, 1100, 1)]:
        cc.check_channel_bias_grad(ops, dev, rng, shape, dtype)


@pytest.mark.parametrize("shape", [(6, 5, 200), (3, 7, 63), (2, 3, 64), (4, 9, 1), (4, 70, 20)])
def test_channel_bias_grad_does_not_depend_on_the_thread_count(rng, shape):
    """Each channel's float64 lanes in an order fixed by the shape: the same bits from one
    thread and from three chunks of channels, long rows (lanes) and short ones (columns)."""
    from gpubackprop.kernels.cpu import CpuOps

    dZ = cc.random(rng, shape, np.float32)
    outs = [ops.channel_bias_grad(dZ, np.empty(shape[1], np.float32))
            for ops in (CpuOps(np, num_threads=1), CpuOps(np, num_threads=3, parallel_min=0))]
    np.testing.assert_array_equal(*outs)


@pytest.mark.parametrize("data", ["normal", "ties", "nan", "-inf"])
@pytest.mark.parametrize("dtype", cc.DTYPES)
@pytest.mark.parametrize("case", cc.POOL_CASES, ids=POOL_IDS)
def test_max_pool(ops, rng, case, dtype, data):
    cc.check_max_pool(ops, dev, rng, case, dtype, data)


@pytest.mark.parametrize("count_include_pad", [True, False])
@pytest.mark.parametrize("dtype", cc.DTYPES)
@pytest.mark.parametrize("case", cc.POOL_CASES, ids=POOL_IDS)
def test_avg_pool(ops, rng, case, dtype, count_include_pad):
    cc.check_avg_pool(ops, dev, rng, case, dtype, count_include_pad)


def test_errors(ops):
    cc.check_errors(ops, dev)


@pytest.mark.parametrize("dtype", cc.DTYPES)
def test_random_geometries(ops, rng, dtype):
    """40 random geometries (padding past the kernel, strides and dilations up to 3): the reference
    against the naive loops, and the fused set against the reference."""
    for case in cc.random_cases(np.random.default_rng(7), 40):
        shape, k, s, p, d = case
        X = rng.standard_normal(shape)
        np.testing.assert_array_equal(REF.im2col(X, np.empty(cc.cols_shape(case)), k, s, p, d),
                                      cc.naive_im2col(X, k, s, p, d), err_msg=cc.case_id(case))
        cc.check_im2col_col2im(ops, dev, rng, case, dtype)
        cc.check_im2col_col2im(ops, dev, rng, case, dtype, batch_inner=True)
        if cc.poolable(case):
            cc.check_max_pool(ops, dev, rng, case, dtype, "ties")
            for count_include_pad in (True, False):
                cc.check_avg_pool(ops, dev, rng, case, dtype, count_include_pad)


def _blas_threads():
    """{library path: threads} of the BLAS libraries loaded now."""
    from threadpoolctl import threadpool_info

    return {i["filepath"]: i["num_threads"] for i in threadpool_info() if i["user_api"] == "blas"}


def test_conv_gemm_threads_one_blas_thread_on_the_fused_set_only(ops):
    """The fused set runs Conv2d's im2col GEMMs on one BLAS thread (kernels/cpu/conv.py says why),
    restored afterwards; the reference set leaves BLAS as it is."""
    import scipy.linalg.cython_blas  # noqa: F401 (every BLAS the context limits, loaded first)
    from threadpoolctl import threadpool_limits

    with threadpool_limits(limits=2, user_api="blas"):
        before = _blas_threads()
        assert before and set(before.values()) == {2}
        with ops.conv_gemm_threads():
            assert _blas_threads() == dict.fromkeys(before, 1)
        assert _blas_threads() == before
        with ReferenceOps(np).conv_gemm_threads():
            assert _blas_threads() == before
