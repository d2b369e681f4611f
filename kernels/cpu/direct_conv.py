"""CPU direct convolution for few channels (stride 1, dilation 1, one group): forward, input and
weight gradient, no columns and no GEMM.

A layer such as LeNet-5's (1->6 5x5 on 28x28, 6->16 5x5 on 14x14) makes im2col GEMMs with K = 25
or 150 and 6 or 16 output rows: BLAS runs them far below its peak and im2col/col2im move K times
the input. Here each sample's input is copied once into a zero-padded plane buffer (C, Hp, Wp),
rows Wp apart, and an output plane is computed in the padded width: with t = oh·Wp + ow,

    forward   Z[co, t]  = Σ_{c, i, j} W[co, c, i, j] · Xp[c, i·Wp + j + t]
    dX        dXp[c, i·Wp + j + t] += W[co, c, i, j] · dZp[co, t]        (then cropped to dX)
    BP3       dW[co, c, i, j] = Σ_n Σ_t dZp[n, co, t] · Xp[n, c, i·Wp + j + t]

over t in [0, OH·Wp): every (c, i, j) is one contiguous shifted row of OH·Wp elements, a loop LLVM
vectorises, at the cost of the Wp − OW columns past each output row (computed and dropped; dZp is
zero there, so they add nothing to dX and dW). The buffers have kw elements of tail so that the
last shifted row stays inside. The sums run in a fixed order (c, i, j for Z; co, i, j for dX; t
for dW, reassociated by LLVM into vector lanes: ``fastmath`` reassoc/contract, fixed at compile
time), so the bits do not depend on the thread count: the batch is split into ``DIRECT_CHUNKS``
fixed chunks (prange), each with its own buffers and its own partial dW, summed in chunk order.
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
                    for j in range(kw):
                        _axpy(acc, u(0), Wt[co, c, i, j], xp, u((c * Hp + i) * Wp + j), u(T))
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
    P = Hp * Wp + kw  # a padded plane and its tail
    xp = np.zeros(C * Hp * Wp + kw, X.dtype)
    dzp = np.zeros(Co * T, X.dtype)  # dZ in the padded width: zeros past OW stay zero
    dxp = np.empty(P, X.dtype)
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
                for ow in range(OW):
                    dzp[b + ow] = dZ[n, co, oh, ow]
        # BP3: one dot product over t per weight
        for c in range(C):
            for i in range(kh):
                for j in range(kw):
                    s = u((c * Hp + i) * Wp + j)
                    for co in range(Co):
                        dWp[co, c, i, j] += _dot(dzp, u(co * T), xp, s, u(T))
        if not input_grad:
            continue
        # dX: each input channel's padded plane gathers every (co, i, j) shifted row of dZp
        for c in range(C):
            for t in range(P):
                dxp[t] = zero
            for co in range(Co):
                for i in range(kh):
                    for j in range(kw):
                        _axpy(dxp, u(i * Wp + j), Wt[co, c, i, j], dzp, u(co * T), u(T))
            for h in range(H):
                b = (h + ph) * Wp + pw
                for w_ in range(W):
                    dX[n, c, h, w_] = dxp[b + w_]


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

    def direct_conv_forward(self, X, W, Z, padding):
        """Z (N, Co, OH, OW) = Σ_{c, i, j} W[co, c, i, j] · Xpad[n, c, oh + i, ow + j] (stride 1,
        no bias); one pass over X."""
        checks.float_arrays(NAMES_FORWARD, X, W, Z)
        ph, pw = _check(X, W, Z, padding, "Z")
        _forward(X, W, Z, ph, pw, min(DIRECT_CHUNKS, X.shape[0]))
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
        _backward(X, dZ, W, dW, X if dX is None else dX, ph, pw, min(DIRECT_CHUNKS, X.shape[0]),
                  dX is not None, bool(accumulate))
        return dW, dX
