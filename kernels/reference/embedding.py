"""Reference embedding ops: a row gather forward, a deterministic scatter-add backward.

``embedding(W, idx, Y)``: Y[p] = W[idx[p]] for the flat positions p (a row of NaN where idx[p] is
outside [0, V): the layer checks indices before any kernel runs, this only keeps memory safe).

``embedding_backward(dY, idx, dW, padding_idx, accumulate)``: the weight gradient. Row v's gradient
is s_v = (((0 + dY[p1]) + dY[p2]) + ...) over the positions p1 < p2 < ... with idx[p] = v, summed in
the array dtype in that order, then dW[v] = s_v (or dW[v] + s_v when accumulating); the padding row
and out-of-range indices get nothing (s = 0). Every set sums in this one order, so the fused sets
equal this one bit for bit; ``np.add.at``/``cupyx.scatter_add`` promise no order on the GPU.
"""

import numpy as np

from gpubackprop.kernels import checks

NAMES_EMBEDDING = ("W", "Y")
NAMES_EMBEDDING_BACKWARD = ("dY", "dW")


def check_indices(idx, n):
    """idx: a 1-D integer array of ``n`` positions (int32 or int64)."""
    if getattr(idx, "dtype", None) not in (np.int32, np.int64) or idx.ndim != 1:
        raise TypeError(f"idx: expected a 1-D int32 or int64 array, got "
                        f"{getattr(idx, 'dtype', type(idx).__name__)} of shape "
                        f"{tuple(getattr(idx, 'shape', ()))}")
    if idx.shape[0] != n:
        raise checks.shape_error("idx", f"{n} positions", idx)


def check_embedding(W, idx, Y):
    checks.float_arrays(NAMES_EMBEDDING, W, Y)
    if W.ndim != 2:
        raise checks.shape_error("W", "a 2-D (num_embeddings, embedding_dim) array", W)
    if Y.ndim != 2 or Y.shape[1] != W.shape[1]:
        raise checks.shape_error("Y", f"(positions, {W.shape[1]})", Y)
    check_indices(idx, Y.shape[0])
    return W.dtype


def check_embedding_backward(dY, idx, dW):
    checks.float_arrays(NAMES_EMBEDDING_BACKWARD, dY, dW)
    if dW.ndim != 2:
        raise checks.shape_error("dW", "a 2-D (num_embeddings, embedding_dim) array", dW)
    if dY.ndim != 2 or dY.shape[1] != dW.shape[1]:
        raise checks.shape_error("dY", f"(positions, {dW.shape[1]})", dY)
    check_indices(idx, dY.shape[0])
    return dW.dtype


def padding_row(padding_idx, V):
    """The padding row as an int in [0, V), or -1 for none (a row no index reaches)."""
    return -1 if padding_idx is None or not 0 <= int(padding_idx) < V else int(padding_idx)


def sorted_positions(xp, idx, V, padding_idx):
    """(pos, bounds): the positions sorted by index, ties in position order, and the segment
    bounds (V + 1,): row v's positions are pos[bounds[v]:bounds[v + 1]]. Out-of-range indices and
    the padding row's go to a sentinel row V past the end. The keys are unique (index·n + position),
    so any sort gives this one order: no stable sort is needed."""
    n = idx.shape[0]
    rows = idx.astype(np.int64)
    skip = (rows < 0) | (rows >= V) | (rows == padding_idx)
    rows = xp.where(skip, np.int64(V), rows)
    pos = xp.argsort(rows * np.int64(n) + xp.arange(n, dtype=np.int64)).astype(np.int64)
    bounds = xp.searchsorted(rows[pos], xp.arange(V + 1, dtype=np.int64)).astype(np.int64)
    return pos, bounds


class EmbeddingOps:
    """Plain-xp embedding ops (a mixin of ``ReferenceOps``: uses ``self.xp``)."""

    def embedding(self, W, idx, Y):
        """Y (n, D) = W[idx] (n positions); a NaN row for an index outside [0, V)."""
        check_embedding(W, idx, Y)
        xp = self.xp
        V = W.shape[0]
        ok = (idx >= 0) & (idx < V)
        Y[...] = xp.where(ok[:, None], W[xp.where(ok, idx, 0)], W.dtype.type(np.nan))
        return Y

    def embedding_backward(self, dY, idx, dW, padding_idx=None, accumulate=False):
        """dW[v] (+)= the sum of dY[p] over the positions p with idx[p] = v, in position order."""
        dt = check_embedding_backward(dY, idx, dW)
        xp = self.xp
        V = dW.shape[0]
        pos, bounds = sorted_positions(xp, idx, V, padding_row(padding_idx, V))
        counts = bounds[1:] - bounds[:-1]
        s = xp.zeros(dW.shape, dt)
        # The k-th term of every segment at once: one fancy-index add per k, its rows distinct.
        longest = int(counts.max()) if V else 0
        for k in range(longest):
            rows = xp.nonzero(counts > k)[0]
            s[rows] += dY[pos[bounds[rows] + k]]
        if accumulate:
            dW += s
        else:
            dW[...] = s
        return dW
