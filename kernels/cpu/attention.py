"""CPU attention ops: the masked row softmax and its backward pass, one Numba pass per row.

Each row is read in a fixed order (left to right: the max, then Σ exp, then the division), so the
result does not depend on the thread count; the parallel kernels split the rows into chunks, and
rows are independent. Semantics as ``kernels/reference/attention.py`` (a fully masked row gives
zeros).
"""

import math

from numba import njit, prange

from gpubackprop.kernels.cpu.numerics import _span
from gpubackprop.kernels.reference.attention import (
    check_masked_softmax,
    check_masked_softmax_backward,
)


@njit(cache=True, error_model="numpy", inline="always")
def _softmax_rows(X, mask, has_mask, Y, r0, r1):
    L = X.shape[1]
    zero = X.dtype.type(0)
    for r in range(r0, r1):
        m = X.dtype.type(-math.inf)
        nan = False
        for j in range(L):
            z = X[r, j] + mask[r, j] if has_mask else X[r, j]
            Y[r, j] = z  # z kept in Y for the next passes (read X[r, j] first: Y may be X)
            if z != z:
                nan = True
            elif z > m:
                m = z
        if nan:
            for j in range(L):
                Y[r, j] = X.dtype.type(math.nan)
            continue
        if m == -math.inf:  # every entry masked: zeros, not NaN
            for j in range(L):
                Y[r, j] = zero
            continue
        s = zero
        for j in range(L):
            e = math.exp(Y[r, j] - m)
            Y[r, j] = e
            s += e
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
    for r in range(r0, r1):
        dot = Y.dtype.type(0)
        for j in range(L):
            dot += dY[r, j] * Y[r, j]
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
