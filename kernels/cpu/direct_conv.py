"""CPU direct convolution for few channels (stride 1, dilation 1, one group): forward, input and
weight gradient, no columns and no GEMM.

A layer such as LeNet-5's (1->6 5x5 on 28x28, 6->16 5x5 on 14x14) makes im2col GEMMs with K = 25
or 150 and 6 or 16 output rows: BLAS runs them far below its peak and im2col/col2im move K times
the input. Here each sample's input is copied once into a zero-padded plane buffer (C, Hp, Wp),
rows Wp apart, and an output plane is computed in the padded width: with t = oh·Wp + ow,

    forward   Z[co, t]  = Σ_{c, i, j} W[co, c, i, j] · Xp[c, i·Wp + j + t]
    dX        dX[c, t'] = Σ_{co, i, j} W[co, c, kh−1−i, kw−1−j] · dZq[co, (ph + i)·Wq + pw + j + t']
    BP3       dW[co, c, i, j] = Σ_n Σ_t dZp[n, co, t] · Xp[n, c, i·Wp + j + t]

over t in [0, OH·Wp): every (c, i, j) is one contiguous shifted row of OH·Wp elements, a loop LLVM
vectorises, at the cost of the Wp − OW columns past each output row (computed and dropped; dZp is
zero there, so they add nothing to dW). dX is the same correlation on dZq, dZ zero-padded by
kh−1, kw−1 (width Wq, t' = h·Wq + w), with the flipped weights. The buffers have a tail so that
the last shifted row stays inside. The sums run in a fixed order (c, i, j for Z; co, i, j for dX; t
for dW, reassociated by LLVM into vector lanes: ``fastmath`` reassoc/contract, fixed at compile
time), so the bits do not depend on the thread count: the batch is split into ``DIRECT_CHUNKS``
fixed chunks, each with its own buffers and its own partial dW, summed in chunk order, run over
Numba's threads (prange) where ``DirectConvOps.direct_parallel`` says so, else one after the other.
"""

import numpy as np
from numba import njit, prange

from gpubackprop.kernels import checks

# Fixed sample chunks of a call (the partial dW sums): independent of the thread count, and enough
# for the two cores here with a few to balance.
DIRECT_CHUNKS = 8
NAMES_FORWARD = ("X", "W", "Z")
NAMES_BACKWARD = ("X", "dZ", "W", "dW", "dX")
_FM = {"reassoc", "contract"}


# Flat loops with uint64 indices (as kernels/cpu/conv.py's copies): with int64 ones Numba wraps
# negative indices, a compare and a select per access, and LLVM keeps them scalar.
@njit(cache=True, error_model="numpy", fastmath=_FM, inline="always")
def _axpy(dst, d, w, src, s, count):
    """dst[d + t] += w · src[s + t] for t < count (d, s, count: uint64)."""
    for t in range(count):
        dst[d + t] += w * src[s + t]


@njit(cache=True, error_model="numpy", fastmath=_FM, inline="always")
def _taps(dst, w, src, s, count):
    """dst[t] += Σ_j w[j] · src[s + j + t] for t < count: a kernel row's taps in one pass over dst
    (one load and store of dst for kw multiply-adds, rather than one each; 3 and 5 taps unrolled
    so that LLVM vectorises over t), taps in order j = 0, 1, …"""
    u = np.uint64  # (uint64 + an int literal is a float64 in Numba: offsets made as uint64)
    kw = w.shape[0]
    s1, s2 = s + u(1), s + u(2)
    if kw == 5:
        s3, s4 = s + u(3), s + u(4)
        w0, w1, w2, w3, w4 = w[0], w[1], w[2], w[3], w[4]
        for t in range(count):
            dst[t] += (w0 * src[s + t] + w1 * src[s1 + t] + w2 * src[s2 + t]
                       + w3 * src[s3 + t] + w4 * src[s4 + t])
    elif kw == 3:
        w0, w1, w2 = w[0], w[1], w[2]
        for t in range(count):
            dst[t] += w0 * src[s + t] + w1 * src[s1 + t] + w2 * src[s2 + t]
    else:
        for j in range(kw):
            _axpy(dst, u(0), w[j], src, s + u(j), count)


@njit(cache=True, error_model="numpy", fastmath=_FM, inline="always")
def _tap_dots(out, a, ia, b, ib, count):
    """out[j] += Σ_t a[ia + t] · b[ib + j + t] for each tap j of a kernel row (out: kw values): one
    pass over a for all kw sums (3 and 5 unrolled), lanes reassociated."""
    u = np.uint64
    kw = out.shape[0]
    zero = a.dtype.type(0)
    b1, b2 = ib + u(1), ib + u(2)
    if kw == 5:
        b3, b4 = ib + u(3), ib + u(4)
        s0 = s1 = s2 = s3 = s4 = zero
        for t in range(count):
            v = a[ia + t]
            s0 += v * b[ib + t]
            s1 += v * b[b1 + t]
            s2 += v * b[b2 + t]
            s3 += v * b[b3 + t]
            s4 += v * b[b4 + t]
        out[0] += s0
        out[1] += s1
        out[2] += s2
        out[3] += s3
        out[4] += s4
    elif kw == 3:
        s0 = s1 = s2 = zero
        for t in range(count):
            v = a[ia + t]
            s0 += v * b[ib + t]
            s1 += v * b[b1 + t]
            s2 += v * b[b2 + t]
        out[0] += s0
        out[1] += s1
        out[2] += s2
    else:
        for j in range(kw):
            out[j] += _dot(a, ia, b, ib + u(j), count)


@njit(cache=True, error_model="numpy", fastmath=_FM, inline="always")
def _dot(a, ia, b, ib, count):
    """Σ_t a[ia + t] · b[ib + t] (uint64 indices), in LLVM's vector lanes (reassoc)."""
    acc = a.dtype.type(0)
    for t in range(count):
        acc += a[ia + t] * b[ib + t]
    return acc


@njit(cache=True, error_model="numpy", inline="always")
def _pad_sample(X, n, xp, ph, pw, Hp, Wp):
    """The interior of the padded planes xp (flat, C·Hp·Wp + tail) from X[n]; the borders stay
    as they are (zero: written once per chunk)."""
    C, H, W = X.shape[1], X.shape[2], X.shape[3]
    for c in range(C):
        for h in range(H):
            b = (c * Hp + h + ph) * Wp + pw
            for w in range(W):
                xp[b + w] = X[n, c, h, w]


@njit(cache=True, error_model="numpy", fastmath=_FM)
def _forward_chunk(X, Wt, Z, ph, pw, n0, n1):
    C, H, W = X.shape[1], X.shape[2], X.shape[3]
    Co, kh, kw = Wt.shape[0], Wt.shape[2], Wt.shape[3]
    OH, OW = Z.shape[2], Z.shape[3]
    Hp, Wp = H + 2 * ph, W + 2 * pw
    T = OH * Wp
    xp = np.zeros(C * Hp * Wp + kw, X.dtype)
    acc = np.empty(T, X.dtype)
    zero = X.dtype.type(0)
    u = np.uint64
    for n in range(n0, n1):
        _pad_sample(X, n, xp, ph, pw, Hp, Wp)
        for co in range(Co):
            for t in range(T):
                acc[t] = zero
            for c in range(C):
                for i in range(kh):
                    _taps(acc, Wt[co, c, i], xp, u((c * Hp + i) * Wp), u(T))
            for oh in range(OH):
                for ow in range(OW):
                    Z[n, co, oh, ow] = acc[oh * Wp + ow]


@njit(cache=True, error_model="numpy", parallel=True)
def _forward(X, Wt, Z, ph, pw, chunks):
    N = X.shape[0]
    size = -(-N // chunks)
    for k in prange(chunks):
        n0 = min(N, k * size)
        _forward_chunk(X, Wt, Z, ph, pw, n0, min(N, n0 + size))


@njit(cache=True, error_model="numpy", fastmath=_FM)
def _backward_chunk(X, dZ, Wt, dWp, dX, ph, pw, n0, n1, input_grad):
    """dWp (Co, C, kh, kw) = this chunk's BP3 sum (written); dX[n0:n1] if ``input_grad``."""
    C, H, W = X.shape[1], X.shape[2], X.shape[3]
    Co, kh, kw = Wt.shape[0], Wt.shape[2], Wt.shape[3]
    OH, OW = dZ.shape[2], dZ.shape[3]
    Hp, Wp = H + 2 * ph, W + 2 * pw
    T = OH * Wp
    xp = np.zeros(C * Hp * Wp + kw, X.dtype)
    dzp = np.zeros(Co * T, X.dtype)  # dZ in the padded width: zeros past OW stay zero
    # dX as a forward correlation (a gather: shifted reads, aligned writes; scattering shifted rows
    # into dX's planes made each row's stores wait on the previous row's): dZ zero-padded by
    # kh−1, kw−1 (planes Hq x Wq), the flipped weights, the output rows offset by (ph, pw).
    Hq, Wq = OH + 2 * (kh - 1), OW + 2 * (kw - 1)
    TX = H * Wq
    dzq = np.zeros(Co * Hq * Wq + pw + kw, X.dtype)
    acc = np.empty(TX, X.dtype)
    zero = X.dtype.type(0)
    u = np.uint64
    for co in range(Co):
        for c in range(C):
            for i in range(kh):
                for j in range(kw):
                    dWp[co, c, i, j] = zero
    for n in range(n0, n1):
        _pad_sample(X, n, xp, ph, pw, Hp, Wp)
        for co in range(Co):
            for oh in range(OH):
                b = co * T + oh * Wp
                q = (co * Hq + oh + kh - 1) * Wq + kw - 1
                for ow in range(OW):
                    dzp[b + ow] = dZ[n, co, oh, ow]
                    dzq[q + ow] = dZ[n, co, oh, ow]
        # BP3: one dot product over t per weight
        for c in range(C):
            for i in range(kh):
                s = u((c * Hp + i) * Wp)
                for co in range(Co):
                    _tap_dots(dWp[co, c, i], dzp, u(co * T), xp, s, u(T))
        if not input_grad:
            continue
        # dX[c, h, w] = Σ_{co, i, j} W[co, c, kh−1−i, kw−1−j] · dZq[co, h + ph + i, w + pw + j]
        for c in range(C):
            for t in range(TX):
                acc[t] = zero
            for co in range(Co):
                for i in range(kh):
                    _taps(acc, Wt[co, c, kh - 1 - i, ::-1], dzq, u((co * Hq + ph + i) * Wq + pw),
                          u(TX))
            for h in range(H):
                for w_ in range(W):
                    dX[n, c, h, w_] = acc[h * Wq + w_]


@njit(cache=True, error_model="numpy", parallel=True)
def _backward(X, dZ, Wt, dW, dX, ph, pw, chunks, input_grad, accumulate):
    N = X.shape[0]
    size = -(-N // chunks)
    parts = np.empty((chunks,) + Wt.shape, dW.dtype)
    for k in prange(chunks):
        n0 = min(N, k * size)
        _backward_chunk(X, dZ, Wt, parts[k], dX, ph, pw, n0, min(N, n0 + size), input_grad)
    Co, C, kh, kw = Wt.shape
    for co in range(Co):
        for c in range(C):
            for i in range(kh):
                for j in range(kw):
                    s = parts[0, co, c, i, j]
                    for k in range(1, chunks):
                        s += parts[k, co, c, i, j]
                    dW[co, c, i, j] = dW[co, c, i, j] + s if accumulate else s


# The same bodies on the calling thread only (prange runs as range): the same chunks, the same bits.
_forward_serial = njit(cache=True, error_model="numpy")(_forward.py_func)
_backward_serial = njit(cache=True, error_model="numpy")(_backward.py_func)


def _check(X, Wt, out, padding, out_name):
    """(ph, pw) after checking the shapes of a stride-1 convolution X (N, C, H, W) * W (Co, C, kh,
    kw) -> ``out`` (N, Co, OH, OW)."""
    for name, a in (("X", X), ("W", Wt), (out_name, out)):
        if a.ndim != 4:
            raise ValueError(f"{name}: expected a 4-D array, got shape {tuple(a.shape)}")
    ph, pw = (padding, padding) if isinstance(padding, (int, np.integer)) else padding
    ph, pw = int(ph), int(pw)
    if ph < 0 or pw < 0:
        raise ValueError(f"padding: expected values >= 0, got {padding!r}")
    N, C, H, W = X.shape
    Co, kh, kw = Wt.shape[0], Wt.shape[2], Wt.shape[3]
    if Wt.shape[1] != C:
        raise ValueError(f"W: expected {C} input channels (X's), got shape {tuple(Wt.shape)}")
    OH, OW = H + 2 * ph - kh + 1, W + 2 * pw - kw + 1
    if OH < 1 or OW < 1:
        raise ValueError(f"W: kernel {kh}x{kw} larger than the padded input "
                         f"{H + 2 * ph}x{W + 2 * pw}")
    if tuple(out.shape) != (N, Co, OH, OW):
        raise ValueError(f"{out_name}: expected shape {(N, Co, OH, OW)}, got {tuple(out.shape)}")
    return ph, pw


class DirectConvOps:
    """Fused direct convolution (a mixin of ``CpuOps``): Conv2d takes it for few channels."""

    direct_conv = True
    # Whether the direct kernels split the batch over Numba's threads (where the set has 2+). Off:
    # in a training step BLAS's threads keep spinning on the other core after each GEMM (the
    # dense layers'), and a parallel region's second thread then runs at a fraction of a core
    # (LeNet-5, 2-core Xeon, whole step: 24 ms with the split against 11 without; the layers alone,
    # no GEMM around them, gain 1.6-1.9x from it).
    direct_parallel = False

    def _direct_kernel(self, parallel, serial):
        return parallel if self.direct_parallel and getattr(self, "nchunks", 1) >= 2 else serial

    def direct_conv_forward(self, X, W, Z, padding):
        """Z (N, Co, OH, OW) = Σ_{c, i, j} W[co, c, i, j] · Xpad[n, c, oh + i, ow + j] (stride 1,
        no bias); one pass over X."""
        checks.float_arrays(NAMES_FORWARD, X, W, Z)
        ph, pw = _check(X, W, Z, padding, "Z")
        self._direct_kernel(_forward, _forward_serial)(X, W, Z, ph, pw,
                                                       min(DIRECT_CHUNKS, X.shape[0]))
        return Z

    def direct_conv_backward(self, X, dZ, W, dW, dX, padding, accumulate=False):
        """dW (+)= Σ_n dZ[n] ⋆ Xpad[n] (BP3), and dX = the full convolution of dZ with the flipped
        W (None: skipped); one pass over X and dZ."""
        arrays = (X, dZ, W, dW) + (() if dX is None else (dX,))
        checks.float_arrays(NAMES_BACKWARD[:len(arrays)], *arrays)
        ph, pw = _check(X, W, dZ, padding, "dZ")
        if dW.shape != W.shape:
            raise ValueError(f"dW: expected shape {tuple(W.shape)}, got {tuple(dW.shape)}")
        if dX is not None and dX.shape != X.shape:
            raise ValueError(f"dX: expected shape {tuple(X.shape)}, got {tuple(dX.shape)}")
        self._direct_kernel(_backward, _backward_serial)(
            X, dZ, W, dW, X if dX is None else dX, ph, pw, min(DIRECT_CHUNKS, X.shape[0]),
            dX is not None, bool(accumulate))
        return dW, dX
