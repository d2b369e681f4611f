"""Normalization ops: the fused CPU set against the reference, and the reference against an
independent NumPy formula, central differences and (when installed) PyTorch."""

import math

import norm_cases as nc
import numpy as np
import pytest
from kernel_cases import cpu_ops  # noqa: F401  (the ops fixture: the fused CPU set)
from kernel_cases import host as dev
from layer_cases import central_differences

from gpubackprop.kernels.cpu import CpuOps

# Batch norm (N, C, *): BatchNorm1d's (N, C), (N, C, L), BatchNorm2d's (N, C, H, W); ragged sizes.
# Rows of L >= 128 go through the float64 lanes in pairs of 64-blocks, with ragged tails in both
# halves of the last pair ((3, 4, 200), (2, 3, 191)); rows shorter than 64 as column sums in blocks
# of at most 1024 columns ((3, 70, 20): blocks of 51 and 19 channels, (2, 1100): 1024 and 76).
BN_SHAPES = [(1, 1), (2, 1), (5, 3), (33, 7), (7, 5, 13), (4, 3, 5, 6), (3, 9, 1, 1), (16, 4, 65),
             (3, 4, 200), (2, 3, 191), (2, 2, 8, 16), (3, 70, 20), (2, 1100)]
LN_SHAPES = [(1, 1), (1, 7), (5, 3), (33, 70), (3, 257), (4, 200), (2, 128)]
REF = nc.REF


# ---- fused CPU set against the reference ----------------------------------------------------------
@pytest.mark.parametrize("dtype", nc.DTYPES)
@pytest.mark.parametrize("shape", BN_SHAPES)
def test_batch_norm(ops, rng, shape, dtype):
    nc.check_batch_norm_train(ops, dev, rng, shape, dtype)
    nc.check_batch_norm_eval(ops, dev, rng, shape, dtype)
    nc.check_norm_backward(ops, dev, rng, "batch", shape, dtype)
    nc.check_norm_backward(ops, dev, rng, "batch", shape, dtype, accumulate=True)


@pytest.mark.parametrize("dtype", nc.DTYPES)
@pytest.mark.parametrize("shape", LN_SHAPES)
def test_layer_norm(ops, rng, shape, dtype):
    nc.check_layer_norm(ops, dev, rng, shape, dtype)
    nc.check_norm_backward(ops, dev, rng, "layer", shape, dtype)
    nc.check_norm_backward(ops, dev, rng, "layer", shape, dtype, accumulate=True)


@pytest.mark.parametrize("dtype", nc.DTYPES)
def test_backward_in_place(ops, rng, dtype):
    nc.check_norm_in_place(ops, dev, rng, dtype)


@pytest.mark.parametrize("kind, shape", [("batch", (3, 4, 200)), ("batch", (5, 6)),
                                         ("layer", (5, 200)), ("layer", (3, 129))])
def test_backward_in_place_equals_out_of_place(ops, rng, kind, shape):
    """dX = dY takes its own one-name loop (it vectorizes): the same bits as a separate dX."""
    X, gamma, m, s, dY = nc._norm_backward_inputs(rng, kind, shape, np.float32)
    name = f"{kind}_norm_backward"
    P = gamma.shape[0]
    grads = [np.empty(P, np.float32) for _ in range(4)]
    dX = getattr(ops, name)(dY, X, gamma, m, s, np.empty_like(X), grads[0], grads[1])
    dYi = dY.copy()
    getattr(ops, name)(dYi, X, gamma, m, s, dYi, grads[2], grads[3])
    np.testing.assert_array_equal(dYi, dX)
    np.testing.assert_array_equal(grads[2], grads[0])
    np.testing.assert_array_equal(grads[3], grads[1])


def _two_halves_ops():
    """The fused set running every batch norm in its two halves (the calling and the worker
    thread), whatever the size."""
    ops = CpuOps(np, num_threads=2)
    ops.bn_halves_min = 0
    return ops


@pytest.mark.parametrize("activation", ["identity", "relu"])
@pytest.mark.parametrize("shape", [(6, 5, 200), (3, 7, 9, 9), (2, 3, 64), (4, 70, 20), (5, 9)])
def test_batch_norm_sums_do_not_depend_on_the_thread_count(rng, shape, activation):
    """Each channel's float64 lanes (positions l mod 64 of every row, rows in order) are summed in
    an order fixed by the shape: one thread, three chunks of channels and the two halves on two
    threads (channels, then rows) give the same bits."""
    X, gamma, beta = nc._bn_inputs(rng, shape, np.float32)
    dY = nc.random(rng, shape, np.float32)
    C = shape[1]
    outs = []
    for ops in (CpuOps(np, num_threads=1), CpuOps(np, num_threads=3, parallel_min=0),
                _two_halves_ops()):
        assert ops._norm_halves(X) is (ops.bn_halves_min == 0)
        m, s = np.empty(C, np.float32), np.empty(C, np.float32)
        Y = ops.batch_norm_train(X, gamma, beta, nc.EPS, np.empty_like(X), m, s,
                                 activation=activation)
        dg, db = np.full(C, 1, np.float32), np.full(C, 2, np.float32)  # accumulated into
        dX = ops.batch_norm_backward(dY, X, gamma, m, s, np.empty_like(X), dg, db,
                                     accumulate=True, activation=activation, beta=beta)
        outs.append((Y, m, s, dX, dg, db))
    for other in outs[1:]:
        for a, b in zip(outs[0], other, strict=True):
            np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("shape", [(33, 200), (5, 64), (9, 7)])
def test_layer_norm_sums_do_not_depend_on_the_thread_count(rng, shape):
    """Each row's float64 lanes (positions j mod 64), then the lanes pairwise: the same bits from
    one thread and from three chunks of rows."""
    X = nc.random(rng, shape, np.float32, 2.0, 1.0)
    gamma, beta, dY = (nc.random(rng, s, np.float32) for s in (shape[1], shape[1], shape))
    outs = []
    for ops in (CpuOps(np, num_threads=1), CpuOps(np, num_threads=3, parallel_min=0)):
        m, s = np.empty(shape[0], np.float32), np.empty(shape[0], np.float32)
        Y = ops.layer_norm(X, gamma, beta, nc.EPS, np.empty_like(X), m, s)
        dg, db = np.empty(shape[1], np.float32), np.empty(shape[1], np.float32)
        dX = ops.layer_norm_backward(dY, X, gamma, m, s, np.empty_like(X), dg, db)
        outs.append((Y, m, s, dX, dg, db))
    for a, b in zip(*outs, strict=True):
        np.testing.assert_array_equal(a, b)


def test_float32_large_mean_keeps_accuracy(ops):
    """A float32 channel with mean 1e4 and spread 1: two-pass float64 sums keep invstd exact to
    float32 rounding, where a one-pass E[x²] − E[x]² would lose every digit."""
    rng = np.random.default_rng(5)
    x = rng.standard_normal((4096, 2)) + 1e4
    X = x.astype(np.float32)
    m, s = np.empty(2, np.float32), np.empty(2, np.float32)
    ops.batch_norm_train(X, np.ones(2, np.float32), np.zeros(2, np.float32), nc.EPS,
                         np.empty_like(X), m, s)
    xd = X.astype(np.float64)
    exact = 1 / np.sqrt(xd.var(axis=0) + nc.EPS)
    np.testing.assert_allclose(s, exact, rtol=2e-7)
    np.testing.assert_allclose(m, xd.mean(axis=0), rtol=1e-7)


def test_errors(ops):
    nc.check_norm_errors(ops, dev)


# ---- the reference against an independent formula -------------------------------------------------
def _bn_loops(X, gamma, beta, eps, dY):
    """Batch norm forward and backward channel by channel, with math.fsum (exactly rounded sums)
    and the textbook backward dX = γ·invstd·(dY − mean(dY) − x̂·mean(dY·x̂))."""
    C = X.shape[1]
    Y, dX = np.empty_like(X), np.empty_like(X)
    dg, db = np.empty(C), np.empty(C)
    for c in range(C):
        x, dy = X[:, c].ravel(), dY[:, c].ravel()
        mu = math.fsum(x) / x.size
        var = math.fsum((x - mu) ** 2) / x.size
        r = 1 / math.sqrt(var + eps)
        xh = (x - mu) * r
        Y[:, c] = (xh * gamma[c] + beta[c]).reshape(Y[:, c].shape)
        dg[c], db[c] = math.fsum(dy * xh), math.fsum(dy)
        d = gamma[c] * r * (dy - db[c] / x.size - xh * dg[c] / x.size)
        dX[:, c] = d.reshape(dX[:, c].shape)
    return Y, dX, dg, db


@pytest.mark.parametrize("shape", BN_SHAPES)
def test_reference_batch_norm_against_loops(rng, shape):
    X, gamma, beta = nc._bn_inputs(rng, shape, np.float64)
    dY = rng.standard_normal(shape)
    C = shape[1]
    Y, m, s = np.empty_like(X), np.empty(C), np.empty(C)
    REF.batch_norm_train(X, gamma, beta, nc.EPS, Y, m, s)
    dX, dg, db = np.empty_like(X), np.empty(C), np.empty(C)
    REF.batch_norm_backward(dY, X, gamma, m, s, dX, dg, db)
    Ye, dXe, dge, dbe = _bn_loops(X, gamma, beta, nc.EPS, dY)
    for got, exp in ((Y, Ye), (dX, dXe), (dg, dge), (db, dbe)):
        np.testing.assert_allclose(got, exp, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("shape", LN_SHAPES)
def test_reference_layer_norm_against_loops(rng, shape):
    X, gamma, beta = nc._ln_inputs(rng, shape, np.float64)
    dY = rng.standard_normal(shape)
    M, D = shape
    Y, m, s = np.empty_like(X), np.empty(M), np.empty(M)
    REF.layer_norm(X, gamma, beta, nc.EPS, Y, m, s)
    dX, dg, db = np.empty_like(X), np.empty(D), np.empty(D)
    REF.layer_norm_backward(dY, X, gamma, m, s, dX, dg, db)
    # Layer norm of row i is batch norm of a (D, 1) "batch" with γ folded into dY.
    for i in range(M):
        x = X[i][:, None]
        Ye, _, _, _ = _bn_loops(x, np.ones(1), np.zeros(1), nc.EPS, x)
        np.testing.assert_allclose(Y[i], Ye[:, 0] * gamma + beta, rtol=1e-10, atol=1e-12)
        _, dXe, _, _ = _bn_loops(x, np.ones(1), np.zeros(1), nc.EPS, (dY[i] * gamma)[:, None])
        np.testing.assert_allclose(dX[i], dXe[:, 0], rtol=1e-10, atol=1e-12)
    xh = (X - X.mean(axis=1, keepdims=True)) / np.sqrt(X.var(axis=1, keepdims=True) + nc.EPS)
    np.testing.assert_allclose(dg, (dY * xh).sum(axis=0), rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(db, dY.sum(axis=0), rtol=1e-10, atol=1e-12)


def test_reference_batch_norm_eval_against_formula(rng):
    X, gamma, beta = nc._bn_inputs(rng, (6, 4, 5), np.float64)
    rm, rv = rng.standard_normal(4), rng.uniform(0.1, 2, 4)
    Y = REF.batch_norm_eval(X, gamma, beta, rm, rv, nc.EPS, np.empty_like(X))
    for c in range(4):
        exp = (X[:, c] - rm[c]) / math.sqrt(rv[c] + nc.EPS) * gamma[c] + beta[c]
        np.testing.assert_allclose(Y[:, c], exp, rtol=1e-13, atol=1e-14)


# ---- central differences of the backward ops (float64) --------------------------------------------
@pytest.mark.parametrize("kind,shape", [("batch", (5, 3)), ("batch", (3, 2, 4)), ("layer", (4, 6)),
                                        ("layer", (1, 5))])
@pytest.mark.parametrize("set_name", ["reference", "fused"])
def test_backward_central_differences(rng, kind, shape, set_name):
    """L = Σ W·Y: the backward op with dY = W gives ∂L/∂X, ∂L/∂γ, ∂L/∂β."""
    ops = REF if set_name == "reference" else CpuOps(np, num_threads=1)
    make = nc._bn_inputs if kind == "batch" else nc._ln_inputs
    X, gamma, beta = make(rng, shape, np.float64)
    W = rng.standard_normal(shape)
    groups = shape[1] if kind == "batch" else shape[0]
    forward = ops.batch_norm_train if kind == "batch" else ops.layer_norm
    backward = ops.batch_norm_backward if kind == "batch" else ops.layer_norm_backward

    def loss():
        Y = forward(X, gamma, beta, nc.EPS, np.empty_like(X), np.empty(groups), np.empty(groups))
        return float(np.sum(W * Y))

    m, s = np.empty(groups), np.empty(groups)
    forward(X, gamma, beta, nc.EPS, np.empty_like(X), m, s)
    dX, dg, db = np.empty_like(X), np.empty_like(gamma), np.empty_like(beta)
    backward(W, X, gamma, m, s, dX, dg, db)
    for got, a in ((dX, X), (dg, gamma), (db, beta)):
        np.testing.assert_allclose(got, central_differences(loss, a), rtol=1e-6, atol=1e-8)


# ---- the reference against PyTorch ---------------------------------------------------------------
@pytest.mark.parametrize("shape", [(5, 3), (7, 5, 13), (4, 3, 5, 6)])
def test_reference_batch_norm_against_torch(rng, shape):
    torch = pytest.importorskip("torch")
    X, gamma, beta = nc._bn_inputs(rng, shape, np.float64)
    dY = rng.standard_normal(shape)
    C = shape[1]
    Y, m, s = np.empty_like(X), np.empty(C), np.empty(C)
    REF.batch_norm_train(X, gamma, beta, nc.EPS, Y, m, s)
    dX, dg, db = np.empty_like(X), np.empty(C), np.empty(C)
    REF.batch_norm_backward(dY, X, gamma, m, s, dX, dg, db)
    tX, tg, tb = (torch.tensor(a, requires_grad=True) for a in (X, gamma, beta))
    tY = torch.nn.functional.batch_norm(tX, None, None, tg, tb, training=True, eps=nc.EPS)
    tY.backward(torch.tensor(dY))
    for got, exp in ((Y, tY), (dX, tX.grad), (dg, tg.grad), (db, tb.grad)):
        np.testing.assert_allclose(got, exp.detach().numpy(), rtol=1e-10, atol=1e-12)
    Ye = REF.batch_norm_eval(X, gamma, beta, m, 1 / s**2 - nc.EPS, nc.EPS, np.empty_like(X))
    tYe = torch.nn.functional.batch_norm(torch.tensor(X), torch.tensor(m),
                                         torch.tensor(1 / s**2 - nc.EPS), torch.tensor(gamma),
                                         torch.tensor(beta), training=False, eps=nc.EPS)
    np.testing.assert_allclose(Ye, tYe.numpy(), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("shape", LN_SHAPES)
def test_reference_layer_norm_against_torch(rng, shape):
    torch = pytest.importorskip("torch")
    X, gamma, beta = nc._ln_inputs(rng, shape, np.float64)
    dY = rng.standard_normal(shape)
    M, D = shape
    Y, m, s = np.empty_like(X), np.empty(M), np.empty(M)
    REF.layer_norm(X, gamma, beta, nc.EPS, Y, m, s)
    dX, dg, db = np.empty_like(X), np.empty(D), np.empty(D)
    REF.layer_norm_backward(dY, X, gamma, m, s, dX, dg, db)
    tX, tg, tb = (torch.tensor(a, requires_grad=True) for a in (X, gamma, beta))
    tY = torch.nn.functional.layer_norm(tX, (D,), tg, tb, eps=nc.EPS)
    tY.backward(torch.tensor(dY))
    for got, exp in ((Y, tY), (dX, tX.grad), (dg, tg.grad), (db, tb.grad)):
        np.testing.assert_allclose(got, exp.detach().numpy(), rtol=1e-10, atol=1e-12)


# ---- batch norm + ReLU (activation="relu": the BatchNorm layer's fused activation) ---------------
def _bn_relu_composed(ops, X, gamma, beta, dA, start, accumulate):
    """BN then ops.activation; act_backward then BN backward: the definition the fused op keeps."""
    C = X.shape[1]
    m, s = np.empty(C, X.dtype), np.empty(C, X.dtype)
    A = ops.batch_norm_train(X, gamma, beta, nc.EPS, np.empty_like(X), m, s)
    ops.activation(A, "relu", A)
    dZ = ops.act_backward(dA, A, "relu", np.empty_like(X))
    dg, db = start[0].copy(), start[1].copy()
    dX = ops.batch_norm_backward(dZ, X, gamma, m, s, np.empty_like(X), dg, db,
                                 accumulate=accumulate)
    return A, m, s, dX, dg, db


@pytest.mark.parametrize("accumulate", [False, True])
@pytest.mark.parametrize("dtype", nc.DTYPES)
@pytest.mark.parametrize("shape", BN_SHAPES + [(64, 8, 7, 9), (5, 6, 1)])
def test_batch_norm_relu_equals_the_composition(ops, rng, shape, dtype, accumulate):
    """The fused BN + ReLU against the reference's composition (within the set's tolerance) and
    the CPU set's own composition (bit for bit: the same arithmetic, no dZ buffer), train, eval,
    backward, dX separate and in place."""
    X, gamma, beta = nc._bn_inputs(rng, shape, dtype)
    dA = nc.random(rng, shape, dtype)
    C = shape[1]
    start = nc.random(rng, (2, C), dtype) if accumulate else np.zeros((2, C), dtype)
    ref = _bn_relu_composed(REF, X, gamma, beta, dA, start, accumulate)
    own = _bn_relu_composed(CpuOps(np, num_threads=1), X, gamma, beta, dA, start, accumulate)
    m, s = np.empty(C, dtype), np.empty(C, dtype)
    A = ops.batch_norm_train(X, gamma, beta, nc.EPS, np.empty_like(X), m, s, activation="relu")
    assert (A >= 0).all() and (X.size < 4 or (A == 0).any())
    dg, db = start[0].copy(), start[1].copy()
    dX = ops.batch_norm_backward(dA, X, gamma, m, s, np.empty_like(X), dg, db,
                                 accumulate=accumulate, activation="relu", beta=beta)
    dZr = REF.act_backward(dA, ref[0], "relu", np.empty_like(X))
    scales = nc._backward_scales("batch", X, gamma, ref[1], ref[2], dZr, start)
    for what, got, r, o, scale in zip(("A", "mean", "invstd", "dX", "dgamma", "dbeta"),
                                      (A, m, s, dX, dg, db), ref, own,
                                      (None, None, None) + scales, strict=True):
        nc.assert_close(got, r, f"bn+relu {shape} {what}", scale)
        np.testing.assert_array_equal(got, o, f"bn+relu {shape} {what}: not the composition's bits")
    dAi = dA.copy()  # dX in place of dA
    dg2, db2 = start[0].copy(), start[1].copy()
    ops.batch_norm_backward(dAi, X, gamma, m, s, dAi, dg2, db2, accumulate=accumulate,
                            activation="relu", beta=beta)
    for got, want in ((dAi, dX), (dg2, dg), (db2, db)):
        np.testing.assert_array_equal(got, want)
    rm, rv = nc.random(rng, C, dtype), np.abs(nc.random(rng, C, dtype)) + 0.5
    Ye = ops.batch_norm_eval(X, gamma, beta, rm, rv, nc.EPS, np.empty_like(X), activation="relu")
    Yr = REF.batch_norm_eval(X, gamma, beta, rm, rv, nc.EPS, np.empty_like(X))
    nc.assert_close(Ye, np.maximum(Yr, 0), f"bn+relu eval {shape}")


def test_batch_norm_activation_errors(ops):
    X, g = np.zeros((4, 3, 5), np.float32), np.ones(3, np.float32)
    m, s = np.zeros(3, np.float32), np.ones(3, np.float32)
    with pytest.raises(ValueError, match=r"activation: expected one of \('identity', 'relu'\)"):
        ops.batch_norm_train(X, g, g, nc.EPS, np.empty_like(X), m, s, activation="tanh")
    with pytest.raises(ValueError, match=r"beta: the forward's β is needed"):
        ops.batch_norm_backward(X, X, g, m, s, np.empty_like(X), m.copy(), s.copy(),
                                activation="relu")
    with pytest.raises(ValueError, match=r"beta: expected shape \(3,\)"):
        ops.batch_norm_backward(X, X, g, m, s, np.empty_like(X), m.copy(), s.copy(),
                                activation="relu", beta=np.zeros(4, np.float32))
