"""CUDA embedding ops: the row gather, and the weight gradient as ordered segment sums (no atomics).

Backward: the positions are sorted by index on the device (``sorted_positions``: a sort of the
unique keys index·n + position, so ties stay in position order whatever the sort), which gives
each row a segment of its positions in position order; then one thread per (row, feature) sums its
segment in that order. The sums are the reference's exactly (``kernels/reference/embedding.py``),
in the array dtype, bit for bit, and the same on every run: no atomic adds whose order varies.
"""

import math

import numpy as np

from gpubackprop.kernels.cuda.launch import cuda, kernel_body
from gpubackprop.kernels.reference.embedding import (
    check_embedding,
    check_embedding_backward,
    padding_row,
    sorted_positions,
)


@kernel_body("void({t}[:, ::1], {l}[::1], {t}[:, ::1])")
def _embedding(W, idx, Y):
    """One thread per (position, feature): Y[p, d] = W[idx[p], d]."""
    V, D = W.shape
    n = idx.shape[0]
    nan = W.dtype.type(math.nan)
    for i in range(cuda.grid(1), n * D, cuda.gridsize(1)):
        p = i // D
        d = i - p * D
        v = idx[p]
        # The layer checks indices before any kernel; this only keeps memory safe.
        Y[p, d] = W[v, d] if v >= 0 and v < V else nan


@kernel_body("void({t}[:, ::1], int64[::1], int64[::1], {t}[:, ::1], boolean)")
def _embedding_grad(dY, pos, bounds, dW, accumulate):
    """One thread per (row, feature): its segment's dY summed in position order."""
    V, D = dW.shape
    for i in range(cuda.grid(1), V * D, cuda.gridsize(1)):
        v = i // D
        d = i - v * D
        s = dW.dtype.type(0)
        for k in range(bounds[v], bounds[v + 1]):
            s += dY[pos[k], d]
        dW[v, d] = dW[v, d] + s if accumulate else s


class EmbeddingOps:
    """Fused embedding ops (a mixin of ``CudaOps``: uses its launcher)."""

    def embedding(self, W, idx, Y):
        """Y (n, D) = W[idx], one kernel; a NaN row for an index outside [0, V)."""
        dt = check_embedding(W, idx, Y)
        self.launch(_embedding, Y.size, dt, W, idx, Y, label_dtype=idx.dtype)
        return Y

    def embedding_backward(self, dY, idx, dW, padding_idx=None, accumulate=False):
        """dW[v] (+)= the sum of dY[p] over the positions with idx[p] = v, in position order."""
        dt = check_embedding_backward(dY, idx, dW)
        V = dW.shape[0]
        pos, bounds = sorted_positions(self.xp, idx, V, padding_row(padding_idx, V))
        if pos.size == 0:  # an empty array's CUDA interface has no data pointer to launch with
            pos = self.xp.zeros(1, np.int64)
        self.launch(_embedding_grad, dW.size, dt, dY, pos, bounds, dW, bool(accumulate))
        return dW
