"""CPU attention ops: the masked row softmax and its backward pass, one Numba pass per row.

Each row is read in a fixed order (the max, exp, Σ, the division; the max and the sums over 8
lanes j mod 8, added pairwise at the end, so that they do not wait on one add each), so the
result does not depend on the thread count; the parallel kernels split the rows into chunks, and
rows are independent. float32's exp is the vectorizable polynomial of ``numerics._exp``.
Semantics as ``kernels/reference/attention.py`` (a fully masked row gives zeros).
"""

import math

from numba import njit, prange

from gpubackprop.kernels.cpu.numerics import _exp, _span
from gpubackprop.kernels.reference.attention import (
    check_masked_softmax,
    check_masked_softmax_backward,
)


@njit(cache=True, error_model="numpy", inline="always")
def _row_max(Y, r, L):
    """max_j Y[r, j] over the non-NaN entries (-inf when none): 8 running maxima (lanes j mod 8),
    so that the comparisons do not wait on each other."""
    m0 = m1 = m2 = m3 = m4 = m5 = m6 = m7 = Y.dtype.type(-math.inf)
    j = 0
    while j + 8 <= L:
        m0 = Y[r, j] if Y[r, j] > m0 else m0
        m1 = Y[r, j + 1] if Y[r, j + 1] > m1 else m1
        m2 = Y[r, j + 2] if Y[r, j + 2] > m2 else m2
        m3 = Y[r, j + 3] if Y[r, j + 3] > m3 else m3
        m4 = Y[r, j + 4] if Y[r, j + 4] > m4 else m4
        m5 = Y[r, j + 5] if Y[r, j + 5] > m5 else m5
        m6 = Y[r, j + 6] if Y[r, j + 6] > m6 else m6
        m7 = Y[r, j + 7] if Y[r, j + 7] > m7 else m7
        j += 8
    while j < L:
        m0 = Y[r, j] if Y[r, j] > m0 else m0
        j += 1
    return max(max(max(m0, m1), max(m2, m3)), max(max(m4, m5), max(m6, m7)))


@njit(cache=True, error_model="numpy", inline="always")
def _row_sum(Y, r, L):
    """Σ_j Y[r, j] in a fixed order: 8 partial sums (lanes j mod 8), then the lanes pairwise."""
    zero = Y.dtype.type(0)
    s0 = s1 = s2 = s3 = s4 = s5 = s6 = s7 = zero
    j = 0
    while j + 8 <= L:
        s0 += Y[r, j]
        s1 += Y[r, j + 1]
        s2 += Y[r, j + 2]
        s3 += Y[r, j + 3]
        s4 += Y[r, j + 4]
        s5 += Y[r, j + 5]
        s6 += Y[r, j + 6]
        s7 += Y[r, j + 7]
        j += 8
    while j < L:
        s0 += Y[r, j]
        j += 1
    return ((s0 + s1) + (s2 + s3)) + ((s4 + s5) + (s6 + s7))


@njit(cache=True, error_model="numpy", inline="always")
def _softmax_rows(X, mask, has_mask, Y, r0, r1):
    L = X.shape[1]
    zero = X.dtype.type(0)
    for r in range(r0, r1):
        if has_mask:  # z kept in Y for the next passes (each X[r, j] read before Y[r, j]: Y may be X)
            for j in range(L):
                Y[r, j] = X[r, j] + mask[r, j]
        else:
            for j in range(L):
                Y[r, j] = X[r, j]
        m = _row_max(Y, r, L)
        if m == -math.inf:  # every entry masked (or NaN): zeros, not NaN; NaN stays NaN
            nan = False
            for j in range(L):
                nan = nan or Y[r, j] != Y[r, j]
            for j in range(L):
                Y[r, j] = X.dtype.type(math.nan) if nan else zero
            continue
        # A NaN entry (never the max) makes its exp NaN, hence Σ and the whole row NaN, as the
        # reference's. exp apart from the sum, so that the pass vectorizes (float32: _exp's
        # polynomial).
        for j in range(L):
            Y[r, j] = _exp(Y[r, j] - m)
        s = _row_sum(Y, r, L)
        for j in range(L):
            Y[r, j] = Y[r, j] / s


@njit(cache=True, error_model="numpy")
def _softmax_serial(X, mask, has_mask, Y):
    _softmax_rows(X, mask, has_mask, Y, 0, X.shape[0])


@njit(cache=True, error_model="numpy", parallel=True)
def _softmax_parallel(X, mask, has_mask, Y, nchunks):
    for c in prange(nchunks):
        r0, r1 = _span(c, nchunks, X.shape[0])
        _softmax_rows(X, mask, has_mask, Y, r0, r1)


@njit(cache=True, error_model="numpy", inline="always")
def _softmax_grad_rows(dY, Y, dX, r0, r1):
    L = Y.shape[1]
    zero = Y.dtype.type(0)
    for r in range(r0, r1):
        d0 = d1 = d2 = d3 = d4 = d5 = d6 = d7 = zero  # Σ dy·y as _row_sum adds
        j = 0
        while j + 8 <= L:
            d0 += dY[r, j] * Y[r, j]
            d1 += dY[r, j + 1] * Y[r, j + 1]
            d2 += dY[r, j + 2] * Y[r, j + 2]
            d3 += dY[r, j + 3] * Y[r, j + 3]
            d4 += dY[r, j + 4] * Y[r, j + 4]
            d5 += dY[r, j + 5] * Y[r, j + 5]
            d6 += dY[r, j + 6] * Y[r, j + 6]
            d7 += dY[r, j + 7] * Y[r, j + 7]
            j += 8
        while j < L:
            d0 += dY[r, j] * Y[r, j]
            j += 1
        dot = ((d0 + d1) + (d2 + d3)) + ((d4 + d5) + (d6 + d7))
        for j in range(L):
            dX[r, j] = Y[r, j] * (dY[r, j] - dot)


@njit(cache=True, error_model="numpy")
def _softmax_grad_serial(dY, Y, dX):
    _softmax_grad_rows(dY, Y, dX, 0, Y.shape[0])


@njit(cache=True, error_model="numpy", parallel=True)
def _softmax_grad_parallel(dY, Y, dX, nchunks):
    for c in prange(nchunks):
        r0, r1 = _span(c, nchunks, Y.shape[0])
        _softmax_grad_rows(dY, Y, dX, r0, r1)


class AttentionOps:
    """Fused attention ops (a mixin of ``CpuOps``)."""

    def masked_softmax(self, X, mask, Y):
        """Y = softmax(X + mask) per row, one pass a row; a fully masked row gives zeros. Y may be X."""
        check_masked_softmax(X, mask, Y)
        has_mask = mask is not None
        m = mask if has_mask else X  # a placeholder Numba can type; never read
        if self.parallel and X.size >= self.par_transcendental:
            _softmax_parallel(X, m, has_mask, Y, self.nchunks)
        else:
            _softmax_serial(X, m, has_mask, Y)
        return Y

    def masked_softmax_backward(self, dY, Y, dX):
        """dX = Y ⊙ (dY − Σ_row dY ⊙ Y). dX may be dY."""
        check_masked_softmax_backward(dY, Y, dX)
        if self.parallel and Y.size >= self.par_cheap:
            _softmax_grad_parallel(dY, Y, dX, self.nchunks)
        else:
            _softmax_grad_serial(dY, Y, dX)
        return dX
