"""Numerics shared by the CPU kernels: chunk spans and vectorizable float32 exp and tanh.

In float32, exp and tanh are straight-line polynomial code (``_expf``, ``_tanh``) rather than
libm's scalar calls, so that the loops that call them vectorize.
"""

import math

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.extending import intrinsic, overload


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
