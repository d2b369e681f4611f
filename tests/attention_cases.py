"""Shared checks of the masked softmax ops: a fused set (``ops``, on ``dev`` arrays) against the
reference and against the formula written out, on ragged rows (lengths 1 to a few blocks) with
-inf masks, fully masked rows and NaN."""

import numpy as np

from gpubackprop.kernels.reference import ReferenceOps

REF = ReferenceOps(np)
DTYPES = [np.float32, np.float64]
SHAPES = [(1, 1), (7, 3), (40, 33), (5, 300)]  # (rows, length): one entry to several blocks' worth
TOL = {np.float32: 2e-6, np.float64: 1e-13}


def random_case(rng, R, L, dtype):
    """(X, mask): scores of a wide range and a mask of 0 / -inf / finite offsets, row 0 masked
    entirely where R > 1."""
    X = (rng.normal(size=(R, L)) * 10).astype(dtype)
    mask = np.where(rng.random((R, L)) < 0.3, -np.inf, rng.normal(size=(R, L))).astype(dtype)
    if R > 1:
        mask[0] = -np.inf
    return X, mask


def formula(X, mask):
    """softmax(x + mask) per row in float64, zeros for a fully masked row."""
    Z = X.astype(np.float64) + (0 if mask is None else mask)
    out = np.zeros_like(Z)
    for r, z in enumerate(Z):
        if np.isneginf(z).all():
            continue
        e = np.exp(z - z.max())
        out[r] = e / e.sum()
    return out


def host(ops, a):
    return np.asarray(a.get() if hasattr(a, "get") else a)


def check_forward(ops, dev, rng, R, L, dtype, with_mask):
    X, mask = random_case(rng, R, L, dtype)
    mask = mask if with_mask else None
    want = formula(X, mask)
    ref = REF.masked_softmax(X, mask, np.empty_like(X))
    np.testing.assert_allclose(ref, want, rtol=0, atol=TOL[dtype])
    Y = ops.masked_softmax(dev(X), None if mask is None else dev(mask), dev(np.empty_like(X)))
    np.testing.assert_allclose(host(ops, Y), ref, rtol=0, atol=TOL[dtype])
    if with_mask and R > 1:
        assert (host(ops, Y)[0] == 0).all()  # fully masked: zeros, not NaN
    Xd = dev(X.copy())  # in place: Y is X
    ops.masked_softmax(Xd, None if mask is None else dev(mask), Xd)
    np.testing.assert_allclose(host(ops, Xd), ref, rtol=0, atol=TOL[dtype])


def check_backward(ops, dev, rng, R, L, dtype):
    X, mask = random_case(rng, R, L, dtype)
    Y = REF.masked_softmax(X, mask, np.empty_like(X))
    dY = rng.normal(size=(R, L)).astype(dtype)
    y, dy = Y.astype(np.float64), dY.astype(np.float64)
    want = y * (dy - (dy * y).sum(axis=1, keepdims=True))
    ref = REF.masked_softmax_backward(dY, Y, np.empty_like(dY))
    np.testing.assert_allclose(ref, want, rtol=0, atol=TOL[dtype])
    assert (ref[Y == 0] == 0).all()  # masked positions get no gradient
    dX = ops.masked_softmax_backward(dev(dY), dev(Y), dev(np.empty_like(dY)))
    np.testing.assert_allclose(host(ops, dX), ref, rtol=0, atol=TOL[dtype])
    dd = dev(dY.copy())  # in place: dX is dY
    ops.masked_softmax_backward(dd, dev(Y), dd)
    np.testing.assert_allclose(host(ops, dd), ref, rtol=0, atol=TOL[dtype])


def check_nan_propagates(ops, dev):
    X = np.array([[0.0, np.nan, 1.0], [0.0, 1.0, 2.0]])
    Y = host(ops, ops.masked_softmax(dev(X), None, dev(np.empty_like(X))))
    assert np.isnan(Y[0]).all() and np.isfinite(Y[1]).all()


def check_errors(ops, dev):
    import pytest

    X = np.zeros((2, 3))
    with pytest.raises(ValueError, match=r"mask: expected None or X's shape \(2, 3\), got shape \(2, 2\)"):
        ops.masked_softmax(dev(X), dev(np.zeros((2, 2))), dev(np.empty_like(X)))
    with pytest.raises(TypeError, match="Y: expected a C-contiguous float32 or float64 array"):
        ops.masked_softmax(dev(X), None, dev(np.zeros((2, 3), np.float32)))
    with pytest.raises(ValueError, match=r"dX: expected Y's shape \(2, 3\), got shape \(3, 2\)"):
        ops.masked_softmax_backward(dev(X), dev(X), dev(np.zeros((3, 2))))
