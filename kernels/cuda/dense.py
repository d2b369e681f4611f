"""CUDA dense-layer ops: bias + activation forward (and the activation alone), the σ' Hadamard
product (BP1/BP2), BP4."""

import math

from gpubackprop.kernels import checks
from gpubackprop.kernels.cuda.launch import as_1d, as_2d, cuda, device_function, kernel_body
from gpubackprop.kernels.cuda.numerics import imin, mul
from gpubackprop.kernels.reference import ACTIVATIONS, GELU_C, GELU_K, LEAKY_SLOPE
from gpubackprop.kernels.reference.dense import INV_SQRT_2PI, SQRT1_2

IDENTITY, SIGMOID, TANH, RELU, LEAKY_RELU, GELU, GELU_TANH = range(7)
ACT_CODE = {name: i for i, name in enumerate(ACTIVATIONS)}
assert ACTIVATIONS == ("identity", "sigmoid", "tanh", "relu", "leaky_relu", "gelu", "gelu_tanh")
GELU_3K = 3 * GELU_K  # the reference evaluates 3 * GELU_K in Python first
# BP4 sums a column over chunks of this many rows in parallel, then the chunks in order: a fixed
# order (it depends on the batch size only), and enough threads to fill a GPU at 1024 columns.
BIAS_GRAD_ROWS = 8


# ---- forward: Z += b; A = σ(Z) -----------------------------------------------------------------
@device_function
def activate(z, act, like):
    """σ(z) for the activation code ``act``, in the dtype of the array ``like`` (also used by conv)."""
    zero, one, nz = like.dtype.type(0), like.dtype.type(1), like.dtype.type(-0.0)
    slope = like.dtype.type(LEAKY_SLOPE)
    half, c, k = like.dtype.type(0.5), like.dtype.type(GELU_C), like.dtype.type(GELU_K)
    s = like.dtype.type(SQRT1_2)
    if act == IDENTITY:
        a = z
    elif act == SIGMOID:
        # Split at 0 so exp never overflows: e = exp(-|z|) <= 1 on both sides.
        e = math.exp(-abs(z))
        a = one / (one + e) if z >= zero else e / (one + e)
    elif act == TANH:
        a = math.tanh(z)
    elif act == RELU:
        a = zero if z < zero else z  # keeps NaN, as np.maximum does
    elif act == LEAKY_RELU:
        a = z if z > zero else z * slope
    elif act == GELU:  # exact: z·Φ(z), Φ(z) = 0.5·erfc(-z/√2) (accurate in the left tail)
        a = z * (half * math.erfc(-z * s))
    else:  # GELU_TANH
        t = math.tanh(c * (z + mul(k, z * z * z, nz)))
        a = half * z * (one + t)
    return a


@kernel_body("void({t}[:, ::1], {t}[::1], {t}[:, ::1], int64)")
def _bias_act(Z, b, A, act):
    B, n = Z.shape
    for idx in range(cuda.grid(1), B * n, cuda.gridsize(1)):
        i = idx // n
        j = idx - i * n
        z = Z[i, j] + b[j]
        Z[i, j] = z
        A[i, j] = activate(z, act, Z)


# ---- the activation alone: A = σ(X), X kept (an Activation layer after a norm or a sum) ----------
@kernel_body("void({t}[::1], {t}[::1], int64)")
def _activation(X, A, act):
    """Flat, any shape; σ(X) bit for bit bias_act's σ(X + (-0.0)). A may be X."""
    for i in range(cuda.grid(1), X.size, cuda.gridsize(1)):
        A[i] = activate(X[i], act, X)


# ---- backward: dZ = dA ⊙ σ'(saved) (the Hadamard product of BP1/BP2) ------------------------------
@kernel_body("void({t}[:, ::1], {t}[:, ::1], {t}[:, ::1], int64)")
def _act_backward(dA, S, dZ, act):
    B, n = dA.shape
    zero, one, nz = dA.dtype.type(0), dA.dtype.type(1), dA.dtype.type(-0.0)
    slope = dA.dtype.type(LEAKY_SLOPE)
    half, c, k, k3 = (dA.dtype.type(0.5), dA.dtype.type(GELU_C), dA.dtype.type(GELU_K),
                      dA.dtype.type(GELU_3K))
    s2, p = dA.dtype.type(SQRT1_2), dA.dtype.type(INV_SQRT_2PI)
    for idx in range(cuda.grid(1), B * n, cuda.gridsize(1)):
        i = idx // n
        j = idx - i * n
        d = dA[i, j]
        s = S[i, j]
        if act == IDENTITY:
            r = d
        elif act == SIGMOID:
            r = d * s * (one - s)
        elif act == TANH:
            r = d * (one - mul(s, s, nz))
        elif act == RELU:
            r = d if s > zero else zero
        elif act == LEAKY_RELU:
            r = d if s > zero else d * slope
        elif act == GELU:  # S is Z: Φ(z) + z·φ(z)
            r = d * (half * math.erfc(-s * s2) + s * (p * math.exp(-half * s * s)))
        else:  # GELU_TANH: S is Z
            t = math.tanh(c * (s + mul(k, s * s * s, nz)))
            left = mul(half, one + t, nz)
            right = mul(half * s * (one - mul(t, t, nz)) * c, one + mul(k3 * s, s, nz), nz)
            r = d * (left + right)
        dZ[i, j] = r


# ---- BP4: bias gradient, deterministic (no atomics) ----------------------------------------------
@kernel_body("void({t}[:, ::1], {t}[::1], boolean)")
def _bias_grad(dZ, db, accumulate):
    """Few rows: a thread a column, rows added in order."""
    B, n = dZ.shape
    for j in range(cuda.grid(1), n, cuda.gridsize(1)):
        s = dZ.dtype.type(0)
        for i in range(B):
            s += dZ[i, j]
        db[j] = db[j] + s if accumulate else s


@kernel_body("void({t}[:, ::1], {t}[:, ::1])")
def _col_sum_chunks(dZ, partial):
    """partial[c, j] = Σ of column j over rows [c·R, (c+1)·R): a thread a (chunk, column)."""
    B, n = dZ.shape
    chunks = partial.shape[0]
    R = (B + chunks - 1) // chunks
    for idx in range(cuda.grid(1), chunks * n, cuda.gridsize(1)):
        c = idx // n
        j = idx - c * n  # consecutive threads read consecutive columns: coalesced
        s = dZ.dtype.type(0)
        for i in range(c * R, imin(B, (c + 1) * R)):
            s += dZ[i, j]
        partial[c, j] = s


@kernel_body("void({t}[:, ::1], {t}[::1], boolean)")
def _col_sum_finish(partial, db, accumulate):
    chunks, n = partial.shape
    for j in range(cuda.grid(1), n, cuda.gridsize(1)):
        s = partial[0, j]
        for c in range(1, chunks):
            s += partial[c, j]
        db[j] = db[j] + s if accumulate else s


class DenseOps:
    """Fused dense-layer ops (a mixin of ``CudaOps``: uses its launcher)."""

    def bias_act(self, Z, b, activation, A):
        """Z += b (in place), then A = σ(Z), one kernel. A may be Z unless the activation is a gelu."""
        dt = checks.float_arrays(checks.NAMES_BIAS_ACT, Z, b, A)
        if Z.ndim != 2 or b.shape != Z.shape[1:] or A.shape != Z.shape:
            checks.check_bias_act(Z, b, A)
        act = ACT_CODE.get(activation)
        if act is None:
            raise checks.unknown_activation(activation)
        self.launch(_bias_act, Z.size, dt, Z, b, A, act)
        return A

    def activation(self, X, activation, A):
        """A = σ(X), one kernel, any shape (X is not written). A may be X itself."""
        dt = checks.float_arrays(checks.NAMES_ACTIVATION, X, A)
        if A.shape != X.shape:
            checks.check_same_shape("X", X, ("A", A))
        act = ACT_CODE.get(activation)
        if act is None:
            raise checks.unknown_activation(activation)
        self.launch(_activation, X.size, dt, as_1d(X), as_1d(A), act)
        return A

    def act_backward(self, dA, saved, activation, dZ):
        """dZ = dA ⊙ σ'(saved), one kernel (saved is A, or Z for the gelus). dZ may be dA."""
        dt = checks.float_arrays(checks.NAMES_ACT_BACKWARD, dA, saved, dZ)
        if saved.shape != dA.shape or dZ.shape != dA.shape:
            checks.check_same_shape("dA", dA, ("saved", saved), ("dZ", dZ))
        act = ACT_CODE.get(activation)
        if act is None:
            raise checks.unknown_activation(activation)
        self.launch(_act_backward, dA.size, dt, as_2d(dA), as_2d(saved), as_2d(dZ), act)
        return dZ

    def bias_grad(self, dZ, db, accumulate=False):
        """db (+)= Σ_rows dZ, deterministic: chunks of rows in parallel, then the chunks in order."""
        dt = checks.float_arrays(checks.NAMES_BIAS_GRAD, dZ, db)
        if dZ.ndim != 2 or db.shape != dZ.shape[1:]:
            checks.check_bias_grad(dZ, db)
        B, n = dZ.shape
        accumulate = bool(accumulate)
        chunks = -(-B // BIAS_GRAD_ROWS)
        if chunks <= 1:
            self.launch(_bias_grad, n, dt, dZ, db, accumulate)
            return db
        partial = self.scratch("bias_grad", (chunks, n), dt)
        self.launch(_col_sum_chunks, chunks * n, dt, dZ, partial)
        self.launch(_col_sum_finish, n, dt, partial, db, accumulate)
        return db
