"""CUDA pooling ops: max and average pooling, a thread an output forward, a thread a pixel backward.

The backward passes are gathers: each input pixel adds the gradients of the outputs whose window
holds it, kernel offsets in row-major order (the reference's order), and writes its gradient once.
No atomics: every result is the same from run to run.
"""

import math

from gpubackprop.kernels import checks
from gpubackprop.kernels.cuda.launch import cuda, kernel_body
from gpubackprop.kernels.cuda.numerics import imax, imin, unravel_nchw
from gpubackprop.kernels.reference.conv import expect_int64, expect_shape, window

WINDOW = "int64, int64, int64, int64, int64, int64, int64, int64"  # kh kw sh sw ph pw dh dw
AVG_WINDOW = "int64, int64, int64, int64, int64, int64, boolean"  # kh kw sh sw ph pw include_pad


# ---- max pooling -------------------------------------------------------------------------------
@kernel_body("void({t}[:, :, :, ::1], {t}[:, :, :, ::1], int64[:, :, :, ::1], " + WINDOW + ")")
def _max_pool(X, Y, argmax, kh, kw, sh, sw, ph, pw, dh, dw):
    N, C, H, W = X.shape
    OH, OW = Y.shape[2], Y.shape[3]
    ninf = X.dtype.type(-math.inf)
    for idx in range(cuda.grid(1), N * C * OH * OW, cuda.gridsize(1)):
        n, c, oh, ow = unravel_nchw(idx, C, OH, OW)
        best = ninf
        arg = -1
        for i in range(kh):
            h = oh * sh - ph + i * dh
            if h >= 0 and h < H:
                for j in range(kw):
                    w = ow * sw - pw + j * dw
                    if w >= 0 and w < W:
                        v = X[n, c, h, w]
                        # The window's first pixel, then a strictly larger one or a NaN (PyTorch's rule).
                        if arg < 0 or v > best or v != v:
                            best = v
                            arg = h * W + w
        Y[n, c, oh, ow] = best
        argmax[n, c, oh, ow] = arg


@kernel_body("void({t}[:, :, :, ::1], int64[:, :, :, ::1], {t}[:, :, :, ::1], " + WINDOW + ")")
def _max_pool_backward(dY, argmax, dX, kh, kw, sh, sw, ph, pw, dh, dw):
    N, C, H, W = dX.shape
    OH, OW = dY.shape[2], dY.shape[3]
    for idx in range(cuda.grid(1), N * C * H * W, cuda.gridsize(1)):
        n, c, h, w = unravel_nchw(idx, C, H, W)
        me = h * W + w
        s = dX.dtype.type(0)
        for i in range(kh):
            hh = h + ph - i * dh  # = oh·sh for the output row that holds (h, w) at offset i
            if hh < 0:
                break
            oh = hh // sh
            if oh * sh != hh or oh >= OH:
                continue
            for j in range(kw):
                ww = w + pw - j * dw
                if ww < 0:
                    break
                ow = ww // sw
                if ow * sw == ww and ow < OW and argmax[n, c, oh, ow] == me:
                    s += dY[n, c, oh, ow]
        dX[n, c, h, w] = s


# ---- average pooling ---------------------------------------------------------------------------
@kernel_body("void({t}[:, :, :, ::1], {t}[:, :, :, ::1], " + AVG_WINDOW + ")")
def _avg_pool(X, Y, kh, kw, sh, sw, ph, pw, include_pad):
    N, C, H, W = X.shape
    OH, OW = Y.shape[2], Y.shape[3]
    for idx in range(cuda.grid(1), N * C * OH * OW, cuda.gridsize(1)):
        n, c, oh, ow = unravel_nchw(idx, C, OH, OW)
        h0 = oh * sh - ph
        w0 = ow * sw - pw
        s = X.dtype.type(0)
        for i in range(kh):
            h = h0 + i
            if h >= 0 and h < H:
                for j in range(kw):
                    w = w0 + j
                    if w >= 0 and w < W:
                        s += X[n, c, h, w]
        if include_pad:
            cnt = kh * kw
        else:
            cnt = (imin(h0 + kh, H) - imax(h0, 0)) * (imin(w0 + kw, W) - imax(w0, 0))
        Y[n, c, oh, ow] = s / X.dtype.type(cnt)


@kernel_body("void({t}[:, :, :, ::1], {t}[:, :, :, ::1], " + AVG_WINDOW + ")")
def _avg_pool_backward(dY, dX, kh, kw, sh, sw, ph, pw, include_pad):
    N, C, H, W = dX.shape
    OH, OW = dY.shape[2], dY.shape[3]
    for idx in range(cuda.grid(1), N * C * H * W, cuda.gridsize(1)):
        n, c, h, w = unravel_nchw(idx, C, H, W)
        s = dX.dtype.type(0)
        for i in range(kh):
            hh = h + ph - i
            if hh < 0:
                break
            oh = hh // sh
            if oh * sh != hh or oh >= OH:
                continue
            h0 = hh - ph
            for j in range(kw):
                ww = w + pw - j
                if ww < 0:
                    break
                ow = ww // sw
                if ow * sw == ww and ow < OW:
                    if include_pad:
                        cnt = kh * kw
                    else:
                        w0 = ww - pw
                        cnt = (imin(h0 + kh, H) - imax(h0, 0)) * (imin(w0 + kw, W) - imax(w0, 0))
                    s += dY[n, c, oh, ow] / dX.dtype.type(cnt)
        dX[n, c, h, w] = s


def pool_args(win):
    """The window as the kernels' int arguments: kh, kw, sh, sw, ph, pw, dh, dw."""
    return win.kernel + win.stride + win.padding + win.dilation


class PoolingOps:
    """Fused pooling ops (a mixin of ``CudaOps``: uses its launcher)."""

    def max_pool2d(self, X, Y, argmax, kernel, stride, padding, dilation):
        """Y (N, C, OH, OW) = the max of each window of X, argmax (int64) its index h·W + w."""
        dt = checks.float_arrays(checks.NAMES_POOL, X, Y)
        win = window(X, kernel, stride, padding, dilation, pool=True)
        out = tuple(X.shape[:2]) + win.out
        expect_shape("Y", Y, out)
        expect_shape("argmax", argmax, out)
        expect_int64("argmax", argmax)
        self.launch(_max_pool, Y.size, dt, X, Y, argmax, *pool_args(win))
        return Y, argmax

    def max_pool2d_backward(self, dY, argmax, dX, kernel, stride, padding, dilation):
        """dX (N, C, H, W) = Σ of dY over the outputs whose argmax is the pixel: a thread a pixel."""
        dt = checks.float_arrays(checks.NAMES_POOL_BACKWARD, dY, dX)
        win = window(dX, kernel, stride, padding, dilation, pool=True, name="dX")
        out = tuple(dX.shape[:2]) + win.out
        expect_shape("dY", dY, out)
        expect_shape("argmax", argmax, out)
        expect_int64("argmax", argmax)
        self.launch(_max_pool_backward, dX.size, dt, dY, argmax, dX, *pool_args(win))
        return dX

    def avg_pool2d(self, X, Y, kernel, stride, padding, count_include_pad=True):
        """Y (N, C, OH, OW) = the mean of each window of X (padding counts as 0), a thread an output."""
        dt = checks.float_arrays(checks.NAMES_POOL, X, Y)
        win = window(X, kernel, stride, padding, pool=True)
        expect_shape("Y", Y, tuple(X.shape[:2]) + win.out)
        args = pool_args(win)[:6] + (bool(count_include_pad),)
        self.launch(_avg_pool, Y.size, dt, X, Y, *args)
        return Y

    def avg_pool2d_backward(self, dY, dX, kernel, stride, padding, count_include_pad=True):
        """dX (N, C, H, W) = Σ of dY / count over the windows holding each pixel: a thread a pixel."""
        dt = checks.float_arrays(checks.NAMES_POOL_BACKWARD, dY, dX)
        win = window(dX, kernel, stride, padding, pool=True, name="dX")
        expect_shape("dY", dY, tuple(dX.shape[:2]) + win.out)
        args = pool_args(win)[:6] + (bool(count_include_pad),)
        self.launch(_avg_pool_backward, dX.size, dt, dY, dX, *args)
        return dX
