"""CPU pooling ops: max and average pooling, forward per output row, backward per plane.

Each dX plane belongs to one loop iteration. Average pooling's backward is a gather by rows, as
col2im: each row adds the gradients of the outputs whose window holds its pixels, kernel offset by
offset in row-major order; max pooling's is a scatter of each output's gradient to its argmax in
an order that adds the same terms in the same order. Either way each pixel's sum is the
reference's, bit for bit, and does not depend on the thread count. The parallel kernels split the
N·C planes over threads. Max pooling over tiling windows (kernel == stride, no padding, dilation 1:
MaxPool2d(k)) has its own kernels: one pass per window, forward and backward (measured below).
"""

import math

import numba
import numpy as np
from numba import njit, prange

from gpubackprop.kernels import checks
from gpubackprop.kernels.cpu.conv import _valid
from gpubackprop.kernels.reference.conv import expect_int64, expect_shape, window


# ---- max pooling -------------------------------------------------------------------------------
# Flat arrays with uint64 indices (as im2col in conv.py): with signed indices Numba wraps negative
# ones, a compare and a select per access. Every index is formed in int64 and is >= 0 by
# construction before the cast.
@njit(cache=True, error_model="numpy")
def _ow_ranges(kw, sw, pw, dw, W, OW):
    """Per kernel column j, [lo, hi) of the outputs whose pixel lies inside: once a call, since
    the two integer divisions of _valid per output row and offset cost more than the row itself."""
    r = np.empty((kw, 2), np.int64)
    for j in range(kw):
        r[j, 0], r[j, 1] = _valid(j * dw - pw, sw, W, OW)
    return r


@njit(cache=True, error_model="numpy")
def _max_pool_plane(x, y, am, p, H, W, OH, OW, kh, kw, sh, sw, ph, pw, dh, dw, ranges):
    """Plane p of the flat X, Y and argmax: per output row, the kernel offsets in row-major order,
    each a pass over the row's outputs with selects, not branches (a window's compares are coin
    tosses on random data: branching on them cost ~90 cycles a window in mispredictions)."""
    u = np.uint64
    ninf = y.dtype.type(-math.inf)
    xb = p * H * W
    for oh in range(OH):
        ob = (p * OH + oh) * OW
        for t in range(u(OW)):
            y[u(ob) + t] = ninf
            am[u(ob) + t] = -1
        for i in range(kh):
            h = oh * sh - ph + i * dh
            if h < 0 or h >= H:
                continue
            for j in range(kw):
                ow_lo, ow_hi = ranges[j, 0], ranges[j, 1]
                s0 = h * W + j * dw - pw + ow_lo * sw  # pixel of output ow_lo, inside the plane
                o0 = ob + ow_lo
                for t in range(u(ow_hi - ow_lo)):
                    idx = s0 + np.int64(t) * sw
                    v = x[u(xb + idx)]
                    o = u(o0) + t
                    b = y[o]
                    a = am[o]
                    # The window's first pixel, then a strictly larger one or a NaN (PyTorch's rule).
                    take = (a < 0) | (v > b) | (v != v)
                    y[o] = v if take else b
                    am[o] = idx if take else a


@njit(cache=True, error_model="numpy")
def _max_pool_serial(X, Y, argmax, kh, kw, sh, sw, ph, pw, dh, dw):
    N, C, H, W = X.shape
    OH, OW = Y.shape[2], Y.shape[3]
    x, y, am = X.reshape(-1), Y.reshape(-1), argmax.reshape(-1)
    ranges = _ow_ranges(kw, sw, pw, dw, W, OW)
    for p in range(N * C):
        _max_pool_plane(x, y, am, p, H, W, OH, OW, kh, kw, sh, sw, ph, pw, dh, dw, ranges)


@njit(cache=True, error_model="numpy", parallel=True)
def _max_pool_parallel(X, Y, argmax, kh, kw, sh, sw, ph, pw, dh, dw):
    N, C, H, W = X.shape
    OH, OW = Y.shape[2], Y.shape[3]
    x, y, am = X.reshape(-1), Y.reshape(-1), argmax.reshape(-1)
    ranges = _ow_ranges(kw, sw, pw, dw, W, OW)
    for p in prange(N * C):
        _max_pool_plane(x, y, am, p, H, W, OH, OW, kh, kw, sh, sw, ph, pw, dh, dw, ranges)


# ---- max pooling over tiling windows: kernel == stride, no padding, dilation 1 (MaxPool2d(k)) ----
# Each pixel lies in at most one window, and every window lies inside the plane: no bounds logic,
# each output row reads kh whole input rows, and the backward is a pure write of each window (its
# argmax pixel gets 0 + dY, the others 0 + 0: the reference's one term, bit for bit; + 0 because
# 0 + -0.0 is +0.0), no zeroing pass. The row loops run over the outputs with the window unrolled
# (kh, kw are constants where the dispatch below inlines 2 or 3) and selects, so LLVM vectorizes
# them: 8 outputs a step, the strided loads split into even and odd lanes. It vectorizes a row as
# short as VGG's (OW = 16, 8) only without runtime alias checks between X, Y and argmax: with them
# a plain njit loop keeps every row under 24 outputs scalar (its IR: `icmp ult OW, 24`). Numba
# marks the arrays of a parfor's body noalias, so these kernels are parfors only, and the
# launcher runs them on this thread alone below the parallel threshold (``_run_tiles``).
# Measured (2-core AMD EPYC znver4, busy with other jobs; float32; interleaved medians of 60
# rounds, forward then backward per layer, /tmp script, 2 calls each; general kernel -> these):
#   VGG, MaxPool2d(2) on 64x32x32x32 and 64x64x16x16: forward 5.76 -> 1.19 ms, backward 3.95 ->
#     1.24 ms (sum 9.72 -> 2.42); the same plane code as a plain njit loop: forward 3.13 ms;
#   LeNet-5, on 128x6x28x28 and 128x16x10x10: forward 1.65 -> 0.28 ms, backward 0.58 -> 0.33 ms
#     (sum 2.22 -> 0.61; the rows' rounding up to 8, ``_row_length``, in a kernel A/B: forward
#     0.56 -> 0.23 ms, backward 0.45 -> 0.29 ms).
# In the VGG step (prof.py vgg 10, runs alternated, very noisy): max_pool2d 6.5-11.7 -> 1.0-2.1
# ms, max_pool2d_backward 4.4-7.8 -> 1.3-4.1 ms; there the backward reads argmax and dY from
# memory: the int64 argmax is 8 of the 28 bytes an output moves each way at 2x2.
# Both kernels on 2 threads there (forced): 1.8-11 ms and 1.9-11 ms, so the parallel threshold
# (PAR_MIN_CHEAP) stands for them as for the other ops.
@njit(cache=True, error_model="numpy", inline="always")
def _row_length(oh, H, W, OH, OW, kh, kw):
    """The outputs output row oh's loop runs over: OW rounded up to 8 (whole vector steps; a row of
    fewer than 8 is otherwise all scalar, LeNet's 14 and 5 mostly), where the extra ones stay in
    the plane: they read pixels of the rows below and write outputs (or, backward, pixels) of the
    rows below, which this call writes again after. The plane's last rows: OW."""
    n = (OW + 7) // 8 * 8
    if oh * OW + n <= OH * OW and oh * kh * W + (kh - 1) * W + n * kw <= H * W:
        return n
    return OW


@njit(cache=True, error_model="numpy", inline="always")
def _max_pool_tiles_plane(x, y, am, p, H, W, OH, OW, kh, kw):
    """Plane p of the flat X, Y and argmax: per output, the window in row-major order (selects)."""
    u = np.uint64
    xb = p * H * W
    for oh in range(OH):
        ob = (p * OH + oh) * OW
        rb = oh * kh * W  # the window's first row, in the plane
        for ow in range(u(_row_length(oh, H, W, OH, OW, kh, kw))):
            c = rb + np.int64(ow) * kw
            b = x[u(xb + c)]  # the window's first pixel, then a strictly larger one or a NaN
            a = c
            for j in range(1, kw):
                v = x[u(xb + c + j)]
                take = (v > b) | (v != v)
                b = v if take else b
                a = c + j if take else a
            for i in range(1, kh):
                for j in range(kw):
                    idx = c + i * W + j
                    v = x[u(xb + idx)]
                    take = (v > b) | (v != v)
                    b = v if take else b
                    a = idx if take else a
            y[u(ob) + ow] = b
            am[u(ob) + ow] = a


@njit(cache=True, error_model="numpy", parallel=True)
def _max_pool_tiles(X, Y, argmax, kh, kw):
    N, C, H, W = X.shape
    OH, OW = Y.shape[2], Y.shape[3]
    x, y, am = X.reshape(-1), Y.reshape(-1), argmax.reshape(-1)
    for p in prange(N * C):
        # Literal sizes into the inlined body: its window loops unroll.
        if kh == 2 and kw == 2:
            _max_pool_tiles_plane(x, y, am, p, H, W, OH, OW, 2, 2)
        elif kh == 3 and kw == 3:
            _max_pool_tiles_plane(x, y, am, p, H, W, OH, OW, 3, 3)
        else:
            _max_pool_tiles_plane(x, y, am, p, H, W, OH, OW, kh, kw)


@njit(cache=True, error_model="numpy", inline="always")
def _max_pool_tiles_backward_plane(dy, am, dx, p, H, W, OH, OW, kh, kw):
    """dX plane p (flat), written row by row: a window's pixels get 0 + (dY at its argmax, else
    0); the pixels of no window (the cropped last rows and columns) 0."""
    u = np.uint64
    zero = dx.dtype.type(0)
    xb = p * H * W
    for oh in range(OH):
        ob = (p * OH + oh) * OW
        rb = oh * kh * W
        n = _row_length(oh, H, W, OH, OW, kh, kw)
        for i in range(kh):
            r = xb + rb + i * W  # row i of the windows, flat
            for ow in range(u(n)):
                g = dy[u(ob) + ow]
                d = am[u(ob) + ow] - (rb + np.int64(ow) * kw)  # the argmax, from the window's corner
                for j in range(kw):
                    dx[u(r) + ow * u(kw) + u(j)] = (g if d == i * W + j else zero) + zero
            for w in range(OW * kw, W):
                dx[u(r + w)] = zero
    for t in range(u(OH * kh * W), u(H * W)):
        dx[u(xb) + t] = zero


@njit(cache=True, error_model="numpy", parallel=True)
def _max_pool_tiles_backward(dY, argmax, dX, kh, kw):
    N, C, H, W = dX.shape
    OH, OW = dY.shape[2], dY.shape[3]
    dy, am, dx = dY.reshape(-1), argmax.reshape(-1), dX.reshape(-1)
    for p in prange(N * C):
        if kh == 2 and kw == 2:
            _max_pool_tiles_backward_plane(dy, am, dx, p, H, W, OH, OW, 2, 2)
        elif kh == 3 and kw == 3:
            _max_pool_tiles_backward_plane(dy, am, dx, p, H, W, OH, OW, 3, 3)
        else:
            _max_pool_tiles_backward_plane(dy, am, dx, p, H, W, OH, OW, kh, kw)


@njit(cache=True, error_model="numpy", inline="always")
def _on_grid(d, step, k):
    """Whether d = i·step for an i in [0, k): the kernel offset of a pixel at distance d."""
    if step == 1:
        return np.uint64(d) < np.uint64(k)  # one compare: d < 0 wraps to a huge value
    return d >= 0 and d % step == 0 and d // step < k


@njit(cache=True, error_model="numpy")
def _max_pool_backward_plane(dy, am, dx, p, H, W, OH, OW, kh, kw, sh, sw, ph, pw, dh, dw):
    """dX plane p (flat), owned by this call: zeroed, then each output adds its dY to its argmax
    pixel, outputs in reverse row-major order. A pixel is the argmax of at most one output per
    kernel offset, and the outputs that hold it at offsets (i, j) in row-major order are those
    (oh, ow) in reverse row-major order: so each pixel's sum runs over the offsets in the
    reference's order, bit for bit. An argmax that is not a pixel of its output's window adds
    nothing (as in the reference)."""
    u = np.uint64
    zero = dx.dtype.type(0)
    HW = H * W
    xb = p * HW
    inv_w = 1.0 / W
    for t in range(u(HW)):
        dx[u(xb) + t] = zero
    for oh in range(OH - 1, -1, -1):
        ob = (p * OH + oh) * OW
        h0 = oh * sh - ph
        for ow in range(OW - 1, -1, -1):
            a = am[u(ob + ow)]
            if u(a) >= u(HW):  # outside the plane (a < 0 included)
                continue
            # a // W without a 64-bit division (~40 cycles here): a float quotient, off by one at most.
            h = np.int64(np.float64(a) * inv_w)
            if h * W > a:
                h -= 1
            elif (h + 1) * W <= a:
                h += 1
            if _on_grid(h - h0, dh, kh) and _on_grid(a - h * W - (ow * sw - pw), dw, kw):
                dx[u(xb + a)] += dy[u(ob + ow)]


@njit(cache=True, error_model="numpy")
def _max_pool_backward_serial(dY, argmax, dX, kh, kw, sh, sw, ph, pw, dh, dw):
    N, C, H, W = dX.shape
    OH, OW = dY.shape[2], dY.shape[3]
    dy, am, dx = dY.reshape(-1), argmax.reshape(-1), dX.reshape(-1)
    for p in range(N * C):
        _max_pool_backward_plane(dy, am, dx, p, H, W, OH, OW, kh, kw, sh, sw, ph, pw, dh, dw)


@njit(cache=True, error_model="numpy", parallel=True)
def _max_pool_backward_parallel(dY, argmax, dX, kh, kw, sh, sw, ph, pw, dh, dw):
    N, C, H, W = dX.shape
    OH, OW = dY.shape[2], dY.shape[3]
    dy, am, dx = dY.reshape(-1), argmax.reshape(-1), dX.reshape(-1)
    for p in prange(N * C):
        _max_pool_backward_plane(dy, am, dx, p, H, W, OH, OW, kh, kw, sh, sw, ph, pw, dh, dw)


# ---- average pooling ---------------------------------------------------------------------------
@njit(cache=True, error_model="numpy", inline="always")
def _count(oh, ow, kh, kw, sh, sw, ph, pw, H, W, include_pad):
    """The divisor of output (oh, ow): kh·kw, or the number of its window's input pixels."""
    if include_pad:
        return kh * kw
    h0, w0 = oh * sh - ph, ow * sw - pw
    return (min(h0 + kh, H) - max(h0, 0)) * (min(w0 + kw, W) - max(w0, 0))


@njit(cache=True, error_model="numpy")
def _avg_pool_plane(x, y, p, H, W, OH, OW, kh, kw, sh, sw, ph, pw, include_pad, ranges):
    """Plane p of the flat X and Y: per output row, the sum over the kernel offsets in row-major
    order, each a pass over the row's outputs (flat, uint64 indices), then the division."""
    u = np.uint64
    t = y.dtype.type
    zero = t(0)
    xb = p * H * W
    for oh in range(OH):
        ob = (p * OH + oh) * OW
        for q in range(u(OW)):
            y[u(ob) + q] = zero
        for i in range(kh):
            h = oh * sh - ph + i
            if h < 0 or h >= H:
                continue
            for j in range(kw):
                ow_lo, ow_hi = ranges[j, 0], ranges[j, 1]
                s0 = xb + h * W + j - pw + ow_lo * sw  # pixel of output ow_lo, inside the plane
                o0 = u(ob + ow_lo)
                if sw == 1:
                    for q in range(u(ow_hi - ow_lo)):
                        y[o0 + q] += x[u(s0) + q]
                else:
                    for q in range(u(ow_hi - ow_lo)):
                        y[o0 + q] += x[u(s0) + q * u(sw)]
        for ow in range(OW):
            o = u(ob + ow)
            y[o] = y[o] / t(_count(oh, ow, kh, kw, sh, sw, ph, pw, H, W, include_pad))


@njit(cache=True, error_model="numpy")
def _avg_pool_serial(X, Y, kh, kw, sh, sw, ph, pw, include_pad):
    N, C, H, W = X.shape
    OH, OW = Y.shape[2], Y.shape[3]
    x, y = X.reshape(-1), Y.reshape(-1)
    ranges = _ow_ranges(kw, sw, pw, 1, W, OW)
    for p in range(N * C):
        _avg_pool_plane(x, y, p, H, W, OH, OW, kh, kw, sh, sw, ph, pw, include_pad, ranges)


@njit(cache=True, error_model="numpy", parallel=True)
def _avg_pool_parallel(X, Y, kh, kw, sh, sw, ph, pw, include_pad):
    N, C, H, W = X.shape
    OH, OW = Y.shape[2], Y.shape[3]
    x, y = X.reshape(-1), Y.reshape(-1)
    ranges = _ow_ranges(kw, sw, pw, 1, W, OW)
    for p in prange(N * C):
        _avg_pool_plane(x, y, p, H, W, OH, OW, kh, kw, sh, sw, ph, pw, include_pad, ranges)


@njit(cache=True, error_model="numpy")
def _avg_pool_backward_plane(dy, dx, p, H, W, OH, OW, kh, kw, sh, sw, ph, pw, include_pad, ranges):
    """dX plane p (flat), owned by this call: g = dY / count once per output, then each row zeroed
    and, per kernel offset (i, j) in row-major order, the g of the outputs that read its pixels
    added (each pixel at most once per offset): the reference's sum, in its order."""
    u = np.uint64
    t = dx.dtype.type
    zero = t(0)
    g = np.empty(OH * OW, dx.dtype)
    for oh in range(OH):
        for ow in range(OW):
            o = oh * OW + ow
            g[o] = dy[u(p * OH * OW + o)] / t(_count(oh, ow, kh, kw, sh, sw, ph, pw, H, W, include_pad))
    for h in range(H):
        rb = (p * H + h) * W
        for q in range(u(W)):
            dx[u(rb) + q] = zero
        for i in range(kh):
            hh = h + ph - i  # = oh·sh for the output row that holds row h at offset i
            if hh < 0:
                break  # hh falls as i grows
            oh = hh // sh
            if oh * sh != hh or oh >= OH:
                continue
            for j in range(kw):
                ow_lo, ow_hi = ranges[j, 0], ranges[j, 1]
                d0 = rb + j - pw + ow_lo * sw  # the pixel output ow_lo reads, inside the row
                g0 = u(oh * OW + ow_lo)
                if sw == 1:
                    for q in range(u(ow_hi - ow_lo)):
                        dx[u(d0) + q] += g[g0 + q]
                else:
                    for q in range(u(ow_hi - ow_lo)):
                        dx[u(d0) + q * u(sw)] += g[g0 + q]


@njit(cache=True, error_model="numpy")
def _avg_pool_backward_serial(dY, dX, kh, kw, sh, sw, ph, pw, include_pad):
    N, C, H, W = dX.shape
    OH, OW = dY.shape[2], dY.shape[3]
    dy, dx = dY.reshape(-1), dX.reshape(-1)
    ranges = _ow_ranges(kw, sw, pw, 1, W, OW)
    for p in range(N * C):
        _avg_pool_backward_plane(dy, dx, p, H, W, OH, OW, kh, kw, sh, sw, ph, pw, include_pad, ranges)


@njit(cache=True, error_model="numpy", parallel=True)
def _avg_pool_backward_parallel(dY, dX, kh, kw, sh, sw, ph, pw, include_pad):
    N, C, H, W = dX.shape
    OH, OW = dY.shape[2], dY.shape[3]
    dy, dx = dY.reshape(-1), dX.reshape(-1)
    ranges = _ow_ranges(kw, sw, pw, 1, W, OW)
    for p in prange(N * C):
        _avg_pool_backward_plane(dy, dx, p, H, W, OH, OW, kh, kw, sh, sw, ph, pw, include_pad, ranges)


# Input elements from which max pooling over tiling windows runs the tiling kernels: below, the
# general serial kernel's scalar rows cost less than a parallel launch (~4 µs, one thread too).
TILES_MIN = 1 << 12
# ... and the backward from outputs this wide: on narrower rows (rounded up to 8 outputs,
# ``_row_length``) it loses to the general gather. Measured (2-core AMD EPYC znver3, float32,
# medians of 50 calls, 2x2 windows; outputs a row: tiles / general ms): LeNet-5's 128x16x10x10
# (5) 0.634 / 0.188; 64x64x16x16 (8, VGG's second pool) 3.73 / 1.09; 64x16x18x18 (9) 0.36 /
# 0.32; 64x16x20x20 (10) 0.58 / 0.36; 64x16x24x24 (12) 0.44 / 0.55; 128x6x28x28 (14) 0.57 /
# 0.66; 64x32x32x32 (16) 1.49 / 3.49; 64x8x64x64 (32) 1.08 / 2.64.
TILES_BACKWARD_MIN_OW = 12


def _tiles(win):
    """Whether the windows tile the plane: kernel == stride, no padding, dilation 1."""
    return win.kernel == win.stride and win.padding == (0, 0) and win.dilation == (1, 1)


def _run_tiles(kernel, parallel, *args):
    """A tiling kernel (a parfor) on Numba's threads, or on this thread alone unless ``parallel``
    (Numba's thread count is per calling thread; restored after)."""
    if parallel:
        kernel(*args)
        return
    threads = numba.get_num_threads()
    numba.set_num_threads(1)
    try:
        kernel(*args)
    finally:
        numba.set_num_threads(threads)


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
        parallel = self.parallel and X.size >= self.par_cheap
        if _tiles(win) and X.size >= TILES_MIN:
            _run_tiles(_max_pool_tiles, parallel, X, Y, argmax, *win.kernel)
        elif parallel:
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
        parallel = self.parallel and dX.size >= self.par_cheap
        if _tiles(win) and dX.size >= TILES_MIN and win.out[1] >= TILES_BACKWARD_MIN_OW:
            _run_tiles(_max_pool_tiles_backward, parallel, dY, argmax, dX, *win.kernel)
        elif parallel:
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
