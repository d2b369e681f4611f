"""CPU mixed-precision ops: float32 <-> fp16/bf16 by integer bit manipulation in Numba.

Numba's CPU target has no float16 (``np.float16(x)`` in an njit function raises
NotImplementedError), so both formats are converted on the bits of a uint32 view of the float32
array, rounded to nearest even as ``cvt.rn`` on the GPU, NumPy's float16 cast and ml_dtypes'
bfloat16 (tests/test_precision_kernels.py checks every 16-bit pattern and the rounding ties
against those). fp16: normal, subnormal (units of 2^-24), overflow from 65520 up to inf, NaN kept
quiet; bf16: the high half after adding 0x7FFF plus the lowest kept bit, NaN kept quiet.

The 16-bit bias+activation and σ' ops are the float32 fused kernels followed by the cast pass:
on the CPU the 16-bit modes emulate the GPU's numerics (computed in float32, stored rounded), and
that is exactly float32 then round.
"""

import numpy as np
from numba import njit

from gpubackprop.kernels.reference.precision import (
    FOUND_INF,
    check_f32,
    check_precision_name,
    check_scaler_state,
    check_storage,
)

BF16 = "bf16"


@njit(cache=True, error_model="numpy", inline="always")
def _f16_bits(u):
    """The float16 bit pattern (as uint32) of the float32 with bits ``u``, rounded to nearest even."""
    sign = (u >> np.uint32(16)) & np.uint32(0x8000)
    a = u & np.uint32(0x7FFFFFFF)
    if a > np.uint32(0x7F800000):  # NaN: quiet, the top payload bits kept
        return sign | np.uint32(0x7E00) | ((a >> np.uint32(13)) & np.uint32(0x3FF))
    if a >= np.uint32(0x477FF000):  # >= 65520 (halfway past 65504, the largest half): inf
        return sign | np.uint32(0x7C00)
    if a >= np.uint32(0x38800000):  # >= 2^-14: a normal half; rebias the exponent by 127 - 15
        h = (a - np.uint32(0x38000000)) >> np.uint32(13)
        rest = a & np.uint32(0x1FFF)
        if rest > np.uint32(0x1000) or (rest == np.uint32(0x1000) and (h & np.uint32(1))):
            h += np.uint32(1)  # a carry into the exponent is the right next value
        return sign | h
    if a < np.uint32(0x33000000):  # < 2^-25: rounds to zero (2^-25 itself ties to even 0)
        return sign
    # A subnormal half: the value in units of 2^-24 is M >> (126 - e), M the 24-bit significand.
    e = a >> np.uint32(23)
    m = (a & np.uint32(0x7FFFFF)) | np.uint32(0x800000)
    shift = np.uint32(126) - e
    h = m >> shift
    rest = m & ((np.uint32(1) << shift) - np.uint32(1))
    half = np.uint32(1) << (shift - np.uint32(1))
    if rest > half or (rest == half and (h & np.uint32(1))):
        h += np.uint32(1)
    return sign | h


@njit(cache=True, error_model="numpy", inline="always")
def _f16_to_f32_bits(h):
    """The float32 bits of the float16 with bits ``h`` (exact: every half is a float32)."""
    sign = (h & np.uint32(0x8000)) << np.uint32(16)
    e = (h >> np.uint32(10)) & np.uint32(0x1F)
    m = h & np.uint32(0x3FF)
    if e == np.uint32(0x1F):  # inf, NaN
        return sign | np.uint32(0x7F800000) | (m << np.uint32(13))
    if e == np.uint32(0):
        if m == np.uint32(0):
            return sign
        e32 = np.uint32(113)  # subnormal: normalise m·2^-24 (the biased exponent of 2^-14 is 113)
        while (m & np.uint32(0x400)) == np.uint32(0):
            m <<= np.uint32(1)
            e32 -= np.uint32(1)
        return sign | (e32 << np.uint32(23)) | ((m & np.uint32(0x3FF)) << np.uint32(13))
    return sign | ((e + np.uint32(112)) << np.uint32(23)) | (m << np.uint32(13))


@njit(cache=True, error_model="numpy", inline="always")
def _bf16_bits(u):
    """The bfloat16 bit pattern (as uint32) of the float32 with bits ``u``, nearest even."""
    if (u & np.uint32(0x7FFFFFFF)) > np.uint32(0x7F800000):
        return (u >> np.uint32(16)) | np.uint32(0x0040)  # NaN stays a quiet NaN
    return (u + np.uint32(0x7FFF) + ((u >> np.uint32(16)) & np.uint32(1))) >> np.uint32(16)


@njit(cache=True, error_model="numpy")
def _round16(U, R, bf16):
    """R = U rounded to 16 bits, both uint32 views of float32 arrays (R may be U)."""
    if bf16:
        for i in range(U.size):
            R[i] = _bf16_bits(U[i]) << np.uint32(16)
    else:
        for i in range(U.size):
            R[i] = _f16_to_f32_bits(_f16_bits(U[i]))


@njit(cache=True, error_model="numpy")
def _cast16(U, H, bf16):
    """H (uint16 bits) = U (uint32 view of float32) rounded."""
    if bf16:
        for i in range(U.size):
            H[i] = np.uint16(_bf16_bits(U[i]))
    else:
        for i in range(U.size):
            H[i] = np.uint16(_f16_bits(U[i]))


@njit(cache=True, error_model="numpy")
def _widen16(H, U, bf16):
    """U (uint32 view of float32) = the values of H (uint16 bits)."""
    if bf16:
        for i in range(H.size):
            U[i] = np.uint32(H[i]) << np.uint32(16)
    else:
        for i in range(H.size):
            U[i] = _f16_to_f32_bits(np.uint32(H[i]))


@njit(cache=True, error_model="numpy")
def _unscale_check(g, state):
    """g *= 1/scale, state[FOUND_INF] = 1 if an entry was inf or NaN: one pass."""
    inv = np.float32(1) / state[0]
    bad = False
    for i in range(g.size):
        v = g[i]
        if not np.isfinite(v):
            bad = True
        g[i] = v * inv
    if bad:
        state[FOUND_INF] = np.float32(1)


def _bits(a):
    """A flat uint16 view of a 16-bit storage array (float16 or uint16)."""
    return a.reshape(-1).view(np.uint16)


class PrecisionOps:
    """Numba CPU mixed-precision ops (a mixin of ``CpuOps``)."""

    def round16(self, X, precision, out=None):
        """out = X rounded to the nearest ``precision`` value, as float32 (out may be X)."""
        check_f32("X", X)
        check_precision_name(precision)
        out = X if out is None else out
        check_f32("out", out, X.shape)
        _round16(X.reshape(-1).view(np.uint32), out.reshape(-1).view(np.uint32), precision == BF16)
        return out

    def cast16(self, X, H, precision):
        """H (16-bit storage) = X (float32) rounded to nearest even."""
        check_f32("X", X)
        check_storage("H", H, precision, X.shape)
        _cast16(X.reshape(-1).view(np.uint32), _bits(H), precision == BF16)
        return H

    def widen16(self, H, X, precision):
        """X (float32) = the values of H (16-bit storage)."""
        check_storage("H", H, precision)
        check_f32("X", X, H.shape)
        _widen16(_bits(H), X.reshape(-1).view(np.uint32), precision == BF16)
        return X

    def bias_act16(self, Z, b, activation, A, precision):
        """Z += b (float32, in place), A (16-bit) = σ(Z): the float32 kernel, then the cast; b
        float32 or 16-bit storage (widened first)."""
        check_f32("Z", Z)
        check_storage("A", A, precision, Z.shape)
        if getattr(b, "dtype", None) == A.dtype:
            check_storage("b", b, precision, Z.shape[1:])
            b = self.widen16(b, np.empty(b.shape, np.float32), precision)
        A32 = np.empty(Z.shape, np.float32)
        self.bias_act(Z, b, activation, A32)
        return self.cast16(A32, A, precision)

    def act_backward16(self, dA, saved, activation, dZ, precision):
        """dZ (16-bit) = dA ⊙ σ'(saved), all 16-bit, in float32 and rounded once."""
        for name, H in (("dA", dA), ("saved", saved), ("dZ", dZ)):
            check_storage(name, H, precision, dA.shape)
        a = self.widen16(dA, np.empty(dA.shape, np.float32), precision)
        s = self.widen16(saved, np.empty(dA.shape, np.float32), precision)
        self.act_backward(a, s, activation, a)
        return self.cast16(a, dZ, precision)

    def unscale_check(self, g, state):
        """g *= 1/scale and the found-inf flag, one pass (see the reference)."""
        check_f32("g", g)
        check_scaler_state(state)
        _unscale_check(g.reshape(-1), state)
        return g
