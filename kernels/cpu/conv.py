"""CPU convolution ops: im2col, col2im, the per-channel bias + activation, BP4 per channel.

Every output element is written by one loop iteration, so the result does not depend on the thread
count. col2im is a gather by rows: each dX row belongs to one iteration, which adds the column
entries that read its pixels, kernel offset by offset in row-major order (per pixel the sum, and the
order, of a per-pixel gather and of the reference). The parallel kernels split the N·C planes (or
the C channels) over threads; the launcher takes them only above the set's size thresholds.
"""

import numpy as np
from numba import njit, prange

from gpubackprop.kernels import checks
from gpubackprop.kernels.cpu import blas
from gpubackprop.kernels.cpu.dense import (
    ACT_CODE,
    GELU,
    IDENTITY,
    LEAKY_RELU,
    RELU,
    SIGMOID,
    TANH,
    _gelu,
    _gelu_tanh,
    _leaky_relu,
    _relu,
    _sigmoid,
)
from gpubackprop.kernels.cpu.normalization import LANES, SHORT_COLUMNS, _add_lanes, _lanes_total
from gpubackprop.kernels.cpu.numerics import _span, _tanh
from gpubackprop.kernels.reference import GELU_C, GELU_K, LEAKY_SLOPE
from gpubackprop.kernels.reference.conv import (
    check_channel_bias_act,
    check_channel_bias_grad,
    cols_shape,
    expect_shape,
    window,
)
from gpubackprop.kernels.reference.dense import SQRT1_2


@njit(cache=True, error_model="numpy", inline="always")
def _valid(start, step, size, count):
    """[lo, hi): the k in range(count) with 0 <= start + k·step < size (step >= 1)."""
    lo = 0 if start >= 0 else (step - 1 - start) // step
    hi = 0 if start >= size else (size - 1 - start) // step + 1
    lo = min(lo, count)
    hi = min(max(hi, lo), count)
    return lo, hi


# ---- flat copies with uint64 indices ----------------------------------------------------------------
# Numba wraps negative indices (a compare and a select per access) unless the index is unsigned; with
# int64 indices these copies ran at scalar speed (im2col of a 22-sample chunk of a VGG 32->32 3x3
# layer, 23.6 MiB of columns: 3.6 ms warm), with uint64 ones LLVM turns them into vector copies (1.3 ms).
# Every index below is formed in int64, checked >= 0 by construction, and cast once.
@njit(cache=True, error_model="numpy", inline="always")
def _fill(dst, d, count, value):
    """dst[d : d + count] = value (d, count: uint64)."""
    for t in range(count):
        dst[d + t] = value


@njit(cache=True, error_model="numpy", inline="always")
def _copy(dst, d, src, s, count, step):
    """dst[d + t] = src[s + t·step] for t < count (all uint64)."""
    if step == 1:
        for t in range(count):
            dst[d + t] = src[s + t]
    else:
        for t in range(count):
            dst[d + t] = src[s + t * step]


@njit(cache=True, error_model="numpy", inline="always")
def _add(dst, d, src, s, count, step):
    """dst[d + t·step] += src[s + t] for t < count (all uint64)."""
    if step == 1:
        for t in range(count):
            dst[d + t] += src[s + t]
    else:
        for t in range(count):
            dst[d + t * step] += src[s + t]


# ---- im2col: cols[n, (c·kh + i)·kw + j, oh·OW + ow] = X[n, c, oh·sh − ph + i·dh, ow·sw − pw + j·dw] ----
# (batch-inner columns: cols[(c·kh + i)·kw + j, n, oh·OW + ow], the same rows at other offsets)
@njit(cache=True, error_model="numpy")
def _im2col_plane(x, cols, p, C, H, W, kh, kw, sh, sw, ph, pw, dh, dw, OH, OW, rs, ss):
    """The kh·kw column rows of plane p = n·C + c, from the flat X ``x`` into the flat ``cols``
    (row r of sample n at r·rs + n·ss): per output row one strided copy of the pixels inside, zeros
    for those in the padding."""
    u = np.uint64
    zero = cols.dtype.type(0)
    n, c = p // C, p % C
    xb = p * H * W
    for i in range(kh):
        oh_lo, oh_hi = _valid(i * dh - ph, sh, H, OH)  # the output rows whose pixel is inside
        for j in range(kw):
            rb = ((c * kh + i) * kw + j) * rs + n * ss  # row (c·kh + i)·kw + j of sample n
            w0 = j * dw - pw
            ow_lo, ow_hi = _valid(w0, sw, W, OW)
            _fill(cols, u(rb), u(oh_lo * OW), zero)
            for oh in range(oh_lo, oh_hi):
                d = rb + oh * OW
                s = xb + (oh * sh - ph + i * dh) * W + w0 + ow_lo * sw  # >= 0: ow_lo is inside
                _fill(cols, u(d), u(ow_lo), zero)
                _copy(cols, u(d + ow_lo), x, u(s), u(ow_hi - ow_lo), u(sw))
                _fill(cols, u(d + ow_hi), u(OW - ow_hi), zero)
            _fill(cols, u(rb + oh_hi * OW), u((OH - oh_hi) * OW), zero)


@njit(cache=True, error_model="numpy", nogil=True)  # (Conv2d's two halves run on two threads)
def _im2col_serial(X, cols, kh, kw, sh, sw, ph, pw, dh, dw, OW, rs, ss):
    N, C, H, W = X.shape
    x, c = X.reshape(-1), cols.reshape(-1)
    for p in range(N * C):
        _im2col_plane(x, c, p, C, H, W, kh, kw, sh, sw, ph, pw, dh, dw, cols.shape[2] // OW, OW, rs, ss)


@njit(cache=True, error_model="numpy", parallel=True)
def _im2col_parallel(X, cols, kh, kw, sh, sw, ph, pw, dh, dw, OW, rs, ss):
    N, C, H, W = X.shape
    x, c = X.reshape(-1), cols.reshape(-1)
    for p in prange(N * C):
        _im2col_plane(x, c, p, C, H, W, kh, kw, sh, sw, ph, pw, dh, dw, cols.shape[2] // OW, OW, rs, ss)


# ---- col2im: dX[n, c, h, w] = Σ over the (i, j) whose window position is integral and in range ------
@njit(cache=True, error_model="numpy")
def _col2im_plane(dcols, dx, p, C, H, W, kh, kw, sh, sw, ph, pw, dh, dw, OH, OW, rs, ss):
    """One dX plane (flat ``dx``), owned by this call: zeroed, then for each kernel offset (i, j) in
    row-major order every pixel adds the column entry that read it. A pixel is read at most once per
    offset, so its sum runs over the offsets in the gather's (and the reference's) order, bit for
    bit. Rows of ``dcols`` as im2col's (r·rs + n·ss)."""
    u = np.uint64
    n, c = p // C, p % C
    xb = p * H * W
    _fill(dx, u(xb), u(H * W), dx.dtype.type(0))
    for i in range(kh):
        oh_lo, oh_hi = _valid(i * dh - ph, sh, H, OH)
        for j in range(kw):
            rb = ((c * kh + i) * kw + j) * rs + n * ss
            w0 = j * dw - pw
            ow_lo, ow_hi = _valid(w0, sw, W, OW)
            for oh in range(oh_lo, oh_hi):
                d = xb + (oh * sh - ph + i * dh) * W + w0 + ow_lo * sw
                _add(dx, u(d), dcols, u(rb + oh * OW + ow_lo), u(ow_hi - ow_lo), u(sw))


@njit(cache=True, error_model="numpy", nogil=True)
def _col2im_serial(dcols, dX, kh, kw, sh, sw, ph, pw, dh, dw, OW, rs, ss):
    N, C, H, W = dX.shape
    c, dx = dcols.reshape(-1), dX.reshape(-1)
    for p in range(N * C):
        _col2im_plane(c, dx, p, C, H, W, kh, kw, sh, sw, ph, pw, dh, dw, dcols.shape[2] // OW, OW, rs, ss)


@njit(cache=True, error_model="numpy", parallel=True)
def _col2im_parallel(dcols, dX, kh, kw, sh, sw, ph, pw, dh, dw, OW, rs, ss):
    N, C, H, W = dX.shape
    c, dx = dcols.reshape(-1), dX.reshape(-1)
    for p in prange(N * C):
        _col2im_plane(c, dx, p, C, H, W, kh, kw, sh, sw, ph, pw, dh, dw, dcols.shape[2] // OW, OW, rs, ss)


# ---- Z[n, c, :] += b[c]; A = σ(Z): rows of the (N·C, L) view, row r in channel r % C -----------------
@njit(cache=True, error_model="numpy", inline="always")
def _act_row(src, dst, bias, act, r):
    """dst[r, :] = σ(src[r, :] + bias); one activation per loop so that LLVM can vectorize it."""
    t = src.dtype.type
    zero, one, half = t(0), t(1), t(0.5)
    slope, c, k, s = t(LEAKY_SLOPE), t(GELU_C), t(GELU_K), t(SQRT1_2)
    L = src.shape[1]
    if act == IDENTITY:
        for m in range(L):
            dst[r, m] = src[r, m] + bias
    elif act == SIGMOID:
        for m in range(L):
            dst[r, m] = _sigmoid(src[r, m] + bias, zero, one)
    elif act == TANH:
        for m in range(L):
            dst[r, m] = _tanh(src[r, m] + bias)
    elif act == RELU:
        for m in range(L):
            dst[r, m] = _relu(src[r, m] + bias, zero)
    elif act == LEAKY_RELU:
        for m in range(L):
            dst[r, m] = _leaky_relu(src[r, m] + bias, zero, slope)
    elif act == GELU:
        for m in range(L):
            dst[r, m] = _gelu(src[r, m] + bias, half, s)
    else:  # GELU_TANH
        for m in range(L):
            dst[r, m] = _gelu_tanh(src[r, m] + bias, half, one, c, k)


@njit(cache=True, error_model="numpy")
def _channel_rows(Z, b, A, act, inplace, r0, r1):
    C = b.shape[0]
    nz = Z.dtype.type(-0.0)  # z + (-0.0) is z for every z, -0.0 included (z + 0.0 is not)
    for r in range(r0, r1):
        bias = b[r % C]
        if inplace:
            # One array in the loop: with two names for one buffer LLVM's alias check fails.
            _act_row(Z, Z, bias, act, r)
        else:
            for m in range(Z.shape[1]):
                Z[r, m] += bias
            _act_row(Z, A, nz, act, r)


@njit(cache=True, error_model="numpy")
def _channel_bias_act_serial(Z, b, A, act):
    _channel_rows(Z, b, A, act, A.ctypes.data == Z.ctypes.data, 0, Z.shape[0])


@njit(cache=True, error_model="numpy", parallel=True)
def _channel_bias_act_parallel(Z, b, A, act, nchunks):
    R = Z.shape[0]
    inplace = A.ctypes.data == Z.ctypes.data
    for ch in prange(nchunks):
        r0, r1 = _span(ch, nchunks, R)
        _channel_rows(Z, b, A, act, inplace, r0, r1)


# ---- BP4 per channel: db[c] (+)= Σ_n Σ_l dZ[n, c, l], in float64 lanes as batch norm's sums ---------
@njit(cache=True, error_model="numpy")
def _channel_sums(dZ, db, accumulate, c0, c1):
    """db[c] for channels c0..c1: lane t of a channel sums its positions l ≡ t (mod LANES) over the
    samples in order (positions paired first, as batch norm's _add_lanes), the lanes added pairwise:
    a fixed order, the same bits on every run and for any thread count. The loops run n outer and
    channels inner, so dZ is read in memory order. Measured, 64x32x1024 float32 (8 MiB), one
    thread, side by side (a busy 2-core VM): 8 scalar float64 chains (which LLVM left scalar)
    0.75 ms, these vector lanes 0.18 ms (np.sum 0.36 ms); 64x32x256: 0.15 -> 0.04 ms."""
    N, C, L = dZ.shape
    w = c1 - c0
    acc = np.zeros((w, LANES))
    dz = dZ.reshape(-1)
    for n in range(N):
        for c in range(w):
            _add_lanes(acc[c], dz, np.uint64((n * C + c0 + c) * L), L, None)
    for c in range(w):
        total = db.dtype.type(_lanes_total(acc[c]))
        db[c0 + c] = db[c0 + c] + total if accumulate else total


@njit(cache=True, error_model="numpy")
def _channel_sums_short(dZ, db, accumulate, c0, c1):
    """db[c] for channels c0..c1 when L < LANES: a channel's rows are too short for a vector loop
    each, so each row of the channels' L·(c1 − c0) contiguous values is one, into float64 column
    sums over the samples in order; then a channel's L column sums are its lanes 0..L−1 of
    _lanes_total. That is _channel_sums' order (lane l takes position l of every row, rows in
    order), bit for bit. Blocks of channels of at most SHORT_COLUMNS columns keep the column
    sums in L1."""
    N, C, L = dZ.shape
    dz = dZ.reshape(-1)
    acc = np.zeros(LANES)
    cb = max(1, SHORT_COLUMNS // L)
    for b0 in range(c0, c1, cb):
        b1 = min(c1, b0 + cb)
        w = (b1 - b0) * L
        cols = np.zeros(w)
        for n in range(N):
            base = np.uint64((n * C + b0) * L)
            for j in range(np.uint64(w)):
                cols[j] += np.float64(dz[base + j])
        for c in range(b1 - b0):
            if L == 1:  # lane 0 alone: adding the zero lanes would only turn -0.0 into 0.0
                total = db.dtype.type(cols[c])
            else:
                acc[:L] = cols[c * L:(c + 1) * L]
                total = db.dtype.type(_lanes_total(acc))
            db[b0 + c] = db[b0 + c] + total if accumulate else total


@njit(cache=True, error_model="numpy")
def _channel_bias_grad_serial(dZ, db, accumulate):
    if dZ.shape[2] < LANES:
        _channel_sums_short(dZ, db, accumulate, 0, dZ.shape[1])
    else:
        _channel_sums(dZ, db, accumulate, 0, dZ.shape[1])


@njit(cache=True, error_model="numpy", parallel=True)
def _channel_bias_grad_parallel(dZ, db, accumulate, nchunks):
    C = dZ.shape[1]
    for k in prange(nchunks):
        c0, c1 = _span(k, nchunks, C)
        if dZ.shape[2] < LANES:
            _channel_sums_short(dZ, db, accumulate, c0, c1)
        else:
            _channel_sums(dZ, db, accumulate, c0, c1)


def window_args(win):
    """The window as the kernels' int arguments: kh, kw, sh, sw, ph, pw, dh, dw, OW."""
    return win.kernel + win.stride + win.padding + win.dilation + (win.out[1],)


def _row_strides(shape, batch_inner):
    """(rs, ss): the flat offset of column row r of sample n is r·rs + n·ss, in the columns of
    ``shape`` ((N, K, L), or (K, N, L) batch-inner)."""
    if batch_inner:
        K, N, L = shape
        return (N * L, L)
    N, K, L = shape
    return (L, K * L)


class ConvOps:
    """Fused convolution ops (a mixin of ``CpuOps``: uses its parallel thresholds)."""

    # Conv2d's chunks when a batch's columns exceed its budget (layers/conv.py): columns about one
    # core's L2, so that im2col, the GEMMs and col2im pass over them in the cache. Measured on the
    # VGG-style 32->32 3x3 layer, batch 64 (75 MB of columns), forward + backward: 32 MiB chunks
    # (3) 49 ms, 2 MiB (one sample) 43 ms.
    cols_cache_bytes = 2 << 20
    batch_inner_gemm = True  # Conv2d may run one GEMM a chunk on batch-inner columns
    conv_halves = True  # Conv2d's im2col chunks in two halves (on two threads where there are 2+)

    def conv_gemm_threads(self):
        """Conv2d's im2col GEMMs on one BLAS thread. The fused set's Winograd layers run two halves
        of their chunks on the two cores themselves (one-thread GEMMs); a threaded im2col GEMM
        before them leaves BLAS's worker spinning on a core into those halves (30 involuntary
        context switches a resnet step). Measured, the resnet preset's step (one stride-2 im2col
        layer), batch 64, 2-core AMD EPYC, interleaved medians: 97.3 -> 78.8 ms; the VGG-style net
        (its first layer im2col) 63.5 -> 64.3, within the noise."""
        return blas.one_blas_thread()

    def im2col(self, X, cols, kernel, stride, padding, dilation, batch_inner=False):
        """cols (N, C·kh·kw, OH·OW) = every window of X (N, C, H, W), zeros in the padding; one pass.
        ``batch_inner``: cols is (C·kh·kw, N, OH·OW), one matrix for one GEMM over the N samples."""
        checks.float_arrays(checks.NAMES_IM2COL, X, cols)
        win = window(X, kernel, stride, padding, dilation)
        expect_shape("cols", cols, cols_shape(X.shape, win, batch_inner))
        args = window_args(win) + _row_strides(cols.shape, batch_inner)
        if self.parallel and cols.size >= self.par_cheap:
            _im2col_parallel(X, cols, *args)
        else:
            _im2col_serial(X, cols, *args)
        return cols

    def col2im(self, dcols, dX, kernel, stride, padding, dilation, batch_inner=False):
        """dX (N, C, H, W) = Σ of the dcols entries that read each pixel: a gather, written.
        ``batch_inner``: dcols is (C·kh·kw, N, OH·OW), as im2col's."""
        checks.float_arrays(checks.NAMES_COL2IM, dcols, dX)
        win = window(dX, kernel, stride, padding, dilation, name="dX")
        expect_shape("dcols", dcols, cols_shape(dX.shape, win, batch_inner))
        args = window_args(win) + _row_strides(dcols.shape, batch_inner)
        if self.parallel and dcols.size >= self.par_cheap:
            _col2im_parallel(dcols, dX, *args)
        else:
            _col2im_serial(dcols, dX, *args)
        return dX

    def channel_bias_act(self, Z, b, activation, A):
        """Z (N, C, L) += b[c] in place, then A = σ(Z), in one pass. A may be Z unless a gelu."""
        checks.float_arrays(checks.NAMES_BIAS_ACT, Z, b, A)
        check_channel_bias_act(Z, b, A)
        act = ACT_CODE.get(activation)
        if act is None:
            raise checks.unknown_activation(activation)
        N, C, L = Z.shape
        Z2, A2 = Z.reshape(N * C, L), A.reshape(N * C, L)
        # A may be a view of Z's buffer (layers pass Z.reshape(...) and A.reshape(...)): same start,
        # same shape, both C-contiguous means the same elements, so that is in place too. The
        # kernels compare the data pointers (here __array_interface__ cost ~3 µs a call).
        if self.parallel and Z.size >= self.par_by_act[act]:
            _channel_bias_act_parallel(Z2, b, A2, act, self.nchunks)
        else:
            _channel_bias_act_serial(Z2, b, A2, act)
        return A

    def channel_bias_grad(self, dZ, db, accumulate=False):
        """db (C,) (+)= Σ over n and l of dZ (N, C, L), summed in float64 in a fixed order."""
        checks.float_arrays(checks.NAMES_BIAS_GRAD, dZ, db)
        check_channel_bias_grad(dZ, db)
        accumulate = bool(accumulate)
        if self.parallel and dZ.size >= self.par_cheap and dZ.shape[1] >= 2 * self.nchunks:
            _channel_bias_grad_parallel(dZ, db, accumulate, self.nchunks)
        else:
            _channel_bias_grad_serial(dZ, db, accumulate)
        return db

