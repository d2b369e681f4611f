"""CPU recurrent ops: one RNN, LSTM or GRU time step (cell), forward and backward, each one pass;
the time loops, all T steps of a direction (each step's GEMM and cell) in one Numba call; and the
layers' GEMMs over all T·N rows (input projections, input and weight gradients) in the loops' row
chunks.

Each cell kernel runs over the (n, j) hidden units of rows n0 … n1−1 of one step: it reads the n-th
rows of the gate pre-activations at the G gates of unit j, and writes unit j's state and saved
gates (see ``kernels/reference/recurrent.py`` for the equations). The arithmetic is the
reference's, in its order, in the arrays' dtype. A per-step cell op is serial: a parallel region
per time step would cost more than it saves.

The time loops call BLAS for each step's GEMM from inside the compiled loop (``_gemm``: NumPy's
own OpenBLAS through ``kernels/cpu/blas.py``, faster here than SciPy's, which Numba's ``np.dot``
calls, to the same bits), so that a step costs no Python. On several threads they split the batch:
the samples of a batch are independent through the whole recurrence, so each thread runs every
step of its own rows (its own GEMMs h_prev[rows] W_hhᵀ, single-threaded BLAS, and its cells) with
no synchronisation between steps, where a threaded BLAS would meet its threads twice a step. The
rows are fixed chunks and a row's arithmetic does not depend on which chunk holds it.

Measured on the 2-core AMD EPYC (Zen 4) VM, benchmark networks, float32, batch 128, interleaved
with PyTorch 2.13 (step minima; × PyTorch the median of per-round ratios; a shared machine): with
NumPy's OpenBLAS for every GEMM here, weight_gemm's transposed orientation, one GEMM for an LSTM's
two weight gradients and no allocation per step, LSTM(28→128) → LastStep → Dense 16.0 -> 14.4 ms
(× PyTorch 0.96 -> 1.09), 2-layer GRU(128) 31.6 -> 27.8 ms (× PyTorch 1.72 -> 1.95). The LSTM's
input projection in its forward time loop (``_lstm_forward_xh_rows``, no rows_gemm): its training
step 13.97 -> 13.49 ms (interleaved rounds in one process, medians; the benchmark: × PyTorch 1.07
-> 1.10, both on a machine shared with other jobs).
"""

import threading

import numpy as np
from numba import njit, prange

from numba.extending import overload

from gpubackprop.kernels import checks
from gpubackprop.kernels.cpu import blas
from gpubackprop.kernels.cpu.dense import _sigmoid
from gpubackprop.kernels.cpu.numerics import _span, _tanh
from gpubackprop.kernels.reference.recurrent import (
    CELL_NAMES,
    STEPS_NAMES,
    check_act,
    check_cell,
    check_gemm,
    check_second_operand,
    check_steps,
)

RNN_TANH, RNN_RELU = 0, 1


def _gemm(A, B, out):
    """out = A B, one BLAS GEMM (A, B C- or F-contiguous, out C-contiguous). Compiled: NumPy's
    OpenBLAS (``blas.gemm``); run as Python (the benchmark's tests record the GEMMs a step calls
    through this module's ``np``): ``np.dot``."""
    np.dot(A, B, out)


@overload(_gemm, jit_options={"cache": True, "error_model": "numpy"})
def _gemm_impl(A, B, out):
    return lambda A, B, out: blas.gemm(A, B, out)


def _gemm_tn(dG, A, out_t):
    """out_tᵀ = dGᵀ A (dG (M, m), A (M, n) C-contiguous; out_t (n, m) C-contiguous), one BLAS
    GEMM: compiled, BLAS computes out_t = Aᵀ dG, the product's other orientation, which NumPy's
    OpenBLAS runs faster here (one thread, the LSTM's chunks of 1792 rows: dW_hh (512x128)
    3.33 -> 3.12 ms, dW_ih (512x28) 1.23 -> 0.98 ms). As Python: np.dot(dG.T, A)."""
    out_t.T[...] = np.dot(dG.T, A)


@overload(_gemm_tn, jit_options={"cache": True, "error_model": "numpy"})
def _gemm_tn_impl(dG, A, out_t):
    return lambda dG, A, out_t: blas.gemm(A.T, dG, out_t)
# Rows per thread from which a time loop splits the batch: below it a thread's GEMMs are too thin
# for BLAS to run near its peak, and the parallel region's start (µs) is not worth it.
STEPS_MIN_ROWS = 16


# ---- RNN -------------------------------------------------------------------------------------------
@njit(cache=True, error_model="numpy")
def _rnn_cell_rows(gx, gh, b, h, act, n0, n1):
    H = h.shape[1]
    zero = h.dtype.type(0)
    for n in range(n0, n1):
        if act == RNN_TANH:
            for j in range(H):
                h[n, j] = _tanh(gx[n, j] + gh[n, j] + b[j])
        else:
            for j in range(H):
                z = gx[n, j] + gh[n, j] + b[j]
                h[n, j] = zero if z < zero else z  # keeps NaN, as np.maximum does


@njit(cache=True, error_model="numpy")
def _rnn_cell_backward_rows(dh_out, dh_rec, h, dpre, act, n0, n1):
    H = h.shape[1]
    zero, one = h.dtype.type(0), h.dtype.type(1)
    for n in range(n0, n1):
        if act == RNN_TANH:
            for j in range(H):
                s = h[n, j]
                dpre[n, j] = (dh_out[n, j] + dh_rec[n, j]) * (one - s * s)
        else:
            for j in range(H):
                dpre[n, j] = dh_out[n, j] + dh_rec[n, j] if h[n, j] > zero else zero


# ---- LSTM (gates i, f, g, o) -------------------------------------------------------------------------
@njit(cache=True, error_model="numpy", inline="always")
def _lstm_state_row(gates, c_prev, h, c, n, H):
    """Row n of c_t = f ⊙ c_{t-1} + i ⊙ g and h_t = o ⊙ tanh(c_t) from its activated gates."""
    i, f, g, o = gates[n, :H], gates[n, H:2 * H], gates[n, 2 * H:3 * H], gates[n, 3 * H:]
    for j in range(H):
        ct = f[j] * c_prev[n, j] + i[j] * g[j]
        c[n, j] = ct
        h[n, j] = o[j] * _tanh(ct)


@njit(cache=True, error_model="numpy")
def _lstm_cell_rows(gx, gh, b, c_prev, h, c, gates, n0, n1):
    # Row by row, one loop per kind of gate and one for the state: each loop runs one activation
    # over contiguous memory, so that LLVM vectorizes it (one loop over all four gates does not).
    # Loops run from 0 with the offset added inside: an index known to be >= 0 needs no
    # wraparound check, which would keep the loop scalar (range(2 * H, 3 * H) ran 3x slower).
    H = h.shape[1]
    zero, one = h.dtype.type(0), h.dtype.type(1)
    for n in range(n0, n1):
        for j in range(2 * H):  # i, f
            gates[n, j] = _sigmoid(gx[n, j] + gh[n, j] + b[j], zero, one)
        for j in range(H):  # g
            q = 2 * H + j
            gates[n, q] = _tanh(gx[n, q] + gh[n, q] + b[q])
        for j in range(H):  # o
            q = 3 * H + j
            gates[n, q] = _sigmoid(gx[n, q] + gh[n, q] + b[q], zero, one)
        _lstm_state_row(gates, c_prev, h, c, n, H)


@njit(cache=True, error_model="numpy")
def _lstm_cell_xh_rows(gxh, b, c_prev, h, c, gates, n0, n1):
    # _lstm_cell_rows for the fused input projection (_lstm_forward_xh_rows): gxh = [x_t, h_prev]
    # [W_ih; W_hh]ᵀ holds both GEMMs' sums, b = b_ih + b_hh; the same loops, one operand fewer.
    H = h.shape[1]
    zero, one = h.dtype.type(0), h.dtype.type(1)
    for n in range(n0, n1):
        for j in range(2 * H):  # i, f
            gates[n, j] = _sigmoid(gxh[n, j] + b[j], zero, one)
        for j in range(H):  # g
            q = 2 * H + j
            gates[n, q] = _tanh(gxh[n, q] + b[q])
        for j in range(H):  # o
            q = 3 * H + j
            gates[n, q] = _sigmoid(gxh[n, q] + b[q], zero, one)
        _lstm_state_row(gates, c_prev, h, c, n, H)


@njit(cache=True, error_model="numpy")
def _lstm_cell_backward_rows(dh_out, dh_rec, dc, c_prev, c, gates, dgates, n0, n1):
    # Two loops a row, each over few arrays: with every array in one loop, LLVM gives up on the
    # runtime alias checks that vectorizing needs. The first leaves ∂C/∂c_t (dct) in dc.
    H = c.shape[1]
    one = c.dtype.type(1)
    for n in range(n0, n1):
        for j in range(H):
            o = gates[n, 3 * H + j]
            dh = dh_out[n, j] + dh_rec[n, j]
            tc = _tanh(c[n, j])
            dc[n, j] = dc[n, j] + dh * o * (one - tc * tc)
            dgates[n, 3 * H + j] = dh * tc * o * (one - o)
        for j in range(H):
            i, f, g = gates[n, j], gates[n, H + j], gates[n, 2 * H + j]
            dct = dc[n, j]
            dgates[n, j] = dct * g * i * (one - i)
            dgates[n, H + j] = dct * c_prev[n, j] * f * (one - f)
            dgates[n, 2 * H + j] = dct * i * (one - g * g)
            dc[n, j] = dct * f


# ---- GRU (gates r, z, n; saved r, z, n, hn) -------------------------------------------------------
@njit(cache=True, error_model="numpy")
def _gru_cell_rows(gx, gh, b, h_prev, h, saved, n0, n1):
    # One loop per kind of gate, as in _lstm_cell_rows, so that each vectorizes.
    H = h.shape[1]
    zero, one = h.dtype.type(0), h.dtype.type(1)
    for n in range(n0, n1):
        for j in range(2 * H):  # r, z
            saved[n, j] = _sigmoid(gx[n, j] + (gh[n, j] + b[j]), zero, one)
        r, nn, hn = saved[n, :H], saved[n, 2 * H:3 * H], saved[n, 3 * H:]
        for j in range(H):
            q = 2 * H + j
            hnj = gh[n, q] + b[q]
            hn[j] = hnj
            nn[j] = _tanh(gx[n, q] + r[j] * hnj)
        z = saved[n, H:2 * H]
        for j in range(H):
            h[n, j] = (one - z[j]) * nn[j] + z[j] * h_prev[n, j]


@njit(cache=True, error_model="numpy")
def _gru_cell_backward_rows(dh_out, dh_rec, dh, h_prev, saved, dgx, dgh, n0, n1):
    H = dh.shape[1]
    one = dh.dtype.type(1)
    for n in range(n0, n1):
        for j in range(H):
            r, z = saved[n, j], saved[n, H + j]
            nn, hn = saved[n, 2 * H + j], saved[n, 3 * H + j]
            d = dh_out[n, j] + dh_rec[n, j] + dh[n, j]
            dn = d * (one - z) * (one - nn * nn)
            dr = dn * hn * r * (one - r)
            dz = d * (h_prev[n, j] - nn) * z * (one - z)
            dgx[n, j] = dr
            dgx[n, H + j] = dz
            dgx[n, 2 * H + j] = dn
            dgh[n, j] = dr
            dgh[n, H + j] = dz
            dgh[n, 2 * H + j] = dn * r
            dh[n, j] = d * z


# ---- the time loops: all T steps of a direction, for rows n0 … n1−1 --------------------------------
# Step s of a forward direction is t = s, reading hs[t] and writing hs[t + 1]; of a reverse one
# t = T−1−s, reading hs[t + 1] and writing hs[t]. The backward loops take the steps the other way.
# W_hhT is W_hhᵀ (H, G·H) as a C-contiguous copy (made once a call): NumPy's OpenBLAS runs the
# step's GEMM faster on it than on the transposed view (28 steps of 64x128x512 on one thread:
# 2.71 against 3.21 ms; SciPy's, with the view, 2.87). _gemm(a, B, out) is one BLAS GEMM (no copy:
# every other operand is a C-contiguous block of rows).
@njit(cache=True, error_model="numpy", inline="always")
def _step(s, T, reverse):
    """(t, prev, cur) of step s of a direction's forward loop."""
    if reverse:
        t = T - 1 - s
        return t, t + 1, t
    return s, s, s + 1


@njit(cache=True, error_model="numpy")
def _rnn_forward_rows(gx, W_hhT, b, hs, gh, act, reverse, n0, n1):
    T = gx.shape[0]
    for s in range(T):
        t, p, c = _step(s, T, reverse)
        _gemm(hs[p][n0:n1], W_hhT, gh[n0:n1])
        _rnn_cell_rows(gx[t], gh, b, hs[c], act, n0, n1)


@njit(cache=True, error_model="numpy")
def _rnn_backward_rows(dout, W_hh, hs, dpre, dh, act, reverse, state_grad, n0, n1):
    T = dout.shape[0]
    for s in range(T - 1, -1, -1):
        t, _, c = _step(s, T, reverse)
        _rnn_cell_backward_rows(dout[t], dh, hs[c], dpre[t], act, n0, n1)
        if s > 0 or state_grad:
            _gemm(dpre[t][n0:n1], W_hh, dh[n0:n1])  # the part of ∂C/∂h_prev through W_hh


@njit(cache=True, error_model="numpy")
def _lstm_forward_rows(gx, W_hhT, b, hs, cs, gates, gh, reverse, n0, n1):
    T = gx.shape[0]
    keep = gates.shape[0] == T
    for s in range(T):
        t, p, c = _step(s, T, reverse)
        _gemm(hs[p][n0:n1], W_hhT, gh[n0:n1])
        _lstm_cell_rows(gx[t], gh, b, cs[p], hs[c], cs[c], gates[t if keep else 0], n0, n1)


@njit(cache=True, error_model="numpy")
def _lstm_forward_xh_rows(x, W_xhT, b, hs, cs, gates, gh, xh, reverse, n0, n1):
    # The input projection inside the loop: per step the rows [x_t, h_prev] side by side in xh
    # (N, F + H) and one GEMM with W_xhT = [W_ih; W_hh]ᵀ (F + H, 4H), so that gx = x W_ihᵀ is
    # neither a GEMM over all T·N rows of its own nor written out and read back (7.3 MB for the
    # LSTM benchmark). One thread, rows 0..63 of the LSTM(28 -> 128) benchmark: rows_gemm's half
    # of the rows and the loop 4.45 ms, this 4.00.
    T, F, H = x.shape[0], x.shape[2], hs.shape[2]
    keep = gates.shape[0] == T
    for s in range(T):
        t, p, c = _step(s, T, reverse)
        xt, hp = x[t], hs[p]
        for n in range(n0, n1):
            r, a, q = xh[n], xt[n], hp[n]
            for j in range(F):
                r[j] = a[j]
            for j in range(H):
                r[F + j] = q[j]
        _gemm(xh[n0:n1], W_xhT, gh[n0:n1])
        _lstm_cell_xh_rows(gh, b, cs[p], hs[c], cs[c], gates[t if keep else 0], n0, n1)


@njit(cache=True, error_model="numpy")
def _lstm_backward_rows(dout, W_hh, cs, gates, dgates, dh, dc, reverse, state_grad, n0, n1):
    T = dout.shape[0]
    for s in range(T - 1, -1, -1):
        t, p, c = _step(s, T, reverse)
        _lstm_cell_backward_rows(dout[t], dh, dc, cs[p], cs[c], gates[t], dgates[t], n0, n1)
        if s > 0 or state_grad:
            _gemm(dgates[t][n0:n1], W_hh, dh[n0:n1])


@njit(cache=True, error_model="numpy")
def _gru_forward_rows(gx, W_hhT, b, hs, saved, gh, reverse, n0, n1):
    T = gx.shape[0]
    keep = saved.shape[0] == T
    for s in range(T):
        t, p, c = _step(s, T, reverse)
        _gemm(hs[p][n0:n1], W_hhT, gh[n0:n1])
        _gru_cell_rows(gx[t], gh, b, hs[p], hs[c], saved[t if keep else 0], n0, n1)


@njit(cache=True, error_model="numpy")
def _gru_backward_rows(dout, W_hh, hs, saved, dgx, dgh, dh, carry, reverse, state_grad, n0, n1):
    T = dout.shape[0]
    for s in range(T - 1, -1, -1):
        t, p, _ = _step(s, T, reverse)
        _gru_cell_backward_rows(dout[t], dh, carry, hs[p], saved[t], dgx[t], dgh[t], n0, n1)
        if s > 0 or state_grad:
            _gemm(dgh[t][n0:n1], W_hh, dh[n0:n1])
    if state_grad:
        for n in range(n0, n1):
            for j in range(dh.shape[1]):
                dh[n, j] += carry[n, j]


# The batch split: chunk ch of nchunks runs the whole loop on its rows.
@njit(cache=True, error_model="numpy", parallel=True)
def _rnn_forward_parallel(gx, W_hhT, b, hs, gh, act, reverse, nchunks):
    for ch in prange(nchunks):
        n0, n1 = _span(ch, nchunks, gx.shape[1])
        _rnn_forward_rows(gx, W_hhT, b, hs, gh, act, reverse, n0, n1)


@njit(cache=True, error_model="numpy", parallel=True)
def _rnn_backward_parallel(dout, W_hh, hs, dpre, dh, act, reverse, state_grad, nchunks):
    for ch in prange(nchunks):
        n0, n1 = _span(ch, nchunks, dout.shape[1])
        _rnn_backward_rows(dout, W_hh, hs, dpre, dh, act, reverse, state_grad, n0, n1)


@njit(cache=True, error_model="numpy", parallel=True)
def _lstm_forward_parallel(gx, W_hhT, b, hs, cs, gates, gh, reverse, nchunks):
    for ch in prange(nchunks):
        n0, n1 = _span(ch, nchunks, gx.shape[1])
        _lstm_forward_rows(gx, W_hhT, b, hs, cs, gates, gh, reverse, n0, n1)


@njit(cache=True, error_model="numpy", parallel=True)
def _lstm_forward_xh_parallel(x, W_xhT, b, hs, cs, gates, gh, xh, reverse, nchunks):
    for ch in prange(nchunks):
        n0, n1 = _span(ch, nchunks, x.shape[1])
        _lstm_forward_xh_rows(x, W_xhT, b, hs, cs, gates, gh, xh, reverse, n0, n1)


@njit(cache=True, error_model="numpy", parallel=True)
def _lstm_backward_parallel(dout, W_hh, cs, gates, dgates, dh, dc, reverse, state_grad, nchunks):
    for ch in prange(nchunks):
        n0, n1 = _span(ch, nchunks, dout.shape[1])
        _lstm_backward_rows(dout, W_hh, cs, gates, dgates, dh, dc, reverse, state_grad, n0, n1)


@njit(cache=True, error_model="numpy", parallel=True)
def _gru_forward_parallel(gx, W_hhT, b, hs, saved, gh, reverse, nchunks):
    for ch in prange(nchunks):
        n0, n1 = _span(ch, nchunks, gx.shape[1])
        _gru_forward_rows(gx, W_hhT, b, hs, saved, gh, reverse, n0, n1)


@njit(cache=True, error_model="numpy", parallel=True)
def _gru_backward_parallel(dout, W_hh, hs, saved, dgx, dgh, dh, carry, reverse, state_grad,
                           nchunks):
    for ch in prange(nchunks):
        n0, n1 = _span(ch, nchunks, dout.shape[1])
        _gru_backward_rows(dout, W_hh, hs, saved, dgx, dgh, dh, carry, reverse, state_grad, n0,
                           n1)


# ---- the layers' GEMMs over all T·N rows, split the same way ------------------------------------
# On the chunks' threads with single-threaded BLAS as the loops, so that NumPy's threaded BLAS is
# not woken in a recurrent step: its threads spin for a while after each GEMM and would take the
# cores from the next time loop's chunks (measured: a step 1.5x slower).
@njit(cache=True, error_model="numpy", parallel=True)
def _rows_gemm_parallel(A, B, out, bias, add_bias, nchunks):
    # Each chunk adds the bias to its rows right after its GEMM, while they are in the cache.
    for c in prange(nchunks):
        r0, r1 = _span(c, nchunks, A.shape[0])
        _gemm(A[r0:r1], B, out[r0:r1])
        if add_bias:
            for i in range(r0, r1):
                for j in range(out.shape[1]):
                    out[i, j] = out[i, j] + bias[j]


@njit(cache=True, error_model="numpy", parallel=True)
def _weight_gemm_parallel(dG, A, A2, scratch, partial, colsum, sum_cols, nchunks):
    # Chunk c's rows give partial[c] = (dG[rows]ᵀ [A, A2][rows])ᵀ and (BP4) colsum[c] = Σ_rows dG
    # in float64, in row order; the caller adds the chunks in chunk order. With A2 (K2 > 0
    # columns) the chunk first copies its rows of A and A2 side by side into its scratch, so that
    # both products are one GEMM: for the LSTM (28 + 128 columns, 3584 rows in two chunks) the
    # copy and one GEMM take 3.53 ms against 3.98 for two GEMMs (one thread each, NumPy's BLAS).
    K1, K2 = A.shape[1], A2.shape[1]
    for c in prange(nchunks):
        r0, r1 = _span(c, nchunks, A.shape[0])
        if K2 == 0:
            _gemm_tn(dG[r0:r1], A[r0:r1], partial[c])
        else:
            S = scratch[c, :r1 - r0]
            for r in range(r1 - r0):
                for j in range(K1):
                    S[r, j] = A[r0 + r, j]
                for j in range(K2):
                    S[r, K1 + j] = A2[r0 + r, j]
            _gemm_tn(dG[r0:r1], S, partial[c])
        if sum_cols:
            acc = colsum[c]
            for j in range(dG.shape[1]):
                acc[j] = 0.0
            for i in range(r0, r1):
                for j in range(dG.shape[1]):
                    acc[j] += dG[i, j]


@njit(cache=True, error_model="numpy")
def _sum_partials(partial, dW, dW2, colsum, db, sum_cols):
    # partial[c] holds chunk c's [dW, dW2]ᵀ (see _gemm_tn); dW2 may have no columns. Row j of the
    # partials is summed contiguously (a vector loop) in a row buffer, then written to column j
    # of dW (dW2): reading the partials down their columns cost the LSTM's step ~1 ms.
    K1, GH = dW.shape[1], dW.shape[0]
    acc = np.empty(GH, partial.dtype)
    for j in range(partial.shape[1]):
        row = partial[0, j]
        for i in range(GH):
            acc[i] = row[i]
        for c in range(1, partial.shape[0]):
            row = partial[c, j]
            for i in range(GH):
                acc[i] += row[i]
        if j < K1:
            for i in range(GH):
                dW[i, j] = acc[i]
        else:
            for i in range(GH):
                dW2[i, j - K1] = acc[i]
    if sum_cols:
        for j in range(db.shape[0]):
            s = colsum[0, j]
            for c in range(1, colsum.shape[0]):
                s += colsum[c, j]
            db[j] = s


# ---- BLAS operands --------------------------------------------------------------------------------
def _blas_operand(B, dtype, name):
    """B as the GEMM kernels take it: the dtype checked, C-contiguous (a copy of a transposed view
    such as W_ihᵀ: NumPy's OpenBLAS runs the LSTM's input projection, 3584x28x512 in two chunks,
    in 0.79 ms on it against 0.89 on the view)."""
    if getattr(B, "dtype", None) != dtype:
        got = f"dtype {B.dtype}" if hasattr(B, "dtype") else type(B).__name__
        raise TypeError(f"{name}: expected dtype {dtype}, got {got}")
    return np.ascontiguousarray(B)


class RecurrentOps:
    """Fused recurrent ops (a mixin of ``CpuOps``): one Numba pass per cell, one call per loop.

    The time loops and the GEMM ops call BLAS themselves whatever ``matmul`` they are given: on
    the CPU the layers' GEMM is NumPy's, and a wrapper around it (the benchmark's timer, a capture
    recorder) sees these ops, not their GEMMs, so that a step has the same bits whoever watches."""

    def rnn_cell(self, gx, gh, b_hh, h, activation):
        """h = act(gx + gh + b_hh), act "tanh" or "relu"; one pass."""
        args = (gx, gh, b_hh, h)
        checks.float_arrays(CELL_NAMES["rnn_cell"], *args)
        N, _ = check_cell("rnn_cell", args)
        _rnn_cell_rows(*args, RNN_RELU if check_act(activation) == "relu" else RNN_TANH, 0, N)
        return h

    def rnn_cell_backward(self, dh_out, dh_rec, h, dpre, activation):
        """dpre = (dh_out + dh_rec) ⊙ act'(·), act' from h; one pass."""
        args = (dh_out, dh_rec, h, dpre)
        checks.float_arrays(CELL_NAMES["rnn_cell_backward"], *args)
        N, _ = check_cell("rnn_cell_backward", args)
        _rnn_cell_backward_rows(*args, RNN_RELU if check_act(activation) == "relu" else RNN_TANH,
                                0, N)
        return dpre

    def lstm_cell(self, gx, gh, b_hh, c_prev, h, c, gates):
        """One LSTM step (gates i, f, g, o activated and saved), one pass."""
        args = (gx, gh, b_hh, c_prev, h, c, gates)
        checks.float_arrays(CELL_NAMES["lstm_cell"], *args)
        N, _ = check_cell("lstm_cell", args)
        _lstm_cell_rows(*args, 0, N)
        return h, c

    def lstm_cell_backward(self, dh_out, dh_rec, dc, c_prev, c, gates, dgates):
        """The gate pre-activation gradients; dc from ∂C/∂c_t to ∂C/∂c_{t−1} in place; one pass."""
        args = (dh_out, dh_rec, dc, c_prev, c, gates, dgates)
        checks.float_arrays(CELL_NAMES["lstm_cell_backward"], *args)
        N, _ = check_cell("lstm_cell_backward", args)
        _lstm_cell_backward_rows(*args, 0, N)
        return dgates, dc

    def gru_cell(self, gx, gh, b_hh, h_prev, h, saved):
        """One GRU step (r, z, n and hn saved), one pass."""
        args = (gx, gh, b_hh, h_prev, h, saved)
        checks.float_arrays(CELL_NAMES["gru_cell"], *args)
        N, _ = check_cell("gru_cell", args)
        _gru_cell_rows(*args, 0, N)
        return h

    def gru_cell_backward(self, dh_out, dh_rec, dh, h_prev, saved, dgx, dgh):
        """dgx, dgh (input- and hidden-side pre-activation gradients); dh carried in place."""
        args = (dh_out, dh_rec, dh, h_prev, saved, dgx, dgh)
        checks.float_arrays(CELL_NAMES["gru_cell_backward"], *args)
        N, _ = check_cell("gru_cell_backward", args)
        _gru_cell_backward_rows(*args, 0, N)
        return dgx, dgh, dh

    # ---- scratch kept between calls -------------------------------------------------------------
    def _recurrent_buffer(self, name, shape, dtype):
        """A buffer kept per (name, calling thread, shape, dtype) for the ops' own temporaries, so
        that a step allocates none: the weight gradients' 2 MB of scratch and partials, new each
        call, came back as fresh pages from the OS (malloc hands blocks that large to mmap)."""
        store = self.__dict__.setdefault("_recurrent_scratch", {})
        key = (name, threading.get_ident(), tuple(shape), np.dtype(dtype))
        buf = store.get(key)
        if buf is None:
            if len(store) >= 64:  # many shapes (batch sizes): keep memory bounded
                store.clear()
            buf = store[key] = np.empty(shape, dtype)
        return buf

    def _hidden_operand(self, W_hh):
        """W_hhᵀ as the forward time loops' GEMMs take it: a C-contiguous copy (see their note),
        into a kept buffer."""
        out = self._recurrent_buffer("W_hhT", W_hh.shape[::-1], W_hh.dtype)
        np.copyto(out, W_hh.T)
        return out

    # ---- the GEMMs over all rows ---------------------------------------------------------------
    def rows_gemm(self, A, B, out, bias=None, matmul=None):
        """out = A B (+ bias), the rows split into the time loops' chunks (see the reference op)."""
        check_gemm("rows_gemm", A, B, out, bias)
        nchunks = self._steps_chunks(A.shape[0])
        if nchunks == 1:
            return super().rows_gemm(A, B, out, bias)
        add_bias = bias is not None
        b = bias if add_bias else out[0]  # unused without a bias
        checks.float_arrays(("A", "out", "bias"), A, out, b)
        B = _blas_operand(B, A.dtype, "B")
        with blas.one_blas_thread():
            _rows_gemm_parallel(A, B, out, b, add_bias, nchunks)
        return out

    def weight_gemm(self, dG, A, dW, db=None, matmul=None, A2=None, dW2=None):
        """dW = dGᵀ A (and db = Σ_rows dG; with A2, dW2 also dW2 = dGᵀ A2): each chunk's rows one
        GEMM (on its copy of [A, A2] with A2) and column sum, the chunks added in chunk order (the
        sums in float64)."""
        check_gemm("weight_gemm", dG, A, dW, db)
        pair = check_second_operand(dG, A2, dW2)
        nchunks = self._steps_chunks(A.shape[0])
        if nchunks == 1:
            return super().weight_gemm(dG, A, dW, db, A2=A2, dW2=dW2)
        sum_cols = db is not None
        d = db if sum_cols else dW[0]  # unused without db
        checks.float_arrays(("dG", "A", "dW", "db"), dG, A, dW, d)
        M, K1 = A.shape
        if pair:
            checks.float_arrays(("dG", "A2", "dW2"), dG, A2, dW2)
            K2 = A2.shape[1]
            scratch = self._recurrent_buffer("wg scratch", (nchunks, -(-M // nchunks), K1 + K2), dW.dtype)
        else:
            K2 = 0
            A2, dW2 = np.empty((M, 0), dW.dtype), np.empty((dW.shape[0], 0), dW.dtype)
            scratch = np.empty((nchunks, 0, 0), dW.dtype)
        # [dW, dW2]ᵀ of each chunk
        partial = self._recurrent_buffer("wg partial", (nchunks, K1 + K2, dW.shape[0]), dW.dtype)
        colsum = self._recurrent_buffer("wg colsum", (nchunks, dG.shape[1]), np.float64)
        with blas.one_blas_thread():
            _weight_gemm_parallel(dG, A, A2, scratch, partial, colsum, sum_cols, nchunks)
        _sum_partials(partial, dW, dW2, colsum, d, sum_cols)
        return dW

    def row_chunks(self, op, rows):
        """The row chunks op ``op`` runs ``rows`` rows in, each chunk on its own thread with one
        BLAS thread (chunk c: rows ``_span(c, chunks, rows)``): "steps" (a time loop; rows = the
        batch; 1 = all rows on the calling thread, BLAS still on one thread), "rows_gemm" or
        "weight_gemm" (rows = T·N; 0: one GEMM through the matmul given, as the reference's).
        The benchmark's GEMM plan reads it (gpubackprop/benchmark/gemm_limit.py)."""
        n = self._steps_chunks(rows)
        return n if op == "steps" or n > 1 else 0

    # ---- the time loops ------------------------------------------------------------------------
    def _steps_chunks(self, N):
        """How many row chunks a time loop over a batch of N runs on (1: serial); with
        ``parallel_min=0`` (tests, warm-up) every batch of two or more rows is split."""
        min_rows = 1 if self.par_cheap == 0 else STEPS_MIN_ROWS
        return max(1, min(self.nchunks, N // min_rows))

    def _run_steps(self, serial, parallel, N, args):
        """Checks done, runs one time loop: serially on all rows, or split into row chunks."""
        nchunks = self._steps_chunks(N)
        with blas.one_blas_thread():
            if nchunks == 1:
                serial(*args, 0, N)
            else:
                parallel(*args, nchunks)

    def rnn_forward_steps(self, gx, W_hh, b_hh, hs, gh, activation, reverse=False, matmul=None):
        """All T steps of one RNN direction in one call (see the reference op)."""
        act = RNN_RELU if check_act(activation) == "relu" else RNN_TANH
        arrays = (gx, W_hh, b_hh, hs, gh)
        checks.float_arrays(STEPS_NAMES["rnn_forward_steps"], *arrays)
        _, N, _ = check_steps("rnn_forward_steps", arrays)
        W_hhT = self._hidden_operand(W_hh)  # (H, H): see the note on the time loops
        self._run_steps(_rnn_forward_rows, _rnn_forward_parallel, N,
                        (gx, W_hhT, b_hh, hs, gh, act, bool(reverse)))
        return hs

    def rnn_backward_steps(self, dout, W_hh, hs, dpre, dh, activation, reverse=False,
                           state_grad=True, matmul=None):
        """Backward through all T steps of one RNN direction in one call (see the reference op)."""
        act = RNN_RELU if check_act(activation) == "relu" else RNN_TANH
        arrays = (dout, W_hh, hs, dpre, dh)
        checks.float_arrays(STEPS_NAMES["rnn_backward_steps"], *arrays)
        _, N, _ = check_steps("rnn_backward_steps", arrays)
        self._run_steps(_rnn_backward_rows, _rnn_backward_parallel, N,
                        (*arrays, act, bool(reverse), bool(state_grad)))
        return dpre, dh

    # The recurrent layers give lstm_forward_steps the layer's input (x, W_ih, b_ih) where a kernel
    # set says so here, and then make no rows_gemm for gx: the input projection runs in the time
    # loop, each step's [x_t, h_prev] one GEMM with [W_ih; W_hh]ᵀ (_lstm_forward_xh_rows).
    lstm_input_in_steps = True

    def lstm_forward_steps(self, gx, W_hh, b_hh, hs, cs, gates, gh, reverse=False, matmul=None,
                           x=None, W_ih=None, b_ih=None):
        """All T steps of one LSTM direction in one call (see the reference op). With x (T, N, F)
        and W_ih (4H, F) (and b_ih (4H,) or None) the step's pre-activations are
        [x_t, h_prev] [W_ih; W_hh]ᵀ + (b_ih + b_hh), the input projection computed here; gx is
        then not read (the layer's buffer for it, which its backward overwrites)."""
        arrays = (gx, W_hh, b_hh, hs, cs, gates, gh)
        checks.float_arrays(STEPS_NAMES["lstm_forward_steps"], *arrays)
        T, N, H = check_steps("lstm_forward_steps", arrays)
        if x is None:
            if W_ih is not None or b_ih is not None:
                raise ValueError("lstm_forward_steps: W_ih and b_ih go with x (the layer's input); "
                                 "got them without x")
            W_hhT = self._hidden_operand(W_hh)  # (H, 4H)
            self._run_steps(_lstm_forward_rows, _lstm_forward_parallel, N,
                            (gx, W_hhT, b_hh, hs, cs, gates, gh, bool(reverse)))
            return hs, cs
        W_xhT, b = self._input_operands(x, W_ih, b_ih, W_hh, b_hh, T, N, H)
        xh = self._recurrent_buffer("xh", (N, W_xhT.shape[0]), hs.dtype)
        self._run_steps(_lstm_forward_xh_rows, _lstm_forward_xh_parallel, N,
                        (x, W_xhT, b, hs, cs, gates, gh, xh, bool(reverse)))
        return hs, cs

    def _input_operands(self, x, W_ih, b_ih, W_hh, b_hh, T, N, H):
        """[W_ih; W_hh]ᵀ (F + H, G·H) C-contiguous and b_ih + b_hh (b_hh without b_ih), in kept
        buffers, for a time loop that runs the input projection; x, W_ih and b_ih checked."""
        dtype = W_hh.dtype
        checks.float_arrays(("x", "W_ih"), x, W_ih)
        for name, a in (("x", x), ("W_ih", W_ih)):
            if a.dtype != dtype:
                raise TypeError(f"{name}: expected dtype {dtype} (as W_hh), got {a.dtype}")
        GH = W_hh.shape[0]
        if x.ndim != 3 or tuple(x.shape[:2]) != (T, N) or x.shape[2] < 1:
            raise ValueError(f"x: expected shape ({T}, {N}, F) (time steps, batch as hs; F >= 1 "
                             f"input features), got shape {tuple(x.shape)}")
        F = x.shape[2]
        if tuple(W_ih.shape) != (GH, F):
            raise ValueError(f"W_ih: expected shape {(GH, F)} (as W_hh's rows, x's features), got "
                             f"shape {tuple(W_ih.shape)}")
        W_xhT = self._recurrent_buffer("W_xhT", (F + H, GH), dtype)
        np.copyto(W_xhT[:F], W_ih.T)
        np.copyto(W_xhT[F:], W_hh.T)
        b = self._recurrent_buffer("b_ih + b_hh", (GH,), dtype)
        if b_ih is None:
            np.copyto(b, b_hh)
        else:
            if getattr(b_ih, "dtype", None) != dtype or tuple(b_ih.shape) != (GH,):
                got = (f"shape {tuple(b_ih.shape)}, dtype {b_ih.dtype}" if hasattr(b_ih, "shape")
                       else type(b_ih).__name__)
                raise ValueError(f"b_ih: expected shape {(GH,)} and dtype {dtype} (as b_hh), got "
                                 f"{got}")
            np.add(b_ih, b_hh, out=b)
        return W_xhT, b

    def lstm_backward_steps(self, dout, W_hh, cs, gates, dgates, dh, dc, reverse=False,
                            state_grad=True, matmul=None):
        """Backward through all T steps of one LSTM direction in one call (see the reference op)."""
        arrays = (dout, W_hh, cs, gates, dgates, dh, dc)
        checks.float_arrays(STEPS_NAMES["lstm_backward_steps"], *arrays)
        _, N, _ = check_steps("lstm_backward_steps", arrays)
        self._run_steps(_lstm_backward_rows, _lstm_backward_parallel, N,
                        (*arrays, bool(reverse), bool(state_grad)))
        return dgates, dh, dc

    def gru_forward_steps(self, gx, W_hh, b_hh, hs, saved, gh, reverse=False, matmul=None):
        """All T steps of one GRU direction in one call (see the reference op)."""
        arrays = (gx, W_hh, b_hh, hs, saved, gh)
        checks.float_arrays(STEPS_NAMES["gru_forward_steps"], *arrays)
        _, N, _ = check_steps("gru_forward_steps", arrays)
        W_hhT = self._hidden_operand(W_hh)  # (H, 3H)
        self._run_steps(_gru_forward_rows, _gru_forward_parallel, N,
                        (gx, W_hhT, b_hh, hs, saved, gh, bool(reverse)))
        return hs

    def gru_backward_steps(self, dout, W_hh, hs, saved, dgx, dgh, dh, carry, reverse=False,
                           state_grad=True, matmul=None):
        """Backward through all T steps of one GRU direction in one call (see the reference op)."""
        arrays = (dout, W_hh, hs, saved, dgx, dgh, dh, carry)
        checks.float_arrays(STEPS_NAMES["gru_backward_steps"], *arrays)
        _, N, _ = check_steps("gru_backward_steps", arrays)
        self._run_steps(_gru_backward_rows, _gru_backward_parallel, N,
                        (*arrays, bool(reverse), bool(state_grad)))
        return dgx, dgh, dh
