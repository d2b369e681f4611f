"""Checks shared by the normalization and dropout kernel tests (CPU set and CUDA set).

Each ``check_*`` runs the fused set ``ops`` on device copies (``dev``: numpy -> the set's array type)
of random host inputs and ``ReferenceOps(numpy)`` on host copies, and compares: float32 within 1e-5
relative, float64 within 1e-12, with an absolute floor of the same fraction of the largest
reference value (for elements where the formula itself cancels). Dropout must agree bit for bit.
"""

import numpy as np
import pytest

from gpubackprop.backend import to_numpy
from gpubackprop.kernels.reference import ReferenceOps

DTYPES = [np.float32, np.float64]
RTOL = {np.dtype(np.float32): 1e-5, np.dtype(np.float64): 1e-12}
REF = ReferenceOps(np)
EPS = 1e-5


def assert_close(got, ref, what="", scale=None):
    """``scale``: the size of the terms that make ``ref`` (default its largest value), where the
    result cancels (a batch-norm dX over two samples is 0 up to rounding)."""
    got = to_numpy(got)
    ref = np.asarray(ref)
    assert got.dtype == ref.dtype, f"{what}: dtype {got.dtype}, reference {ref.dtype}"
    assert got.shape == ref.shape, f"{what}: shape {got.shape}, reference {ref.shape}"
    rtol = RTOL[ref.dtype]
    if scale is None:
        scale = float(np.abs(ref).max()) if ref.size else 0.0
    atol = rtol * scale
    np.testing.assert_allclose(got, ref, rtol=rtol, atol=atol, err_msg=what)


def random(rng, shape, dtype, scale=1.0, offset=0.0):
    return (rng.standard_normal(shape) * scale + offset).astype(dtype)


def _bn_inputs(rng, shape, dtype):
    C = shape[1]
    # Per-channel offsets and spreads, so a channel mix-up shows.
    offset = rng.uniform(-3, 3, size=(1, C) + (1,) * (len(shape) - 2))
    X = (rng.standard_normal(shape) * rng.uniform(0.5, 2) + offset).astype(dtype)
    gamma = random(rng, C, dtype, 1.0, 1.0)
    beta = random(rng, C, dtype)
    return X, gamma, beta


# ---- batch norm ----------------------------------------------------------------------------------
def check_batch_norm_train(ops, dev, rng, shape, dtype):
    X, gamma, beta = _bn_inputs(rng, shape, dtype)
    C = shape[1]
    Yr, mr, sr = np.empty_like(X), np.empty(C, dtype), np.empty(C, dtype)
    REF.batch_norm_train(X, gamma, beta, EPS, Yr, mr, sr)
    outs = []
    for _ in range(2):
        Y, m, s = dev(np.empty_like(X)), dev(np.empty(C, dtype)), dev(np.empty(C, dtype))
        assert ops.batch_norm_train(dev(X), dev(gamma), dev(beta), EPS, Y, m, s) is Y
        outs.append([to_numpy(a) for a in (Y, m, s)])
    for what, got, ref in zip(("Y", "mean", "invstd"), outs[0], (Yr, mr, sr), strict=True):
        assert_close(got, ref, f"batch_norm_train {shape} {what}")
    for a, b in zip(*outs, strict=True):
        np.testing.assert_array_equal(a, b, "batch_norm_train is not deterministic")


def check_batch_norm_eval(ops, dev, rng, shape, dtype):
    X, gamma, beta = _bn_inputs(rng, shape, dtype)
    C = shape[1]
    rm, rv = random(rng, C, dtype), rng.uniform(0.1, 3, C).astype(dtype)
    ref = REF.batch_norm_eval(X, gamma, beta, rm, rv, EPS, np.empty_like(X))
    Y = dev(np.empty_like(X))
    assert ops.batch_norm_eval(dev(X), dev(gamma), dev(beta), dev(rm), dev(rv), EPS, Y) is Y
    assert_close(Y, ref, f"batch_norm_eval {shape}")


def _norm_backward_inputs(rng, kind, shape, dtype):
    X, gamma, beta = _bn_inputs(rng, shape, dtype) if kind == "batch" else _ln_inputs(rng, shape,
                                                                                       dtype)
    groups = shape[1] if kind == "batch" else shape[0]
    m, s = np.empty(groups, dtype), np.empty(groups, dtype)
    forward = REF.batch_norm_train if kind == "batch" else REF.layer_norm
    forward(X, gamma, beta, EPS, np.empty_like(X), m, s)
    return X, gamma, m, s, random(rng, shape, dtype)


def check_norm_backward(ops, dev, rng, kind, shape, dtype, accumulate=False):
    """batch_norm_backward (kind "batch") or layer_norm_backward ("layer") against the reference."""
    X, gamma, m, s, dY = _norm_backward_inputs(rng, kind, shape, dtype)
    P = gamma.shape[0]
    start = random(rng, (2, P), dtype) if accumulate else np.zeros((2, P), dtype)
    name = f"{kind}_norm_backward"
    dXr, dgr, dbr = np.empty_like(X), start[0].copy(), start[1].copy()
    getattr(REF, name)(dY, X, gamma, m, s, dXr, dgr, dbr, accumulate=accumulate)
    outs = []
    for _ in range(2):
        dX, dg, db = dev(np.empty_like(X)), dev(start[0].copy()), dev(start[1].copy())
        out = getattr(ops, name)(dev(dY), dev(X), dev(gamma), dev(m), dev(s), dX, dg, db,
                                 accumulate=accumulate)
        assert out is dX
        outs.append([to_numpy(a) for a in (dX, dg, db)])
    for what, got, ref, scale in zip(("dX", "dgamma", "dbeta"), outs[0], (dXr, dgr, dbr),
                                     _backward_scales(kind, X, gamma, m, s, dY, start), strict=True):
        assert_close(got, ref, f"{name} {shape} accumulate={accumulate} {what}", scale)
    for a, b in zip(*outs, strict=True):
        np.testing.assert_array_equal(a, b, f"{name} is not deterministic")


def _backward_scales(kind, X, gamma, m, s, dY, start):
    """The size of the terms of dX, dγ and dβ (each of them may cancel to rounding noise)."""
    X, gamma, m, s, dY = (a.astype(np.float64) for a in (X, gamma, m, s, dY))
    if kind == "batch":
        shape = (1, -1) + (1,) * (X.ndim - 2)
        xh = np.abs((X - m.reshape(shape)) * s.reshape(shape))
        k = np.abs(gamma * s).max()
        axes = (0,) + tuple(range(2, X.ndim))
    else:
        xh = np.abs((X - m[:, None]) * s[:, None])
        k = np.abs(gamma).max() * s.max()
        axes = (0,)
    ady = np.abs(dY)
    sx = k * ady.max() * (1 + xh.max()) * 2
    sg = (ady * xh).sum(axis=axes).max() + np.abs(start[0]).max()
    sb = ady.sum(axis=axes).max() + np.abs(start[1]).max()
    return sx, sg, sb


# ---- layer norm ----------------------------------------------------------------------------------
def _ln_inputs(rng, shape, dtype):
    M, D = shape
    X = (rng.standard_normal(shape) * rng.uniform(0.5, 2, (M, 1)) + rng.uniform(-3, 3, (M, 1)))
    return X.astype(dtype), random(rng, D, dtype, 1.0, 1.0), random(rng, D, dtype)


def check_layer_norm(ops, dev, rng, shape, dtype):
    X, gamma, beta = _ln_inputs(rng, shape, dtype)
    M = shape[0]
    Yr, mr, sr = np.empty_like(X), np.empty(M, dtype), np.empty(M, dtype)
    REF.layer_norm(X, gamma, beta, EPS, Yr, mr, sr)
    outs = []
    for _ in range(2):
        Y, m, s = dev(np.empty_like(X)), dev(np.empty(M, dtype)), dev(np.empty(M, dtype))
        assert ops.layer_norm(dev(X), dev(gamma), dev(beta), EPS, Y, m, s) is Y
        outs.append([to_numpy(a) for a in (Y, m, s)])
    for what, got, ref in zip(("Y", "mean", "invstd"), outs[0], (Yr, mr, sr), strict=True):
        assert_close(got, ref, f"layer_norm {shape} {what}")
    for a, b in zip(*outs, strict=True):
        np.testing.assert_array_equal(a, b, "layer_norm is not deterministic")


def check_norm_in_place(ops, dev, rng, dtype):
    """dX may be dY (the backward reads each dY before it writes that dX)."""
    for kind, shape in (("batch", (6, 3, 5)), ("layer", (9, 13))):
        X, gamma, m, s, dY = _norm_backward_inputs(rng, kind, shape, dtype)
        name = f"{kind}_norm_backward"
        P = gamma.shape[0]
        ref = getattr(REF, name)(dY, X, gamma, m, s, np.empty_like(X), np.empty(P, dtype),
                                 np.empty(P, dtype))
        dYd = dev(dY.copy())
        getattr(ops, name)(dYd, dev(X), dev(gamma), dev(m), dev(s), dYd, dev(np.empty(P, dtype)),
                           dev(np.empty(P, dtype)))
        assert_close(dYd, ref, f"{name} in place")


# ---- launcher errors -----------------------------------------------------------------------------
def check_norm_errors(ops, dev):
    f32 = np.float32
    X, g, Y = dev(np.zeros((4, 3, 5), f32)), dev(np.ones(3, f32)), dev(np.zeros((4, 3, 5), f32))
    m, s = dev(np.zeros(3, f32)), dev(np.ones(3, f32))
    with pytest.raises(ValueError, match=r"gamma: expected shape \(3,\) \(one value per channel"):
        ops.batch_norm_train(X, dev(np.ones(4, f32)), g, EPS, Y, m, s)
    with pytest.raises(ValueError, match=r"Y: expected shape \(4, 3, 5\) \(the shape of X\)"):
        ops.batch_norm_train(X, g, g, EPS, dev(np.zeros((4, 3, 4), f32)), m, s)
    with pytest.raises(TypeError, match=r"invstd: expected dtype float32 \(the dtype of X\), got dtype f"):
        ops.batch_norm_train(X, g, g, EPS, Y, m, dev(np.ones(3)))
    with pytest.raises(ValueError, match=r"X: expected an array \(N, C, \*\) of at least 2 dim"):
        ops.batch_norm_train(dev(np.zeros(3, f32)), g, g, EPS, dev(np.zeros(3, f32)), m, s)
    with pytest.raises(ValueError, match=r"X: expected at least one value per channel"):
        ops.batch_norm_train(dev(np.zeros((0, 3), f32)), g, g, EPS, dev(np.zeros((0, 3), f32)), m, s)
    with pytest.raises(ValueError, match=r"running_var: expected shape \(3,\)"):
        ops.batch_norm_eval(X, g, g, m, dev(np.ones(2, f32)), EPS, Y)
    with pytest.raises(ValueError, match=r"dX: expected a C-contiguous array"):
        ops.batch_norm_backward(Y, X, g, m, s, dev(np.zeros((5, 3, 4), f32)).T, g, g)
    with pytest.raises(ValueError, match=r"dgamma: expected shape \(3,\)"):
        ops.batch_norm_backward(Y, X, g, m, s, Y, dev(np.ones(2, f32)), g)
    X2, Y2 = dev(np.zeros((4, 6), f32)), dev(np.zeros((4, 6), f32))
    g6, m4 = dev(np.ones(6, f32)), dev(np.zeros(4, f32))
    with pytest.raises(ValueError, match=r"X: expected a 2-D array \(rows, features\), got shape \(4, 3"):
        ops.layer_norm(X, g, g, EPS, Y, m, s)
    with pytest.raises(ValueError, match=r"beta: expected shape \(6,\) \(one value per feature of X\)"):
        ops.layer_norm(X2, g6, g, EPS, Y2, m4, m4)
    with pytest.raises(ValueError, match=r"invstd: expected shape \(4,\) \(one value per row of X\)"):
        ops.layer_norm(X2, g6, g6, EPS, Y2, m4, g6)
    with pytest.raises(ValueError, match=r"dY: expected shape \(4, 6\) \(the shape of X\)"):
        ops.layer_norm_backward(dev(np.zeros((6, 4), f32)), X2, g6, m4, m4, Y2, g6, g6)


# ---- dropout ---------------------------------------------------------------------------------------
def check_dropout(ops, dev, rng, shape, dtype, p, seed=7, layer=3, step=11):
    """Mask, forward and backward bit-identical to the reference; in place too."""
    X = random(rng, shape, dtype)
    mask_ref = REF.dropout_mask(shape, p, seed, layer, step)
    mask = to_numpy(ops.dropout_mask(shape, p, seed, layer, step))
    assert mask.dtype == np.bool_ and mask.shape == tuple(shape)
    np.testing.assert_array_equal(mask, mask_ref, f"dropout_mask {shape} p={p}")
    Yr = REF.dropout(X, np.empty_like(X), p, seed, layer, step)
    Y = dev(np.empty_like(X))
    assert ops.dropout(dev(X), Y, p, seed, layer, step) is Y
    np.testing.assert_array_equal(to_numpy(Y), Yr, f"dropout {shape} p={p}")
    np.testing.assert_array_equal(Yr != 0, mask_ref & (X != 0), "dropout zeros where the mask drops")
    dY = random(rng, shape, dtype)
    dXr = REF.dropout_backward(dY, np.empty_like(dY), p, seed, layer, step)
    dX = dev(np.empty_like(dY))
    assert ops.dropout_backward(dev(dY), dX, p, seed, layer, step) is dX
    np.testing.assert_array_equal(to_numpy(dX), dXr, f"dropout_backward {shape} p={p}")
    Xd = dev(X.copy())
    ops.dropout(Xd, Xd, p, seed, layer, step)
    np.testing.assert_array_equal(to_numpy(Xd), Yr, "dropout in place")


def check_dropout_errors(ops, dev, arrays=True):
    """Bad p, seed, layer or step (every set); bad arrays (the fused sets, ``arrays``)."""
    X = dev(np.zeros((3, 4), np.float32))
    with pytest.raises(ValueError, match=r"p: expected a probability in \[0, 1\], got 1.5"):
        ops.dropout(X, X, 1.5, 0, 0, 0)
    with pytest.raises(ValueError, match=r"p: expected a probability in \[0, 1\], got nan"):
        ops.dropout(X, X, float("nan"), 0, 0, 0)
    with pytest.raises(TypeError, match=r"step: expected an integer, got float"):
        ops.dropout(X, X, 0.5, 0, 0, 1.5)
    with pytest.raises(TypeError, match=r"seed: expected an integer, got str"):
        ops.dropout_mask((3, 4), 0.5, "1", 0, 0)
    if not arrays:
        return
    with pytest.raises(TypeError, match=r"Y: expected dtype float32 \(the dtype of X\), got dtype float64"):
        ops.dropout(X, dev(np.zeros((3, 4))), 0.5, 0, 0, 0)
    with pytest.raises(ValueError, match=r"dX: expected shape \(3, 4\) \(the shape of dY\)"):
        ops.dropout_backward(X, dev(np.zeros((4, 3), np.float32)), 0.5, 0, 0, 0)
