"""CPU embedding ops: the row gather, and the weight gradient by a counting sort of the positions.

The backward pass sorts the positions by index with a counting sort (a count per row, a prefix sum,
then the positions placed in increasing order, so each row's segment lists its positions in
position order), then sums each row's segment in that order: the reference's sums exactly
(``kernels/reference/embedding.py``), in the array dtype, bit for bit, whatever the thread count.
The rows are independent, so the parallel kernel splits the rows into chunks.
"""

import numpy as np
from numba import njit, prange

from gpubackprop.kernels.cpu.numerics import _span
from gpubackprop.kernels.reference.embedding import (
    check_embedding,
    check_embedding_backward,
    padding_row,
)


@njit(cache=True, error_model="numpy")
def _gather(W, idx, Y):
    V = W.shape[0]
    nan = W.dtype.type(np.nan)
    for p in range(idx.shape[0]):
        v = idx[p]
        if 0 <= v < V:
            Y[p, :] = W[v, :]
        else:  # the layer checks indices first; this only keeps memory safe
            Y[p, :] = nan


@njit(cache=True, error_model="numpy")
def _counting_sort(idx, V, pad):
    """(pos, bounds): positions grouped by index in position order; padding/out-of-range skipped."""
    counts = np.zeros(V + 1, np.int64)
    for p in range(idx.shape[0]):
        v = idx[p]
        if 0 <= v < V and v != pad:
            counts[v + 1] += 1
    for v in range(V):
        counts[v + 1] += counts[v]
    bounds = counts.copy()
    fill = counts[:V].copy()
    pos = np.empty(bounds[V], np.int64)
    for p in range(idx.shape[0]):
        v = idx[p]
        if 0 <= v < V and v != pad:
            pos[fill[v]] = p
            fill[v] += 1
    return pos, bounds


@njit(cache=True, error_model="numpy", inline="always")
def _segment_rows(dY, pos, bounds, dW, accumulate, v0, v1):
    s = np.empty(dW.shape[1], dW.dtype)
    for v in range(v0, v1):
        s[:] = 0
        for k in range(bounds[v], bounds[v + 1]):
            s += dY[pos[k], :]
        if accumulate:
            dW[v, :] += s
        else:
            dW[v, :] = s


@njit(cache=True, error_model="numpy")
def _grad_serial(dY, idx, dW, pad, accumulate):
    pos, bounds = _counting_sort(idx, dW.shape[0], pad)
    _segment_rows(dY, pos, bounds, dW, accumulate, 0, dW.shape[0])


@njit(cache=True, error_model="numpy", parallel=True)
def _grad_parallel(dY, idx, dW, pad, accumulate, nchunks):
    pos, bounds = _counting_sort(idx, dW.shape[0], pad)
    for c in prange(nchunks):
        v0, v1 = _span(c, nchunks, dW.shape[0])
        _segment_rows(dY, pos, bounds, dW, accumulate, v0, v1)


class EmbeddingOps:
    """Fused embedding ops (a mixin of ``CpuOps``)."""

    def embedding(self, W, idx, Y):
        """Y (n, D) = W[idx], one pass; a NaN row for an index outside [0, V)."""
        check_embedding(W, idx, Y)
        _gather(W, idx, Y)
        return Y

    def embedding_backward(self, dY, idx, dW, padding_idx=None, accumulate=False):
        """dW[v] (+)= the sum of dY[p] over the positions with idx[p] = v, in position order."""
        check_embedding_backward(dY, idx, dW)
        pad = padding_row(padding_idx, dW.shape[0])
        if self.parallel and dW.size >= self.par_cheap:
            _grad_parallel(dY, idx, dW, pad, bool(accumulate), self.nchunks)
        else:
            _grad_serial(dY, idx, dW, pad, bool(accumulate))
        return dW
