"""CPU dropout ops: the keep mask hashed from (key, flat index) inside the loop, never stored.

The hash is the reference's (``kernels/reference/dropout.py``) in uint64 arithmetic; every operand
is a uint64 (Numba types uint64 mixed with int64 as float64, so the index is converted first).
"""

import numpy as np
from numba import njit, prange

from gpubackprop.kernels import checks
from gpubackprop.kernels.cpu.numerics import _span
from gpubackprop.kernels.reference.dropout import GOLDEN, MIX1, MIX2, RANDOM_SHIFT, dropout_params

_ONE = np.uint64(1)
_GOLDEN = np.uint64(GOLDEN)
_MIX1 = np.uint64(MIX1)
_MIX2 = np.uint64(MIX2)
_S30, _S27, _S31 = np.uint64(30), np.uint64(27), np.uint64(31)
_SR = np.uint64(RANDOM_SHIFT)


@njit(cache=True, error_model="numpy", inline="always")
def _random_bits(key, i):
    """The 24 random bits of flat index i: SplitMix64's output for counter i + 1 from ``key``."""
    z = key + (np.uint64(i) + _ONE) * _GOLDEN
    z = (z ^ (z >> _S30)) * _MIX1
    z = (z ^ (z >> _S27)) * _MIX2
    z = z ^ (z >> _S31)
    return z >> _SR


@njit(cache=True, error_model="numpy")
def _dropout_span(X, Y, key, threshold, scale, inplace, i0, i1):
    t = X.dtype.type
    s, zero = t(scale), t(0)
    if inplace:
        # Y is X: a one-array loop (with two names for one buffer LLVM's runtime alias check
        # fails and the loop runs scalar, 3x slower).
        for i in range(i0, i1):
            X[i] = X[i] * (s if _random_bits(key, i) >= threshold else zero)
    else:
        for i in range(i0, i1):
            Y[i] = X[i] * (s if _random_bits(key, i) >= threshold else zero)


@njit(cache=True, error_model="numpy")
def _dropout_serial(X, Y, key, threshold, scale, inplace):
    _dropout_span(X, Y, key, threshold, scale, inplace, 0, X.size)


@njit(cache=True, error_model="numpy", parallel=True)
def _dropout_parallel(X, Y, key, threshold, scale, inplace, nchunks):
    n = X.size
    for c in prange(nchunks):
        i0, i1 = _span(c, nchunks, n)
        _dropout_span(X, Y, key, threshold, scale, inplace, i0, i1)


@njit(cache=True, error_model="numpy")
def _mask(out, key, threshold):
    for i in range(out.size):
        out[i] = _random_bits(key, i) >= threshold


class DropoutOps:
    """Fused dropout ops (a mixin of ``CpuOps``)."""

    def _dropout_launch(self, names, X, Y, p, seed, layer, step):
        checks.float_arrays(names, X, Y)
        if Y.shape != X.shape:
            checks.check_same_shape(names[0], X, (names[1], Y))
        key, threshold, scale = dropout_params(p, seed, layer, step)
        n = X.size
        args = (X.reshape(n), Y.reshape(n), np.uint64(key), np.uint64(threshold), scale,
                Y is X)
        if self.parallel and n >= self.par_transcendental:
            _dropout_parallel(*args, self.nchunks)
        else:
            _dropout_serial(*args)
        return Y

    def dropout(self, X, Y, p, seed, layer, step):
        """Y = X·keep/(1 − p), keep = hash(seed, layer, step, i) ≥ p, one pass. Y may be X."""
        return self._dropout_launch(checks.NAMES_DROPOUT, X, Y, p, seed, layer, step)

    def dropout_backward(self, dY, dX, p, seed, layer, step):
        """dX = dY·keep/(1 − p), the mask recomputed. dX may be dY."""
        return self._dropout_launch(checks.NAMES_DROPOUT_BACKWARD, dY, dX, p, seed, layer, step)

    def dropout_mask(self, shape, p, seed, layer, step):
        """The keep mask (bool array of ``shape``), from this set's own kernel."""
        key, threshold, _ = dropout_params(p, seed, layer, step)
        out = np.empty(shape, np.bool_)
        _mask(out.reshape(out.size), np.uint64(key), np.uint64(threshold))
        return out
