"""CUDA loss ops: softmax + cross-entropy (BP1), a block a row."""

import math

import numpy as np

from gpubackprop.kernels import checks
from gpubackprop.kernels.cuda.launch import SIMULATOR, THREADS, cuda, kernel_body
from gpubackprop.kernels.cuda.numerics import tree_max, tree_sum


@kernel_body("void({t}[:, ::1], {l}[::1], {t}[:, ::1], {t}[::1])")
def _softmax_ce(logits, labels, dlogits, loss_rows):
    """A block a row: its threads stride over the classes, then tree reductions (max, then sum).

    Deliberate float64: the row sum of exponentials is accumulated in float64 (``red``), so a
    float32 row of 1000 classes loses nothing to the summation order. The row max passes through
    the same float64 buffer unchanged (a float32 converts to float64 exactly; only compared).
    """
    red = cuda.shared.array(THREADS, np.float64)
    B, C = logits.shape
    tid = cuda.threadIdx.x
    nt = cuda.blockDim.x
    one = logits.dtype.type(1)
    fB = logits.dtype.type(B)
    for i in range(cuda.blockIdx.x, B, cuda.gridDim.x):  # the same rows for every thread: barriers hold
        y = labels[i]
        valid = y >= 0 and y < C  # labels are checked on the host; this only keeps memory safe
        zy = logits[i, y] if valid else logits.dtype.type(math.nan)  # before dlogits may alias
        # Subtract the row max before exp (log-sum-exp) so exp never overflows; NaN propagates.
        m = logits.dtype.type(-math.inf)
        for j in range(tid, C, nt):
            v = logits[i, j]
            if v > m or v != v:
                m = v
        red[tid] = m
        tree_max(red, tid, nt)
        m = logits.dtype.type(red[0])
        cuda.syncthreads()  # everyone has read the max before red is reused
        s = 0.0
        for j in range(tid, C, nt):
            e = math.exp(logits[i, j] - m)
            dlogits[i, j] = e
            s += e
        red[tid] = s
        tree_sum(red, tid, nt)
        sf = logits.dtype.type(red[0])
        if tid == 0:
            loss_rows[i] = math.log(sf) + m - zy
        for j in range(tid, C, nt):
            d = dlogits[i, j] / sf
            if j == y:
                d = d - one
            dlogits[i, j] = d / fB
        cuda.syncthreads()  # red is read above before the next row overwrites it


def threads_for(C):
    """The smallest power of two >= C, at least a warp and at most a block: no idle warps.

    The simulator pays dearly for each barrier of each thread, so there the floor is 4 threads.
    """
    t = 4 if SIMULATOR else 32
    while t < C and t < THREADS:
        t *= 2
    return min(t, THREADS)


class LossOps:
    """Fused loss ops (a mixin of ``CudaOps``)."""

    def softmax_ce(self, logits, labels, dlogits, loss_rows):
        """Per-row loss logsumexp(z) − z[y]; dlogits = (softmax(z) − onehot(y))/B; a block a row.

        A label outside [0, C) (the host checks them first) gives a NaN loss row, never a stray
        write. dlogits may be logits itself.
        """
        dt = checks.float_arrays(checks.NAMES_SOFTMAX_CE, logits, dlogits, loss_rows)
        checks.check_softmax_ce(logits, labels, dlogits, loss_rows)
        B, C = logits.shape
        if C == 0:
            raise checks.shape_error("logits", "at least one class (column)", logits)
        self.launch(_softmax_ce, B, dt, logits, labels, dlogits, loss_rows,
                    label_dtype=labels.dtype, blocks=min(B, self.max_blocks),
                    threads=threads_for(C))
        return dlogits, loss_rows
