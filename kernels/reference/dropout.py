"""Reference dropout ops, and the counter-based hash that makes the keep mask.

The mask is a pure function of (seed, layer, step, i), i the flat element index, so the backward
pass recomputes it instead of storing it, and the reference, the Numba CPU kernel and the CUDA
kernel draw bit-identical masks: all arithmetic is on unsigned 64-bit integers, which wrap the
same way everywhere.

- ``dropout_key(seed, layer, step)``: three rounds of SplitMix64 (on the host, Python ints) mix the
  three numbers into one 64-bit key per call.
- element i: r = mix64(key + (i + 1)·GOLDEN) >> 40, i.e. SplitMix64's output for counter i + 1 of
  the stream that starts at ``key``; its top 24 bits make u = r / 2^24 in [0, 1).
- keep = u ≥ p, tested exactly in integers as r ≥ ⌈p·2^24⌉ (p·2^24 is exact in float64), so
  p = 0 keeps every element and p = 1 none.
- Y = X · (1/(1 − p) if keep else 0): inverted dropout, the scale computed once on the host in
  float64 and rounded to the array dtype (PyTorch's mask holds the same rounded scale). A NaN
  or inf in a dropped element gives NaN, as x·0 does in PyTorch.
"""

import math
import operator

import numpy as np

MASK64 = (1 << 64) - 1
GOLDEN = 0x9E3779B97F4A7C15  # 2^64 / golden ratio: SplitMix64's counter increment
MIX1 = 0xBF58476D1CE4E5B9  # SplitMix64's finalizer (Stafford's Mix13)
MIX2 = 0x94D049BB133111EB
KEEP_BITS = 24
RANDOM_SHIFT = 64 - KEEP_BITS  # r = the top 24 bits of the 64-bit hash
ONE_U = 1 << KEEP_BITS  # 2^24


def mix64(z):
    """SplitMix64's finalizer on a Python int in [0, 2^64)."""
    z = ((z ^ (z >> 30)) * MIX1) & MASK64
    z = ((z ^ (z >> 27)) * MIX2) & MASK64
    return z ^ (z >> 31)


def _as_int(name, value):
    try:
        return operator.index(value)
    except TypeError:
        raise TypeError(f"{name}: expected an integer, got {type(value).__name__}") from None


def dropout_key(seed, layer, step):
    """The 64-bit key of one dropout call: SplitMix64 rounds over seed, then layer, then step."""
    return mix64(((dropout_layer_key(seed, layer) ^ (_as_int("step", step) & MASK64)) + GOLDEN)
                 & MASK64)


def dropout_layer_key(seed, layer):
    """The first two rounds of ``dropout_key`` (seed, then layer): what stays fixed over steps, so a
    kernel that reads the step from the device finishes the key with one more round."""
    seed, layer = _as_int("seed", seed) & MASK64, _as_int("layer", layer) & MASK64
    k = mix64((seed + GOLDEN) & MASK64)
    return mix64(((k ^ layer) + GOLDEN) & MASK64)


def dropout_params(p, seed, layer, step):
    """(key, threshold, scale) for the kernels: keep element i when its 24 random bits r satisfy
    r ≥ threshold = ⌈p·2^24⌉; a kept element is multiplied by scale = 1/(1 − p) (0 when p = 1)."""
    try:
        p = float(p)
    except (TypeError, ValueError):
        raise TypeError(f"p: expected a probability (a float in [0, 1]), got {p!r}") from None
    if not 0.0 <= p <= 1.0:  # also rejects NaN
        raise ValueError(f"p: expected a probability in [0, 1], got {p!r}")
    threshold = math.ceil(p * ONE_U)
    scale = 1.0 / (1.0 - p) if p < 1.0 else 0.0
    return dropout_key(seed, layer, step), threshold, scale


class DropoutOps:
    """Plain-xp dropout ops (a mixin of ``ReferenceOps``: uses ``self.xp``)."""

    def _keep(self, n, key, threshold):
        """The keep mask of the flat indices 0..n-1 (xp bool), vectorised in uint64 arithmetic
        (array arithmetic wraps modulo 2^64 without a warning)."""
        xp = self.xp
        u64 = np.uint64
        z = (xp.arange(n, dtype=xp.uint64) + u64(1)) * u64(GOLDEN) + u64(key)
        z = (z ^ (z >> u64(30))) * u64(MIX1)
        z = (z ^ (z >> u64(27))) * u64(MIX2)
        z = z ^ (z >> u64(31))
        return (z >> u64(RANDOM_SHIFT)) >= u64(threshold)

    def dropout_mask(self, shape, p, seed, layer, step):
        """The keep mask (xp bool array of ``shape``) that ``dropout`` uses for these arguments."""
        key, threshold, _ = dropout_params(p, seed, layer, step)
        shape = tuple(shape) if np.ndim(shape) else (int(shape),)
        return self._keep(math.prod(shape), key, threshold).reshape(shape)

    def dropout(self, X, Y, p, seed, layer, step):
        """Y = X·keep/(1 − p), keep = hash(seed, layer, step, i) ≥ p per flat index i. Y may be X."""
        return self._dropout_apply(X, Y, p, seed, layer, step)

    def dropout_backward(self, dY, dX, p, seed, layer, step):
        """dX = dY·keep/(1 − p), the mask recomputed from (seed, layer, step). dX may be dY."""
        return self._dropout_apply(dY, dX, p, seed, layer, step)

    def _dropout_apply(self, X, Y, p, seed, layer, step):
        key, threshold, scale = dropout_params(p, seed, layer, step)
        keep = self._keep(X.size, key, threshold).reshape(X.shape)
        t = X.dtype.type
        Y[...] = X * self.xp.where(keep, t(scale), t(0))
        return Y

    # ``values``: ``StepValues.values``, the step read from its slot (a captured CUDA graph's
    # kernels read it on the device; this set, and the fused CPU set inheriting it, on the host).
    def dropout_values(self, X, Y, p, seed, layer, values):
        """``dropout`` with the step from ``values[SLOT["step"]]``."""
        return self.dropout(X, Y, p, seed, layer, _values_step(values))

    def dropout_backward_values(self, dY, dX, p, seed, layer, values):
        """``dropout_backward`` with the step from ``values[SLOT["step"]]``."""
        return self.dropout_backward(dY, dX, p, seed, layer, _values_step(values))


def _values_step(values):
    from gpubackprop.step_values import SLOT

    return int(values[SLOT["step"]])
