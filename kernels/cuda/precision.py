"""CUDA mixed-precision ops: 16-bit loads and stores around float32 arithmetic, and the loss scaler.

16-bit storage is float16 (fp16; ``cvt.rn.f16.f32`` on a store, ``cvt.f32.f16`` on a load) or
uint16 holding bfloat16 bits (bf16). numba-cuda 0.30 has a ``numba.cuda.bf16`` module, but its
``nv_bfloat16`` operations are C++ shims compiled by NVRTC and linked at launch: the kernels could
no longer be assembled by ptxas on their own (tests/test_cuda_compile.py) and the simulator has no
bfloat16. So bf16 moves bits: a load is the 16 bits shifted into the high half of a float32
(``int_as_float``, a register move), a store rounds to nearest even on the float32 bits (add
0x7FFF plus the lowest kept bit; NaN kept quiet), as ``cvt.rn.bf16.f32`` and ml_dtypes do.

Every body is compiled for both storages (``{h}``: float16, uint16) and takes ``bf16`` saying which
the array holds; the compile check assembles both for sm_80 and sm_90, and the simulator runs the
fp16 ones (it has no libdevice, which only the bf16 branch calls).
"""

import math

import numpy as np

from gpubackprop.kernels import checks
from gpubackprop.kernels.cuda.dense import ACT_CODE, BIAS_GRAD_ROWS, _col_sum_finish, activate
from gpubackprop.kernels.cuda.launch import as_2d, cuda, device_function, kernel_body
from gpubackprop.kernels.cuda.numerics import imin, mul
from gpubackprop.kernels.reference import GELU_C, GELU_K, LEAKY_SLOPE
from gpubackprop.kernels.reference.dense import INV_SQRT_2PI, SQRT1_2
from gpubackprop.kernels.reference.precision import (
    FOUND_INF,
    SCALE,
    TRACKER,
    check_f32,
    check_precision_name,
    check_scaler_state,
    check_storage,
)
from gpubackprop.precision import SKIP

IDENTITY, SIGMOID, TANH, RELU, LEAKY_RELU, GELU, GELU_TANH = range(7)
GELU_3K = 3 * GELU_K


@device_function
def load16(H, i, bf16):
    """float32 value of H[i] (16-bit storage)."""
    if bf16:
        return cuda.libdevice.int_as_float(np.int32(H[i]) << np.int32(16))
    return np.float32(H[i])


@device_function
def store16(H, i, x, bf16):
    """H[i] = x (float32) rounded to nearest even."""
    if bf16:
        u = np.uint32(cuda.libdevice.float_as_int(x))
        if (u & np.uint32(0x7FFFFFFF)) > np.uint32(0x7F800000):
            r = (u >> np.uint32(16)) | np.uint32(0x0040)  # NaN stays a quiet NaN
        else:
            r = (u + np.uint32(0x7FFF) + ((u >> np.uint32(16)) & np.uint32(1))) >> np.uint32(16)
        H[i] = np.uint16(r)
    else:
        H[i] = x  # cvt.rn.f16.f32


@device_function
def round16(x, bf16):
    """x rounded to the nearest 16-bit value, as float32."""
    if bf16:
        u = np.uint32(cuda.libdevice.float_as_int(x))
        if (u & np.uint32(0x7FFFFFFF)) > np.uint32(0x7F800000):
            return x
        r = (u + np.uint32(0x7FFF) + ((u >> np.uint32(16)) & np.uint32(1))) & np.uint32(0xFFFF0000)
        return cuda.libdevice.int_as_float(np.int32(r))
    return np.float32(np.float16(x))


@kernel_body("void(float32[::1], float32[::1], boolean)")
def _round16(X, out, bf16):
    for i in range(cuda.grid(1), X.size, cuda.gridsize(1)):
        out[i] = round16(X[i], bf16)


@kernel_body("void(float32[::1], {h}[::1], boolean)")
def _cast16(X, H, bf16):
    for i in range(cuda.grid(1), X.size, cuda.gridsize(1)):
        store16(H, i, X[i], bf16)


@kernel_body("void({h}[::1], float32[::1], boolean)")
def _widen16(H, X, bf16):
    for i in range(cuda.grid(1), H.size, cuda.gridsize(1)):
        X[i] = load16(H, i, bf16)


@kernel_body("void(float32[:, ::1], float32[::1], {h}[::1], int64, boolean)")
def _bias_act16(Z, b, A, act, bf16):
    """Z += b (float32), A = σ(Z) stored in 16 bits; A is flat (B·n)."""
    B, n = Z.shape
    for idx in range(cuda.grid(1), B * n, cuda.gridsize(1)):
        i = idx // n
        j = idx - i * n
        z = Z[i, j] + b[j]
        Z[i, j] = z
        store16(A, idx, activate(z, act, Z), bf16)


@kernel_body("void(float32[:, ::1], {h}[::1], {h}[::1], int64, boolean)")
def _bias16_act16(Z, b, A, act, bf16):
    """Z += b (b read from the 16-bit weight copy, added in float32), A = σ(Z) in 16 bits."""
    B, n = Z.shape
    for idx in range(cuda.grid(1), B * n, cuda.gridsize(1)):
        i = idx // n
        j = idx - i * n
        z = Z[i, j] + load16(b, j, bf16)
        Z[i, j] = z
        store16(A, idx, activate(z, act, Z), bf16)


@kernel_body("void({h}[::1], int64, float32[::1], boolean, boolean)")
def _bias_grad16(dZ, n, db, accumulate, bf16):
    """Few rows of a 16-bit Δ (flat, rows of n): a thread a column, float32 sums in row order
    (the float32 kernel's order, so the same bits as it gives on the widened Δ)."""
    B = dZ.size // n
    for j in range(cuda.grid(1), n, cuda.gridsize(1)):
        s = np.float32(0)
        for i in range(B):
            s += load16(dZ, i * n + j, bf16)
        db[j] = db[j] + s if accumulate else s


@kernel_body("void({h}[::1], int64, float32[:, ::1], boolean)")
def _col_sum_chunks16(dZ, n, partial, bf16):
    """partial[c, j] = Σ of column j of the 16-bit Δ over rows [c·R, (c+1)·R), in float32."""
    B = dZ.size // n
    chunks = partial.shape[0]
    R = (B + chunks - 1) // chunks
    for idx in range(cuda.grid(1), chunks * n, cuda.gridsize(1)):
        c = idx // n
        j = idx - c * n  # consecutive threads read consecutive columns: coalesced
        s = np.float32(0)
        for i in range(c * R, imin(B, (c + 1) * R)):
            s += load16(dZ, i * n + j, bf16)
        partial[c, j] = s


@kernel_body("void({h}[::1], {h}[::1], {h}[::1], int64, boolean)")
def _act_backward16(dA, S, dZ, act, bf16):
    """dZ = dA ⊙ σ'(S), loaded from and stored to 16 bits, computed in float32."""
    zero, one, nz = np.float32(0), np.float32(1), np.float32(-0.0)
    slope = np.float32(LEAKY_SLOPE)
    half, c, k, k3 = np.float32(0.5), np.float32(GELU_C), np.float32(GELU_K), np.float32(GELU_3K)
    s2, p = np.float32(SQRT1_2), np.float32(INV_SQRT_2PI)
    for i in range(cuda.grid(1), dA.size, cuda.gridsize(1)):
        d = load16(dA, i, bf16)
        s = load16(S, i, bf16)
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
        store16(dZ, i, r, bf16)


@kernel_body("void(float32[::1], float32[::1])")
def _unscale_check(g, state):
    """g *= 1/scale; any thread that meets an inf or NaN sets the flag (they all write 1: no
    atomics needed), so a step's overflow check is this one pass, with no host read."""
    inv = np.float32(1) / state[0]
    for i in range(cuda.grid(1), g.size, cuda.gridsize(1)):
        v = g[i]
        if math.isinf(v) or math.isnan(v):
            state[2] = np.float32(1)
        g[i] = v * inv


@kernel_body("void(float32[::1], float32, float32, float32)")
def _loss_scale_update(state, growth_factor, backoff_factor, growth_interval):
    """GradScaler.update (torch's _amp_update_scale_), one thread; then the flag cleared."""
    if cuda.grid(1) == 0:
        scale = state[0]
        if state[2] != np.float32(0):
            state[0] = scale * backoff_factor
            state[1] = np.float32(0)
        else:
            successful = state[1] + np.float32(1)
            if successful == growth_interval:
                grown = scale * growth_factor
                if not (math.isinf(grown) or math.isnan(grown)):
                    state[0] = grown
                state[1] = np.float32(0)
            else:
                state[1] = successful
        state[2] = np.float32(0)


@kernel_body("void({t}[::1], float32[::1], boolean)")
def _loss_scale_gate(factor, state, clipping):
    """factor[0] = SKIP if the found-inf flag is set, else the clip factor or 1; one thread."""
    if cuda.grid(1) == 0:
        if state[2] != np.float32(0):
            factor[0] = factor.dtype.type(SKIP)
        elif not clipping:
            factor[0] = factor.dtype.type(1)


class PrecisionOps:
    """Fused CUDA mixed-precision ops (a mixin of ``CudaOps``: uses its launcher)."""

    def round16(self, X, precision, out=None):
        """out = X rounded to the nearest ``precision`` value, as float32 (out may be X)."""
        check_f32("X", X)
        check_precision_name(precision)
        out = X if out is None else out
        check_f32("out", out, X.shape)
        self.launch(_round16, X.size, np.dtype(np.float32), X.reshape(-1), out.reshape(-1),
                    precision == "bf16")
        return out

    def _launch16(self, body, work, H, *args):
        self.launch(body, work, np.dtype(np.float32), *args, label_dtype=H.dtype)

    def cast16(self, X, H, precision):
        """H (16-bit storage) = X (float32) rounded to nearest even, one kernel."""
        check_f32("X", X)
        check_storage("H", H, precision, X.shape)
        self._launch16(_cast16, X.size, H, X.reshape(-1), H.reshape(-1), precision == "bf16")
        return H

    def widen16(self, H, X, precision):
        """X (float32) = the values of H (16-bit storage), one kernel."""
        check_storage("H", H, precision)
        check_f32("X", X, H.shape)
        self._launch16(_widen16, H.size, H, H.reshape(-1), X.reshape(-1), precision == "bf16")
        return X

    def bias_act16(self, Z, b, activation, A, precision):
        """Z += b (float32, in place), A (16-bit) = σ(Z) in float32: one kernel; b float32, or
        16-bit storage (a view of the model's 16-bit weight copy)."""
        check_f32("Z", Z)
        check_storage("A", A, precision, Z.shape)
        act = ACT_CODE.get(activation)
        if act is None:
            raise checks.unknown_activation(activation)
        if getattr(b, "dtype", None) == A.dtype:
            check_storage("b", b, precision, Z.shape[1:])
            self._launch16(_bias16_act16, Z.size, A, as_2d(Z), b, A.reshape(-1), act,
                           precision == "bf16")
            return A
        check_f32("b", b, Z.shape[1:])
        self._launch16(_bias_act16, Z.size, A, as_2d(Z), b, A.reshape(-1), act, precision == "bf16")
        return A

    def bias_grad16(self, dZ, db, precision, accumulate=False):
        """db (float32) (+)= Σ_rows dZ (16-bit storage), summed in float32: the float32 kernels'
        chunks and order (BIAS_GRAD_ROWS), so the bits of bias_grad on the widened dZ."""
        check_storage("dZ", dZ, precision)
        if dZ.ndim != 2:
            raise ValueError(f"dZ: expected a 2-D (rows, n) array, got shape {tuple(dZ.shape)}")
        B, n = dZ.shape
        check_f32("db", db, (n,))
        accumulate, bf16 = bool(accumulate), precision == "bf16"
        if n == 0:
            return db
        chunks = -(-B // BIAS_GRAD_ROWS)
        if chunks <= 1:
            self._launch16(_bias_grad16, n, dZ, dZ.reshape(-1), n, db, accumulate, bf16)
            return db
        partial = self.scratch("bias_grad16", (chunks, n), np.dtype(np.float32))
        self._launch16(_col_sum_chunks16, chunks * n, dZ, dZ.reshape(-1), n, partial, bf16)
        self.launch(_col_sum_finish, n, np.dtype(np.float32), partial, db, accumulate)
        return db

    def act_backward16(self, dA, saved, activation, dZ, precision):
        """dZ (16-bit) = dA ⊙ σ'(saved), 16-bit in and out, float32 inside: one kernel."""
        for name, H in (("dA", dA), ("saved", saved), ("dZ", dZ)):
            check_storage(name, H, precision, dA.shape)
        act = ACT_CODE.get(activation)
        if act is None:
            raise checks.unknown_activation(activation)
        self._launch16(_act_backward16, dA.size, dA, dA.reshape(-1), saved.reshape(-1),
                       dZ.reshape(-1), act, precision == "bf16")
        return dZ

    def unscale_check(self, g, state):
        """g *= 1/scale and the found-inf flag, one kernel (see the reference)."""
        check_f32("g", g)
        check_scaler_state(state)
        self.launch(_unscale_check, g.size, np.dtype(np.float32), g.reshape(-1), state)
        return g

    def loss_scale_gate(self, factor, state, clipping):
        """The optimizer's factor: SKIP on overflow, else the clip factor or 1 (one thread)."""
        if getattr(factor, "shape", None) != (1,) or factor.dtype.kind != "f":
            raise ValueError(f"factor: expected a 1-element float array, got {factor!r}")
        check_scaler_state(state)
        self.launch(_loss_scale_gate, 1, factor.dtype, factor, state, bool(clipping))
        return factor

    def loss_scale_update(self, state, growth_factor, backoff_factor, growth_interval):
        """GradScaler.update on the device, one thread (see the reference)."""
        check_scaler_state(state)
        self.launch(_loss_scale_update, 1, np.dtype(np.float32), state, float(growth_factor),
                    float(backoff_factor), float(growth_interval))
        return state


assert (SCALE, TRACKER, FOUND_INF) == (0, 1, 2)  # the kernels index the state array by number
