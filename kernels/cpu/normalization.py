"""CPU normalization ops: batch norm (train, eval, backward) and layer norm (forward, backward).

Each op is a reduction pass (per channel, or per row) and an elementwise pass, as Numba loops.
Deliberate float64 accumulators: every sum (the mean, the squares about it, Σ dY and Σ dY·x̂) is
accumulated in float64 in a fixed order that depends on the shape only, never on the thread
count, so the results are deterministic and a float32 channel of 10^6 values loses nothing to
summation. The variance is two-pass (the mean first, then Σ (x − mean)² over the same values),
which does not cancel when the mean is large against the spread. Everything written to an array
of the model dtype is computed in that dtype from the rounded sums, as the reference does.
"""

import math

import numpy as np
from numba import njit, prange

from gpubackprop.kernels import checks
from gpubackprop.kernels.cpu.dense import _relu
from gpubackprop.kernels.cpu.numerics import _span
from gpubackprop.kernels.cpu.worker import in_halves


def _as_ncl(a):
    return a.reshape(a.shape[0], a.shape[1], -1)


@njit(cache=True, error_model="numpy", inline="always")
def _same_buffer(a, b):
    """Whether a and b (C-contiguous, one shape: the launchers check) are the same elements: the
    in-place backward. Asked in the kernel (in the launcher __array_interface__ cost ~3 µs)."""
    return a.ctypes.data == b.ctypes.data


# ---- batch norm: X (N, C, L) -------------------------------------------------------------------
# Loops run n outer and channels inner, so memory is read in order. Each channel has LANES float64
# lanes, lane t taking positions l ≡ t (mod LANES) of each of its rows (l and l + LANES of each
# 2·LANES block added to each other first), and the lanes are added pairwise at the end, so a
# channel's order depends on the shape only. Rows shorter than LANES (L = 1: BatchNorm1d's (N, C))
# are too short for a vector loop each: there a sample's values of a block of channels are one
# loop into float64 column sums, and a channel's L columns are its lanes 0..L−1 (the same order).
# Measured side by side, one thread, float32 batch_norm_train / backward: 256x128x4 0.38 / 0.62 ms
# -> 0.05 / 0.06 ms, 256x64x16 0.23 / 0.30 -> 0.10 / 0.12 (a copy: 0.014, 0.027 ms).
LANES = 64
SHORT_COLUMNS = 1024  # the column sums of a block of channels (short rows): 8 KiB, in L1
# The elementwise passes spread the per-channel values over the columns below this row length
# (above it one loop a row is faster: the spread values no longer fit L1 with C·L large).
SHORT_ROWS = 16


@njit(cache=True, error_model="numpy", inline="always")
def _lane_value(v, mu):
    """The term a lane adds: v, or (v − mu)² (float64)."""
    if mu is None:
        return v
    d = v - mu
    return d * d


@njit(cache=True, error_model="numpy", inline="always")
def _add_lanes(acc, x, base, L, mu):
    """acc[l mod LANES] += x[base + l] (mu is None) or (x[base + l] − mu)² for l < L, in float64
    (flat x, uint64 indices); in each block of 2·LANES positions, l and l + LANES are added to
    each other before their lane. Each lane is its own chain and a block is one vector loop,
    which a few scalar chains (four interleaved accumulators) were not: the stats passes ran at a
    third of memory speed. The pair ahead of the lane halves the loads and stores of ``acc``, which
    bounded the sum (64x32x1024 float32, one thread, hot: one LANES-block at a time 0.20 ms, in
    pairs 0.15 ms; the squares, bound by their arithmetic, 0.24 ms either way)."""
    u = np.uint64
    K = u(LANES)
    K2 = K + K
    nb = u(L) // K2
    for blk in range(nb + u(1)):
        j = base + blk * K2
        if blk < nb:
            n = K
            for t in range(n):
                acc[t] += (_lane_value(np.float64(x[j + t]), mu)
                           + _lane_value(np.float64(x[j + K + t]), mu))
        else:
            r = u(L) - nb * K2
            n = min(r, K)
            for t in range(n):
                acc[t] += _lane_value(np.float64(x[j + t]), mu)
            for t in range(r - n):
                acc[t] += _lane_value(np.float64(x[j + K + t]), mu)


@njit(cache=True, error_model="numpy", inline="always")
def _lanes_total(acc):
    """Σ acc, the lanes added pairwise (a fixed tree): then zeroed for the next channel."""
    h = LANES
    while h > 1:
        h //= 2
        for t in range(h):
            acc[t] += acc[t + h]
    total = acc[0]
    acc[:] = 0.0
    return total


@njit(cache=True, error_model="numpy", inline="always")
def _columns(v, L, c0, c1):
    """v[c] for each of the L columns of channels c0..c1: (c1 − c0)·L values."""
    out = np.empty((c1 - c0) * L, v.dtype)
    for c in range(c1 - c0):
        for l in range(L):  # noqa: E741
            out[c * L + l] = v[c0 + c]
    return out


@njit(cache=True, error_model="numpy", inline="always")
def _fold_columns(cols, L, nch):
    """Each channel's total of its L (< LANES) float64 column sums: they are its lanes 0..L−1,
    added as _lanes_total adds them. Lane l of a short row takes position l of every row in
    order, so this is the lanes' order, bit for bit. L = 1: the column sums are the totals."""
    if L == 1:
        return cols.copy()
    acc = np.zeros(LANES)
    out = np.empty(nch)
    for c in range(nch):
        acc[:L] = cols[c * L:(c + 1) * L]
        out[c] = _lanes_total(acc)
    return out


@njit(cache=True, error_model="numpy")
def _bn_stats_channels(X, eps, mean, invstd, c0, c1):
    """mean, invstd of channels c0..c1, two passes. Deliberate float64 accumulator (module
    docstring): lane t of a channel sums its positions l ≡ t (mod LANES) over the samples in
    order, and the lanes are added pairwise. Rows shorter than LANES (L = 1 included) are summed
    as columns: each sample's (c1 − c0)·L contiguous values one vector loop into float64 column
    sums (a loop over a row of L < 64 each ran at a tenth of memory speed, or less)."""
    N, C, L = X.shape
    M = N * L
    w = c1 - c0
    x = X.reshape(-1)
    u = np.uint64
    if L < LANES:
        mu = np.empty(w)
        q = np.empty(w)
        cb = max(1, SHORT_COLUMNS // L)  # channels a block: its column sums stay in L1
        for b0 in range(c0, c1, cb):
            b1 = min(c1, b0 + cb)
            nc = b1 - b0
            cols = np.zeros(nc * L)
            for n in range(N):
                base = u((n * C + b0) * L)
                for j in range(u(nc * L)):
                    cols[j] += np.float64(x[base + j])
            mu_b = _fold_columns(cols, L, nc) / M
            mu_cols = _columns(mu_b, L, 0, nc)
            cols[:] = 0.0
            for n in range(N):
                base = u((n * C + b0) * L)
                for j in range(u(nc * L)):
                    d = np.float64(x[base + j]) - mu_cols[j]
                    cols[j] += d * d
            mu[b0 - c0:b1 - c0] = mu_b
            q[b0 - c0:b1 - c0] = _fold_columns(cols, L, nc)
    else:
        # Lanes per channel: the loops stay in memory order (n outer, channels inner).
        acc = np.zeros((w, LANES))
        s = np.zeros(w)
        q = np.zeros(w)
        for n in range(N):
            for c in range(w):
                _add_lanes(acc[c], x, u((n * C + c0 + c) * L), L, None)
        for c in range(w):
            s[c] = _lanes_total(acc[c])
        mu = s / M
        for n in range(N):
            for c in range(w):
                _add_lanes(acc[c], x, u((n * C + c0 + c) * L), L, mu[c])
        for c in range(w):
            q[c] = _lanes_total(acc[c])
    t = X.dtype.type
    for c in range(w):
        mean[c0 + c] = t(mu[c])
        invstd[c0 + c] = t(1.0 / math.sqrt(q[c] / M + eps))


@njit(cache=True, error_model="numpy")
def _inv_sqrt(var, eps):
    """1/√(var + eps) per channel, in the dtype (eval: from the running variance)."""
    t = var.dtype.type
    one, e = t(1), t(eps)
    out = np.empty_like(var)
    for c in range(var.size):
        out[c] = one / math.sqrt(var[c] + e)
    return out


@njit(cache=True, error_model="numpy", inline="always")
def _act_out(v, zero, relu):
    """v, or with ``relu`` the Activation layer's ReLU of it (kernels/cpu/dense.py's _relu: the
    same bits as BN then ops.activation, NaN kept)."""
    if relu:
        return _relu(v, zero)
    return v


@njit(cache=True, error_model="numpy", inline="always")
def _bn_apply_body(X, gamma, beta, shift, scale, Y, n0, n1, relu):
    N, C, L = X.shape
    u = np.uint64
    zero = X.dtype.type(0)
    x, y = X.reshape(-1), Y.reshape(-1)
    if L < SHORT_ROWS:
        m, s = _columns(shift, L, 0, C), _columns(scale, L, 0, C)
        g, b = _columns(gamma, L, 0, C), _columns(beta, L, 0, C)
        for n in range(n0, n1):
            base = u(n * C * L)
            for j in range(u(C * L)):
                y[base + j] = _act_out((x[base + j] - m[j]) * s[j] * g[j] + b[j], zero, relu)
        return
    for n in range(n0, n1):
        for c in range(C):
            m, s, g, b = shift[c], scale[c], gamma[c], beta[c]
            base = u((n * C + c) * L)
            for l in range(u(L)):  # noqa: E741
                y[base + l] = _act_out((x[base + l] - m) * s * g + b, zero, relu)


@njit(cache=True, error_model="numpy")
def _bn_apply_rows(X, gamma, beta, shift, scale, Y, n0, n1, relu):
    """Y = (X − shift)·scale·γ + β for samples n0..n1, in the array dtype, with ``relu`` then
    max(·, 0) on the write (the fused BN + ReLU: no pass of its own). Rows shorter than
    SHORT_ROWS: each sample's C·L values one loop, the per-channel values spread over the
    columns. The body is inlined with ``relu`` a constant, so each loop has no branch on it."""
    if relu:
        _bn_apply_body(X, gamma, beta, shift, scale, Y, n0, n1, True)
    else:
        _bn_apply_body(X, gamma, beta, shift, scale, Y, n0, n1, False)


@njit(cache=True, error_model="numpy", inline="always")
def _masked(dy, x, m, s, g, b, zero, relu):
    """dY, or with ``relu`` dZ = dY where the forward's output A > 0, else 0 (act_backward's
    ReLU). A > 0 exactly where x̂·γ + β > 0, x̂ = (x − mean)·invstd: recomputed from X, which
    these passes read anyway, in the dtype and in the order of the forward's normalize pass
    (_bn_apply_body: ((x − m)·s)·γ + β, no contraction), so the mask is the saved A's bit for
    bit, without reading A (64x32x32x32 float32, one thread: the backward with the mask read
    from A 1.98 ms, recomputed 1.50 ms; BN alone 1.47-1.52, BN + act_backward 2.07-2.11)."""
    if relu:
        return dy if (x - m) * s * g + b > zero else zero
    return dy


@njit(cache=True, error_model="numpy", inline="always")
def _grad_terms(dy, x, m, s):
    """dY and dY·x̂ in float64, x̂ computed in the dtype as the dX pass has it."""
    g = np.float64(dy)
    return g, g * np.float64((x - m) * s)


@njit(cache=True, error_model="numpy", inline="always")
def _add_grad_lanes(acc_a, acc_b, dy, x, base, L, m, s, g, b, relu):
    """acc_a[l mod LANES] += dY, acc_b[l mod LANES] += dY·x̂ over one row, float64, positions
    l and l + LANES of each 2·LANES block paired first (as _add_lanes); dY masked by A > 0
    with ``relu``."""
    u = np.uint64
    zero = x.dtype.type(0)
    K = u(LANES)
    K2 = K + K
    nb = u(L) // K2
    for blk in range(nb + u(1)):
        j = base + blk * K2
        if blk < nb:
            n = K
            for t in range(n):
                g0, h0 = _grad_terms(_masked(dy[j + t], x[j + t], m, s, g, b, zero, relu),
                                     x[j + t], m, s)
                g1, h1 = _grad_terms(_masked(dy[j + K + t], x[j + K + t], m, s, g, b, zero,
                                             relu),
                                     x[j + K + t], m, s)
                acc_a[t] += g0 + g1
                acc_b[t] += h0 + h1
        else:
            r = u(L) - nb * K2
            n = min(r, K)
            for t in range(n):
                g0, h0 = _grad_terms(_masked(dy[j + t], x[j + t], m, s, g, b, zero, relu),
                                     x[j + t], m, s)
                acc_a[t] += g0
                acc_b[t] += h0
            for t in range(r - n):
                g1, h1 = _grad_terms(_masked(dy[j + K + t], x[j + K + t], m, s, g, b, zero,
                                             relu),
                                     x[j + K + t], m, s)
                acc_a[t] += g1
                acc_b[t] += h1


@njit(cache=True, error_model="numpy")
def _bn_grad_sums_channels(dY, X, gamma, beta, mean, invstd, sums, c0, c1, relu):
    """sums[0, c] = Σ dY, sums[1, c] = Σ dY·x̂ for channels c0..c1, rounded to the dtype (dY
    masked by A > 0 with ``relu``, A from γ and β; unread without). Deliberate float64
    accumulator (module docstring), over lanes (or, for rows shorter than LANES, columns) as
    in _bn_stats_channels."""
    if relu:
        _bn_grad_sums_body(dY, X, gamma, beta, mean, invstd, sums, c0, c1, True)
    else:
        _bn_grad_sums_body(dY, X, gamma, beta, mean, invstd, sums, c0, c1, False)


@njit(cache=True, error_model="numpy", inline="always")
def _bn_grad_sums_body(dY, X, gamma, beta, mean, invstd, sums, c0, c1, relu):
    N, C, L = X.shape
    w = c1 - c0
    u = np.uint64
    zero = X.dtype.type(0)
    x, dy = X.reshape(-1), dY.reshape(-1)
    if L < LANES:
        a = np.empty(w)
        b = np.empty(w)
        cb = max(1, SHORT_COLUMNS // L)
        for b0 in range(c0, c1, cb):
            b1 = min(c1, b0 + cb)
            nc = b1 - b0
            m, s = _columns(mean, L, b0, b1), _columns(invstd, L, b0, b1)
            gc, bc = _columns(gamma, L, b0, b1), _columns(beta, L, b0, b1)
            cols_a = np.zeros(nc * L)
            cols_b = np.zeros(nc * L)
            for n in range(N):
                base = u((n * C + b0) * L)
                for j in range(u(nc * L)):
                    g, h = _grad_terms(_masked(dy[base + j], x[base + j], m[j], s[j], gc[j], bc[j],
                                               zero, relu),
                                       x[base + j], m[j], s[j])
                    cols_a[j] += g
                    cols_b[j] += h
            a[b0 - c0:b1 - c0] = _fold_columns(cols_a, L, nc)
            b[b0 - c0:b1 - c0] = _fold_columns(cols_b, L, nc)
    else:
        a = np.zeros(w)
        b = np.zeros(w)
        acc_a = np.zeros((w, LANES))
        acc_b = np.zeros((w, LANES))
        for n in range(N):
            for c in range(w):
                _add_grad_lanes(acc_a[c], acc_b[c], dy, x, u((n * C + c0 + c) * L), L,
                                mean[c0 + c], invstd[c0 + c], gamma[c0 + c], beta[c0 + c], relu)
        for c in range(w):
            a[c] = _lanes_total(acc_a[c])
            b[c] = _lanes_total(acc_b[c])
    t = X.dtype.type
    for c in range(w):
        sums[0, c0 + c] = t(a[c])
        sums[1, c0 + c] = t(b[c])


@njit(cache=True, error_model="numpy", inline="always")
def _bn_dx_body(dy, x, dx, N, C, L, gamma, beta, mean, invstd, sums, n0, n1, relu):
    """dX = γ·invstd/M·(M·dY − Σ dY − x̂·Σ dY·x̂) for samples n0..n1 (flat arrays), dY masked by
    A > 0 with ``relu`` (a constant here); rows shorter than SHORT_ROWS as one loop over each
    sample's C·L values (as _bn_apply_rows)."""
    u = np.uint64
    t = x.dtype.type
    zero = t(0)
    fM = t(N * L)
    k = gamma * invstd / fM
    db = sums[0]
    dg = sums[1]
    if L < SHORT_ROWS:
        mc, sc, kc = _columns(mean, L, 0, C), _columns(invstd, L, 0, C), _columns(k, L, 0, C)
        dbc, dgc = _columns(db, L, 0, C), _columns(dg, L, 0, C)
        gc, bc = _columns(gamma, L, 0, C), _columns(beta, L, 0, C)
        for n in range(n0, n1):
            base = u(n * C * L)
            for j in range(u(C * L)):
                xh = (x[base + j] - mc[j]) * sc[j]
                d = _masked(dy[base + j], x[base + j], mc[j], sc[j], gc[j], bc[j], zero, relu)
                dx[base + j] = kc[j] * (fM * d - dbc[j] - xh * dgc[j])
    else:
        for n in range(n0, n1):
            for c in range(C):
                m, s, kc, dbc, dgc = mean[c], invstd[c], k[c], db[c], dg[c]
                g, b = gamma[c], beta[c]
                base = u((n * C + c) * L)
                for l in range(u(L)):  # noqa: E741
                    xh = (x[base + l] - m) * s
                    d = _masked(dy[base + l], x[base + l], m, s, g, b, zero, relu)
                    dx[base + l] = kc * (fM * d - dbc - xh * dgc)


@njit(cache=True, error_model="numpy")
def _bn_dx_rows(dY, X, gamma, beta, mean, invstd, sums, dX, n0, n1, relu):
    N, C, L = X.shape
    x, dx = X.reshape(-1), dX.reshape(-1)
    if _same_buffer(dX, dY):
        # dX is dY: one name for the one buffer, else LLVM's runtime alias check fails and the
        # loop runs scalar (64x32x256 float32 in place: 0.57 ms, with one name 0.24 ms).
        if relu:
            _bn_dx_body(dx, x, dx, N, C, L, gamma, beta, mean, invstd, sums, n0, n1, True)
        else:
            _bn_dx_body(dx, x, dx, N, C, L, gamma, beta, mean, invstd, sums, n0, n1, False)
    elif relu:
        _bn_dx_body(dY.reshape(-1), x, dx, N, C, L, gamma, beta, mean, invstd, sums, n0, n1, True)
    else:
        _bn_dx_body(dY.reshape(-1), x, dx, N, C, L, gamma, beta, mean, invstd, sums, n0, n1, False)


@njit(cache=True, error_model="numpy")
def _write_param_grads(sums, dgamma, dbeta, accumulate):
    for c in range(dgamma.shape[0]):
        if accumulate:
            dgamma[c] += sums[1, c]
            dbeta[c] += sums[0, c]
        else:
            dgamma[c] = sums[1, c]
            dbeta[c] = sums[0, c]


@njit(cache=True, error_model="numpy")
def _bn_train_serial(X, gamma, beta, eps, Y, mean, invstd, relu):
    _bn_stats_channels(X, eps, mean, invstd, 0, X.shape[1])
    _bn_apply_rows(X, gamma, beta, mean, invstd, Y, 0, X.shape[0], relu)


@njit(cache=True, error_model="numpy", parallel=True)
def _bn_train_parallel(X, gamma, beta, eps, Y, mean, invstd, relu, nchunks):
    N, C, _ = X.shape
    for k in prange(nchunks):  # each channel's sums by one thread: the order is the serial one
        c0, c1 = _span(k, nchunks, C)
        _bn_stats_channels(X, eps, mean, invstd, c0, c1)
    for k in prange(nchunks):
        n0, n1 = _span(k, nchunks, N)
        _bn_apply_rows(X, gamma, beta, mean, invstd, Y, n0, n1, relu)


@njit(cache=True, error_model="numpy")
def _bn_eval_serial(X, gamma, beta, running_mean, running_var, eps, Y, relu):
    scale = _inv_sqrt(running_var, eps)
    _bn_apply_rows(X, gamma, beta, running_mean, scale, Y, 0, X.shape[0], relu)


@njit(cache=True, error_model="numpy", parallel=True)
def _bn_eval_parallel(X, gamma, beta, running_mean, running_var, eps, Y, relu, nchunks):
    scale = _inv_sqrt(running_var, eps)
    for k in prange(nchunks):
        n0, n1 = _span(k, nchunks, X.shape[0])
        _bn_apply_rows(X, gamma, beta, running_mean, scale, Y, n0, n1, relu)


@njit(cache=True, error_model="numpy")
def _bn_backward_serial(dY, X, gamma, mean, invstd, dX, dgamma, dbeta, accumulate, beta, relu):
    sums = np.empty((2, X.shape[1]), X.dtype)
    _bn_grad_sums_channels(dY, X, gamma, beta, mean, invstd, sums, 0, X.shape[1], relu)
    _bn_dx_rows(dY, X, gamma, beta, mean, invstd, sums, dX, 0, X.shape[0], relu)
    _write_param_grads(sums, dgamma, dbeta, accumulate)


@njit(cache=True, error_model="numpy", parallel=True)
def _bn_backward_parallel(dY, X, gamma, mean, invstd, dX, dgamma, dbeta, accumulate, beta, relu,
                          nchunks):
    N, C, _ = X.shape
    sums = np.empty((2, C), X.dtype)
    for k in prange(nchunks):
        c0, c1 = _span(k, nchunks, C)
        _bn_grad_sums_channels(dY, X, gamma, beta, mean, invstd, sums, c0, c1, relu)
    for k in prange(nchunks):
        n0, n1 = _span(k, nchunks, N)
        _bn_dx_rows(dY, X, gamma, beta, mean, invstd, sums, dX, n0, n1, relu)
    _write_param_grads(sums, dgamma, dbeta, accumulate)


# ---- layer norm: X (M, D) ----------------------------------------------------------------------
@njit(cache=True, error_model="numpy")
def _ln_rows(X, gamma, beta, eps, Y, mean, invstd, r0, r1):
    """Rows r0..r1: two-pass statistics, then Y. Deliberate float64 accumulator (module docstring),
    over LANES lanes a row as in _bn_stats_channels."""
    D = X.shape[1]
    t = X.dtype.type
    x = X.reshape(-1)
    acc = np.zeros(LANES)
    for i in range(r0, r1):
        base = np.uint64(i * D)
        _add_lanes(acc, x, base, D, None)
        mu = _lanes_total(acc) / D
        _add_lanes(acc, x, base, D, mu)
        q = _lanes_total(acc)
        m = t(mu)
        r = t(1.0 / math.sqrt(q / D + eps))
        mean[i] = m
        invstd[i] = r
        for j in range(D):
            Y[i, j] = (X[i, j] - m) * r * gamma[j] + beta[j]


@njit(cache=True, error_model="numpy")
def _ln_param_grads_cols(dY, X, mean, invstd, dgamma, dbeta, accumulate, j0, j1):
    """dγ = Σ_rows dY·x̂, dβ = Σ_rows dY for columns j0..j1, rows added in order.
    Deliberate float64 accumulator (module docstring). Flat uint64 indices: with dY[i, j0 + j]
    and j0 not a constant (the parallel kernel's chunks) Numba's negative-index wrap kept the
    loop scalar (2048x128 float32, one call: 0.28 ms, now 0.05 ms)."""
    M, D = X.shape
    w = j1 - j0
    ag = np.zeros(w)
    ab = np.zeros(w)
    x, dy = X.reshape(-1), dY.reshape(-1)
    for i in range(M):
        m = mean[i]
        s = invstd[i]
        base = np.uint64(i * D + j0)
        for j in range(np.uint64(w)):
            g = dy[base + j]
            xh = (x[base + j] - m) * s
            ag[j] += np.float64(g) * np.float64(xh)
            ab[j] += np.float64(g)
    t = X.dtype.type
    for j in range(w):
        if accumulate:
            dgamma[j0 + j] += t(ag[j])
            dbeta[j0 + j] += t(ab[j])
        else:
            dgamma[j0 + j] = t(ag[j])
            dbeta[j0 + j] = t(ab[j])


@njit(cache=True, error_model="numpy", inline="always")
def _ln_grad_terms(dy, x, gamma, m, s):
    """g = γ·dY and g·x̂ in float64, g and x̂ computed in the dtype as the dX pass has them."""
    g = dy * gamma
    return np.float64(g), np.float64(g) * np.float64((x - m) * s)


@njit(cache=True, error_model="numpy", inline="always")
def _ln_dx_body(dy, x, dx, gamma, mean, invstd, D, r0, r1):
    """dX = invstd/D·(D·g − Σg − x̂·Σ g·x̂), g = γ·dY, for rows r0..r1 (flat arrays). Σg and
    Σ g·x̂ over a row's LANES float64 lanes, positions l and l + LANES of each 2·LANES block
    paired first (as _add_lanes)."""
    u = np.uint64
    t = x.dtype.type
    fD = t(D)
    acc_a = np.zeros(LANES)
    acc_b = np.zeros(LANES)
    K = u(LANES)
    K2 = K + K
    nb = u(D) // K2
    for i in range(r0, r1):
        m = mean[i]
        s = invstd[i]
        base = u(i * D)
        for blk in range(nb + u(1)):
            j = blk * K2
            if blk < nb:
                n = K
                for k in range(n):
                    g0, h0 = _ln_grad_terms(dy[base + j + k], x[base + j + k], gamma[j + k], m, s)
                    g1, h1 = _ln_grad_terms(dy[base + j + K + k], x[base + j + K + k],
                                            gamma[j + K + k], m, s)
                    acc_a[k] += g0 + g1
                    acc_b[k] += h0 + h1
            else:
                r = u(D) - nb * K2
                n = min(r, K)
                for k in range(n):
                    g0, h0 = _ln_grad_terms(dy[base + j + k], x[base + j + k], gamma[j + k], m, s)
                    acc_a[k] += g0
                    acc_b[k] += h0
                for k in range(r - n):
                    g1, h1 = _ln_grad_terms(dy[base + j + K + k], x[base + j + K + k],
                                            gamma[j + K + k], m, s)
                    acc_a[k] += g1
                    acc_b[k] += h1
        a = t(_lanes_total(acc_a))
        b = t(_lanes_total(acc_b))
        k = s / fD
        for j in range(u(D)):
            g = dy[base + j] * gamma[j]
            xh = (x[base + j] - m) * s
            dx[base + j] = k * (fD * g - a - xh * b)


@njit(cache=True, error_model="numpy")
def _ln_dx_rows(dY, X, gamma, mean, invstd, dX, r0, r1):
    x, dx = X.reshape(-1), dX.reshape(-1)
    if _same_buffer(dX, dY):  # dX is dY: one name for the one buffer, as _bn_dx_rows
        _ln_dx_body(dx, x, dx, gamma, mean, invstd, X.shape[1], r0, r1)
    else:
        _ln_dx_body(dY.reshape(-1), x, dx, gamma, mean, invstd, X.shape[1], r0, r1)


@njit(cache=True, error_model="numpy")
def _ln_serial(X, gamma, beta, eps, Y, mean, invstd):
    _ln_rows(X, gamma, beta, eps, Y, mean, invstd, 0, X.shape[0])


@njit(cache=True, error_model="numpy", parallel=True)
def _ln_parallel(X, gamma, beta, eps, Y, mean, invstd, nchunks):
    for k in prange(nchunks):
        r0, r1 = _span(k, nchunks, X.shape[0])
        _ln_rows(X, gamma, beta, eps, Y, mean, invstd, r0, r1)


@njit(cache=True, error_model="numpy")
def _ln_backward_serial(dY, X, gamma, mean, invstd, dX, dgamma, dbeta, accumulate):
    # The parameter gradients first: they read dY, which dX may overwrite.
    _ln_param_grads_cols(dY, X, mean, invstd, dgamma, dbeta, accumulate, 0, X.shape[1])
    _ln_dx_rows(dY, X, gamma, mean, invstd, dX, 0, X.shape[0])


@njit(cache=True, error_model="numpy", parallel=True)
def _ln_backward_parallel(dY, X, gamma, mean, invstd, dX, dgamma, dbeta, accumulate, nchunks):
    M, D = X.shape
    for k in prange(nchunks):
        j0, j1 = _span(k, nchunks, D)
        _ln_param_grads_cols(dY, X, mean, invstd, dgamma, dbeta, accumulate, j0, j1)
    for k in prange(nchunks):
        r0, r1 = _span(k, nchunks, M)
        _ln_dx_rows(dY, X, gamma, mean, invstd, dX, r0, r1)


# The activations batch_norm_train/_eval/_backward take as ``activation=`` (the layer composes
# any other with ops.activation / act_backward, and every activation on the sets without it).
BATCH_NORM_ACTIVATIONS = ("identity", "relu")


# Spans of a batch norm on the calling thread, releasing the GIL: BatchNorm's two halves
# (``NormalizationOps.bn_halves_min``), the channels' sums then the rows, as the parallel kernels.
@njit(cache=True, error_model="numpy", nogil=True)
def _bn_stats_span(X, eps, mean, invstd, c0, c1):
    _bn_stats_channels(X, eps, mean, invstd, c0, c1)


@njit(cache=True, error_model="numpy", nogil=True)
def _bn_apply_span(X, gamma, beta, shift, scale, Y, n0, n1, relu):
    _bn_apply_rows(X, gamma, beta, shift, scale, Y, n0, n1, relu)


@njit(cache=True, error_model="numpy", nogil=True)
def _bn_grad_sums_span(dY, X, gamma, beta, mean, invstd, sums, c0, c1, relu):
    _bn_grad_sums_channels(dY, X, gamma, beta, mean, invstd, sums, c0, c1, relu)


@njit(cache=True, error_model="numpy", nogil=True)
def _bn_dx_span(dY, X, gamma, beta, mean, invstd, sums, dX, n0, n1, relu):
    _bn_dx_rows(dY, X, gamma, beta, mean, invstd, sums, dX, n0, n1, relu)


def _relu_flag(activation):
    """Whether the fused BN applies a ReLU: "relu" or "identity" (``batch_norm_activations``)."""
    if activation not in BATCH_NORM_ACTIVATIONS:
        raise ValueError(f"activation: expected one of {BATCH_NORM_ACTIVATIONS} (the activations "
                         f"the fused CPU batch norm applies itself), got {activation!r}")
    return activation == "relu"


class NormalizationOps:
    """Fused normalization ops (a mixin of ``CpuOps``: uses its parallel thresholds).

    BatchNorm + ReLU: the ReLU is applied in batch_norm_train's (and _eval's) normalize pass,
    which writes A = max(Y, 0) only, and its backward mask (dZ = dA where A > 0) is applied
    inside batch_norm_backward's two passes, A's sign recomputed from the X they read (_masked):
    the Activation layer's own pass forward and the act_backward pass (read dA and A, write dZ)
    are gone, and the backward reads nothing more than BN's. The values are those of BN then
    ops.activation / act_backward, bit for bit. Measured side by side, one thread, 64x32x32x32
    float32 (VGG's first layers), composed -> fused: forward 1.26 -> 0.77 ms (BN alone 0.69),
    backward 2.07 -> 1.50 ms (BN alone 1.47-1.52; with the mask read from a saved A: 1.98).
    """

    batch_norm_activations = BATCH_NORM_ACTIVATIONS

    # Batch norms of this many elements and more (below the parallel kernels' size) run their
    # channels' sums and then their rows in two halves, on the calling thread and the worker
    # thread (kernels/cpu/worker.py: one thread that spins only briefly between calls; the
    # parallel kernels' OpenMP threads spin after a region, into Conv2d's halves: the resnet step
    # 79 -> 118 ms with them from 2^16 elements). The same spans' sums, so the same bits as the
    # serial kernels. Each half starts and ends with a hand-over to the other thread (0.1-0.2 ms
    # on a VM with a sleeping worker): on the resnet preset's 64x32x16x16 (2^19) the halves took
    # 0.65 / 0.72 ms forward / backward against 0.49 / 0.57 serial, on its 64x16x32x32 (2^20) 0.87
    # / 1.02 against 0.96 / 1.12. With the spinning hand-off, the resnet step: 2^19 91.2 ms
    # against 2^20 89.3, 2^18 94.4 against 91.6 (interleaved medians, znver3).
    bn_halves_min = 1 << 20

    def _norm_parallel(self, X):
        return self.parallel and X.size >= self.par_cheap

    def _norm_halves(self, X):
        return (self.bn_halves_min is not None and getattr(self, "nchunks", 1) >= 2
                and X.size >= self.bn_halves_min and X.shape[0] >= 2 and X.shape[1] >= 2)

    def batch_norm_train(self, X, gamma, beta, eps, Y, mean, invstd, activation="identity"):
        """Per-channel batch mean and biased variance of X (N, C, *) into ``mean``, ``invstd``;
        Y = σ((X − mean)·invstd·γ + β), σ the ``activation`` (identity or relu). A reduction
        pass per channel, then an elementwise pass."""
        relu = _relu_flag(activation)
        checks.float_arrays(checks.NAMES_BATCH_NORM, X, gamma, beta, Y, mean, invstd)
        checks.check_batch_norm(X, (("gamma", gamma), ("beta", beta), ("mean", mean),
                                    ("invstd", invstd)), (("Y", Y),))
        args = (_as_ncl(X), gamma, beta, float(eps), _as_ncl(Y), mean, invstd, relu)
        if self._norm_parallel(X):
            _bn_train_parallel(*args, self.nchunks)
        elif self._norm_halves(X):
            X3, Y3 = args[0], args[4]
            in_halves(X3.shape[1], lambda c0, c1: _bn_stats_span(X3, float(eps), mean, invstd, c0, c1))
            in_halves(X3.shape[0], lambda n0, n1: _bn_apply_span(X3, gamma, beta, mean, invstd, Y3,
                                                               n0, n1, relu))
        else:
            _bn_train_serial(*args)
        return Y

    def batch_norm_eval(self, X, gamma, beta, running_mean, running_var, eps, Y,
                        activation="identity"):
        """Y = σ((X − running_mean)/√(running_var + eps)·γ + β), one elementwise pass."""
        relu = _relu_flag(activation)
        checks.float_arrays(checks.NAMES_BATCH_NORM_EVAL, X, gamma, beta, running_mean,
                            running_var, Y)
        checks.check_batch_norm(X, (("gamma", gamma), ("beta", beta), ("running_mean", running_mean),
                                    ("running_var", running_var)), (("Y", Y),))
        args = (_as_ncl(X), gamma, beta, running_mean, running_var, float(eps), _as_ncl(Y),
                relu)
        if self._norm_parallel(X):
            _bn_eval_parallel(*args, self.nchunks)
        else:
            _bn_eval_serial(*args)
        return Y

    def batch_norm_backward(self, dY, X, gamma, mean, invstd, dX, dgamma, dbeta, accumulate=False,
                            activation="identity", beta=None):
        """dX; dγ = Σ dZ·x̂ and dβ = Σ dZ per channel (written, or added when ``accumulate``),
        dZ = dY for identity, for relu dY where the forward's output A > 0 else 0 (A's sign
        recomputed from X, γ and the forward's ``beta``, needed then). dX may be dY."""
        relu = _relu_flag(activation)
        if relu and beta is None:
            raise ValueError("beta: the forward's β is needed for activation='relu' (the mask "
                             "A > 0 is recomputed from it)")
        beta = beta if relu else gamma  # unread without the ReLU: any array of the kernel's type
        checks.float_arrays(checks.NAMES_NORM_BACKWARD + ("beta",), dY, X, gamma, mean, invstd,
                            dX, dgamma, dbeta, beta)
        checks.check_batch_norm(X, (("gamma", gamma), ("mean", mean), ("invstd", invstd),
                                    ("dgamma", dgamma), ("dbeta", dbeta), ("beta", beta)),
                                (("dY", dY), ("dX", dX)))
        args = (_as_ncl(dY), _as_ncl(X), gamma, mean, invstd, _as_ncl(dX), dgamma, dbeta,
                bool(accumulate), beta, relu)
        if self._norm_parallel(X):
            _bn_backward_parallel(*args, self.nchunks)
        elif self._norm_halves(X):
            dY3, X3, dX3 = args[0], args[1], args[5]
            sums = np.empty((2, X3.shape[1]), X3.dtype)
            in_halves(X3.shape[1], lambda c0, c1: _bn_grad_sums_span(dY3, X3, gamma, beta, mean,
                                                                   invstd, sums, c0, c1, relu))
            in_halves(X3.shape[0], lambda n0, n1: _bn_dx_span(dY3, X3, gamma, beta, mean, invstd,
                                                            sums, dX3, n0, n1, relu))
            _write_param_grads(sums, dgamma, dbeta, bool(accumulate))
        else:
            _bn_backward_serial(*args)
        return dX

    def layer_norm(self, X, gamma, beta, eps, Y, mean, invstd):
        """Per-row mean and biased variance of X (M, D) into ``mean``, ``invstd`` (M,);
        Y = (X − mean)·invstd·γ + β. One pass a row."""
        checks.float_arrays(checks.NAMES_LAYER_NORM, X, gamma, beta, Y, mean, invstd)
        checks.check_layer_norm(X, (("gamma", gamma), ("beta", beta)),
                                (("mean", mean), ("invstd", invstd)), (("Y", Y),))
        args = (X, gamma, beta, float(eps), Y, mean, invstd)
        if self._norm_parallel(X):
            _ln_parallel(*args, self.nchunks)
        else:
            _ln_serial(*args)
        return Y

    def layer_norm_backward(self, dY, X, gamma, mean, invstd, dX, dgamma, dbeta, accumulate=False):
        """dX; dγ = Σ_rows dY·x̂ and dβ = Σ_rows dY (written, or added when ``accumulate``)."""
        checks.float_arrays(checks.NAMES_NORM_BACKWARD, dY, X, gamma, mean, invstd, dX, dgamma,
                            dbeta)
        checks.check_layer_norm(X, (("gamma", gamma), ("dgamma", dgamma), ("dbeta", dbeta)),
                                (("mean", mean), ("invstd", invstd)), (("dY", dY), ("dX", dX)))
        args = (dY, X, gamma, mean, invstd, dX, dgamma, dbeta, bool(accumulate))
        if self._norm_parallel(X):
            _ln_backward_parallel(*args, self.nchunks)
        else:
            _ln_backward_serial(*args)
        return dX
