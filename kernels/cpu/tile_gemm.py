"""The Winograd chunks' 16 small products in Numba, without BLAS: for few channels.

A chunk of Conv2d's Winograd path (kernels/cpu/winograd.py) multiplies, for each of the 16 tile
positions k, a small matrix of channels by a long one of tiles:

    forward   M[k]  = U[k] · V[k]       (C_out × C_in) · (C_in × P)
    dV        dV[k] = U[k]ᵀ · dM[k]     (C_in × C_out) · (C_out × P)
    BP3       dU[k] = dM[k] · V[k]ᵀ     (C_out × P) · (P × C_in)

With 16 or 32 channels these are K = 16 or 32 deep: OpenBLAS runs them far below its peak (its
packing and call cost are paid on 2^17 multiply-adds) and a chunk makes 48 of them. Here
``nn`` keeps 2 output rows × 4 input rows of weights in registers and makes one pass over a block
of TB tiles per 4 input rows (each loaded row feeds 8 multiply-adds; the output block stays in L1);
``nt`` makes 4 × 2 dot products in one pass over the tiles (6 loads for 8 multiply-adds; LLVM
splits each sum into vector lanes: ``fastmath`` reassoc/contract, fixed at compile time). The sums
run in a fixed order (input rows in order, in blocks of 4; tiles in lanes for BP3), so the bits do
not depend on the thread count; they differ from OpenBLAS's by rounding only.

Measured (2-core AMD EPYC znver3, AVX2, float32, one thread, in-cache minima; one product):
16×16 by 512 tiles 9.2 µs (OpenBLAS) -> 5.5 (``nn``), BP3's 7.2 -> 5.6; 32×32 by 256 tiles
10.0 -> 8.7 and 10.4 -> 9.5. In a chunk, where V and M come from L2, the 16-channel layers gain
and the 32-channel ones do not (OpenBLAS keeps those): ``WinogradOps.winograd_own_products``.
"""

import numpy as np
from numba import njit

from gpubackprop.kernels.cpu.direct_conv import _dot  # Σ_t a[ia + t]·b[ib + t], lanes

_FM = {"reassoc", "contract"}
# Tiles in a block of ``nn``: 2 output rows of TB and 4 input rows of TB in L1 (measured 64, 128,
# 256, 512 on the shapes above: 256 best).
TB = 256


@njit(cache=True, error_model="numpy", fastmath=_FM, inline="always")
def _rows2x4(out, o0, o1, first, w, b0, P, B, count):
    """out[o0 + t], out[o1 + t] (=, or += unless ``first``) Σ_q w[row, q] · B[b0 + q·P + t]."""
    w00, w01, w02, w03, w10, w11, w12, w13 = w
    b1 = b0 + P
    b2 = b1 + P
    b3 = b2 + P
    if first:
        for t in range(count):
            x0, x1, x2, x3 = B[b0 + t], B[b1 + t], B[b2 + t], B[b3 + t]
            out[o0 + t] = w00 * x0 + w01 * x1 + w02 * x2 + w03 * x3
            out[o1 + t] = w10 * x0 + w11 * x1 + w12 * x2 + w13 * x3
    else:
        for t in range(count):
            x0, x1, x2, x3 = B[b0 + t], B[b1 + t], B[b2 + t], B[b3 + t]
            out[o0 + t] += w00 * x0 + w01 * x1 + w02 * x2 + w03 * x3
            out[o1 + t] += w10 * x0 + w11 * x1 + w12 * x2 + w13 * x3


@njit(cache=True, error_model="numpy", fastmath=_FM, inline="always")
def _rows1x4(out, o0, first, w, b0, P, B, count):
    """_rows2x4 for one output row."""
    w0, w1, w2, w3 = w
    b1 = b0 + P
    b2 = b1 + P
    b3 = b2 + P
    if first:
        for t in range(count):
            out[o0 + t] = w0 * B[b0 + t] + w1 * B[b1 + t] + w2 * B[b2 + t] + w3 * B[b3 + t]
    else:
        for t in range(count):
            out[o0 + t] += w0 * B[b0 + t] + w1 * B[b1 + t] + w2 * B[b2 + t] + w3 * B[b3 + t]


@njit(cache=True, error_model="numpy", fastmath=_FM, inline="always")
def _row1(out, o0, first, w, b0, B, count):
    """out[o0 + t] (=, or +=) w · B[b0 + t]: one input row (the last ones, past the blocks of 4)."""
    if first:
        for t in range(count):
            out[o0 + t] = w * B[b0 + t]
    else:
        for t in range(count):
            out[o0 + t] += w * B[b0 + t]


@njit(cache=True, error_model="numpy", fastmath=_FM, inline="always")
def _block_nn(A, B, bo, out, oo, o, rows, k, P, t0, count):
    """Output rows o (and o + 1 where ``rows`` is 2), tiles [t0, t0 + count), of ``nn``."""
    u = np.uint64
    q = k - k % 4
    for c in range(0, q, 4):
        b0 = bo + u(c * P + t0)
        if rows == 2:
            w = (A[o, c], A[o, c + 1], A[o, c + 2], A[o, c + 3],
                 A[o + 1, c], A[o + 1, c + 1], A[o + 1, c + 2], A[o + 1, c + 3])
            _rows2x4(out, oo + u(o * P + t0), oo + u((o + 1) * P + t0), c == 0, w, b0, u(P), B,
                     count)
        else:
            _rows1x4(out, oo + u(o * P + t0), c == 0,
                     (A[o, c], A[o, c + 1], A[o, c + 2], A[o, c + 3]), b0, u(P), B, count)
    for c in range(q, k):
        for r in range(rows):
            _row1(out, oo + u((o + r) * P + t0), c == 0, A[o + r, c], bo + u(c * P + t0), B, count)


@njit(cache=True, error_model="numpy", fastmath=_FM)
def nn(A, B, bo, out, oo, P):
    """out (m, P) = A (m, k) · B (k, P): B's rows P apart from ``bo`` in the flat B, out's from
    ``oo`` in the flat ``out`` (offsets uint64); A any layout (a transposed view for dV). Sums
    over k in order, 4 at a time."""
    m, k = A.shape
    u = np.uint64
    for t0 in range(0, P, TB):
        count = u(min(TB, P - t0))
        for o in range(0, m - 1, 2):
            _block_nn(A, B, bo, out, oo, o, 2, k, P, t0, count)
        if m % 2:
            _block_nn(A, B, bo, out, oo, m - 1, 1, k, P, t0, count)
    return out


@njit(cache=True, error_model="numpy", fastmath=_FM, inline="always")
def _dots4x2(Af, a0, P, Bf, b0, count):
    """The 8 sums Σ_t A[a0 + i·P + t] · B[b0 + j·P + t], i < 4, j < 2, in one pass."""
    zero = Af.dtype.type(0)
    a1 = a0 + P
    a2 = a1 + P
    a3 = a2 + P
    b1 = b0 + P
    s00 = s01 = s10 = s11 = s20 = s21 = s30 = s31 = zero
    for t in range(count):
        y0, y1 = Bf[b0 + t], Bf[b1 + t]
        x = Af[a0 + t]
        s00 += x * y0
        s01 += x * y1
        x = Af[a1 + t]
        s10 += x * y0
        s11 += x * y1
        x = Af[a2 + t]
        s20 += x * y0
        s21 += x * y1
        x = Af[a3 + t]
        s30 += x * y0
        s31 += x * y1
    return s00, s01, s10, s11, s20, s21, s30, s31


@njit(cache=True, error_model="numpy", fastmath=_FM)
def nt(A, ao, B, bo, P, out):
    """out (m, n) = A (m, P) · B (n, P)ᵀ, A's rows P apart from ``ao`` in the flat A, B's from
    ``bo`` in the flat B (uint64), out (m, n) any layout: blocks of 4 × 2 sums, the rows and
    columns past them one sum each."""
    m, n = out.shape
    u = np.uint64
    count = u(P)
    m4, n2 = m - m % 4, n - n % 2
    for o in range(0, m4, 4):
        for c in range(0, n2, 2):
            s = _dots4x2(A, ao + u(o * P), u(P), B, bo + u(c * P), count)
            out[o, c], out[o, c + 1] = s[0], s[1]
            out[o + 1, c], out[o + 1, c + 1] = s[2], s[3]
            out[o + 2, c], out[o + 2, c + 1] = s[4], s[5]
            out[o + 3, c], out[o + 3, c + 1] = s[6], s[7]
    for o in range(m):
        for c in range(n2 if o < m4 else 0, n):
            out[o, c] = _dot(A, ao + u(o * P), B, bo + u(c * P), count)
    return out
