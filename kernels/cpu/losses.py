"""CPU loss ops: softmax + cross-entropy (BP1), one pass a row."""

import math

import numpy as np
from numba import njit, prange

from gpubackprop.kernels import checks
from gpubackprop.kernels.cpu.numerics import _exp, _span


# ---- BP1 for softmax + cross-entropy ------------------------------------------------------------
@njit(cache=True, error_model="numpy")
def _exp_row(logits, dlogits, i, m):
    """dlogits[i] = exp(logits[i] − m); returns the row sum, added in float64 in a fixed order."""
    C = logits.shape[1]
    for j in range(C):
        dlogits[i, j] = _exp(logits[i, j] - m)
    # Eight interleaved float64 accumulators: a fixed order (deterministic) that the SLP
    # vectorizer packs into vector adds, instead of one long dependent add chain.
    s0 = s1 = s2 = s3 = s4 = s5 = s6 = s7 = 0.0
    j = 0
    while j + 8 <= C:
        s0 += dlogits[i, j]
        s1 += dlogits[i, j + 1]
        s2 += dlogits[i, j + 2]
        s3 += dlogits[i, j + 3]
        s4 += dlogits[i, j + 4]
        s5 += dlogits[i, j + 5]
        s6 += dlogits[i, j + 6]
        s7 += dlogits[i, j + 7]
        j += 8
    while j < C:
        s0 += dlogits[i, j]
        j += 1
    return ((s0 + s1) + (s2 + s3)) + ((s4 + s5) + (s6 + s7))


@njit(cache=True, error_model="numpy", inline="always")
def _row_max(logits, i):
    """max(logits[i]) over eight interleaved lanes (vectorizes; a NaN is caught by the sum)."""
    C = logits.shape[1]
    m0 = m1 = m2 = m3 = m4 = m5 = m6 = m7 = logits[i, 0]
    j = 0
    while j + 8 <= C:
        v0, v1, v2, v3 = logits[i, j], logits[i, j + 1], logits[i, j + 2], logits[i, j + 3]
        v4, v5, v6, v7 = logits[i, j + 4], logits[i, j + 5], logits[i, j + 6], logits[i, j + 7]
        m0 = v0 if v0 > m0 else m0
        m1 = v1 if v1 > m1 else m1
        m2 = v2 if v2 > m2 else m2
        m3 = v3 if v3 > m3 else m3
        m4 = v4 if v4 > m4 else m4
        m5 = v5 if v5 > m5 else m5
        m6 = v6 if v6 > m6 else m6
        m7 = v7 if v7 > m7 else m7
        j += 8
    while j < C:
        v = logits[i, j]
        m0 = v if v > m0 else m0
        j += 1
    m0 = m1 if m1 > m0 else m0
    m2 = m3 if m3 > m2 else m2
    m4 = m5 if m5 > m4 else m4
    m6 = m7 if m7 > m6 else m6
    m0 = m2 if m2 > m0 else m0
    m4 = m6 if m6 > m4 else m4
    return m4 if m4 > m0 else m0


@njit(cache=True, error_model="numpy")
def _softmax_ce_rows(logits, labels, dlogits, loss_rows, r0, r1):
    B, C = logits.shape
    one = logits.dtype.type(1)
    fB = logits.dtype.type(B)
    for i in range(r0, r1):
        y = labels[i]
        valid = 0 <= y < C  # labels are checked on the host; this only keeps memory safe
        zy = logits[i, y] if valid else logits.dtype.type(np.nan)  # read before dlogits may alias
        # Subtract the row max before exp (log-sum-exp) so exp never overflows. A NaN in the row
        # needs no test here: its exp makes the row's sum, loss and gradient NaN.
        m = _row_max(logits, i)
        sf = logits.dtype.type(_exp_row(logits, dlogits, i, m))
        loss_rows[i] = math.log(sf) + m - zy
        ey = dlogits[i, y] if valid else zy
        inv = one / (sf * fB)  # one division a row; differs from (e/s)/B by at most an ulp
        for j in range(C):  # (softmax − onehot)/B, the one-hot entry mended after the loop
            dlogits[i, j] = dlogits[i, j] * inv
        if valid:
            dlogits[i, y] = (ey / sf - one) / fB


@njit(cache=True, error_model="numpy")
def _softmax_ce_serial(logits, labels, dlogits, loss_rows):
    _softmax_ce_rows(logits, labels, dlogits, loss_rows, 0, logits.shape[0])


@njit(cache=True, error_model="numpy", parallel=True)
def _softmax_ce_parallel(logits, labels, dlogits, loss_rows, nchunks):
    B = logits.shape[0]
    for c in prange(nchunks):
        r0, r1 = _span(c, nchunks, B)
        _softmax_ce_rows(logits, labels, dlogits, loss_rows, r0, r1)



class LossOps:
    """Fused loss ops (a mixin of ``CpuOps``)."""

    def softmax_ce(self, logits, labels, dlogits, loss_rows):
        """Per-row loss logsumexp(z) − z[y]; dlogits = (softmax(z) − onehot(y))/B. One pass a row.

        A label outside [0, C) (the host checks them first) gives a NaN loss row, never a stray
        write. dlogits may be logits itself.
        """
        checks.float_arrays(checks.NAMES_SOFTMAX_CE, logits, dlogits, loss_rows)
        checks.check_softmax_ce(logits, labels, dlogits, loss_rows)
        if logits.shape[1] == 0:
            raise checks.shape_error("logits", "at least one class (column)", logits)
        if self.parallel and logits.size >= self.par_transcendental and logits.shape[0] > 1:
            _softmax_ce_parallel(logits, labels, dlogits, loss_rows,
                                 min(self.nchunks, logits.shape[0]))
        else:
            _softmax_ce_serial(logits, labels, dlogits, loss_rows)
        return dlogits, loss_rows
