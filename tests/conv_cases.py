"""Checks shared by test_kernels_conv.py and test_kernels_conv_cuda.py: the conv and pooling families.

Each ``check_*`` runs a kernel set ``ops`` on device copies (``dev``: numpy -> the set's array type)
of random host inputs and compares with the NumPy reference set on host copies. Copies (im2col, max
pooling) must agree exactly; sums within 1e-5 relative in float32 and 1e-12 in float64, with an
absolute floor of the same fraction of the largest reference value. The naive loops at the end are
the independent check of the reference itself (no PyTorch needed).
"""

import numpy as np
import pytest

from gpubackprop.backend import to_numpy
from gpubackprop.kernels.reference import ReferenceOps, saves_input

DTYPES = [np.float32, np.float64]
RTOL = {np.dtype(np.float32): 1e-5, np.dtype(np.float64): 1e-12}
REF = ReferenceOps(np)

# (N, C, H, W), kernel, stride, padding, dilation: odd and non-square sizes, strides, dilations.
CONV_CASES = [
    ((2, 3, 7, 6), (3, 2), (1, 1), (0, 0), (1, 1)),
    ((1, 2, 9, 8), (3, 3), (2, 1), (1, 1), (1, 1)),
    ((2, 1, 8, 11), (2, 3), (2, 3), (1, 1), (2, 1)),
    ((1, 2, 5, 7), (1, 1), (1, 1), (0, 0), (1, 1)),
    ((1, 1, 4, 7), (5, 3), (3, 2), (2, 1), (1, 2)),
    ((1, 2, 3, 5), (2, 3), (1, 2), (3, 2), (1, 1)),  # padding > kernel: whole windows in padding
    ((2, 2, 3, 3), (3, 3), (1, 1), (0, 0), (1, 1)),  # a 1x1 output
]
# Pooling: padding at most half the kernel (PyTorch's rule). Average pooling ignores the dilation.
POOL_CASES = [
    ((2, 3, 7, 6), (3, 2), (1, 1), (0, 0), (1, 1)),
    ((1, 2, 9, 8), (3, 3), (2, 2), (1, 1), (1, 1)),
    ((2, 1, 8, 11), (2, 3), (2, 3), (1, 1), (2, 1)),
    ((1, 1, 5, 7), (5, 3), (3, 2), (2, 1), (1, 2)),
    ((1, 2, 4, 4), (2, 2), (2, 2), (0, 0), (1, 1)),
    ((1, 1, 3, 3), (3, 3), (1, 1), (1, 1), (1, 1)),
]


def case_id(case):
    shape, k, s, p, d = case
    return "x".join(map(str, shape)) + f"-k{k[0]}{k[1]}-s{s[0]}{s[1]}-p{p[0]}{p[1]}-d{d[0]}{d[1]}"


def out_size(H, W, k, s, p, d):
    return ((H + 2 * p[0] - d[0] * (k[0] - 1) - 1) // s[0] + 1,
            (W + 2 * p[1] - d[1] * (k[1] - 1) - 1) // s[1] + 1)


def cols_shape(case, batch_inner=False):
    (N, C, H, W), k, s, p, d = case
    OH, OW = out_size(H, W, k, s, p, d)
    return (C * k[0] * k[1], N, OH * OW) if batch_inner else (N, C * k[0] * k[1], OH * OW)


def pool_out(case, dilation=True):
    (N, C, H, W), k, s, p, d = case
    return (N, C) + out_size(H, W, k, s, p, d if dilation else (1, 1))


def assert_close(got, ref, what=""):
    got, ref = to_numpy(got), np.asarray(ref)
    assert got.dtype == ref.dtype, f"{what}: dtype {got.dtype}, reference {ref.dtype}"
    rtol = RTOL[ref.dtype]
    finite = np.abs(ref[np.isfinite(ref)])
    atol = rtol * float(finite.max()) if finite.size else 0.0
    np.testing.assert_allclose(got, ref, rtol=rtol, atol=atol, equal_nan=True, err_msg=what)


def assert_equal(got, ref, what=""):
    got = to_numpy(got)
    assert got.dtype == np.asarray(ref).dtype, what
    np.testing.assert_array_equal(got, ref, err_msg=what)  # NaN == NaN here


def random(rng, shape, dtype, scale=1.0):
    return (rng.standard_normal(shape) * scale).astype(dtype)


def poisoned(dev, shape, dtype):
    """A device buffer full of NaN (or -7 for ints): every element the op must write."""
    fill = np.nan if np.dtype(dtype).kind == "f" else -7
    return dev(np.full(shape, fill, dtype))


# ---- conv family -------------------------------------------------------------------------------
def check_im2col_col2im(ops, dev, rng, case, dtype, batch_inner=False):
    """im2col copies exactly; col2im sums as the reference does; the two are adjoint. With
    ``batch_inner`` the (C·kh·kw, N, OH·OW) columns (the keyword passed only then)."""
    shape, k, s, p, d = case
    kw = {"batch_inner": True} if batch_inner else {}
    cshape = cols_shape(case, batch_inner)
    X = random(rng, shape, dtype)
    ref = REF.im2col(X, np.empty(cshape, dtype), k, s, p, d, **kw)
    cols = poisoned(dev, cshape, dtype)
    assert ops.im2col(dev(X), cols, k, s, p, d, **kw) is cols
    assert_equal(cols, ref, f"im2col {case_id(case)}")

    dcols = random(rng, cshape, dtype)
    ref = REF.col2im(dcols, np.empty(shape, dtype), k, s, p, d, **kw)
    dX = poisoned(dev, shape, dtype)
    assert ops.col2im(dev(dcols), dX, k, s, p, d, **kw) is dX
    assert_close(dX, ref, f"col2im {case_id(case)}")
    dX2 = poisoned(dev, shape, dtype)
    ops.col2im(dev(dcols), dX2, k, s, p, d, **kw)
    assert_equal(dX2, to_numpy(dX), "col2im is not deterministic")

    # Adjoint: <im2col(X), dcols> == <X, col2im(dcols)>.
    lhs = np.vdot(to_numpy(cols).astype(np.float64), dcols.astype(np.float64))
    rhs = np.vdot(X.astype(np.float64), to_numpy(dX).astype(np.float64))
    np.testing.assert_allclose(lhs, rhs, rtol=RTOL[np.dtype(dtype)] * 10, err_msg="adjoint")


def check_channel_bias_act(ops, dev, rng, shape, dtype, activation, in_place=False):
    Z = random(rng, shape, dtype, 3.0)
    b = random(rng, shape[1], dtype)
    Zr, Ar = Z.copy(), np.empty_like(Z)
    REF.channel_bias_act(Zr, b, activation, Ar)
    Zd = dev(Z)
    Ad = Zd if in_place else poisoned(dev, shape, dtype)
    if in_place == "view":  # A a different array object on Z's buffer, as a layer's reshapes give
        Ad = Zd.reshape(shape[0], -1).reshape(shape)
        assert Ad is not Zd
    assert ops.channel_bias_act(Zd, dev(b), activation, Ad) is Ad
    rtol = 1e-6 if dtype == np.float32 else 1e-12  # as the dense activations
    np.testing.assert_allclose(to_numpy(Ad), Ar, rtol=rtol, atol=rtol * np.abs(Ar).max(),
                               err_msg=f"channel_bias_act {activation} A")
    if not in_place:
        assert_equal(Zd, Zr, f"channel_bias_act {activation}: Z += b in place")


def check_channel_bias_grad(ops, dev, rng, shape, dtype):
    dZ = random(rng, shape, dtype)
    C = shape[1]
    ref = REF.channel_bias_grad(dZ, np.empty(C, dtype))
    dZd = dev(dZ)
    db1, db2 = poisoned(dev, C, dtype), poisoned(dev, C, dtype)
    assert ops.channel_bias_grad(dZd, db1) is db1
    ops.channel_bias_grad(dZd, db2)
    assert_close(db1, ref, f"channel_bias_grad {shape}")
    assert_equal(db2, to_numpy(db1), "channel_bias_grad is not deterministic")
    start = random(rng, C, dtype)
    acc_r = REF.channel_bias_grad(dZ, start.copy(), accumulate=True)
    acc = dev(start.copy())
    ops.channel_bias_grad(dZd, acc, accumulate=True)
    assert_close(acc, acc_r, f"channel_bias_grad accumulate {shape}")


# ---- pooling family ----------------------------------------------------------------------------
def pool_input(rng, shape, dtype, data):
    """"normal" data, "ties" (small integers: many equal maxima), "nan" (some NaN), "-inf" (all)."""
    if data == "ties":
        return rng.integers(-2, 3, size=shape).astype(dtype)
    X = random(rng, shape, dtype)
    if data == "nan":
        X[rng.random(shape) < 0.15] = np.nan
    elif data == "-inf":
        X[...] = -np.inf
    return X


def check_max_pool(ops, dev, rng, case, dtype, data="normal"):
    shape, k, s, p, d = case
    out = pool_out(case)
    X = pool_input(rng, shape, dtype, data)
    Yr, Ir = np.empty(out, dtype), np.empty(out, np.int64)
    REF.max_pool2d(X, Yr, Ir, k, s, p, d)
    Y, argmax = poisoned(dev, out, dtype), poisoned(dev, out, np.int64)
    got = ops.max_pool2d(dev(X), Y, argmax, k, s, p, d)
    assert got[0] is Y and got[1] is argmax
    assert_equal(Y, Yr, f"max_pool2d {data} {case_id(case)}: Y")
    assert_equal(argmax, Ir, f"max_pool2d {data} {case_id(case)}: argmax")

    dY = random(rng, out, dtype)
    ref = REF.max_pool2d_backward(dY, Ir, np.empty(shape, dtype), k, s, p, d)
    dX = poisoned(dev, shape, dtype)
    assert ops.max_pool2d_backward(dev(dY), argmax, dX, k, s, p, d) is dX
    assert_close(dX, ref, f"max_pool2d_backward {data} {case_id(case)}")


def check_avg_pool(ops, dev, rng, case, dtype, count_include_pad):
    shape, k, s, p, _ = case
    out = pool_out(case, dilation=False)
    X = random(rng, shape, dtype)
    ref = REF.avg_pool2d(X, np.empty(out, dtype), k, s, p, count_include_pad)
    Y = poisoned(dev, out, dtype)
    assert ops.avg_pool2d(dev(X), Y, k, s, p, count_include_pad) is Y
    assert_close(Y, ref, f"avg_pool2d {case_id(case)} count_include_pad={count_include_pad}")

    dY = random(rng, out, dtype)
    ref = REF.avg_pool2d_backward(dY, np.empty(shape, dtype), k, s, p, count_include_pad)
    dX = poisoned(dev, shape, dtype)
    assert ops.avg_pool2d_backward(dev(dY), dX, k, s, p, count_include_pad) is dX
    assert_close(dX, ref, f"avg_pool2d_backward {case_id(case)} count_include_pad={count_include_pad}")


# ---- bad arguments -----------------------------------------------------------------------------
def check_errors(ops, dev, fused=True):
    """Wrong ndim, shapes, dtypes, geometry: each error names the argument.

    ``fused``: also the dtype and contiguity checks (the reference set computes in any dtype).
    """
    f32 = np.float32
    X = dev(np.zeros((2, 3, 5, 6), f32))
    cols = dev(np.zeros((2, 27, 12), f32))  # kernel 3x3 on 5x6: 3x4 outputs
    geo = ((3, 3), (1, 1), (0, 0), (1, 1))
    raises = pytest.raises
    with raises(ValueError, match=r"X: expected a 4-D array \(N, C, H, W\), got shape \(3, 5, 6\)"):
        ops.im2col(dev(np.zeros((3, 5, 6), f32)), cols, *geo)
    with raises(ValueError, match=r"cols: expected shape \(2, 27, 12\), got shape \(2, 27, 11\)"):
        ops.im2col(X, dev(np.zeros((2, 27, 11), f32)), *geo)
    with raises(ValueError, match=r"cols: expected a C-contiguous array"):
        ops.im2col(X, dev(np.zeros((2, 12, 27), f32)).transpose(0, 2, 1), *geo)
    with raises(ValueError, match=r"kernel: a \(7, 3\) window .* gives an output of size \(-1, 4\) "
                                  r"on an input of size \(5, 6\); expected an output of at least 1x1"):
        ops.im2col(X, cols, (7, 3), (1, 1), (0, 0), (1, 1))
    with raises(ValueError, match=r"kernel: .*dilation \(3, 1\).*expected an output of at least 1x1"):
        ops.im2col(X, cols, (3, 3), (1, 1), (0, 0), (3, 1))
    with raises(TypeError, match=r"kernel: expected an int or a pair of ints \(h, w\), got \(3,\)"):
        ops.im2col(X, cols, (3,), (1, 1), (0, 0), (1, 1))
    with raises(TypeError, match=r"stride: expected an int or a pair of ints \(h, w\), got \(1.5, 1\)"):
        ops.im2col(X, cols, (3, 3), (1.5, 1), (0, 0), (1, 1))
    with raises(ValueError, match=r"stride: expected values >= 1, got \(0, 1\)"):
        ops.im2col(X, cols, (3, 3), (0, 1), (0, 0), (1, 1))
    with raises(ValueError, match=r"padding: expected values >= 0, got \(0, -1\)"):
        ops.im2col(X, cols, (3, 3), (1, 1), (0, -1), (1, 1))
    with raises(ValueError, match=r"dcols: expected shape \(2, 27, 12\), got shape \(2, 27, 11\)"):
        ops.col2im(dev(np.zeros((2, 27, 11), f32)), X, *geo)
    with raises(ValueError, match=r"dX: expected a 4-D array \(N, C, H, W\), got shape \(2, 3, 30\)"):
        ops.col2im(cols, dev(np.zeros((2, 3, 30), f32)), *geo)

    Z, b = dev(np.zeros((2, 3, 4), f32)), dev(np.zeros(3, f32))
    with raises(ValueError, match=r"Z: expected a 3-D array \(N, C, L\), got shape \(2, 3\)"):
        ops.channel_bias_act(dev(np.zeros((2, 3), f32)), b, "relu", dev(np.zeros((2, 3), f32)))
    with raises(ValueError, match=r"b: expected shape \(3,\) \(the channels of Z\), got shape \(4,\)"):
        ops.channel_bias_act(Z, dev(np.zeros(4, f32)), "relu", Z)
    with raises(ValueError, match=r"A: expected shape \(2, 3, 4\) \(the shape of Z\), got shape \(2, 3, 5\)"):
        ops.channel_bias_act(Z, b, "relu", dev(np.zeros((2, 3, 5), f32)))
    with raises(ValueError, match=r"activation: expected one of .*got 'softplus'"):
        ops.channel_bias_act(Z, b, "softplus", Z)
    with raises(ValueError, match=r"db: expected shape \(3,\) \(the channels of dZ\), got shape \(4,\)"):
        ops.channel_bias_grad(Z, dev(np.zeros(4, f32)))
    with raises(ValueError, match=r"dZ: expected a 3-D array \(N, C, L\), got shape \(2, 12\)"):
        ops.channel_bias_grad(dev(np.zeros((2, 12), f32)), b)

    Y, am = dev(np.zeros((2, 3, 2, 3), f32)), dev(np.zeros((2, 3, 2, 3), np.int64))
    pool = ((2, 2), (2, 2), (0, 0), (1, 1))
    with raises(ValueError, match=r"padding: expected at most half the kernel size \(2, 2\) .*got \(2, 0\)"):
        ops.max_pool2d(X, Y, am, (2, 2), (2, 2), (2, 0), (1, 1))
    with raises(ValueError, match=r"padding: expected at most half the kernel size \(3, 3\) .*got \(1, 2\)"):
        ops.avg_pool2d(X, Y, (3, 3), (2, 2), (1, 2))
    with raises(ValueError, match=r"Y: expected shape \(2, 3, 2, 3\), got shape \(2, 3, 3, 2\)"):
        ops.max_pool2d(X, dev(np.zeros((2, 3, 3, 2), f32)), am, *pool)
    with raises(ValueError, match=r"argmax: expected shape \(2, 3, 2, 3\), got shape \(2, 3, 2, 2\)"):
        ops.max_pool2d(X, Y, dev(np.zeros((2, 3, 2, 2), np.int64)), *pool)
    with raises(TypeError, match=r"argmax: expected an int64 array, got dtype int32"):
        ops.max_pool2d(X, Y, dev(np.zeros((2, 3, 2, 3), np.int32)), *pool)
    with raises(TypeError, match=r"argmax: expected an int64 array, got dtype int32"):
        ops.max_pool2d_backward(Y, dev(np.zeros((2, 3, 2, 3), np.int32)), X, *pool)
    with raises(ValueError, match=r"dY: expected shape \(2, 3, 2, 3\), got shape \(2, 3, 2, 2\)"):
        ops.max_pool2d_backward(dev(np.zeros((2, 3, 2, 2), f32)), am, X, *pool)
    with raises(ValueError, match=r"Y: expected shape \(2, 3, 4, 5\), got shape \(2, 3, 2, 3\)"):
        ops.avg_pool2d(X, Y, (2, 2), (1, 1), (0, 0))
    with raises(ValueError, match=r"dY: expected shape \(2, 3, 4, 5\), got shape \(2, 3, 2, 3\)"):
        ops.avg_pool2d_backward(Y, X, (2, 2), (1, 1), (0, 0))
    with raises(ValueError, match=r"kernel: a \(6, 2\) window .*expected an output of at least 1x1"):
        ops.avg_pool2d(X, Y, (6, 2), (1, 1), (0, 0))
    if not fused:
        return
    with raises(TypeError, match=r"cols: expected dtype float32 \(the dtype of X\), got dtype float64"):
        ops.im2col(X, dev(np.zeros((2, 27, 12))), *geo)
    with raises(TypeError, match=r"X: expected a float32 or float64 array, got dtype int64"):
        ops.im2col(dev(np.zeros((2, 3, 5, 6), np.int64)), cols, *geo)
    with raises(ValueError, match=r"X: expected a C-contiguous array"):
        ops.im2col(dev(np.zeros((2, 3, 6, 5), f32)).transpose(0, 1, 3, 2), cols, *geo)
    with raises(TypeError, match=r"dX: expected dtype float32 \(the dtype of dcols\), got dtype float64"):
        ops.col2im(cols, dev(np.zeros((2, 3, 5, 6))), *geo)
    with raises(TypeError, match=r"b: expected dtype float32 \(the dtype of Z\), got dtype float64"):
        ops.channel_bias_act(Z, dev(np.zeros(3)), "relu", Z)
    with raises(TypeError, match=r"db: expected dtype float32 \(the dtype of dZ\), got dtype float64"):
        ops.channel_bias_grad(Z, dev(np.zeros(3)))
    with raises(TypeError, match=r"Y: expected dtype float32 \(the dtype of X\), got dtype float64"):
        ops.max_pool2d(X, dev(np.zeros((2, 3, 2, 3))), am, *pool)
    with raises(TypeError, match=r"dX: expected dtype float32 \(the dtype of dY\), got dtype float64"):
        ops.avg_pool2d_backward(Y, dev(np.zeros((2, 3, 5, 6))), (2, 2), (2, 2), (0, 0))


# ---- naive loops: the independent check of the reference (float64, tiny sizes) -----------------
def _window_pixels(H, W, oh, ow, k, s, p, d):
    """The (i, j, h, w) of one output's window in row-major order, padding included."""
    for i in range(k[0]):
        for j in range(k[1]):
            yield i, j, oh * s[0] - p[0] + i * d[0], ow * s[1] - p[1] + j * d[1]


def naive_im2col(X, k, s, p, d):
    N, C, H, W = X.shape
    OH, OW = out_size(H, W, k, s, p, d)
    cols = np.zeros((N, C * k[0] * k[1], OH * OW), X.dtype)
    for n, c, oh, ow in np.ndindex(N, C, OH, OW):
        for i, j, h, w in _window_pixels(H, W, oh, ow, k, s, p, d):
            if 0 <= h < H and 0 <= w < W:
                cols[n, (c * k[0] + i) * k[1] + j, oh * OW + ow] = X[n, c, h, w]
    return cols


def naive_col2im(dcols, shape, k, s, p, d):
    N, C, H, W = shape
    OH, OW = out_size(H, W, k, s, p, d)
    dX = np.zeros(shape, dcols.dtype)
    for n, c, oh, ow in np.ndindex(N, C, OH, OW):
        for i, j, h, w in _window_pixels(H, W, oh, ow, k, s, p, d):
            if 0 <= h < H and 0 <= w < W:
                dX[n, c, h, w] += dcols[n, (c * k[0] + i) * k[1] + j, oh * OW + ow]
    return dX


def naive_max_pool(X, k, s, p, d):
    """Max over the window's input pixels: the first maximum, or the last NaN (PyTorch's rule)."""
    N, C, H, W = X.shape
    OH, OW = out_size(H, W, k, s, p, d)
    Y, idx = np.empty((N, C, OH, OW), X.dtype), np.empty((N, C, OH, OW), np.int64)
    for n, c, oh, ow in np.ndindex(N, C, OH, OW):
        best, arg = None, -1
        for _, _, h, w in _window_pixels(H, W, oh, ow, k, s, p, d):
            if 0 <= h < H and 0 <= w < W:
                v = X[n, c, h, w]
                if best is None or v > best or np.isnan(v):
                    best, arg = v, h * W + w
        Y[n, c, oh, ow], idx[n, c, oh, ow] = best, arg
    return Y, idx


def naive_max_pool_backward(dY, idx, shape):
    dX = np.zeros(shape, dY.dtype)
    W = shape[3]
    for n, c, oh, ow in np.ndindex(*dY.shape):
        h, w = divmod(int(idx[n, c, oh, ow]), W)
        dX[n, c, h, w] += dY[n, c, oh, ow]
    return dX


def naive_avg_pool(X, k, s, p, count_include_pad):
    N, C, H, W = X.shape
    OH, OW = out_size(H, W, k, s, p, (1, 1))
    Y = np.empty((N, C, OH, OW), X.dtype)
    for n, c, oh, ow in np.ndindex(N, C, OH, OW):
        inside = [(h, w) for _, _, h, w in _window_pixels(H, W, oh, ow, k, s, p, (1, 1))
                  if 0 <= h < H and 0 <= w < W]
        total = sum(X[n, c, h, w] for h, w in inside)
        Y[n, c, oh, ow] = total / (k[0] * k[1] if count_include_pad else len(inside))
    return Y


def naive_avg_pool_backward(dY, shape, k, s, p, count_include_pad):
    N, C, H, W = shape
    dX = np.zeros(shape, dY.dtype)
    for n, c, oh, ow in np.ndindex(*dY.shape):
        inside = [(h, w) for _, _, h, w in _window_pixels(H, W, oh, ow, k, s, p, (1, 1))
                  if 0 <= h < H and 0 <= w < W]
        count = k[0] * k[1] if count_include_pad else len(inside)
        for h, w in inside:
            dX[n, c, h, w] += dY[n, c, oh, ow] / count
    return dX


def naive_channel_bias_act(Z, b, activation):
    """Through the dense reference on the (N·L, C) layout, where b is a row vector as in Dense."""
    N, C, L = Z.shape
    Z2 = np.ascontiguousarray(Z.transpose(0, 2, 1).reshape(N * L, C))
    A2 = REF.bias_act(Z2, b, activation, np.empty_like(Z2) if saves_input(activation) else Z2)
    return A2.reshape(N, L, C).transpose(0, 2, 1)


def random_cases(rng, count):
    """``count`` random small geometries with an output of at least 1x1 (conv cases; some poolable)."""
    cases = []
    while len(cases) < count:
        shape = tuple(int(x) for x in (rng.integers(1, 3), rng.integers(1, 3), *rng.integers(1, 9, 2)))
        k, s, d = (tuple(int(x) for x in rng.integers(1, hi, 2)) for hi in (5, 4, 4))
        p = tuple(int(x) for x in rng.integers(0, 4, 2))
        if min(out_size(shape[2], shape[3], k, s, p, d)) >= 1:
            cases.append((shape, k, s, p, d))
    return cases


def poolable(case):
    _, k, _, p, _ = case
    return p[0] <= k[0] // 2 and p[1] <= k[1] // 2
