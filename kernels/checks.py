"""Argument checks shared by the fused kernel launchers (``cpu.py``, ``cuda.py``).

A Numba kernel does no checking of its own (the CUDA simulator does none either, and a CPU kernel
with a wrong shape reads or writes out of bounds), so every launcher checks dtype, contiguity and
shapes before it launches. The fast path is a few attribute reads per array; the message is only
built when a check fails. Every failure names the argument, what was expected and what was given.
"""

import numpy as np

from gpubackprop.kernels.reference import ACTIVATIONS

F32 = np.dtype(np.float32)
F64 = np.dtype(np.float64)
FLOAT_DTYPES = (F32, F64)

# The launchers' argument names, in the order their arrays are passed to ``float_arrays``.
NAMES_BIAS_ACT = ("Z", "b", "A")
NAMES_ACT_BACKWARD = ("dA", "saved", "dZ")
NAMES_ACTIVATION = ("X", "A")
NAMES_SOFTMAX_CE = ("logits", "dlogits", "loss_rows")
NAMES_BIAS_GRAD = ("dZ", "db")
NAMES_SGD = ("p", "g", "buf", "scale")
NAMES_RMSPROP = ("p", "g", "square_avg", "buf", "scale")
NAMES_ADAM = ("p", "g", "m", "v", "scale")


def unknown_activation(activation):
    return ValueError(f"activation: expected one of {ACTIVATIONS}, got {activation!r}")


def float_arrays(names, *arrays):
    """The common dtype of ``arrays``: all float32 or all float64, and C-contiguous.

    ``names`` is a tuple naming each array, for the error message.
    """
    try:
        dt = arrays[0].dtype
        ok = dt is F32 or dt is F64
        if ok:
            for a in arrays:
                if a.dtype is not dt or not a.flags.c_contiguous:
                    ok = False
                    break
    except AttributeError:
        ok = False
    if not ok:
        _raise_float_arrays(names, arrays)
    return dt


def _raise_float_arrays(names, arrays):
    first = names[0]
    dt = None
    for name, a in zip(names, arrays, strict=True):
        if not hasattr(a, "dtype") or not hasattr(a, "flags"):
            raise TypeError(f"{name}: expected a float32 or float64 array, got {type(a).__name__}")
        if dt is None:
            if a.dtype not in FLOAT_DTYPES or not a.dtype.isnative:
                raise TypeError(f"{name}: expected a float32 or float64 array, got dtype {a.dtype}")
            dt = a.dtype
        elif a.dtype != dt or not a.dtype.isnative:
            raise TypeError(
                f"{name}: expected dtype {dt} (the dtype of {first}), got dtype {a.dtype}")
        if not a.flags.c_contiguous:
            raise ValueError(
                f"{name}: expected a C-contiguous array, got a non-contiguous one of shape "
                f"{tuple(a.shape)} with strides {tuple(a.strides)}")
    raise AssertionError("float_arrays: no failing argument found")  # unreachable


def shape_error(name, expected, got):
    """A ValueError saying ``name`` should have shape ``expected`` (a tuple or a phrase)."""
    if isinstance(expected, tuple):
        expected = f"shape {expected}"
    return ValueError(f"{name}: expected {expected}, got shape {tuple(got.shape)}")


def check_bias_act(Z, b, A):
    """Shapes for bias_act: Z (B, n), b (n,), A like Z."""
    if Z.ndim != 2:
        raise shape_error("Z", "a 2-D array (batch, features)", Z)
    if b.shape != Z.shape[1:]:
        raise shape_error("b", (Z.shape[1],), b)
    if A.shape != Z.shape:
        raise shape_error("A", tuple(Z.shape), A)


def check_same_shape(ref_name, ref, *pairs):
    """Every (name, array) in ``pairs`` has the shape of ``ref``."""
    for name, a in pairs:
        if a.shape != ref.shape:
            raise shape_error(name, f"shape {tuple(ref.shape)} (the shape of {ref_name})", a)


def check_softmax_ce(logits, labels, dlogits, loss_rows):
    """Shapes and the label dtype for softmax_ce."""
    if logits.ndim != 2:
        raise shape_error("logits", "a 2-D array (batch, classes)", logits)
    B = logits.shape[0]
    if not hasattr(labels, "dtype") or labels.dtype.kind not in "iu":
        got = f"dtype {labels.dtype}" if hasattr(labels, "dtype") else type(labels).__name__
        raise TypeError(f"labels: expected an integer array of class indices, got {got}")
    if labels.shape != (B,):
        raise shape_error("labels", (B,), labels)
    if not labels.flags.c_contiguous:
        raise ValueError(f"labels: expected a C-contiguous array, got strides {labels.strides}")
    if dlogits.shape != logits.shape:
        raise shape_error("dlogits", tuple(logits.shape), dlogits)
    if loss_rows.shape != (B,):
        raise shape_error("loss_rows", (B,), loss_rows)


def check_bias_grad(dZ, db):
    if dZ.ndim != 2:
        raise shape_error("dZ", "a 2-D array (batch, features)", dZ)
    if db.shape != dZ.shape[1:]:
        raise shape_error("db", (dZ.shape[1],), db)


def check_scale(scale):
    if scale.size != 1:
        raise shape_error("scale", "a 1-element array", scale)


def check_flat(name, g):
    if g.ndim != 1:
        raise shape_error(name, "a 1-D (flat) array", g)


# ---- normalization and dropout -----------------------------------------------------------------
NAMES_BATCH_NORM = ("X", "gamma", "beta", "Y", "mean", "invstd")
NAMES_BATCH_NORM_EVAL = ("X", "gamma", "beta", "running_mean", "running_var", "Y")
NAMES_NORM_BACKWARD = ("dY", "X", "gamma", "mean", "invstd", "dX", "dgamma", "dbeta")
NAMES_LAYER_NORM = NAMES_BATCH_NORM
NAMES_DROPOUT = ("X", "Y")
NAMES_DROPOUT_BACKWARD = ("dY", "dX")


def check_batch_norm(X, per_channel, like_X):
    """X (N, C, *) with at least one value per channel; every (name, array) of ``per_channel`` has
    shape (C,), every one of ``like_X`` the shape of X."""
    if X.ndim < 2:
        raise shape_error("X", "an array (N, C, *) of at least 2 dimensions", X)
    if X.shape[1] and X.size == 0:
        raise shape_error("X", "at least one value per channel (N and every trailing size >= 1)", X)
    C = X.shape[1]
    for name, a in per_channel:
        if a.shape != (C,):
            raise shape_error(name, f"shape ({C},) (one value per channel of X)", a)
    check_same_shape("X", X, *like_X)


def check_layer_norm(X, per_feature, per_row, like_X):
    """X (M, D) with D >= 1; ``per_feature`` arrays (D,), ``per_row`` arrays (M,), ``like_X`` (M, D)."""
    if X.ndim != 2:
        raise shape_error("X", "a 2-D array (rows, features)", X)
    M, D = X.shape
    if D == 0:
        raise shape_error("X", "at least one feature (column)", X)
    for name, a in per_feature:
        if a.shape != (D,):
            raise shape_error(name, f"shape ({D},) (one value per feature of X)", a)
    for name, a in per_row:
        if a.shape != (M,):
            raise shape_error(name, f"shape ({M},) (one value per row of X)", a)
    check_same_shape("X", X, *like_X)


# ---- conv and pooling (the window geometry and shape checks live in reference/conv.py, shared
# with the reference ops) ------------------------------------------------------------------------
NAMES_IM2COL = ("X", "cols")
NAMES_COL2IM = ("dcols", "dX")
NAMES_POOL = ("X", "Y")
NAMES_POOL_BACKWARD = ("dY", "dX")
