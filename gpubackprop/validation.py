"""Checks on user input, done on the host before anything reaches a kernel.

Every failure is a ``ValueError`` or ``TypeError`` whose message names the argument, what was
expected and what was given.
"""

import numbers

import numpy as np

from gpubackprop.backend import to_numpy


def describe(a):
    """A short description of an array for error messages: shape and dtype."""
    return f"array of shape {tuple(a.shape)} and dtype {a.dtype}"


def positive_int(value, name):
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"{name}: expected a positive integer, got {value!r}")
    return int(value)


def non_negative_float(value, name):
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not np.isfinite(value) \
            or value < 0:
        raise ValueError(f"{name}: expected a finite number >= 0, got {value!r}")
    return float(value)


def drop_probability(value, name):
    """A dropout probability: a real number in [0, 1) (1 would drop every element)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not np.isfinite(value) \
            or not 0.0 <= value < 1.0:
        raise ValueError(f"{name}: expected a drop probability in [0, 1), got {value!r}"
                         f"{f' ({name} = 1 would drop every element)' if value == 1 else ''}")
    return float(value)


def check_choice(value, choices, name):
    if value not in choices:
        raise ValueError(f"{name}: expected one of {tuple(choices)}, got {value!r}")
    return value


def host_array(a, name):
    """A host NumPy array of a NumPy/CuPy array or nested sequence of real numbers."""
    try:
        h = to_numpy(a)
    except Exception as e:  # ragged lists and the like
        raise TypeError(f"{name}: expected an array-like of numbers, got {type(a).__name__} "
                        f"({e})") from None
    if h.dtype == object or not (np.issubdtype(h.dtype, np.number) or h.dtype == bool) \
            or np.issubdtype(h.dtype, np.complexfloating):
        raise TypeError(f"{name}: expected real numbers (an integer or float dtype), "
                        f"got dtype {h.dtype}")
    return h


def check_finite(h, name):
    if np.issubdtype(h.dtype, np.floating) and not np.isfinite(h).all():
        bad = np.argwhere(~np.isfinite(h))[0]
        raise ValueError(f"{name}: expected finite values, found {h[tuple(bad)]} at index "
                         f"{tuple(int(i) for i in bad)}")
    return h


def features(X, n_features, name="X"):
    """X as a finite 2-D host array (samples × n_features)."""
    h = host_array(X, name)
    if h.ndim != 2:
        raise ValueError(f"{name}: expected a 2-D array (samples × {n_features} features), "
                         f"got {describe(h)}")
    if h.shape[0] == 0:
        raise ValueError(f"{name}: expected at least one sample, got {describe(h)}")
    if h.shape[1] != n_features:
        raise ValueError(f"{name}: expected {n_features} features per sample (shape (n, "
                         f"{n_features})), got shape {h.shape}")
    return check_finite(h, name)


def samples(X, shape, name="X"):
    """X as a finite host array (n, *shape): n samples of the per-sample ``shape``."""
    shape = tuple(shape)
    if len(shape) == 1:
        return features(X, shape[0], name)
    h = host_array(X, name)
    want = "(n, " + ", ".join(map(str, shape)) + ")"
    if h.ndim != len(shape) + 1 or tuple(h.shape[1:]) != shape:
        raise ValueError(f"{name}: expected an array of shape {want} (samples × per-sample shape "
                         f"{shape}), got {describe(h)}")
    if h.shape[0] == 0:
        raise ValueError(f"{name}: expected at least one sample, got {describe(h)}")
    return check_finite(h, name)


def same_length(X, y, x_name="X", y_name="y"):
    if len(X) != len(y):
        raise ValueError(f"{x_name} and {y_name}: expected the same number of samples, got "
                         f"{len(X)} and {len(y)}")
