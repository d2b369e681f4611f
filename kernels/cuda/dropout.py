"""CUDA dropout ops: the keep mask hashed from (key, flat index) in the kernel, never stored.

The hash is the reference's (``kernels/reference/dropout.py``) in uint64 arithmetic, every operand a
uint64 (Numba types uint64 mixed with int64 as float64, so the index is converted first), so the
GPU's mask is bit-identical to the CPU's.
"""

import warnings

import numpy as np

from gpubackprop.kernels import checks
from gpubackprop.kernels.cuda.launch import as_1d, cuda, device_function, kernel_body
from gpubackprop.kernels.reference.dropout import (
    GOLDEN,
    MIX1,
    MIX2,
    RANDOM_SHIFT,
    dropout_layer_key,
    dropout_params,
)
from gpubackprop.step_values import SLOT

STEP = SLOT["step"]

_ONE = np.uint64(1)
_GOLDEN = np.uint64(GOLDEN)
_MIX1 = np.uint64(MIX1)
_MIX2 = np.uint64(MIX2)
_S30, _S27, _S31 = np.uint64(30), np.uint64(27), np.uint64(31)
_SR = np.uint64(RANDOM_SHIFT)


@device_function
def _random_bits(key, i):
    """The 24 random bits of flat index i: SplitMix64's output for counter i + 1 from ``key``."""
    z = key + (np.uint64(i) + _ONE) * _GOLDEN
    z = (z ^ (z >> _S30)) * _MIX1
    z = (z ^ (z >> _S27)) * _MIX2
    z = z ^ (z >> _S31)
    return z >> _SR


@device_function
def _mix64(z):
    """SplitMix64's finalizer, as the reference's ``mix64`` (uint64 arithmetic wraps)."""
    z = (z ^ (z >> _S30)) * _MIX1
    z = (z ^ (z >> _S27)) * _MIX2
    return z ^ (z >> _S31)


@kernel_body("void({t}[::1], {t}[::1], uint64, float64[::1], uint64, float64)")
def _dropout_values(X, Y, layer_key, values, threshold, scale):
    """``_dropout`` with the key's last round done here from the step in ``values`` (an integer
    below 2^53 held exactly in float64): key = mix64((layer_key ^ step) + GOLDEN), the host's
    ``dropout_key``. Every thread computes the same key (three multiplies), no host scalar."""
    t = X.dtype.type
    s, zero = t(scale), t(0)
    key = _mix64((layer_key ^ np.uint64(values[STEP])) + _GOLDEN)
    for i in range(cuda.grid(1), X.size, cuda.gridsize(1)):
        Y[i] = X[i] * (s if _random_bits(key, i) >= threshold else zero)


@kernel_body("void({t}[::1], {t}[::1], uint64, uint64, float64)")
def _dropout(X, Y, key, threshold, scale):
    """Y = X·(scale if kept else 0); Y may be X (each element is read, then written, by one thread)."""
    t = X.dtype.type
    s, zero = t(scale), t(0)
    for i in range(cuda.grid(1), X.size, cuda.gridsize(1)):
        Y[i] = X[i] * (s if _random_bits(key, i) >= threshold else zero)


@kernel_body("void(uint8[::1], uint64, uint64)")
def _dropout_mask(out, key, threshold):
    for i in range(cuda.grid(1), out.size, cuda.gridsize(1)):
        out[i] = 1 if _random_bits(key, i) >= threshold else 0


class DropoutOps:
    """Fused dropout ops (a mixin of ``CudaOps``: uses its launcher)."""

    def _launch_hash(self, body, work, dt, *args):
        if not self.simulator:
            self.launch(body, work, dt, *args)
            return
        # The simulator runs the kernel on NumPy uint64 scalars, which warn on the wrapping
        # multiplications that the hash relies on (a GPU just wraps, silently).
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", "overflow encountered", RuntimeWarning)
            self.launch(body, work, dt, *args)

    def _dropout_launch(self, names, X, Y, p, seed, layer, step):
        dt = checks.float_arrays(names, X, Y)
        if Y.shape != X.shape:
            checks.check_same_shape(names[0], X, (names[1], Y))
        key, threshold, scale = dropout_params(p, seed, layer, step)
        self._launch_hash(_dropout, X.size, dt, as_1d(X), as_1d(Y), np.uint64(key),
                          np.uint64(threshold), scale)
        return Y

    def dropout(self, X, Y, p, seed, layer, step):
        """Y = X·keep/(1 − p), keep = hash(seed, layer, step, i) ≥ p, one kernel. Y may be X."""
        return self._dropout_launch(checks.NAMES_DROPOUT, X, Y, p, seed, layer, step)

    def dropout_backward(self, dY, dX, p, seed, layer, step):
        """dX = dY·keep/(1 − p), the mask recomputed, one kernel. dX may be dY."""
        return self._dropout_launch(checks.NAMES_DROPOUT_BACKWARD, dY, dX, p, seed, layer, step)

    def dropout_mask(self, shape, p, seed, layer, step):
        """The keep mask (device bool array of ``shape``), from this set's own kernel."""
        key, threshold, _ = dropout_params(p, seed, layer, step)
        out = self.xp.empty(shape, np.uint8)
        self._launch_hash(_dropout_mask, out.size, np.dtype(np.float32), as_1d(out),
                          np.uint64(key), np.uint64(threshold))
        return out.view(np.bool_)

    def _dropout_values_launch(self, names, X, Y, p, seed, layer, values):
        dt = checks.float_arrays(names, X, Y)
        if Y.shape != X.shape:
            checks.check_same_shape(names[0], X, (names[1], Y))
        _, threshold, scale = dropout_params(p, seed, layer, 0)
        self._launch_hash(_dropout_values, X.size, dt, as_1d(X), as_1d(Y),
                          np.uint64(dropout_layer_key(seed, layer)), values, np.uint64(threshold),
                          scale)
        return Y

    def dropout_values(self, X, Y, p, seed, layer, values):
        """``dropout`` with the step read in the kernel from ``values[SLOT["step"]]`` (a captured
        graph's masks follow the device's step). Y may be X."""
        return self._dropout_values_launch(checks.NAMES_DROPOUT, X, Y, p, seed, layer, values)

    def dropout_backward_values(self, dY, dX, p, seed, layer, values):
        """``dropout_backward`` with the step from ``values[SLOT["step"]]``. dX may be dY."""
        return self._dropout_values_launch(checks.NAMES_DROPOUT_BACKWARD, dY, dX, p, seed, layer,
                                           values)
