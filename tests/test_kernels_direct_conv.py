"""The fused CPU direct convolution (kernels/cpu/direct_conv.py) against the direct definition in
NumPy float64, Conv2d on it against PyTorch and central differences, and Conv2d.direct's rule."""

import numpy as np
import pytest
from layer_cases import assert_close, central_differences, model_for, run_layer, torch_grads
from test_layers_conv import random_params, torch_conv

import gpubackprop as gb
from gpubackprop.kernels.cpu import CpuOps
from gpubackprop.kernels.cpu.direct_conv import DIRECT_CHUNKS

FUSED = ("cpu", "fused")


def direct_reference(X, W, padding):
    """(Z, conv) in float64 by the definition Z[n, o, y, x] = Σ_{c,i,j} W[o, c, i, j] ·
    Xpad[n, c, y + i, x + j]; ``conv`` also gives the adjoints (dX, dW) of a dZ."""
    ph, pw = padding
    X, W = X.astype(np.float64), W.astype(np.float64)
    N, C, H, Wd = X.shape
    Co, _, kh, kw = W.shape
    Xp = np.pad(X, ((0, 0), (0, 0), (ph, ph), (pw, pw)))
    OH, OW = H + 2 * ph - kh + 1, Wd + 2 * pw - kw + 1
    Z = np.zeros((N, Co, OH, OW))
    for i in range(kh):
        for j in range(kw):
            Z += np.einsum("oc,ncyx->noyx", W[:, :, i, j], Xp[:, :, i:i + OH, j:j + OW])

    def adjoint(dZ):
        dZ = dZ.astype(np.float64)
        dXp, dW = np.zeros_like(Xp), np.zeros_like(W)
        for i in range(kh):
            for j in range(kw):
                dXp[:, :, i:i + OH, j:j + OW] += np.einsum("oc,noyx->ncyx", W[:, :, i, j], dZ)
                dW[:, :, i, j] = np.einsum("noyx,ncyx->oc", dZ, Xp[:, :, i:i + OH, j:j + OW])
        return dXp[:, :, ph:ph + H, pw:pw + Wd], dW

    return Z, adjoint


# (N, C, Co, (H, W), (kh, kw), (ph, pw)): ragged sizes, non-square kernels and padding, more
# samples than the fixed chunks and fewer, a kernel as wide as the padded input.
CASES = [
    (1, 1, 1, (1, 1), (1, 1), (0, 0)),
    (3, 2, 3, (7, 9), (3, 3), (1, 1)),
    (DIRECT_CHUNKS + 3, 1, 6, (11, 10), (5, 5), (2, 2)),
    (5, 6, 16, (9, 8), (5, 5), (0, 0)),
    (4, 3, 5, (6, 13), (2, 4), (0, 3)),
    (2, 4, 2, (5, 3), (3, 5), (1, 1)),
    (17, 2, 7, (4, 4), (4, 4), (0, 0)),
    # the register-blocked 5-wide kernels: blocks of 4, 2 and 1 planes (7 in, 9 out), 16 channels
    # in or out, padding 0, 1, 2, a 1x1 output; 3-wide kernels next to them
    (3, 7, 9, (5, 7), (5, 5), (1, 1)),
    (9, 16, 4, (13, 11), (5, 5), (2, 2)),
    (4, 16, 16, (6, 6), (5, 5), (2, 2)),
    (2, 5, 3, (8, 5), (3, 5), (0, 2)),
    (1, 1, 1, (5, 5), (5, 5), (0, 0)),
    (2, 3, 16, (7, 7), (3, 3), (2, 2)),
    (5, 16, 1, (9, 6), (3, 3), (0, 0)),
]


def ids(case):
    return "N{}-{}x{}-{}x{}-k{}x{}-p{}x{}".format(case[0], case[1], case[2], *case[3], *case[4],
                                                  *case[5])


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("case", CASES, ids=[ids(c) for c in CASES])
def test_direct_kernels_equal_the_definition(rng, case, dtype, threads):
    """float64 to 1e-12 relative. float32: each output is a sum of m = C·kh·kw (dX: Co·kh·kw, dW:
    N·OH·Wp) products rounded in float32 (fused multiply-adds, lanes reassociated), an error of
    at most ~m·2⁻²⁴ of the sum of |terms|; with m up to ~10³ here, 1e-4 of the largest |value| (the
    terms' scale) bounds it with room."""
    N, C, Co, (H, W), (kh, kw), pad = case
    ops = CpuOps(num_threads=threads)
    ops.direct_parallel = threads > 1  # the batch split over Numba's threads (off by default)
    X = rng.normal(size=(N, C, H, W)).astype(dtype)
    Wt = rng.normal(size=(Co, C, kh, kw)).astype(dtype)
    Zr, adjoint = direct_reference(X, Wt, pad)
    dZ = rng.normal(size=Zr.shape).astype(dtype)
    dXr, dWr = adjoint(dZ)
    Z = np.full(Zr.shape, np.nan, dtype)
    ops.direct_conv_forward(X, Wt, Z, pad)
    dW, dX = np.full(Wt.shape, np.nan, dtype), np.full(X.shape, np.nan, dtype)
    ops.direct_conv_backward(X, dZ, Wt, dW, dX, pad)
    tol = 1e-12 if dtype == "float64" else 1e-4
    for name, got, want in (("Z", Z, Zr), ("dX", dX, dXr), ("dW", dW, dWr)):
        err = np.abs(got - want).max() / max(np.abs(want).max(), 1e-300)
        assert err <= tol, f"{name}: relative error {err:.3g} > {tol}"
    # accumulate adds to dW; no dX leaves dW the same
    dW2 = np.ones_like(Wt)
    ops.direct_conv_backward(X, dZ, Wt, dW2, None, pad, accumulate=True)
    assert np.abs(dW2 - 1 - dWr).max() <= tol * max(np.abs(dWr).max(), 1.0) * 4


FUSED_CASES = [CASES[2], CASES[3], CASES[5], CASES[7], CASES[8], CASES[12]]


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("activation", ["identity", "relu"])
@pytest.mark.parametrize("case", FUSED_CASES, ids=[ids(c) for c in FUSED_CASES])
def test_direct_kernels_fuse_bias_and_relu(rng, case, activation, dtype):
    """The bias and ReLU in the forward's write, Δ = dA ⊙ ReLU'(A) and BP4 in the backward, against
    the definition (tolerances as above; BP4 sums in float64)."""
    N, C, Co, (H, W), (kh, kw), pad = case
    ops = CpuOps(num_threads=2)
    ops.direct_parallel = True
    X = rng.normal(size=(N, C, H, W)).astype(dtype)
    Wt = rng.normal(size=(Co, C, kh, kw)).astype(dtype)
    b = rng.normal(size=Co).astype(dtype)
    Zr, adjoint = direct_reference(X, Wt, pad)
    Zr = Zr + b[None, :, None, None]
    Ar = np.maximum(Zr, 0) if activation == "relu" else Zr
    A = np.full(Zr.shape, np.nan, dtype)
    ops.direct_conv_forward(X, Wt, A, pad, b=b, activation=activation)
    dA = rng.normal(size=Zr.shape).astype(dtype)
    # Δ from the kernel's own A, so that the mask is the one it applies
    dZ = np.where(A > 0, dA, 0) if activation == "relu" else dA
    dXr, dWr = adjoint(dZ)
    dbr = dZ.astype(np.float64).sum(axis=(0, 2, 3))
    dW, dX = np.full(Wt.shape, np.nan, dtype), np.full(X.shape, np.nan, dtype)
    db = np.full(Co, np.nan, dtype)
    ops.direct_conv_backward(X, dA, Wt, dW, dX, pad, activation=activation, A=A, db=db)
    tol = 1e-12 if dtype == "float64" else 1e-4
    for name, got, want in (("A", A, Ar), ("dX", dX, dXr), ("dW", dW, dWr), ("db", db, dbr)):
        err = np.abs(got - want).max() / max(np.abs(want).max(), 1e-300)
        assert err <= tol, f"{name}: relative error {err:.3g} > {tol}"
    # accumulate adds to db as to dW
    db2 = np.ones(Co, dtype)
    ops.direct_conv_backward(X, dA, Wt, dW.copy(), None, pad, accumulate=True, activation=activation,
                             A=A, db=db2)
    assert np.abs(db2 - 1 - dbr).max() <= tol * max(np.abs(dbr).max(), 1.0) * 4
    # the serial kernels give the same bits
    ops.direct_parallel = False
    A1, db1 = np.empty_like(A), np.empty_like(db)
    dW1, dX1 = np.empty_like(dW), np.empty_like(dX)
    ops.direct_conv_forward(X, Wt, A1, pad, b=b, activation=activation)
    ops.direct_conv_backward(X, dA, Wt, dW1, dX1, pad, activation=activation, A=A, db=db1)
    for got, want in ((A1, A), (db1, db), (dW1, dW), (dX1, dX)):
        assert np.array_equal(got, want)


@pytest.mark.parametrize("k,Co,pad", [(3, 5, 1), (5, 9, 2)], ids=["3x3", "5x5-blocked"])
def test_direct_kernels_do_not_depend_on_the_thread_count(rng, k, Co, pad):
    """One thread; two halves on the calling and the worker thread (``direct_halves``, the
    default with 2+ threads); the batch over Numba's threads (``direct_parallel``); the 5-wide
    kernels in register blocks of 4 or 2 planes (``direct_block``, 9 planes: blocks of 4, 2, 1
    or 2, 1): the same bits."""
    X = rng.normal(size=(13, 3, 8, 9)).astype(np.float32)
    Wt = rng.normal(size=(Co, 3, k, k)).astype(np.float32)
    dZ = rng.normal(size=(13, Co, 8, 9)).astype(np.float32)
    out = []
    for threads, parallel, halves, block in ((1, False, True, 4), (2, False, True, 4),
                                             (2, False, False, 2), (2, False, True, 2),
                                             (2, True, True, 4), (3, True, True, 2)):
        ops = CpuOps(num_threads=threads)
        ops.direct_parallel, ops.direct_halves, ops.direct_block = parallel, halves, block
        Z, dW, dX = np.empty_like(dZ), np.empty_like(Wt), np.empty_like(X)
        ops.direct_conv_forward(X, Wt, Z, pad)
        ops.direct_conv_backward(X, dZ, Wt, dW, dX, pad)
        out.append((Z, dW, dX))
    for other in out[1:]:
        for a, b in zip(out[0], other, strict=True):
            assert np.array_equal(a, b)


def test_direct_kernels_check_their_arguments():
    ops = CpuOps()
    X, Wt = np.zeros((2, 3, 5, 5), np.float32), np.zeros((4, 3, 3, 3), np.float32)
    with pytest.raises(ValueError, match="Z: expected shape"):
        ops.direct_conv_forward(X, Wt, np.zeros((2, 4, 5, 5), np.float32), 0)
    with pytest.raises(ValueError, match="W: expected 3 input channels"):
        ops.direct_conv_forward(X, Wt[:, :2].copy(), np.zeros((2, 4, 3, 3), np.float32), 0)
    with pytest.raises(TypeError, match="float32 or float64"):
        ops.direct_conv_forward(X.astype(np.int32), Wt, np.zeros((2, 4, 3, 3), np.float32), 0)
    with pytest.raises(ValueError, match="padding"):
        ops.direct_conv_forward(X, Wt, np.zeros((2, 4, 3, 3), np.float32), -1)
    with pytest.raises(ValueError, match="dW: expected shape"):
        ops.direct_conv_backward(X, np.zeros((2, 4, 3, 3), np.float32), Wt,
                                 np.zeros((4, 3, 3, 2), np.float32), None, 0)
    dZ, dW = np.zeros((2, 4, 3, 3), np.float32), np.zeros((4, 3, 3, 3), np.float32)
    with pytest.raises(ValueError, match="activation: expected one of"):
        ops.direct_conv_forward(X, Wt, dZ, 0, activation="tanh")
    with pytest.raises(ValueError, match="b: expected shape"):
        ops.direct_conv_forward(X, Wt, dZ, 0, b=np.zeros(3, np.float32))
    with pytest.raises(ValueError, match="A: the forward's output"):
        ops.direct_conv_backward(X, dZ, Wt, dW, None, 0, activation="relu")
    with pytest.raises(ValueError, match="A: expected shape"):
        ops.direct_conv_backward(X, dZ, Wt, dW, None, 0, activation="relu", A=dZ[:1].copy())
    with pytest.raises(ValueError, match="db: expected shape"):
        ops.direct_conv_backward(X, dZ, Wt, dW, None, 0, db=np.zeros(3, np.float32))


# Layers the direct path takes, forced, (in, out, k, keywords, H x W).
LAYER_CASES = [
    (1, 6, 5, {"padding": 2, "activation": "relu"}, (9, 8)),
    (6, 16, 5, {"activation": "tanh"}, (7, 6)),
    (3, 4, (2, 3), {"padding": (1, 0), "bias": False, "activation": "gelu"}, (5, 7)),
    (2, 3, 3, {}, (4, 4)),
]


@pytest.mark.parametrize("case", LAYER_CASES, ids=[str(i) for i in range(len(LAYER_CASES))])
def test_conv2d_direct_matches_torch(rng, case):
    torch = pytest.importorskip("torch")
    ci, co, k, kw, (H, W) = case
    layer = gb.Conv2d(ci, co, k, **kw)
    layer.direct = True
    N = 11
    X = rng.normal(size=(N, ci, H, W))
    dY = rng.normal(size=(N, *layer.build((ci, H, W))))
    params = random_params(rng, layer)
    Y, dX, grads = run_layer(FUSED, layer, X, dY, params=params)
    Yt, dXt, gt = torch_grads(torch, torch_conv(torch, layer), X, dY, params)
    assert_close(Y, Yt, what="Y")
    assert_close(dX, dXt, what="dX")
    for name in params:
        assert_close(grads[name], gt[name], what=f"d{name}")


def test_conv2d_direct_gradients_are_central_differences(rng):
    layer = gb.Conv2d(2, 3, 3, padding=1, activation="tanh")
    layer.direct = True
    model = model_for(FUSED, [layer], input_shape=(2, 4, 5))
    layer = model.layers[0]
    be = model.backend
    X = rng.normal(size=(3, 2, 4, 5))
    dY = rng.normal(size=(3, 3, 4, 5))

    def loss():
        Y, _ = model.forward(be.to_device(X), train=True)
        return float((np.asarray(Y) * dY).sum())

    model.zero_grads()
    _, bp = model.forward(be.to_device(X), train=True)
    dX = np.array(bp(be.to_device(dY)))
    assert layer._direct()
    for name in ("weight", "bias"):
        got = np.array(layer.grads[name])
        want = central_differences(loss, layer.params[name])
        assert np.abs(got - want).max() <= 1e-6 * max(1.0, np.abs(want).max())
    want = central_differences(loss, X)
    assert np.abs(dX - want).max() <= 1e-6 * max(1.0, np.abs(want).max())


def test_conv2d_direct_rule():
    """'auto': the fused CPU set, fp32 models, stride 1, no dilation, one group, not 1x1, at most 16
    channels out and 3 in, or 8 in for 5-wide kernels (both of LeNet-5's layers); True forces it
    where the shape allows; the reference set offers none."""
    def chosen(layer, shape, kernels="fused", direct="auto", dtype="float32"):
        layer.direct = direct
        model = gb.Sequential([layer], device="cpu", dtype=dtype, kernels=kernels, input_shape=shape)
        assert model.backend.ops is not None  # (binds the layers)
        return model.layers[0]._direct()

    assert chosen(gb.Conv2d(1, 6, 5, padding=2), (1, 28, 28))
    assert chosen(gb.Conv2d(3, 16, 5), (3, 14, 14))
    assert chosen(gb.Conv2d(6, 16, 5), (6, 14, 14))
    assert chosen(gb.Conv2d(8, 16, 5), (8, 14, 14))
    assert not chosen(gb.Conv2d(9, 16, 5), (9, 14, 14))
    assert not chosen(gb.Conv2d(6, 32, 5), (6, 14, 14))
    assert not chosen(gb.Conv2d(6, 16, 3), (6, 14, 14))
    assert chosen(gb.Conv2d(6, 16, 3), (6, 14, 14), direct=True)
    assert not chosen(gb.Conv2d(3, 32, 3, padding=1), (3, 32, 32))
    assert not chosen(gb.Conv2d(8, 16, 3), (8, 9, 9))
    assert chosen(gb.Conv2d(8, 32, 3), (8, 9, 9), direct=True)
    assert not chosen(gb.Conv2d(6, 16, 5), (6, 14, 14), direct=False)
    assert not chosen(gb.Conv2d(6, 16, 5), (6, 14, 14), kernels="reference")
    assert not chosen(gb.Conv2d(6, 16, 5), (6, 14, 14), kernels="reference", direct=True)
    for kw in ({"stride": 2}, {"dilation": 2}, {"groups": 2}):
        assert not chosen(gb.Conv2d(4, 4, 3, **kw), (4, 9, 9), direct=True)
    assert not chosen(gb.Conv2d(4, 4, 1), (4, 9, 9), direct=True)  # 1x1: no columns anyway
    layer = gb.Conv2d(1, 6, 5)
    with pytest.raises(ValueError, match="direct: expected 'auto', True or False"):
        chosen(layer, (1, 9, 9), direct="yes")
