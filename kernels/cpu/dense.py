"""CPU dense-layer ops: bias + activation forward (and the activation alone), the σ' Hadamard
product (BP1/BP2), BP4."""

import contextlib
import math

import numpy as np
from numba import njit, prange

from gpubackprop.kernels import checks
from gpubackprop.kernels.cpu import blas
from gpubackprop.kernels.cpu.numerics import _exp, _span, _tanh
from gpubackprop.kernels.reference import ACTIVATIONS, GELU_C, GELU_K, LEAKY_SLOPE
from gpubackprop.kernels.reference.dense import INV_SQRT_2PI, SQRT1_2

IDENTITY, SIGMOID, TANH, RELU, LEAKY_RELU, GELU, GELU_TANH = range(7)
ACT_CODE = {name: i for i, name in enumerate(ACTIVATIONS)}
assert ACTIVATIONS == ("identity", "sigmoid", "tanh", "relu", "leaky_relu", "gelu", "gelu_tanh")
GELU_3K = 3 * GELU_K  # the reference evaluates 3 * GELU_K in Python first


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
def _gelu(z, half, s):
    """Exact GELU z·Φ(z), Φ(z) = 0.5·erfc(-z/√2) (s = 1/√2): erfc keeps the left tail accurate."""
    return z * (half * math.erfc(-z * s))


@njit(cache=True, error_model="numpy", inline="always")
def _gelu_tanh(z, half, one, c, k):
    return half * z * (one + _tanh(c * (z + k * (z * z * z))))


@njit(cache=True, error_model="numpy", inline="always")
def _same_buffer(a, b):
    """Whether a and b (C-contiguous, one shape: the launchers check) are the same elements, so
    that the in-place kernel runs: a view of the same buffer from the same start included. Asked
    here rather than in the launcher, where __array_interface__ cost ~3 µs a call."""
    return a.ctypes.data == b.ctypes.data


@njit(cache=True, error_model="numpy")
def _bias_act_rows(Z, b, A, act, r0, r1):
    """Z += b, A = σ(Z) for rows r0..r1, A a buffer of its own."""
    n = Z.shape[1]
    t = Z.dtype.type
    zero, one, half = t(0), t(1), t(0.5)
    slope, c, k, s = t(LEAKY_SLOPE), t(GELU_C), t(GELU_K), t(SQRT1_2)
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
        elif act == GELU:
            for j in range(n):
                z = Z[i, j] + b[j]
                Z[i, j] = z
                A[i, j] = _gelu(z, half, s)
        else:  # GELU_TANH
            for j in range(n):
                z = Z[i, j] + b[j]
                Z[i, j] = z
                A[i, j] = _gelu_tanh(z, half, one, c, k)


@njit(cache=True, error_model="numpy")
def _bias_act_rows_inplace(Z, b, act, r0, r1):
    """Z = σ(Z + b) for rows r0..r1: the common case, A is Z, as a one-array loop (with two names
    for one buffer LLVM's runtime alias check fails and the loop runs scalar, ~4x slower)."""
    n = Z.shape[1]
    t = Z.dtype.type
    zero, one, half = t(0), t(1), t(0.5)
    slope, c, k, s = t(LEAKY_SLOPE), t(GELU_C), t(GELU_K), t(SQRT1_2)
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
        # The gelus in place (a caller that keeps Z for the derivative passes a separate A).
        elif act == GELU:
            for j in range(n):
                Z[i, j] = _gelu(Z[i, j] + b[j], half, s)
        else:  # GELU_TANH
            for j in range(n):
                Z[i, j] = _gelu_tanh(Z[i, j] + b[j], half, one, c, k)


@njit(cache=True, error_model="numpy")
def _bias_act_serial(Z, b, A, act):
    if _same_buffer(A, Z):
        _bias_act_rows_inplace(Z, b, act, 0, Z.shape[0])
    else:
        _bias_act_rows(Z, b, A, act, 0, Z.shape[0])


@njit(cache=True, error_model="numpy", parallel=True)
def _bias_act_parallel(Z, b, A, act, nchunks):
    B = Z.shape[0]
    inplace = _same_buffer(A, Z)
    for c in prange(nchunks):
        r0, r1 = _span(c, nchunks, B)
        if inplace:
            _bias_act_rows_inplace(Z, b, act, r0, r1)
        else:
            _bias_act_rows(Z, b, A, act, r0, r1)


# ---- the activation alone: A = σ(X), X kept (an Activation layer after a norm or a sum) ----------
# Flat, any shape; run by the drivers it shares with act_backward (_flat_serial/_flat_parallel),
# inlined for the reason given at _act_backward_span (A is X: one name for the one buffer). The
# same scalar functions as bias_act's, so σ(X) here is bit for bit bias_act's σ(X + (-0.0))
# (z + (-0.0) is z, -0.0 included).
@njit(cache=True, error_model="numpy", inline="always")
def _activation_span(X, A, act, i0, i1):
    t = X.dtype.type
    zero, one, half = t(0), t(1), t(0.5)
    if act == IDENTITY:
        for i in range(i0, i1):
            A[i] = X[i]
    elif act == SIGMOID:
        for i in range(i0, i1):
            A[i] = _sigmoid(X[i], zero, one)
    elif act == TANH:
        for i in range(i0, i1):
            A[i] = _tanh(X[i])
    elif act == RELU:
        for i in range(i0, i1):
            A[i] = _relu(X[i], zero)
    elif act == LEAKY_RELU:
        slope = t(LEAKY_SLOPE)
        for i in range(i0, i1):
            A[i] = _leaky_relu(X[i], zero, slope)
    elif act == GELU:
        s = t(SQRT1_2)
        for i in range(i0, i1):
            A[i] = _gelu(X[i], half, s)
    else:  # GELU_TANH
        c, k = t(GELU_C), t(GELU_K)
        for i in range(i0, i1):
            A[i] = _gelu_tanh(X[i], half, one, c, k)


# ---- backward: dZ = dA ⊙ σ'(saved) (the Hadamard product of BP1/BP2) ------------------------------
# Inlined into each call, so that the in-place call (dZ is dA) passes one name for the one buffer:
# with two, LLVM's runtime alias check fails and the loop runs scalar, the ReLU's select as a
# branch on random signs (64x16384 float32 in place: 5.2 ms; with one name as fast as a copy).
@njit(cache=True, error_model="numpy", inline="always")
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
    elif act == GELU:  # S is Z: Φ(z) + z·φ(z)
        half = dA.dtype.type(0.5)
        s = dA.dtype.type(SQRT1_2)
        p = dA.dtype.type(INV_SQRT_2PI)
        for i in range(i0, i1):
            z = S[i]
            dZ[i] = dA[i] * (half * math.erfc(-z * s) + z * (p * _exp(-half * z * z)))
    else:  # GELU_TANH: S is Z
        half = dA.dtype.type(0.5)
        c = dA.dtype.type(GELU_C)
        k = dA.dtype.type(GELU_K)
        k3 = dA.dtype.type(GELU_3K)
        for i in range(i0, i1):
            z = S[i]
            t = _tanh(c * (z + k * (z * z * z)))
            dZ[i] = dA[i] * (half * (one + t) + half * z * (one - t * t) * c * (one + k3 * z * z))


# ---- the flat drivers of both: forward A = σ(src), or backward dZ = src ⊙ σ'(S) ------------------
# One pair for the two ops (the branch on ``forward`` sits outside the loops): dst is src in place.
@njit(cache=True, error_model="numpy", inline="always")
def _flat_span(src, S, dst, act, forward, i0, i1):
    if forward:
        _activation_span(src, dst, act, i0, i1)
    else:
        _act_backward_span(src, S, dst, act, i0, i1)


@njit(cache=True, error_model="numpy")
def _flat_serial(src, S, dst, act, forward):
    n = src.size
    fs, fd = S.reshape(n), dst.reshape(n)
    if _same_buffer(dst, src):
        _flat_span(fd, fs, fd, act, forward, 0, n)
    else:
        _flat_span(src.reshape(n), fs, fd, act, forward, 0, n)


@njit(cache=True, error_model="numpy", parallel=True)
def _flat_parallel(src, S, dst, act, forward, nchunks):
    n = src.size
    fsrc, fs, fd = src.reshape(n), S.reshape(n), dst.reshape(n)
    inplace = _same_buffer(dst, src)
    for c in prange(nchunks):
        i0, i1 = _span(c, nchunks, n)
        if inplace:
            _flat_span(fd, fs, fd, act, forward, i0, i1)
        else:
            _flat_span(fsrc, fs, fd, act, forward, i0, i1)


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



_BLAS_DECIDES = contextlib.nullcontext()
# OpenBLAS runs a GEMM on one thread up to 65536·4 multiply-adds (interface/gemm.c), on its own
# threads above; Dense takes one BLAS thread below DENSE_ONE_THREAD_BELOW (see dense_gemm_threads).
BLAS_THREADS_FROM = 1 << 18
DENSE_ONE_THREAD_BELOW = 1 << 23


class DenseOps:
    """Fused dense-layer ops (a mixin of ``CpuOps``: uses its parallel thresholds)."""

    dense_one_thread_below = DENSE_ONE_THREAD_BELOW

    def dense_gemm_threads(self, macs):
        """Dense's GEMMs of BLAS_THREADS_FROM to ``dense_one_thread_below`` multiply-adds on one BLAS
        thread (a null context otherwise: BLAS decides). Such a GEMM gains from a second BLAS
        thread alone (LeNet-5's 128x400 · 400x120: 194 -> 109 µs), but OpenBLAS's worker then
        spin-yields on the other core for a while, into the layers that split their own work over
        the two cores (the direct convolutions' halves, Conv2d's chunks in two halves), which then
        run at a fraction of it. Measured on the LeNet-5 step (batch 128, float32, 2-core AMD EPYC
        znver3, interleaved medians of 12 rounds, one run): 12.87 ms with BLAS's threads, 11.18 with
        the whole step on one; the MLPs' GEMMs (784-256-256-10 at batch 128: 8.4M multiply-adds and
        more, but the output layer's) keep BLAS's threads."""
        if BLAS_THREADS_FROM < macs < self.dense_one_thread_below:
            return blas.one_blas_thread()
        return _BLAS_DECIDES


    def bias_act(self, Z, b, activation, A):
        """Z += b (in place), then A = σ(Z), in one pass. A may be Z unless the activation is a gelu."""
        checks.float_arrays(checks.NAMES_BIAS_ACT, Z, b, A)
        if Z.ndim != 2 or b.shape != Z.shape[1:] or A.shape != Z.shape:
            checks.check_bias_act(Z, b, A)
        act = ACT_CODE.get(activation)
        if act is None:
            raise checks.unknown_activation(activation)
        if self.parallel and Z.size >= self.par_by_act[act]:
            _bias_act_parallel(Z, b, A, act, self.nchunks)
        else:
            _bias_act_serial(Z, b, A, act)
        return A

    def activation(self, X, activation, A):
        """A = σ(X) in one pass, any shape (X is not written). A may be X itself."""
        checks.float_arrays(checks.NAMES_ACTIVATION, X, A)
        if A.shape != X.shape:
            checks.check_same_shape("X", X, ("A", A))
        act = ACT_CODE.get(activation)
        if act is None:
            raise checks.unknown_activation(activation)
        if self.parallel and X.size >= self.par_by_act[act]:
            _flat_parallel(X, X, A, act, True, self.nchunks)
        else:
            _flat_serial(X, X, A, act, True)
        return A

    def act_backward(self, dA, saved, activation, dZ):
        """dZ = dA ⊙ σ'(saved) in one pass (saved is A, or Z for the gelus). dZ may be dA."""
        checks.float_arrays(checks.NAMES_ACT_BACKWARD, dA, saved, dZ)
        if saved.shape != dA.shape or dZ.shape != dA.shape:
            checks.check_same_shape("dA", dA, ("saved", saved), ("dZ", dZ))
        act = ACT_CODE.get(activation)
        if act is None:
            raise checks.unknown_activation(activation)
        if self.parallel and dA.size >= self.par_by_act[act]:
            _flat_parallel(dA, saved, dZ, act, False, self.nchunks)
        else:
            _flat_serial(dA, saved, dZ, act, False)
        return dZ

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
