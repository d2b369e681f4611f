"""Fused CPU kernel set: each op of ``ReferenceOps`` as one Numba ``njit`` pass over memory.

Every kernel computes in the dtype of its arrays, as the reference does: constants are made with
``X.dtype.type(c)`` (a bare Python float would promote float32 math to float64), and scalar
hyperparameters arrive as float64 and are rounded to the array dtype once, which is what NumPy
does with a Python scalar and a float32 array. Reductions accumulate in float64 (a little more
accurate than the reference, well within its tolerance) in a fixed order, so results do not depend
on the thread count. No ``fastmath``: it would let LLVM assume there are no NaNs. Every kernel
uses ``error_model="numpy"``: with Python's error model each float division carries a
ZeroDivisionError check that keeps LLVM from vectorizing the loop (Adam's update ran 8x slower).
In float32, exp and tanh are straight-line polynomial code (``_expf``, ``_tanh``) rather than
libm's scalar calls, for the same reason.

Each op has a serial kernel and a ``parallel=True`` one over fixed chunks; the launcher takes the
parallel one only above a size where it pays (a parallel region costs several µs to start).
Kernels compile on first use per dtype and are cached on disk (``cache=True``).
"""

import math

import numba
import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.extending import intrinsic, overload

from gpubackprop.kernels import checks
from gpubackprop.kernels.reference import (
    ACTIVATIONS,
    GELU_C,
    GELU_K,
    LEAKY_SLOPE,
    ReferenceOps,
    adam_coefficients,
)

IDENTITY, SIGMOID, TANH, RELU, LEAKY_RELU, GELU = range(6)
ACT_CODE = {name: i for i, name in enumerate(ACTIVATIONS)}
assert ACTIVATIONS == ("identity", "sigmoid", "tanh", "relu", "leaky_relu", "gelu")
GELU_3K = 3 * GELU_K  # the reference evaluates 3 * GELU_K in Python first

# Element counts from which a parallel kernel runs. In a training step these ops sit between GEMMs,
# and BLAS's threads keep spinning on the cores for a while after each GEMM: a parallel region
# there fights them (measured: a parallel SGD update made the whole L step, 784-1024-1024-10 at
# B=256, 1.34x slower on 2 cores), while a memory-bound op gains < 2x even on free cores. So the
# parallel kernels are for very large arrays only; ``CpuOps(parallel_min=...)`` overrides both,
# NUMBA_NUM_THREADS=1 switches them off.
PAR_MIN_CHEAP = 1 << 24
PAR_MIN_TRANSCENDENTAL = 1 << 22
SQ_CHUNK = 1 << 14  # reduction chunk: the summation order depends on this, not on threads


@njit(cache=True, error_model="numpy", inline="always")
def _span(c, nchunks, n):
    """The c-th of nchunks near-equal pieces of range(n)."""
    return c * n // nchunks, (c + 1) * n // nchunks


@intrinsic
def _as_float32(typingctx, bits):
    """The float32 whose IEEE bits are the int32 ``bits`` (a free bitcast that vectorizes)."""
    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.FloatType())

    return types.float32(types.int32), codegen


@intrinsic
def _bits_of(typingctx, x):
    """The IEEE bits of the float32 ``x`` as an int32."""
    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.IntType(32))

    return types.int32(types.float32), codegen


# exp in float32 arithmetic (Cephes' expf: Cody-Waite reduction x = n·ln2 + r, |r| <= ln2/2, and
# a degree-7 polynomial, peak relative error ~1 ulp), 2^n written straight into the exponent bits.
# Unlike a call to libm's expf per element this is straight-line arithmetic on 8 float32 lanes:
# no float→int conversion either, as n is read from the low mantissa bits of n + 1.5·2^23.
_F = np.float32
LOG2E_F = _F(1.44269504088896341)
LN2_HI_F = _F(0.693359375)  # ln 2 split so that n·LN2_HI_F is exact
LN2_LO_F = _F(-2.12194440e-4)
ROUND_MAGIC_F = _F(12582912.0)  # 1.5·2^23
EXP_MIN_F = _F(-87.33654)  # below: e^x is under the smallest normal float32; the result is 0
EXP_MAX_F = _F(88.72283)  # above: inf
P0, P1, P2 = _F(1.9875691500e-4), _F(1.3981999507e-3), _F(8.3334519073e-3)
P3, P4, P5 = _F(4.1665795894e-2), _F(1.6666665459e-1), _F(5.0000001201e-1)


@njit(cache=True, error_model="numpy", inline="always")
def _expf(x):
    one = _F(1.0)
    xc = x
    if xc < EXP_MIN_F:  # "x < lo" is False for NaN, so NaN stays
        xc = EXP_MIN_F
    if xc > EXP_MAX_F:
        xc = EXP_MAX_F
    t = xc * LOG2E_F + ROUND_MAGIC_F  # round(x·log2 e) in the low bits of t
    n = t - ROUND_MAGIC_F
    r = (xc - n * LN2_HI_F) - n * LN2_LO_F
    z = r * r
    p = (((((P0 * r + P1) * r + P2) * r + P3) * r + P4) * r + P5) * z + r + one
    k = _bits_of(t) - _bits_of(ROUND_MAGIC_F)  # n as an int32
    y = p * _as_float32((k + np.int32(127)) << np.int32(23))
    if x < EXP_MIN_F:
        y = _F(0.0)
    if x > EXP_MAX_F:
        y = _F(np.inf)
    return y


def _exp(x):
    """exp for the kernels below: the vectorizable ``_expf`` for float32, libm's for float64."""
    return math.exp(x)


@overload(_exp, jit_options={"cache": True, "error_model": "numpy"})
def _exp_impl(x):
    if x == types.float32:
        return lambda x: _expf(x)
    return lambda x: math.exp(x)


def _tanh(z):
    """tanh for the kernels below (the Numba overload picks the implementation by dtype)."""
    return math.tanh(z)


@overload(_tanh, jit_options={"cache": True, "error_model": "numpy"})
def _tanh_impl(z):
    if z == types.float32:
        # libm's tanhf is a scalar call per element. Instead, two branch-free float32 formulas and
        # a select, so that a loop over them vectorizes: below |z| = 0.35 the odd Taylor series
        # (the first term left out is < 2e-8 relative), above it (1 − e)/(1 + e) with
        # e = exp(−2|z|) <= 0.5, where 1 − e no longer cancels. NaN goes through exp and stays NaN.
        def impl(z):
            a = abs(z)
            z2 = z * z
            small = z * (T1 + z2 * (T3 + z2 * (T5 + z2 * (T7 + z2 * (T9 + z2 * T11)))))
            e = _expf(_F(-2.0) * a)
            large = (_F(1.0) - e) / (_F(1.0) + e)
            large = large if z >= _F(0.0) else -large
            return small if a < _F(0.35) else large
        return impl
    return lambda z: math.tanh(z)


T1, T3, T5 = _F(1.0), _F(-1.0 / 3.0), _F(2.0 / 15.0)
T7, T9, T11 = _F(-17.0 / 315.0), _F(62.0 / 2835.0), _F(-1382.0 / 155925.0)


# ---- forward: Z += b; A = σ(Z) -----------------------------------------------------------------
# The activations as scalar functions, inlined into each loop below. Each loop runs one activation
# (the branch on ``act`` sits outside it) so that LLVM can vectorize it.
@njit(cache=True, error_model="numpy", inline="always")
def _sigmoid(z, zero, one):
    # Split at 0 so exp never overflows: e = exp(-|z|) <= 1 on both sides.
    e = _exp(-abs(z))
    return one / (one + e) if z >= zero else e / (one + e)


@njit(cache=True, error_model="numpy", inline="always")
def _relu(z, zero):
    return zero if z < zero else z  # "z < 0 gives 0" keeps NaN, as np.maximum does


@njit(cache=True, error_model="numpy", inline="always")
def _leaky_relu(z, zero, slope):
    return z if z > zero else z * slope


@njit(cache=True, error_model="numpy", inline="always")
def _gelu(z, half, one, c, k):
    return half * z * (one + _tanh(c * (z + k * (z * z * z))))


@njit(cache=True, error_model="numpy")
def _bias_act_rows(Z, b, A, act, r0, r1):
    """Z += b, A = σ(Z) for rows r0..r1, A a buffer of its own."""
    n = Z.shape[1]
    t = Z.dtype.type
    zero, one, half = t(0), t(1), t(0.5)
    slope, c, k = t(LEAKY_SLOPE), t(GELU_C), t(GELU_K)
    for i in range(r0, r1):
        if act == IDENTITY:
            for j in range(n):
                z = Z[i, j] + b[j]
                Z[i, j] = z
                A[i, j] = z
        elif act == SIGMOID:
            for j in range(n):
                z = Z[i, j] + b[j]
                Z[i, j] = z
                A[i, j] = _sigmoid(z, zero, one)
        elif act == TANH:
            for j in range(n):
                z = Z[i, j] + b[j]
                Z[i, j] = z
                A[i, j] = _tanh(z)
        elif act == RELU:
            for j in range(n):
                z = Z[i, j] + b[j]
                Z[i, j] = z
                A[i, j] = _relu(z, zero)
        elif act == LEAKY_RELU:
            for j in range(n):
                z = Z[i, j] + b[j]
                Z[i, j] = z
                A[i, j] = _leaky_relu(z, zero, slope)
        else:  # GELU, tanh approximation
            for j in range(n):
                z = Z[i, j] + b[j]
                Z[i, j] = z
                A[i, j] = _gelu(z, half, one, c, k)


@njit(cache=True, error_model="numpy")
def _bias_act_rows_inplace(Z, b, act, r0, r1):
    """Z = σ(Z + b) for rows r0..r1: the common case, A is Z, as a one-array loop (with two names
    for one buffer LLVM's runtime alias check fails and the loop runs scalar, ~4x slower)."""
    n = Z.shape[1]
    t = Z.dtype.type
    zero, one, half = t(0), t(1), t(0.5)
    slope, c, k = t(LEAKY_SLOPE), t(GELU_C), t(GELU_K)
    for i in range(r0, r1):
        if act == IDENTITY:
            for j in range(n):
                Z[i, j] = Z[i, j] + b[j]
        elif act == SIGMOID:
            for j in range(n):
                Z[i, j] = _sigmoid(Z[i, j] + b[j], zero, one)
        elif act == TANH:
            for j in range(n):
                Z[i, j] = _tanh(Z[i, j] + b[j])
        elif act == RELU:
            for j in range(n):
                Z[i, j] = _relu(Z[i, j] + b[j], zero)
        elif act == LEAKY_RELU:
            for j in range(n):
                Z[i, j] = _leaky_relu(Z[i, j] + b[j], zero, slope)
        else:  # GELU in place (a caller that keeps Z for the derivative passes a separate A)
            for j in range(n):
                Z[i, j] = _gelu(Z[i, j] + b[j], half, one, c, k)


@njit(cache=True, error_model="numpy")
def _bias_act_serial(Z, b, A, act, inplace):
    if inplace:
        _bias_act_rows_inplace(Z, b, act, 0, Z.shape[0])
    else:
        _bias_act_rows(Z, b, A, act, 0, Z.shape[0])


@njit(cache=True, error_model="numpy", parallel=True)
def _bias_act_parallel(Z, b, A, act, inplace, nchunks):
    B = Z.shape[0]
    for c in prange(nchunks):
        r0, r1 = _span(c, nchunks, B)
        if inplace:
            _bias_act_rows_inplace(Z, b, act, r0, r1)
        else:
            _bias_act_rows(Z, b, A, act, r0, r1)


# ---- backward: dZ = dA ⊙ σ'(saved) (the Hadamard product of BP1/BP2) ------------------------------
@njit(cache=True, error_model="numpy")
def _act_backward_span(dA, S, dZ, act, i0, i1):
    zero = dA.dtype.type(0)
    one = dA.dtype.type(1)
    if act == IDENTITY:
        for i in range(i0, i1):
            dZ[i] = dA[i]
    elif act == SIGMOID:
        for i in range(i0, i1):
            s = S[i]
            dZ[i] = dA[i] * s * (one - s)
    elif act == TANH:
        for i in range(i0, i1):
            s = S[i]
            dZ[i] = dA[i] * (one - s * s)
    elif act == RELU:
        for i in range(i0, i1):
            dZ[i] = dA[i] if S[i] > zero else zero
    elif act == LEAKY_RELU:
        slope = dA.dtype.type(LEAKY_SLOPE)
        for i in range(i0, i1):
            d = dA[i]
            dZ[i] = d if S[i] > zero else d * slope
    else:  # GELU: S is Z
        half = dA.dtype.type(0.5)
        c = dA.dtype.type(GELU_C)
        k = dA.dtype.type(GELU_K)
        k3 = dA.dtype.type(GELU_3K)
        for i in range(i0, i1):
            z = S[i]
            t = _tanh(c * (z + k * (z * z * z)))
            dZ[i] = dA[i] * (half * (one + t) + half * z * (one - t * t) * c * (one + k3 * z * z))


@njit(cache=True, error_model="numpy")
def _act_backward_serial(dA, S, dZ, act):
    n = dA.size
    _act_backward_span(dA.reshape(n), S.reshape(n), dZ.reshape(n), act, 0, n)


@njit(cache=True, error_model="numpy", parallel=True)
def _act_backward_parallel(dA, S, dZ, act, nchunks):
    n = dA.size
    fa, fs, fz = dA.reshape(n), S.reshape(n), dZ.reshape(n)
    for c in prange(nchunks):
        i0, i1 = _span(c, nchunks, n)
        _act_backward_span(fa, fs, fz, act, i0, i1)


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


# ---- BP4: bias gradient, column sums in row order (NumPy's order for axis=0) ---------------------
@njit(cache=True, error_model="numpy")
def _bias_grad_cols(dZ, db, accumulate, j0, j1):
    B = dZ.shape[0]
    w = j1 - j0
    acc = db[j0:j1] if not accumulate else np.empty(w, dZ.dtype)
    for j in range(w):
        acc[j] = dZ[0, j0 + j] if B > 0 else dZ.dtype.type(0)
    for i in range(1, B):
        for j in range(w):
            acc[j] += dZ[i, j0 + j]
    if accumulate:
        for j in range(w):
            db[j0 + j] += acc[j]


@njit(cache=True, error_model="numpy")
def _bias_grad_serial(dZ, db, accumulate):
    _bias_grad_cols(dZ, db, accumulate, 0, dZ.shape[1])


@njit(cache=True, error_model="numpy", parallel=True)
def _bias_grad_parallel(dZ, db, accumulate, nchunks):
    n = dZ.shape[1]
    for c in prange(nchunks):
        j0, j1 = _span(c, nchunks, n)
        _bias_grad_cols(dZ, db, accumulate, j0, j1)


# ---- ‖g‖²: float64 partial sums over fixed chunks, added in chunk order ---------------------------
@njit(cache=True, error_model="numpy")
def _sq_chunk(g, i0, i1):
    # Four independent accumulators (a fixed order) so the loop is not one long dependency chain.
    a0 = a1 = a2 = a3 = 0.0
    i = i0
    while i + 4 <= i1:
        x0 = np.float64(g[i])
        x1 = np.float64(g[i + 1])
        x2 = np.float64(g[i + 2])
        x3 = np.float64(g[i + 3])
        a0 += x0 * x0
        a1 += x1 * x1
        a2 += x2 * x2
        a3 += x3 * x3
        i += 4
    while i < i1:
        x = np.float64(g[i])
        a0 += x * x
        i += 1
    return (a0 + a1) + (a2 + a3)


@njit(cache=True, error_model="numpy")
def _sq_norm_serial(g, chunk):
    n = g.size
    total = 0.0
    for c in range((n + chunk - 1) // chunk):
        total += _sq_chunk(g, c * chunk, min(n, (c + 1) * chunk))
    return total


@njit(cache=True, error_model="numpy", parallel=True)
def _sq_norm_parallel(g, chunk):
    n = g.size
    nchunks = (n + chunk - 1) // chunk
    partial = np.empty(nchunks)
    for c in prange(nchunks):
        partial[c] = _sq_chunk(g, c * chunk, min(n, (c + 1) * chunk))
    total = 0.0
    for c in range(nchunks):
        total += partial[c]
    return total


@njit(cache=True, error_model="numpy")
def _write_sq(total, out):
    out[0] = out.dtype.type(total)


@njit(cache=True, error_model="numpy")
def _write_clip(total, clip_norm, scale):
    one = scale.dtype.type(1)
    norm = math.sqrt(scale.dtype.type(total))
    x = scale.dtype.type(clip_norm) / (norm + scale.dtype.type(1e-6))
    scale[0] = one if x > one else x  # min(1, x), keeping NaN as np.minimum does


# ---- optimizer updates: one pass over the flat buffers ------------------------------------------
@njit(cache=True, error_model="numpy")
def _sgd_span(p, g, buf, lr, momentum, nesterov, weight_decay, s, i0, i1):
    t = p.dtype.type
    lr, mu, wd = t(lr), t(momentum), t(weight_decay)
    for i in range(i0, i1):
        d = g[i] * s
        if weight_decay != 0.0:
            d = d + wd * p[i]
        if momentum != 0.0:
            bi = buf[i] * mu + d
            buf[i] = bi
            d = d + mu * bi if nesterov else bi
        p[i] -= lr * d


@njit(cache=True, error_model="numpy")
def _sgd_serial(p, g, buf, lr, momentum, nesterov, weight_decay, scale):
    n = p.size
    _sgd_span(p.reshape(n), g.reshape(n), buf.reshape(buf.size), lr, momentum, nesterov,
              weight_decay, scale[0], 0, n)


@njit(cache=True, error_model="numpy", parallel=True)
def _sgd_parallel(p, g, buf, lr, momentum, nesterov, weight_decay, scale, nchunks):
    n = p.size
    fp, fg, fb, s = p.reshape(n), g.reshape(n), buf.reshape(buf.size), scale[0]
    for c in prange(nchunks):
        i0, i1 = _span(c, nchunks, n)
        _sgd_span(fp, fg, fb, lr, momentum, nesterov, weight_decay, s, i0, i1)


@njit(cache=True, error_model="numpy")
def _rmsprop_span(p, g, sq, buf, lr, alpha, eps, weight_decay, momentum, s, i0, i1):
    t = p.dtype.type
    lr, a, a1, ep, wd, mu = t(lr), t(alpha), t(1.0 - alpha), t(eps), t(weight_decay), t(momentum)
    for i in range(i0, i1):
        d = g[i] * s
        if weight_decay != 0.0:
            d = d + wd * p[i]
        v = sq[i] * a + a1 * d * d
        sq[i] = v
        step = d / (math.sqrt(v) + ep)
        if momentum != 0.0:
            step = buf[i] * mu + step
            buf[i] = step
        p[i] -= lr * step


@njit(cache=True, error_model="numpy")
def _rmsprop_serial(p, g, sq, buf, lr, alpha, eps, weight_decay, momentum, scale):
    n = p.size
    _rmsprop_span(p.reshape(n), g.reshape(n), sq.reshape(n), buf.reshape(buf.size), lr, alpha,
                  eps, weight_decay, momentum, scale[0], 0, n)


@njit(cache=True, error_model="numpy", parallel=True)
def _rmsprop_parallel(p, g, sq, buf, lr, alpha, eps, weight_decay, momentum, scale, nchunks):
    n = p.size
    fp, fg, fs, fb, s = p.reshape(n), g.reshape(n), sq.reshape(n), buf.reshape(buf.size), scale[0]
    for c in prange(nchunks):
        i0, i1 = _span(c, nchunks, n)
        _rmsprop_span(fp, fg, fs, fb, lr, alpha, eps, weight_decay, momentum, s, i0, i1)


@njit(cache=True, error_model="numpy")
def _adam_span(p, g, m, v, lr_c, beta1, beta2, eps, l2, decay, sqrt_bc2, s, i0, i1):
    # lr_c = lr / (1 - beta1**step), sqrt_bc2 = sqrt(1 - beta2**step) and decay = 1 - lr*wd
    # (AdamW) are computed in Python as the reference does, then rounded to the array dtype once,
    # as NumPy rounds a Python scalar that meets a float32 array.
    t = p.dtype.type
    b1, b2, c1, c2 = t(beta1), t(beta2), t(1.0 - beta1), t(1.0 - beta2)
    lr, ep, r2, wd, f = t(lr_c), t(eps), t(sqrt_bc2), t(l2), t(decay)
    for i in range(i0, i1):
        d = g[i] * s
        pi = p[i]
        if decay != 1.0:
            pi = pi * f  # AdamW: decoupled decay, before the step
        if l2 != 0.0:
            d = d + wd * pi  # Adam: L2 decay added to the gradient
        mi = m[i] * b1 + c1 * d
        vi = v[i] * b2 + c2 * d * d
        m[i] = mi
        v[i] = vi
        p[i] = pi - lr * mi / (math.sqrt(vi) / r2 + ep)


@njit(cache=True, error_model="numpy")
def _adam_serial(p, g, m, v, lr_c, beta1, beta2, eps, l2, decay, sqrt_bc2, scale):
    n = p.size
    _adam_span(p.reshape(n), g.reshape(n), m.reshape(n), v.reshape(n), lr_c, beta1, beta2, eps,
               l2, decay, sqrt_bc2, scale[0], 0, n)


@njit(cache=True, error_model="numpy", parallel=True)
def _adam_parallel(p, g, m, v, lr_c, beta1, beta2, eps, l2, decay, sqrt_bc2, scale, nchunks):
    n = p.size
    fp, fg, fm, fv, s = p.reshape(n), g.reshape(n), m.reshape(n), v.reshape(n), scale[0]
    for c in prange(nchunks):
        i0, i1 = _span(c, nchunks, n)
        _adam_span(fp, fg, fm, fv, lr_c, beta1, beta2, eps, l2, decay, sqrt_bc2, s, i0, i1)


_EMPTY = {checks.F32: np.empty(0, checks.F32), checks.F64: np.empty(0, checks.F64)}


def _no_buffer(p):
    """An empty stand-in for a momentum buffer that is not used (momentum = 0)."""
    return _EMPTY.get(getattr(p, "dtype", None), p)


class CpuOps(ReferenceOps):
    """The reference ops as fused Numba CPU kernels (float32 and float64)."""

    name = "fused-cpu"

    def __init__(self, xp=np, num_threads=None, parallel_min=None):
        """``num_threads``: chunks of a parallel kernel (default: Numba's thread count);
        ``parallel_min``: element count from which parallel kernels run (default: measured
        thresholds; 0 forces them, as the tests and ``warm_up`` do)."""
        if xp is not np:
            raise TypeError(f"xp: expected numpy for the fused CPU kernels, got {xp.__name__}")
        super().__init__(xp)
        self.nchunks = int(num_threads or numba.get_num_threads())
        self.parallel = self.nchunks > 1 or parallel_min == 0
        if parallel_min is None:
            self.par_cheap, self.par_transcendental = PAR_MIN_CHEAP, PAR_MIN_TRANSCENDENTAL
        else:
            self.par_cheap = self.par_transcendental = int(parallel_min)
        self.par_by_act = tuple(self.par_transcendental if a in (SIGMOID, TANH, GELU)
                                else self.par_cheap for a in range(len(ACTIVATIONS)))

    def bias_act(self, Z, b, activation, A):
        """Z += b (in place), then A = σ(Z), in one pass. A may be Z unless the activation is gelu."""
        checks.float_arrays(checks.NAMES_BIAS_ACT, Z, b, A)
        if Z.ndim != 2 or b.shape != Z.shape[1:] or A.shape != Z.shape:
            checks.check_bias_act(Z, b, A)
        act = ACT_CODE.get(activation)
        if act is None:
            raise checks.unknown_activation(activation)
        inplace = A is Z
        if self.parallel and Z.size >= self.par_by_act[act]:
            _bias_act_parallel(Z, b, A, act, inplace, self.nchunks)
        else:
            _bias_act_serial(Z, b, A, act, inplace)
        return A

    def act_backward(self, dA, saved, activation, dZ):
        """dZ = dA ⊙ σ'(saved) in one pass (saved is A, or Z for gelu). dZ may be dA."""
        checks.float_arrays(checks.NAMES_ACT_BACKWARD, dA, saved, dZ)
        if saved.shape != dA.shape or dZ.shape != dA.shape:
            checks.check_same_shape("dA", dA, ("saved", saved), ("dZ", dZ))
        act = ACT_CODE.get(activation)
        if act is None:
            raise checks.unknown_activation(activation)
        if self.parallel and dA.size >= self.par_by_act[act]:
            _act_backward_parallel(dA, saved, dZ, act, self.nchunks)
        else:
            _act_backward_serial(dA, saved, dZ, act)
        return dZ

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

    def bias_grad(self, dZ, db, accumulate=False):
        """db (+)= Σ_rows dZ, rows added in order (deterministic, the same order as NumPy's)."""
        checks.float_arrays(checks.NAMES_BIAS_GRAD, dZ, db)
        if dZ.ndim != 2 or db.shape != dZ.shape[1:]:
            checks.check_bias_grad(dZ, db)
        accumulate = bool(accumulate)
        n = dZ.shape[1]
        if self.parallel and dZ.size >= self.par_cheap and n >= 2 * self.nchunks:
            _bias_grad_parallel(dZ, db, accumulate, self.nchunks)
        else:
            _bias_grad_serial(dZ, db, accumulate)
        return db

    def _sq_total(self, g):
        if self.parallel and g.size >= self.par_cheap:
            return _sq_norm_parallel(g, SQ_CHUNK)
        return _sq_norm_serial(g, SQ_CHUNK)

    def sq_norm(self, g):
        """‖g‖² as a new 1-element array of g's dtype (float64 partial sums in a fixed order)."""
        dt = checks.float_arrays(("g",), g)
        if g.ndim != 1:
            checks.check_flat("g", g)
        out = np.empty(1, dt)
        _write_sq(self._sq_total(g), out)
        return out

    def clip_scale(self, g, clip_norm, scale):
        """scale[0] = min(1, clip_norm / (‖g‖₂ + 1e-6)), computed as the reference does."""
        checks.float_arrays(("g", "scale"), g, scale)
        if g.ndim != 1 or scale.size != 1:
            checks.check_flat("g", g)
            checks.check_scale(scale)
        _write_clip(self._sq_total(g), float(clip_norm), scale)
        return scale

    def sgd(self, p, g, buf, lr, momentum, nesterov, weight_decay, scale):
        """torch.optim.SGD without dampening, scale and weight decay included, in one pass."""
        momentum = float(momentum)
        if buf is None and not momentum:
            buf = _no_buffer(p)
        checks.float_arrays(checks.NAMES_SGD, p, g, buf, scale)
        if g.shape != p.shape or scale.size != 1 or (momentum and buf.shape != p.shape):
            self._check_opt(p, g, scale, ("buf", buf) if momentum else None)
        args = (p, g, buf, float(lr), momentum, bool(nesterov), float(weight_decay), scale)
        if self.parallel and p.size >= self.par_cheap:
            _sgd_parallel(*args, self.nchunks)
        else:
            _sgd_serial(*args)
        return p

    def rmsprop(self, p, g, square_avg, buf, lr, alpha, eps, weight_decay, momentum, scale):
        """torch.optim.RMSprop (not centered), eps outside the square root, in one pass."""
        momentum = float(momentum)
        if buf is None and not momentum:
            buf = _no_buffer(p)
        checks.float_arrays(checks.NAMES_RMSPROP, p, g, square_avg, buf, scale)
        if g.shape != p.shape or square_avg.shape != p.shape or scale.size != 1 \
                or (momentum and buf.shape != p.shape):
            self._check_opt(p, g, scale, ("square_avg", square_avg),
                            ("buf", buf) if momentum else None)
        args = (p, g, square_avg, buf, float(lr), float(alpha), float(eps), float(weight_decay),
                momentum, scale)
        if self.parallel and p.size >= self.par_cheap:
            _rmsprop_parallel(*args, self.nchunks)
        else:
            _rmsprop_serial(*args)
        return p

    def adam(self, p, g, m, v, lr, beta1, beta2, eps, weight_decay, decoupled, step, scale):
        """torch.optim.Adam / AdamW (decoupled decay), bias-corrected, in one pass."""
        checks.float_arrays(checks.NAMES_ADAM, p, g, m, v, scale)
        if g.shape != p.shape or m.shape != p.shape or v.shape != p.shape or scale.size != 1:
            self._check_opt(p, g, scale, ("m", m), ("v", v))
        beta1, beta2 = float(beta1), float(beta2)
        lr_c, sqrt_bc2, l2, decay = adam_coefficients(lr, beta1, beta2, float(weight_decay),
                                                      decoupled, step)
        args = (p, g, m, v, float(lr_c), beta1, beta2, float(eps), l2, float(decay), sqrt_bc2,
                scale)
        if self.parallel and p.size >= self.par_cheap:
            _adam_parallel(*args, self.nchunks)
        else:
            _adam_serial(*args)
        return p

    @staticmethod
    def _check_opt(p, g, scale, *pairs):
        checks.check_same_shape("p", p, ("g", g), *(x for x in pairs if x is not None))
        checks.check_scale(scale)

    def warm_up(self, dtype="float32"):
        """Compile (or load from Numba's cache) every kernel, serial and parallel, for ``dtype``."""
        from gpubackprop.kernels.info import run_every_op

        run_every_op(self, dtype)
        run_every_op(CpuOps(np, num_threads=2, parallel_min=0), dtype)
