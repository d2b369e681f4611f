"""Checks shared by test_kernels_cpu.py and test_kernels_cuda.py: a fused op against ReferenceOps.

Each ``check_*`` runs the fused set ``ops`` on device copies (``dev``: numpy -> the set's array
type) of random host inputs, the NumPy reference on host copies, and compares. float32 must agree
within 1e-6 relative, float64 within 1e-12; the absolute floor is the same fraction of the largest
reference value, for elements where the formula itself cancels (gelu's tail, a small loss).
"""

import numpy as np
import pytest

from gpubackprop.backend import to_numpy
from gpubackprop.kernels.reference import ACTIVATIONS, ReferenceOps, saves_input

DTYPES = [np.float32, np.float64]
RTOL = {np.dtype(np.float32): 1e-6, np.dtype(np.float64): 1e-12}
REF = ReferenceOps(np)


def host(a):
    """A CPU set's input: a C-contiguous NumPy array (the CPU test files' ``dev``)."""
    return np.ascontiguousarray(a)


@pytest.fixture(params=["serial", "parallel"], scope="module", name="ops")
def cpu_ops(request):
    """The fused CPU set for the CPU kernel test files (imported there as their ``ops``), serial
    and with its parallel kernels forced by a zero threshold: 3 chunks, uneven splits anywhere."""
    from gpubackprop.kernels.cpu import CpuOps

    if request.param == "parallel":
        return CpuOps(np, num_threads=3, parallel_min=0)
    return CpuOps(np, num_threads=1)


def assert_close(got, ref, what=""):
    got = to_numpy(got)
    ref = np.asarray(ref)
    assert got.dtype == ref.dtype, f"{what}: dtype {got.dtype}, reference {ref.dtype}"
    rtol = RTOL[ref.dtype]
    finite = np.abs(ref[np.isfinite(ref)])
    atol = rtol * float(finite.max()) if finite.size else 0.0
    np.testing.assert_allclose(got, ref, rtol=rtol, atol=atol, equal_nan=True, err_msg=what)


def assert_same_nan(got, ref, what=""):
    got = to_numpy(got)
    np.testing.assert_array_equal(np.isnan(got), np.isnan(ref), err_msg=f"{what}: NaN positions")


def random(rng, shape, dtype, scale=3.0):
    return (rng.standard_normal(shape) * scale).astype(dtype)


# ---- activations --------------------------------------------------------------------------------
def check_bias_act(ops, dev, rng, shape, dtype, activation, in_place=False):
    Z = random(rng, shape, dtype)
    b = random(rng, shape[1], dtype, 1.0)
    Zr, Ar = Z.copy(), np.empty_like(Z)
    REF.bias_act(Zr, b, activation, Ar)
    Zd = dev(Z)
    Ad = Zd if in_place else dev(np.empty_like(Z))
    out = ops.bias_act(Zd, dev(b), activation, Ad)
    assert out is Ad
    assert_close(Ad, Ar, f"bias_act {activation} A")
    if not in_place:
        assert_close(Zd, Zr, f"bias_act {activation}: Z += b in place")


def check_act_backward(ops, dev, rng, shape, dtype, activation, in_place=False):
    Z = random(rng, shape, dtype)
    saved = Z if saves_input(activation) else REF.bias_act(Z.copy(), np.zeros(shape[1], dtype),
                                                             activation, np.empty_like(Z))
    dA = random(rng, shape, dtype, 1.0)
    ref = REF.act_backward(dA, saved, activation, np.empty_like(dA))
    dAd = dev(dA)
    dZd = dAd if in_place else dev(np.empty_like(dA))
    out = ops.act_backward(dAd, dev(saved), activation, dZd)
    assert out is dZd
    assert_close(dZd, ref, f"act_backward {activation}")


def _bits(a):
    a = to_numpy(a)
    return a.view(np.uint32 if a.dtype == np.float32 else np.uint64)


def check_activation(ops, dev, rng, shape, dtype, activation, in_place=False, edges=False):
    """A = σ(X) alone: within tolerance of the reference, X left as it was (unless A is X), and
    bit for bit what the set's bias_act gives with a bias of -0.0 (the Activation layer's old path)."""
    X = np.array([EDGE], dtype) if edges else random(rng, shape, dtype)
    with np.errstate(all="ignore"):  # gelu(-inf) = -inf · 0 is NaN, in both
        Ar = REF.activation(X.copy(), activation, np.empty_like(X))
        rows = X.reshape(-1, X.shape[-1])
        old = ops.bias_act(dev(rows.copy()), dev(np.full(rows.shape[1], -0.0, dtype)), activation,
                           dev(np.empty_like(rows)))
        Xd = dev(X.copy())
        Ad = Xd if in_place else dev(np.empty_like(X))
        out = ops.activation(Xd, activation, Ad)
    assert out is Ad
    if edges:
        assert_same_nan(Ad, Ar, f"activation {activation} edges")
    assert_close(Ad, Ar, f"activation {activation}")
    if not in_place:
        np.testing.assert_array_equal(_bits(Xd), _bits(X), err_msg=f"activation {activation}: X")
    np.testing.assert_array_equal(_bits(Ad).reshape(-1), _bits(old).reshape(-1),
                                  err_msg=f"activation {activation}: bias_act(X, -0.0)'s bits")


EDGE = [0.0, -0.0, 1e-30, -1e-30, 1e-5, -1e-5, 0.5, -0.5, 20.0, -20.0, 101.0, -101.0, 150.0,
        -150.0, 1e4, -1e4, np.nan, np.inf, -np.inf]


def check_edges(ops, dev, dtype, activation):
    """z = 0, |z| > 100, ±inf and NaN: forward and backward agree with the reference."""
    Z = np.array([EDGE], dtype=dtype)
    b = np.zeros(Z.shape[1], dtype)
    with np.errstate(all="ignore"):  # gelu(-inf) = -inf · 0 is NaN, in both
        Ar = REF.bias_act(Z.copy(), b, activation, np.empty_like(Z))
        Ad = ops.bias_act(dev(Z.copy()), dev(b), activation, dev(np.empty_like(Z)))
    assert_same_nan(Ad, Ar, f"bias_act {activation}")
    assert_close(Ad, Ar, f"bias_act {activation} edges")
    A = to_numpy(Ad)
    assert np.isnan(A[0, EDGE.index(np.nan)]), f"{activation}(NaN) must be NaN"
    if activation in ("sigmoid", "tanh"):
        finite = np.isfinite(Z)
        assert np.all(np.isfinite(A[finite])), f"{activation} overflowed: {A}"
        top = A[0, EDGE.index(150.0)]
        assert top == 1, f"{activation}(150) = {top}"
    if activation == "relu":
        assert A[0, 0] == 0 and A[0, EDGE.index(-1e4)] == 0 and A[0, EDGE.index(1e4)] == 1e4

    # Backward: a NaN in dA propagates wherever the reference lets it; NaN in saved likewise.
    saved = Z if saves_input(activation) else Ar
    dA = np.linspace(-1, 1, Z.size).astype(dtype).reshape(Z.shape)
    dA[0, 3] = np.nan
    dA[0, 12] = np.nan  # saved > 0 there for every activation but gelu's z = 150 (also fine)
    with np.errstate(all="ignore"):
        ref = REF.act_backward(dA, saved, activation, np.empty_like(dA))
        got = ops.act_backward(dev(dA), dev(saved), activation, dev(np.empty_like(dA)))
    assert_same_nan(got, ref, f"act_backward {activation}")
    assert_close(got, ref, f"act_backward {activation} edges")
    assert np.isnan(to_numpy(got)[0, 12]), f"act_backward {activation}: NaN in dA was dropped"


# ---- softmax + cross-entropy --------------------------------------------------------------------
def check_softmax_ce(ops, dev, rng, shape, dtype, scale=3.0, in_place=False):
    B, C = shape
    logits = random(rng, shape, dtype, scale)
    labels = rng.integers(0, C, size=B)
    dl_r, loss_r = np.empty_like(logits), np.empty(B, dtype)
    REF.softmax_ce(logits, labels, dl_r, loss_r)
    ld = dev(logits)
    dl = ld if in_place else dev(np.empty_like(logits))
    loss = dev(np.empty(B, dtype))
    out = ops.softmax_ce(ld, dev(labels), dl, loss)
    assert out[0] is dl and out[1] is loss
    assert_close(dl, dl_r, "softmax_ce dlogits")
    assert_close(loss, loss_r, "softmax_ce loss rows")
    assert np.all(np.isfinite(to_numpy(loss)))


# ---- bias gradient -----------------------------------------------------------------------------
def check_bias_grad(ops, dev, rng, shape, dtype):
    dZ = random(rng, shape, dtype)
    ref = REF.bias_grad(dZ, np.empty(shape[1], dtype))
    dZd = dev(dZ)
    db1, db2 = dev(np.empty(shape[1], dtype)), dev(np.empty(shape[1], dtype))
    assert ops.bias_grad(dZd, db1) is db1
    ops.bias_grad(dZd, db2)
    assert_close(db1, ref, "bias_grad")
    np.testing.assert_array_equal(to_numpy(db1), to_numpy(db2), "bias_grad is not deterministic")
    start = random(rng, shape[1], dtype)
    acc_r = REF.bias_grad(dZ, start.copy(), accumulate=True)
    acc = dev(start.copy())
    ops.bias_grad(dZd, acc, accumulate=True)
    assert_close(acc, acc_r, "bias_grad accumulate")


# ---- norms and optimizers ----------------------------------------------------------------------
def check_sq_norm_clip(ops, dev, rng, n, dtype):
    g = random(rng, n, dtype, 0.1)
    gd = dev(g)
    got = ops.sq_norm(gd)
    assert got.shape == (1,) and got.dtype == np.dtype(dtype)
    # The reference's own float32 dot has rounding of order sqrt(n)·eps; ours sums in float64.
    tol = RTOL[np.dtype(dtype)] * (1 if dtype == np.float64 else max(1.0, np.sqrt(n) / 64))
    exact = np.dot(g.astype(np.float64), g.astype(np.float64))
    np.testing.assert_allclose(to_numpy(got)[0], exact, rtol=tol)
    assert_close(got, REF.sq_norm(g), "sq_norm")
    np.testing.assert_array_equal(to_numpy(ops.sq_norm(gd)), to_numpy(got), "sq_norm determinism")
    norm = float(np.sqrt(exact))
    for clip in (norm / 3, norm * 3):
        ref = REF.clip_scale(g, clip, np.empty(1, dtype))
        scale = dev(np.full(1, -1, dtype))
        assert ops.clip_scale(gd, clip, scale) is scale
        assert_close(scale, ref, f"clip_scale clip_norm={clip}")
    assert to_numpy(scale)[0] == 1


OPTIMIZER_CASES = [
    ("sgd", dict(lr=0.1, momentum=0.0, nesterov=False, weight_decay=0.0)),
    ("sgd", dict(lr=0.1, momentum=0.9, nesterov=False, weight_decay=0.0)),
    ("sgd", dict(lr=0.05, momentum=0.9, nesterov=True, weight_decay=1e-2)),
    ("rmsprop", dict(lr=0.01, alpha=0.99, eps=1e-8, weight_decay=0.0, momentum=0.0)),
    ("rmsprop", dict(lr=0.01, alpha=0.9, eps=1e-6, weight_decay=1e-2, momentum=0.9)),
    ("adam", dict(lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0, decoupled=False)),
    ("adam", dict(lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=1e-2, decoupled=False)),
    ("adam", dict(lr=1e-2, beta1=0.8, beta2=0.99, eps=1e-8, weight_decay=0.1, decoupled=True)),
]
OPTIMIZER_IDS = [f"{name}-{i}" for i, (name, _) in enumerate(OPTIMIZER_CASES)]


def check_optimizer(ops, dev, rng, n, dtype, name, kw, clip=True):
    """Two steps of ``name`` with a clip scale < 1 (from clip_scale) against the reference."""
    p = random(rng, n, dtype, 1.0)
    state_names = {"sgd": ["buf"], "rmsprop": ["square_avg", "buf"], "adam": ["m", "v"]}[name]
    host = {"p": p.copy(), **{s: np.zeros(n, dtype) for s in state_names}}
    devs = {k: dev(v.copy()) for k, v in host.items()}
    for step in (1, 2):
        g = random(rng, n, dtype, 1.0)
        gd = dev(g)
        s_ref = np.ones(1, dtype)
        if clip:
            clip_norm = 0.5 * float(np.linalg.norm(g))
            REF.clip_scale(g, clip_norm, s_ref)
            assert s_ref[0] < 1
            own = ops.clip_scale(gd, clip_norm, dev(np.ones(1, dtype)))
            assert_close(own, s_ref, "clip_scale")
        # The same scale for both: clip_scale may differ in the last bit (its sum is float64),
        # and RMSprop's d / (sqrt(v) + eps) magnifies that where g·scale + wd·p cancels.
        s_dev = dev(s_ref.copy())
        extra = {"step": step} if name == "adam" else {}
        getattr(REF, name)(host["p"], g, *(host[s] for s in state_names), **kw, **extra,
                           scale=s_ref)
        out = getattr(ops, name)(devs["p"], gd, *(devs[s] for s in state_names), **kw, **extra,
                                 scale=s_dev)
        assert out is devs["p"]
        for k in host:
            assert_close(devs[k], host[k], f"{name} {kw} step {step}: {k}")


# ---- launcher errors ---------------------------------------------------------------------------
def check_errors(ops, dev):
    """Wrong dtype, mixed dtypes, non-contiguous, wrong shape: named in the message."""
    f32 = np.float32
    Z, b, A = (dev(np.zeros((4, 6), f32)), dev(np.zeros(6, f32)), dev(np.zeros((4, 6), f32)))
    with pytest.raises(TypeError, match=r"Z: expected a float32 or float64 array, got dtype int64"):
        ops.bias_act(dev(np.zeros((4, 6), np.int64)), b, "relu", A)
    with pytest.raises(TypeError, match=r"b: expected dtype float32 \(the dtype of Z\), got dtype float64"):
        ops.bias_act(Z, dev(np.zeros(6)), "relu", A)
    with pytest.raises(ValueError, match=r"A: expected a C-contiguous array"):
        ops.bias_act(Z, b, "relu", dev(np.zeros((6, 4), f32)).T)
    with pytest.raises(ValueError, match=r"b: expected shape \(6,\), got shape \(5,\)"):
        ops.bias_act(Z, dev(np.zeros(5, f32)), "relu", A)
    with pytest.raises(ValueError, match=r"A: expected shape \(4, 6\), got shape \(4, 5\)"):
        ops.bias_act(Z, b, "relu", dev(np.zeros((4, 5), f32)))
    with pytest.raises(ValueError, match=r"activation: expected one of .*got 'softplus'"):
        ops.bias_act(Z, b, "softplus", A)
    with pytest.raises(TypeError, match=r"X: expected a float32 or float64 array, got dtype int64"):
        ops.activation(dev(np.zeros((4, 6), np.int64)), "relu", A)
    with pytest.raises(ValueError, match=r"A: expected shape \(4, 6\) \(the shape of X\), got"):
        ops.activation(Z, "relu", dev(np.zeros((4, 5), f32)))
    with pytest.raises(ValueError, match=r"A: expected a C-contiguous array"):
        ops.activation(Z, "relu", dev(np.zeros((6, 4), f32)).T)
    with pytest.raises(ValueError, match=r"activation: expected one of .*got 'softplus'"):
        ops.activation(Z, "softplus", A)
    with pytest.raises(ValueError, match=r"saved: expected shape \(4, 6\) \(the shape of dA\)"):
        ops.act_backward(Z, dev(np.zeros((4, 5), f32)), "tanh", A)
    with pytest.raises(TypeError, match=r"dZ: expected dtype float32 \(the dtype of dA\), got dtype float64"):
        ops.act_backward(Z, A, "tanh", dev(np.zeros((4, 6))))
    with pytest.raises(TypeError, match=r"labels: expected an integer array .*got dtype float32"):
        ops.softmax_ce(Z, dev(np.zeros(4, f32)), A, dev(np.zeros(4, f32)))
    with pytest.raises(ValueError, match=r"labels: expected shape \(4,\), got shape \(3,\)"):
        ops.softmax_ce(Z, dev(np.zeros(3, np.int64)), A, dev(np.zeros(4, f32)))
    with pytest.raises(ValueError, match=r"loss_rows: expected shape \(4,\), got shape \(6,\)"):
        ops.softmax_ce(Z, dev(np.zeros(4, np.int64)), A, b)
    with pytest.raises(ValueError, match=r"db: expected shape \(6,\), got shape \(4,\)"):
        ops.bias_grad(Z, dev(np.zeros(4, f32)))
    with pytest.raises(ValueError, match=r"dZ: expected a C-contiguous array"):
        ops.bias_grad(dev(np.zeros((6, 4), f32)).T, b)
    p, g, s = dev(np.zeros(6, f32)), dev(np.zeros(6, f32)), dev(np.ones(1, f32))
    with pytest.raises(TypeError, match=r"g: expected dtype float32 \(the dtype of p\), got dtype float64"):
        ops.sgd(p, dev(np.zeros(6)), p, 0.1, 0.0, False, 0.0, s)
    with pytest.raises(ValueError, match=r"g: expected shape \(6,\) \(the shape of p\), got shape \(5,\)"):
        ops.adam(p, dev(np.zeros(5, f32)), p, p, 1e-3, 0.9, 0.999, 1e-8, 0.0, False, 1, s)
    with pytest.raises(ValueError, match=r"scale: expected a 1-element array, got shape \(2,\)"):
        ops.rmsprop(p, g, p, p, 0.01, 0.99, 1e-8, 0.0, 0.0, dev(np.ones(2, f32)))
    with pytest.raises(ValueError, match=r"g: expected a C-contiguous array"):
        ops.sq_norm(dev(np.zeros(12, f32))[::2])
    with pytest.raises(ValueError, match=r"g: expected a 1-D \(flat\) array, got shape \(4, 6\)"):
        ops.clip_scale(Z, 1.0, s)


ALL_ACTIVATIONS = list(ACTIVATIONS)
