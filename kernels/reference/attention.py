"""Reference attention ops: a masked, numerically stable row softmax and its backward pass.

``masked_softmax(X, mask, Y)``: per row r of X (R, L), y = softmax(x + mask[r]) computed as
e = exp(z − max z), y = e / Σ e, z = x + mask[r] (``mask`` None: z = x; -inf entries mask a
position out). A row whose every entry is -inf (a fully masked row) gives zeros, where PyTorch
gives NaN: a padded query then contributes nothing instead of poisoning the batch with NaN. A NaN
in a row propagates to that row.

``masked_softmax_backward(dY, Y, dX)``: dx = y ⊙ (dy − Σ dy ⊙ y) per row (masked positions, y = 0,
get 0). dX may be dY.

The fused sets sum each row in their own fixed order, so they agree with these to rounding, not
bit for bit.
"""

import numpy as np


# kernels/checks.py imports this package (ACTIVATIONS), which imports this module first: the
# checks here stand alone.
def _float_arrays(names, *arrays):
    """The common dtype of ``arrays``: all float32 or all float64, and C-contiguous."""
    dt = arrays[0].dtype
    for name, a in zip(names, arrays, strict=True):
        if a.dtype != dt or dt not in (np.float32, np.float64) or not a.flags.c_contiguous:
            raise TypeError(f"{name}: expected a C-contiguous float32 or float64 array of the dtype "
                            f"of {names[0]} ({dt}), got {a.dtype}"
                            f"{'' if a.flags.c_contiguous else ', not C-contiguous'}")
    return dt


def _shape_error(name, expected, got):
    return ValueError(f"{name}: expected {expected}, got shape {tuple(got.shape)}")


def check_masked_softmax(X, mask, Y):
    dt = _float_arrays(("X", "Y"), X, Y)
    if X.ndim != 2:
        raise _shape_error("X", "a 2-D (rows, length) array", X)
    if Y.shape != X.shape:
        raise _shape_error("Y", f"X's shape {tuple(X.shape)}", Y)
    if mask is not None:
        _float_arrays(("X", "mask"), X, mask)
        if mask.shape != X.shape:
            raise _shape_error("mask", f"None or X's shape {tuple(X.shape)}", mask)
    return dt


def check_masked_softmax_backward(dY, Y, dX):
    dt = _float_arrays(("dY", "Y", "dX"), dY, Y, dX)
    if Y.ndim != 2:
        raise _shape_error("Y", "a 2-D (rows, length) array", Y)
    for name, a in (("dY", dY), ("dX", dX)):
        if a.shape != Y.shape:
            raise _shape_error(name, f"Y's shape {tuple(Y.shape)}", a)
    return dt


class AttentionOps:
    """Plain-xp attention ops (a mixin of ``ReferenceOps``: uses ``self.xp``)."""

    def masked_softmax(self, X, mask, Y):
        """Y = softmax(X + mask) per row; a fully masked row (all -inf) gives zeros."""
        dt = check_masked_softmax(X, mask, Y)
        xp = self.xp
        Z = X if mask is None else X + mask
        m = Z.max(axis=1, keepdims=True) if Z.shape[1] else xp.zeros((Z.shape[0], 1), dt)
        dead = m == -np.inf  # every entry masked: zeros, not exp(-inf + inf) = NaN
        E = xp.exp(Z - xp.where(dead, dt.type(0), m))
        s = E.sum(axis=1, keepdims=True)
        Y[...] = xp.where(dead, dt.type(0), E / xp.where(dead, dt.type(1), s))
        return Y

    def masked_softmax_backward(self, dY, Y, dX):
        """dX = Y ⊙ (dY − Σ_row dY ⊙ Y). dX may be dY."""
        check_masked_softmax_backward(dY, Y, dX)
        dot = (dY * Y).sum(axis=1, keepdims=True)
        dX[...] = Y * (dY - dot)
        return dX
