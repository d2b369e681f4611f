"""CUDA attention ops: the masked row softmax and its backward pass, a block a row.

A block's threads stride over the row's entries, then tree reductions in shared memory in a fixed
order (the max, then Σ exp; Σ dy·y backward), so every run gives the same bits. The sums are in
the array dtype (a row is at most a key sequence long: no float64 accumulator needed). Semantics
as ``kernels/reference/attention.py``: a fully masked row (all -inf) gives zeros, not PyTorch's NaN.
"""

import math

from gpubackprop.kernels.cuda.launch import THREADS, cuda, kernel_body
from gpubackprop.kernels.cuda.losses import threads_for
from gpubackprop.kernels.cuda.numerics import tree_max, tree_sum
from gpubackprop.kernels.reference.attention import (
    check_masked_softmax,
    check_masked_softmax_backward,
)


@kernel_body("void({t}[:, ::1], {t}[:, ::1], boolean, {t}[:, ::1])")
def _masked_softmax(X, mask, has_mask, Y):
    """A block a row: z = x + mask into Y, the row max (NaN wins), Σ exp(z − max), y = e / Σ."""
    red = cuda.shared.array(THREADS, X.dtype)
    R, L = X.shape
    tid = cuda.threadIdx.x
    nt = cuda.blockDim.x
    t = X.dtype.type
    for r in range(cuda.blockIdx.x, R, cuda.gridDim.x):  # the same rows for every thread: barriers hold
        m = t(-math.inf)
        for j in range(tid, L, nt):
            z = X[r, j] + mask[r, j] if has_mask else X[r, j]
            Y[r, j] = z  # X[r, j] read first: Y may be X
            if z > m or z != z:
                m = z
        red[tid] = m
        tree_max(red, tid, nt)
        mt = red[0]
        cuda.syncthreads()  # everyone has read the max before red is reused
        dead = mt == -math.inf  # every entry masked: zeros, not NaN
        s = t(0)
        for j in range(tid, L, nt):
            e = t(0) if dead else math.exp(Y[r, j] - mt)
            Y[r, j] = e
            s += e
        red[tid] = s
        tree_sum(red, tid, nt)
        st = t(1) if dead else red[0]
        for j in range(tid, L, nt):
            Y[r, j] = Y[r, j] / st
        cuda.syncthreads()  # red[0] is read above before the next row overwrites it


@kernel_body("void({t}[:, ::1], {t}[:, ::1], {t}[:, ::1])")
def _masked_softmax_grad(dY, Y, dX):
    """A block a row: Σ dy·y by a tree reduction, then dx = y·(dy − Σ)."""
    red = cuda.shared.array(THREADS, Y.dtype)
    R, L = Y.shape
    tid = cuda.threadIdx.x
    nt = cuda.blockDim.x
    for r in range(cuda.blockIdx.x, R, cuda.gridDim.x):
        s = Y.dtype.type(0)
        for j in range(tid, L, nt):
            s += dY[r, j] * Y[r, j]
        red[tid] = s
        tree_sum(red, tid, nt)
        dot = red[0]
        cuda.syncthreads()  # everyone has read red[0] before the next row overwrites it
        for j in range(tid, L, nt):
            dX[r, j] = Y[r, j] * (dY[r, j] - dot)


class AttentionOps:
    """Fused attention ops (a mixin of ``CudaOps``: uses its launcher)."""

    def masked_softmax(self, X, mask, Y):
        """Y = softmax(X + mask) per row, a block a row; a fully masked row gives zeros. Y may be X."""
        dt = check_masked_softmax(X, mask, Y)
        R, L = X.shape
        if L == 0:
            return Y
        has_mask = mask is not None
        self.launch(_masked_softmax, R, dt, X, mask if has_mask else X, has_mask, Y,
                    blocks=min(R, self.max_blocks), threads=threads_for(L))
        return Y

    def masked_softmax_backward(self, dY, Y, dX):
        """dX = Y ⊙ (dY − Σ_row dY ⊙ Y), a block a row. dX may be dY."""
        dt = check_masked_softmax_backward(dY, Y, dX)
        R, L = Y.shape
        if L == 0:
            return dX
        self.launch(_masked_softmax_grad, R, dt, dY, Y, dX, blocks=min(R, self.max_blocks),
                    threads=threads_for(L))
        return dX
