"""CUDA normalization ops: batch norm (train, eval, backward) and layer norm (forward, backward).

Each op is a reduction kernel and an elementwise kernel. A reduction runs a block per channel
(batch norm) or per row (layer norm): its threads stride over the group's values, then a
fixed-order shared-memory tree adds their partial sums, so the result does not depend on timing
(no atomics). The variance is two-pass: Σx gives the mean, then Σ(x − mean)² over the same values.
Deliberate float64 accumulators: those sums are float64 in every kernel (a float32 channel of
10^6 values loses nothing to summation); what is written to arrays of the model dtype is rounded
once and the elementwise kernels compute in the model dtype only.

Layer norm's backward needs sums in both directions: per row (for dX) by a block a row, and per
column (dγ, dβ) as BP4's bias gradient does: chunks of rows in parallel into float64 partials,
then the chunks added in order.
"""

import math

import numpy as np

from gpubackprop.kernels import checks
from gpubackprop.kernels.cuda.launch import THREADS, as_1d, cuda, kernel_body
from gpubackprop.kernels.cuda.losses import threads_for
from gpubackprop.kernels.cuda.numerics import imin, mul, tree_sum, tree_sum2

LN_GRAD_ROWS = 8  # rows a chunk of layer norm's column sums (the summation order depends on it)


def _as_ncl(a):
    return a.reshape(a.shape[0], a.shape[1], -1)


# ---- statistics: a block per group of values (a channel of (N, C, L), or a row as (1, M, D)) ---
@kernel_body("void({t}[:, :, ::1], float64, {t}[::1], {t}[::1])")
def _group_stats(X, eps, mean, invstd):
    """mean[c], invstd[c] of the N·L values X[:, c, :], a block a group c.

    Deliberate float64 accumulator: Σx and Σ(x − mean)², and the mean, variance and invstd made
    from them, are float64; mean and invstd are rounded to the dtype once.
    """
    red = cuda.shared.array(THREADS, np.float64)
    N, C, L = X.shape
    M = N * L
    tid = cuda.threadIdx.x
    nt = cuda.blockDim.x
    for c in range(cuda.blockIdx.x, C, cuda.gridDim.x):  # the same groups for every thread
        s = 0.0
        for k in range(tid, M, nt):
            n = k // L
            s += np.float64(X[n, c, k - n * L])
        red[tid] = s
        tree_sum(red, tid, nt)
        mu = red[0] / M
        cuda.syncthreads()  # everyone has read red[0] before it is reused
        q = 0.0
        for k in range(tid, M, nt):
            n = k // L
            d = np.float64(X[n, c, k - n * L]) - mu
            q += d * d
        red[tid] = q
        tree_sum(red, tid, nt)
        if tid == 0:
            mean[c] = mean.dtype.type(mu)
            invstd[c] = invstd.dtype.type(1.0 / math.sqrt(red[0] / M + eps))
        cuda.syncthreads()  # red[0] is read before the next group overwrites it


# ---- batch norm ------------------------------------------------------------------------------------
@kernel_body("void({t}[::1], {t}[::1], {t}[::1], {t}[::1], {t}[::1], float64, boolean, {t}[::1], "
             "int64, int64)")
def _bn_apply(X, gamma, beta, shift, spread, eps, from_var, Y, C, L):
    """Y = (X − shift)·s·γ + β per channel, s = spread (invstd), or 1/√(spread + eps) when
    ``from_var`` (eval: spread is the running variance). X, Y flat (N, C, L)."""
    t = X.dtype.type
    one, e, nz = t(1), t(eps), t(-0.0)
    for idx in range(cuda.grid(1), X.size, cuda.gridsize(1)):
        c = (idx // L) % C
        s = one / math.sqrt(spread[c] + e) if from_var else spread[c]
        Y[idx] = mul((X[idx] - shift[c]) * s, gamma[c], nz) + beta[c]


@kernel_body("void({t}[:, :, ::1], {t}[:, :, ::1], {t}[::1], {t}[::1], {t}[:, ::1], {t}[::1], "
             "{t}[::1], boolean)")
def _bn_grad_sums(dY, X, mean, invstd, sums, dgamma, dbeta, accumulate):
    """sums[0, c] = Σ dY, sums[1, c] = Σ dY·x̂ over channel c, a block a channel; dβ, dγ (+)= them.

    Deliberate float64 accumulator: both sums are float64, rounded to the dtype once.
    """
    ra = cuda.shared.array(THREADS, np.float64)
    rb = cuda.shared.array(THREADS, np.float64)
    N, C, L = X.shape
    M = N * L
    tid = cuda.threadIdx.x
    nt = cuda.blockDim.x
    for c in range(cuda.blockIdx.x, C, cuda.gridDim.x):
        m = mean[c]
        s = invstd[c]
        a = 0.0
        b = 0.0
        for k in range(tid, M, nt):
            n = k // L
            l = k - n * L  # noqa: E741
            dy = np.float64(dY[n, c, l])
            xh = (X[n, c, l] - m) * s  # x̂ in the dtype, as the elementwise kernel uses it
            a += dy
            b += dy * np.float64(xh)
        ra[tid] = a
        rb[tid] = b
        tree_sum2(ra, rb, tid, nt)
        if tid == 0:
            db = dbeta.dtype.type(ra[0])
            dg = dgamma.dtype.type(rb[0])
            sums[0, c] = db
            sums[1, c] = dg
            dbeta[c] = dbeta[c] + db if accumulate else db
            dgamma[c] = dgamma[c] + dg if accumulate else dg
        cuda.syncthreads()


@kernel_body("void({t}[::1], {t}[::1], {t}[::1], {t}[::1], {t}[::1], {t}[:, ::1], {t}[::1], "
             "int64, int64)")
def _bn_dx(dY, X, gamma, mean, invstd, sums, dX, C, L):
    """dX = γ·invstd/M·(M·dY − Σ dY − x̂·Σ dY·x̂), this call's sums. Flat (N, C, L) arrays."""
    t = X.dtype.type
    fM = t(X.size // C)
    nz = t(-0.0)
    for idx in range(cuda.grid(1), X.size, cuda.gridsize(1)):
        c = (idx // L) % C
        s = invstd[c]
        xh = (X[idx] - mean[c]) * s
        k = gamma[c] * s / fM
        dX[idx] = k * (mul(fM, dY[idx], nz) - sums[0, c] - mul(xh, sums[1, c], nz))


# ---- layer norm --------------------------------------------------------------------------------------
@kernel_body("void({t}[:, ::1], {t}[::1], {t}[::1], {t}[::1], {t}[::1], {t}[:, ::1])")
def _ln_apply(X, gamma, beta, mean, invstd, Y):
    """Y = (X − mean[i])·invstd[i]·γ[j] + β[j]."""
    M, D = X.shape
    nz = X.dtype.type(-0.0)
    for idx in range(cuda.grid(1), M * D, cuda.gridsize(1)):
        i = idx // D
        j = idx - i * D
        Y[i, j] = mul((X[i, j] - mean[i]) * invstd[i], gamma[j], nz) + beta[j]


@kernel_body("void({t}[:, ::1], {t}[:, ::1], {t}[::1], {t}[::1], {t}[::1], {t}[:, ::1])")
def _ln_row_sums(dY, X, gamma, mean, invstd, rsums):
    """rsums[0, i] = Σ_j g, rsums[1, i] = Σ_j g·x̂ with g = γ·dY, a block a row.

    Deliberate float64 accumulator: both sums are float64, rounded to the dtype once.
    """
    ra = cuda.shared.array(THREADS, np.float64)
    rb = cuda.shared.array(THREADS, np.float64)
    M, D = X.shape
    tid = cuda.threadIdx.x
    nt = cuda.blockDim.x
    for i in range(cuda.blockIdx.x, M, cuda.gridDim.x):
        m = mean[i]
        s = invstd[i]
        a = 0.0
        b = 0.0
        for j in range(tid, D, nt):
            g = np.float64(dY[i, j] * gamma[j])
            xh = (X[i, j] - m) * s
            a += g
            b += g * np.float64(xh)
        ra[tid] = a
        rb[tid] = b
        tree_sum2(ra, rb, tid, nt)
        if tid == 0:
            rsums[0, i] = rsums.dtype.type(ra[0])
            rsums[1, i] = rsums.dtype.type(rb[0])
        cuda.syncthreads()


@kernel_body("void({t}[:, ::1], {t}[:, ::1], {t}[::1], {t}[::1], {t}[::1], {t}[:, ::1], "
             "{t}[:, ::1], float64[:, :, ::1])")
def _ln_dx_cols(dY, X, gamma, mean, invstd, rsums, dX, partial):
    """A thread a (chunk of rows, column): dX = invstd/D·(D·g − Σg − x̂·Σ g·x̂) for its rows, and
    the chunk's Σ dY·x̂ and Σ dY into partial[0 or 1, chunk, column].

    Deliberate float64 accumulator: the partial column sums are float64.
    """
    M, D = X.shape
    chunks = partial.shape[1]
    R = (M + chunks - 1) // chunks
    t = X.dtype.type
    fD, nz = t(D), t(-0.0)
    for idx in range(cuda.grid(1), chunks * D, cuda.gridsize(1)):
        ch = idx // D
        j = idx - ch * D  # consecutive threads, consecutive columns: coalesced
        gj = gamma[j]
        a = 0.0
        b = 0.0
        for i in range(ch * R, imin(M, (ch + 1) * R)):
            s = invstd[i]
            dy = dY[i, j]  # read before dX[i, j] is written: dX may be dY
            xh = (X[i, j] - mean[i]) * s
            a += np.float64(dy) * np.float64(xh)
            b += np.float64(dy)
            dX[i, j] = (s / fD) * (mul(fD, dy * gj, nz) - rsums[0, i] - mul(xh, rsums[1, i], nz))
        partial[0, ch, j] = a
        partial[1, ch, j] = b


@kernel_body("void(float64[:, :, ::1], {t}[::1], {t}[::1], boolean)")
def _ln_param_finish(partial, dgamma, dbeta, accumulate):
    """dγ, dβ (+)= the chunks' partial sums added in chunk order, a thread a column.

    Deliberate float64 accumulator: the chunks are added in float64, rounded once.
    """
    chunks = partial.shape[1]
    D = dgamma.size
    t = dgamma.dtype.type
    for j in range(cuda.grid(1), D, cuda.gridsize(1)):
        a = 0.0
        b = 0.0
        for ch in range(chunks):
            a += partial[0, ch, j]
            b += partial[1, ch, j]
        dg = t(a)
        db = t(b)
        dgamma[j] = dgamma[j] + dg if accumulate else dg
        dbeta[j] = dbeta[j] + db if accumulate else db


class NormalizationOps:
    """Fused normalization ops (a mixin of ``CudaOps``: uses its launcher)."""

    def _stats(self, X3, eps, mean, invstd, dt):
        N, C, L = X3.shape
        self.launch(_group_stats, C, dt, X3, float(eps), mean, invstd,
                    blocks=min(C, self.max_blocks), threads=threads_for(N * L))

    def batch_norm_train(self, X, gamma, beta, eps, Y, mean, invstd):
        """Per-channel batch mean and biased variance of X (N, C, *) into ``mean``, ``invstd``;
        Y = (X − mean)·invstd·γ + β. A block a channel for the statistics, then one elementwise
        kernel."""
        dt = checks.float_arrays(checks.NAMES_BATCH_NORM, X, gamma, beta, Y, mean, invstd)
        checks.check_batch_norm(X, (("gamma", gamma), ("beta", beta), ("mean", mean),
                                    ("invstd", invstd)), (("Y", Y),))
        X3 = _as_ncl(X)
        _, C, L = X3.shape
        self._stats(X3, eps, mean, invstd, dt)
        self.launch(_bn_apply, X.size, dt, as_1d(X), gamma, beta, mean, invstd, float(eps), False,
                    as_1d(Y), C, L)
        return Y

    def batch_norm_eval(self, X, gamma, beta, running_mean, running_var, eps, Y):
        """Y = (X − running_mean)/√(running_var + eps)·γ + β, one elementwise kernel."""
        dt = checks.float_arrays(checks.NAMES_BATCH_NORM_EVAL, X, gamma, beta, running_mean,
                                 running_var, Y)
        checks.check_batch_norm(X, (("gamma", gamma), ("beta", beta), ("running_mean", running_mean),
                                    ("running_var", running_var)), (("Y", Y),))
        _, C, L = _as_ncl(X).shape
        self.launch(_bn_apply, X.size, dt, as_1d(X), gamma, beta, running_mean, running_var,
                    float(eps), True, as_1d(Y), C, L)
        return Y

    def batch_norm_backward(self, dY, X, gamma, mean, invstd, dX, dgamma, dbeta, accumulate=False):
        """dX; dγ = Σ dY·x̂ and dβ = Σ dY per channel (written, or added when ``accumulate``).
        A block a channel for the sums, then one elementwise kernel."""
        dt = checks.float_arrays(checks.NAMES_NORM_BACKWARD, dY, X, gamma, mean, invstd, dX,
                                 dgamma, dbeta)
        checks.check_batch_norm(X, (("gamma", gamma), ("mean", mean), ("invstd", invstd),
                                    ("dgamma", dgamma), ("dbeta", dbeta)), (("dY", dY), ("dX", dX)))
        X3 = _as_ncl(X)
        N, C, L = X3.shape
        sums = self.scratch("bn_grad_sums", (2, C), dt)
        self.launch(_bn_grad_sums, C, dt, _as_ncl(dY), X3, mean, invstd, sums, dgamma, dbeta,
                    bool(accumulate), blocks=min(C, self.max_blocks), threads=threads_for(N * L))
        self.launch(_bn_dx, X.size, dt, as_1d(dY), as_1d(X), gamma, mean, invstd, sums, as_1d(dX),
                    C, L)
        return dX

    def layer_norm(self, X, gamma, beta, eps, Y, mean, invstd):
        """Per-row mean and biased variance of X (M, D) into ``mean``, ``invstd`` (M,);
        Y = (X − mean)·invstd·γ + β. A block a row for the statistics, then one elementwise kernel."""
        dt = checks.float_arrays(checks.NAMES_LAYER_NORM, X, gamma, beta, Y, mean, invstd)
        checks.check_layer_norm(X, (("gamma", gamma), ("beta", beta)),
                                (("mean", mean), ("invstd", invstd)), (("Y", Y),))
        M, D = X.shape
        self._stats(X.reshape(1, M, D), eps, mean, invstd, dt)  # a row is a group of D values
        self.launch(_ln_apply, X.size, dt, X, gamma, beta, mean, invstd, Y)
        return Y

    def layer_norm_backward(self, dY, X, gamma, mean, invstd, dX, dgamma, dbeta, accumulate=False):
        """dX; dγ = Σ_rows dY·x̂ and dβ = Σ_rows dY (written, or added when ``accumulate``).
        Row sums a block a row, then dX and the column partial sums, then the columns' totals."""
        dt = checks.float_arrays(checks.NAMES_NORM_BACKWARD, dY, X, gamma, mean, invstd, dX,
                                 dgamma, dbeta)
        checks.check_layer_norm(X, (("gamma", gamma), ("dgamma", dgamma), ("dbeta", dbeta)),
                                (("mean", mean), ("invstd", invstd)), (("dY", dY), ("dX", dX)))
        M, D = X.shape
        accumulate = bool(accumulate)
        chunks = max(1, -(-M // LN_GRAD_ROWS))
        partial = self.scratch("ln_grad_partial", (2, chunks, D), np.float64)
        if M == 0:
            partial[...] = 0
        else:
            rsums = self.scratch("ln_row_sums", (2, M), dt)
            self.launch(_ln_row_sums, M, dt, dY, X, gamma, mean, invstd, rsums,
                        blocks=min(M, self.max_blocks), threads=threads_for(D))
            self.launch(_ln_dx_cols, chunks * D, dt, dY, X, gamma, mean, invstd, rsums, dX,
                        partial)
        self.launch(_ln_param_finish, D, dt, partial, dgamma, dbeta, accumulate)
        return dX
