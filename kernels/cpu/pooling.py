"""CPU pooling ops: max and average pooling, forward per output, backward as a gather by rows.

The backward passes are gathers by rows, as col2im: each dX row belongs to one loop iteration, which
adds the gradients of the outputs whose window holds its pixels, kernel offset by offset in
row-major order (per pixel the sum, and the order, of a per-pixel gather and of the reference), so
the result does not depend on the thread count. The parallel kernels split the N·C planes over
threads.
"""

import math

from numba import njit, prange

from gpubackprop.kernels import checks
from gpubackprop.kernels.cpu.conv import _valid
from gpubackprop.kernels.reference.conv import expect_int64, expect_shape, window


# ---- max pooling -------------------------------------------------------------------------------
@njit(cache=True, error_model="numpy")
def _max_pool_plane(X, Y, argmax, p, kh, kw, sh, sw, ph, pw, dh, dw):
    C, H, W = X.shape[1], X.shape[2], X.shape[3]
    OH, OW = Y.shape[2], Y.shape[3]
    n, c = p // C, p % C
    ninf = X.dtype.type(-math.inf)
    for oh in range(OH):
        for ow in range(OW):
            best = ninf
            arg = -1
            for i in range(kh):
                h = oh * sh - ph + i * dh
                if h < 0 or h >= H:
                    continue
                for j in range(kw):
                    w = ow * sw - pw + j * dw
                    if w < 0 or w >= W:
                        continue
                    v = X[n, c, h, w]
                    # The window's first pixel, then a strictly larger one or a NaN (PyTorch's rule).
                    if arg < 0 or v > best or v != v:
                        best = v
                        arg = h * W + w
            Y[n, c, oh, ow] = best
            argmax[n, c, oh, ow] = arg


@njit(cache=True, error_model="numpy")
def _max_pool_serial(X, Y, argmax, kh, kw, sh, sw, ph, pw, dh, dw):
    for p in range(X.shape[0] * X.shape[1]):
        _max_pool_plane(X, Y, argmax, p, kh, kw, sh, sw, ph, pw, dh, dw)


@njit(cache=True, error_model="numpy", parallel=True)
def _max_pool_parallel(X, Y, argmax, kh, kw, sh, sw, ph, pw, dh, dw):
    for p in prange(X.shape[0] * X.shape[1]):
        _max_pool_plane(X, Y, argmax, p, kh, kw, sh, sw, ph, pw, dh, dw)


@njit(cache=True, error_model="numpy")
def _max_pool_backward_plane(dY, argmax, dX, p, kh, kw, sh, sw, ph, pw, dh, dw):
    C, H, W = dX.shape[1], dX.shape[2], dX.shape[3]
    OH, OW = dY.shape[2], dY.shape[3]
    n, c = p // C, p % C
    for h in range(H):
        row = dX[n, c, h]
        row[:] = 0
        for i in range(kh):
            hh = h + ph - i * dh  # = oh·sh for the output row that holds row h at offset i
            if hh < 0:
                break  # hh falls as i grows
            oh = hh // sh
            if oh * sh != hh or oh >= OH:
                continue
            for j in range(kw):
                w0 = j * dw - pw
                ow_lo, ow_hi = _valid(w0, sw, W, OW)
                for ow in range(ow_lo, ow_hi):
                    w = w0 + ow * sw
                    if argmax[n, c, oh, ow] == h * W + w:
                        row[w] += dY[n, c, oh, ow]


@njit(cache=True, error_model="numpy")
def _max_pool_backward_serial(dY, argmax, dX, kh, kw, sh, sw, ph, pw, dh, dw):
    for p in range(dX.shape[0] * dX.shape[1]):
        _max_pool_backward_plane(dY, argmax, dX, p, kh, kw, sh, sw, ph, pw, dh, dw)


@njit(cache=True, error_model="numpy", parallel=True)
def _max_pool_backward_parallel(dY, argmax, dX, kh, kw, sh, sw, ph, pw, dh, dw):
    for p in prange(dX.shape[0] * dX.shape[1]):
        _max_pool_backward_plane(dY, argmax, dX, p, kh, kw, sh, sw, ph, pw, dh, dw)


# ---- average pooling ---------------------------------------------------------------------------
@njit(cache=True, error_model="numpy", inline="always")
def _count(oh, ow, kh, kw, sh, sw, ph, pw, H, W, include_pad):
    """The divisor of output (oh, ow): kh·kw, or the number of its window's input pixels."""
    if include_pad:
        return kh * kw
    h0, w0 = oh * sh - ph, ow * sw - pw
    return (min(h0 + kh, H) - max(h0, 0)) * (min(w0 + kw, W) - max(w0, 0))


@njit(cache=True, error_model="numpy")
def _avg_pool_plane(X, Y, p, kh, kw, sh, sw, ph, pw, include_pad):
    C, H, W = X.shape[1], X.shape[2], X.shape[3]
    OH, OW = Y.shape[2], Y.shape[3]
    n, c = p // C, p % C
    t = X.dtype.type
    for oh in range(OH):
        for ow in range(OW):
            s = t(0)
            for i in range(kh):
                h = oh * sh - ph + i
                if h < 0 or h >= H:
                    continue
                for j in range(kw):
                    w = ow * sw - pw + j
                    if w >= 0 and w < W:
                        s += X[n, c, h, w]
            Y[n, c, oh, ow] = s / t(_count(oh, ow, kh, kw, sh, sw, ph, pw, H, W, include_pad))


@njit(cache=True, error_model="numpy")
def _avg_pool_serial(X, Y, kh, kw, sh, sw, ph, pw, include_pad):
    for p in range(X.shape[0] * X.shape[1]):
        _avg_pool_plane(X, Y, p, kh, kw, sh, sw, ph, pw, include_pad)


@njit(cache=True, error_model="numpy", parallel=True)
def _avg_pool_parallel(X, Y, kh, kw, sh, sw, ph, pw, include_pad):
    for p in prange(X.shape[0] * X.shape[1]):
        _avg_pool_plane(X, Y, p, kh, kw, sh, sw, ph, pw, include_pad)


@njit(cache=True, error_model="numpy")
def _avg_pool_backward_plane(dY, dX, p, kh, kw, sh, sw, ph, pw, include_pad):
    C, H, W = dX.shape[1], dX.shape[2], dX.shape[3]
    OH, OW = dY.shape[2], dY.shape[3]
    n, c = p // C, p % C
    t = dX.dtype.type
    for h in range(H):
        row = dX[n, c, h]
        row[:] = 0
        for i in range(kh):
            hh = h + ph - i
            if hh < 0:
                break
            oh = hh // sh
            if oh * sh != hh or oh >= OH:
                continue
            for j in range(kw):
                w0 = j - pw
                ow_lo, ow_hi = _valid(w0, sw, W, OW)
                for ow in range(ow_lo, ow_hi):
                    cnt = _count(oh, ow, kh, kw, sh, sw, ph, pw, H, W, include_pad)
                    row[w0 + ow * sw] += dY[n, c, oh, ow] / t(cnt)


@njit(cache=True, error_model="numpy")
def _avg_pool_backward_serial(dY, dX, kh, kw, sh, sw, ph, pw, include_pad):
    for p in range(dX.shape[0] * dX.shape[1]):
        _avg_pool_backward_plane(dY, dX, p, kh, kw, sh, sw, ph, pw, include_pad)


@njit(cache=True, error_model="numpy", parallel=True)
def _avg_pool_backward_parallel(dY, dX, kh, kw, sh, sw, ph, pw, include_pad):
    for p in prange(dX.shape[0] * dX.shape[1]):
        _avg_pool_backward_plane(dY, dX, p, kh, kw, sh, sw, ph, pw, include_pad)


def pool_args(win):
    """The window as the kernels' int arguments: kh, kw, sh, sw, ph, pw, dh, dw."""
    return win.kernel + win.stride + win.padding + win.dilation


class PoolingOps:
    """Fused pooling ops (a mixin of ``CpuOps``: uses its parallel thresholds)."""

    def max_pool2d(self, X, Y, argmax, kernel, stride, padding, dilation):
        """Y (N, C, OH, OW) = the max of each window of X, argmax (int64) its index h·W + w."""
        checks.float_arrays(checks.NAMES_POOL, X, Y)
        win = window(X, kernel, stride, padding, dilation, pool=True)
        out = X.shape[:2] + win.out
        expect_shape("Y", Y, out)
        expect_shape("argmax", argmax, out)
        expect_int64("argmax", argmax)
        if self.parallel and X.size >= self.par_cheap:
            _max_pool_parallel(X, Y, argmax, *pool_args(win))
        else:
            _max_pool_serial(X, Y, argmax, *pool_args(win))
        return Y, argmax

    def max_pool2d_backward(self, dY, argmax, dX, kernel, stride, padding, dilation):
        """dX (N, C, H, W) = Σ of dY over the outputs whose argmax is the pixel: a gather, written."""
        checks.float_arrays(checks.NAMES_POOL_BACKWARD, dY, dX)
        win = window(dX, kernel, stride, padding, dilation, pool=True, name="dX")
        out = dX.shape[:2] + win.out
        expect_shape("dY", dY, out)
        expect_shape("argmax", argmax, out)
        expect_int64("argmax", argmax)
        if self.parallel and dX.size >= self.par_cheap:
            _max_pool_backward_parallel(dY, argmax, dX, *pool_args(win))
        else:
            _max_pool_backward_serial(dY, argmax, dX, *pool_args(win))
        return dX

    def avg_pool2d(self, X, Y, kernel, stride, padding, count_include_pad=True):
        """Y (N, C, OH, OW) = the mean of each window of X (padding counts as 0)."""
        checks.float_arrays(checks.NAMES_POOL, X, Y)
        win = window(X, kernel, stride, padding, pool=True)
        expect_shape("Y", Y, X.shape[:2] + win.out)
        args = pool_args(win)[:6] + (bool(count_include_pad),)
        if self.parallel and X.size >= self.par_cheap:
            _avg_pool_parallel(X, Y, *args)
        else:
            _avg_pool_serial(X, Y, *args)
        return Y

    def avg_pool2d_backward(self, dY, dX, kernel, stride, padding, count_include_pad=True):
        """dX (N, C, H, W) = Σ of dY / count over the windows holding each pixel: a gather, written."""
        checks.float_arrays(checks.NAMES_POOL_BACKWARD, dY, dX)
        win = window(dX, kernel, stride, padding, pool=True, name="dX")
        expect_shape("dY", dY, dX.shape[:2] + win.out)
        args = pool_args(win)[:6] + (bool(count_include_pad),)
        if self.parallel and dX.size >= self.par_cheap:
            _avg_pool_backward_parallel(dY, dX, *args)
        else:
            _avg_pool_backward_serial(dY, dX, *args)
        return dX
