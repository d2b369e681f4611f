"""Winograd F(2x2, 3x3): the reference transforms composed into a convolution against the direct
convolution (naive loops), the fused CPU transforms against the reference, and Conv2d's Winograd
path against its im2col + GEMM path and PyTorch, forward and every gradient, with ragged sizes.

Tolerances in float32. The direct convolution sums K products (K = 9·C_in for Z and dX's 9·C_out,
N·OH·OW for dW), so its rounding error is at most about K·u·S with u = 2⁻²⁴ and S the same sum
of absolute values (|W| * |X|) at that element. Winograd's transforms have entries 0, ±1, ±½:
V = BᵀdB and U = GgGᵀ are sums of at most 16 and 9 terms, the output AᵀMA of 9, each rounded, and
M's sums over C_in run on values at most 4·max|d| by 2.25·max|g|, so its error is bounded by the
same K·u·S times a small constant (Barabasz et al., "Error analysis and improving the accuracy of
Winograd convolution", 2020: ~2x the direct one's for F(2x2, 3x3)), except that a transform mixes
the sums of neighbouring elements (a weight gradient entry that reads only padding, exactly 0,
still takes rounding from its filter's other entries), so S is taken as the array's largest. The
tests take 16·K·u·max(S), a bound no correct implementation can exceed, and a tighter typical
check (the max error relative to the output's scale, 2e-5, where random data sits near 1e-6). In
float64 both paths are within 1e-12 of each other relative to the scale, far inside the 1e-10 at
which the layer must equal PyTorch.
"""

import numpy as np
import pytest
from kernel_cases import cpu_ops  # noqa: F401  (the ops fixture: the fused CPU set)
from layer_cases import assert_close, model_for, run_layer, torch_grads

import gpubackprop as gb
from gpubackprop.kernels.reference import ReferenceOps
from gpubackprop.kernels.reference.winograd import TILE_PAD, tiles

REF = ReferenceOps(np)
U32 = 2.0 ** -24
DTYPES = [np.float32, np.float64]

# (N, C_in, C_out, H, W, padding): odd sizes (a ragged last tile row and column), no padding,
# padding 2 and 3 (tiles wholly in the padding), a 1x1 and a 1x2 output, a single tile.
CASES = [
    (2, 3, 4, 7, 9, (1, 1)),
    (3, 5, 2, 6, 5, (0, 2)),
    (1, 2, 3, 3, 4, (0, 0)),
    (2, 3, 3, 1, 2, (1, 1)),
    (2, 2, 2, 8, 8, (3, 1)),
    (1, 4, 5, 4, 3, (1, 0)),
    (2, 17, 16, 10, 11, (1, 1)),
]


def case_id(case):
    N, ci, co, H, W, (ph, pw) = case
    return f"{N}x{ci}x{H}x{W}-to-{co}-pad{ph}{pw}"


def naive_conv(X, Wt, padding):
    """The direct 3x3 stride-1 convolution by its definition, float64."""
    (ph, pw), (N, H, W) = padding, (X.shape[0], *X.shape[2:])
    Xp = np.pad(X, ((0, 0), (0, 0), (ph, ph), (pw, pw)))
    OH, OW = H + 2 * ph - 2, W + 2 * pw - 2
    Z = np.zeros((N, Wt.shape[0], OH, OW))
    for i in range(3):
        for j in range(3):
            Z += np.einsum("oc,ncst->nost", Wt[:, :, i, j], Xp[:, :, i:i + OH, j:j + OW])
    return Z


def naive_grads(X, Wt, dZ, padding):
    """dX and dW of ``naive_conv`` for the output gradient dZ, by their definitions."""
    (ph, pw), (H, W) = padding, X.shape[2:]
    OH, OW = dZ.shape[2:]
    Xp = np.pad(X, ((0, 0), (0, 0), (ph, ph), (pw, pw)))
    dXp, dW = np.zeros_like(Xp), np.zeros(Wt.shape)
    for i in range(3):
        for j in range(3):
            dXp[:, :, i:i + OH, j:j + OW] += np.einsum("oc,nost->ncst", Wt[:, :, i, j], dZ)
            dW[:, :, i, j] = np.einsum("nost,ncst->oc", dZ, Xp[:, :, i:i + OH, j:j + OW])
    return dXp[:, :, ph:ph + H, pw:pw + W], dW


def winograd_conv(ops, X, Wt, dZ, padding):
    """Z, dX, dW by the transforms of ``ops`` and the 16 GEMMs, as Conv2d composes them."""
    N, C, H, W = X.shape
    Co = Wt.shape[0]
    OH, OW, TH, TW = tiles(H, W, padding)
    P = N * TH * TW
    U = ops.winograd_filter(Wt, np.empty((16, Co, C), X.dtype))
    V = ops.winograd_input(X, np.empty((16, C, P), X.dtype), padding)
    Z = ops.winograd_output(np.matmul(U, V), np.empty((N, Co, OH, OW), X.dtype))
    dM = ops.winograd_output_backward(dZ, np.empty((16, Co, P), X.dtype))
    dW = ops.winograd_filter_backward(np.matmul(dM, V.transpose(0, 2, 1)), np.empty_like(Wt))
    dX = ops.winograd_input_backward(np.matmul(U.transpose(0, 2, 1), dM), np.empty_like(X), padding)
    return Z, dX, dW


def random_case(rng, case, dtype):
    N, ci, co, H, W, padding = case
    X = rng.standard_normal((N, ci, H, W)).astype(dtype)
    Wt = rng.standard_normal((co, ci, 3, 3)).astype(dtype)
    OH, OW = tiles(H, W, padding)[:2]
    dZ = rng.standard_normal((N, co, OH, OW)).astype(dtype)
    return X, Wt, dZ


def check_float32_error(got, exact, abs_sum, K, what):
    """The bound 16·K·u·max(S) and the typical 2e-5 of the scale (module docstring)."""
    err = float(np.abs(got.astype(np.float64) - exact).max())
    bound = 16 * K * U32 * float(abs_sum.max())
    assert err <= bound, f"{what}: error {err:.3e} above the rounding bound {bound:.3e}"
    assert_close(got.astype(np.float64), exact, tol=2e-5, what=what)


# ---- the reference transforms compose into the convolution --------------------------------------
@pytest.mark.parametrize("case", CASES, ids=[case_id(c) for c in CASES])
def test_reference_winograd_is_the_direct_convolution_float64(rng, case):
    X, Wt, dZ = random_case(rng, case, np.float64)
    padding = case[-1]
    Z, dX, dW = winograd_conv(REF, X, Wt, dZ, padding)
    dXn, dWn = naive_grads(X, Wt, dZ, padding)
    assert_close(Z, naive_conv(X, Wt, padding), tol=1e-12, what="Z")
    assert_close(dX, dXn, tol=1e-12, what="dX")
    assert_close(dW, dWn, tol=1e-12, what="dW")


@pytest.mark.parametrize("case", CASES, ids=[case_id(c) for c in CASES])
def test_winograd_float32_error_is_within_the_rounding_bound(ops, rng, case):
    N, ci, co, H, W, padding = case
    X, Wt, dZ = random_case(rng, case, np.float32)
    X64, W64, dZ64 = (a.astype(np.float64) for a in (X, Wt, dZ))
    dXn, dWn = naive_grads(X64, W64, dZ64, padding)
    aX, aW, adZ = np.abs(X64), np.abs(W64), np.abs(dZ64)
    adX, adW = naive_grads(aX, aW, adZ, padding)
    OH, OW = dZ.shape[2:]
    for which in (REF, ops):
        Z, dX, dW = winograd_conv(which, X, Wt, dZ, padding)
        assert Z.dtype == dX.dtype == dW.dtype == np.float32
        check_float32_error(Z, naive_conv(X64, W64, padding), naive_conv(aX, aW, padding), 9 * ci, "Z")
        check_float32_error(dX, dXn, adX, 9 * co, "dX")
        check_float32_error(dW, dWn, adW, N * OH * OW, "dW")


# ---- the fused CPU transforms against the reference --------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", CASES, ids=[case_id(c) for c in CASES])
def test_fused_transforms_match_the_reference(ops, rng, case, dtype):
    N, ci, co, H, W, padding = case
    OH, OW, TH, TW = tiles(H, W, padding)
    P = N * TH * TW
    tol = 1e-6 if dtype == np.float32 else 1e-14
    X, Wt, dZ = random_case(rng, case, dtype)
    V, M = (rng.standard_normal(s).astype(dtype) for s in ((16, ci, P), (16, co, P)))
    dU = rng.standard_normal((16, co, ci)).astype(dtype)

    def both(name, *args, out, **kw):
        # Outputs start as NaN: every element must be written.
        got = getattr(ops, name)(*args, np.full(out, np.nan, dtype), **kw)
        ref = getattr(REF, name)(*args, np.full(out, np.nan, dtype), **kw)
        assert got.dtype == dtype
        assert_close(got, ref, tol=tol, what=name)

    both("winograd_filter", Wt, out=(16, co, ci))
    both("winograd_input", X, out=(16, ci, P), padding=padding)
    both("winograd_input_backward", V, out=X.shape, padding=padding)
    both("winograd_output", M, out=dZ.shape)
    both("winograd_output_backward", dZ, out=(16, co, P))
    both("winograd_filter_backward", dU, out=Wt.shape)
    for which in (ops, REF):  # accumulate adds to what is there
        dW = np.ones_like(Wt)
        which.winograd_filter_backward(dU, dW, accumulate=True)
        assert_close(dW - 1, REF.winograd_filter_backward(dU, np.empty_like(Wt)), tol=tol * 4)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", CASES, ids=[case_id(c) for c in CASES])
def test_output_transforms_fuse_the_bias_and_its_gradient(ops, rng, case, dtype):
    """winograd_output(M, Z, b=) adds b[o] as the separate bias pass does (the same bits in the
    fused set), and applies ReLU where asked; winograd_output_backward(dZ, dM, db=) also sums dZ per channel (BP4), in float64,
    into a db of dZ's dtype or float64, accumulating where asked; dM is unchanged by it."""
    N, ci, co, H, W, padding = case
    OH, OW, TH, TW = tiles(H, W, padding)
    P = N * TH * TW
    tol = 1e-6 if dtype == np.float32 else 1e-14
    M = rng.standard_normal((16, co, P)).astype(dtype)
    dZ = rng.standard_normal((N, co, OH, OW)).astype(dtype)
    b = rng.standard_normal(co).astype(dtype)
    exact = dZ.astype(np.float64).sum(axis=(0, 2, 3))
    for which in (ops, REF):
        Z = which.winograd_output(M, np.full(dZ.shape, np.nan, dtype), b=b)
        plain = which.winograd_output(M, np.empty_like(dZ))
        np.testing.assert_array_equal(Z, plain + b.reshape(1, co, 1, 1))
        assert_close(Z, REF.winograd_output(M, np.empty_like(dZ), b=b), tol=tol, what="Z + b")
        for bias in (b, None):  # ReLU in the same pass, with and without a bias
            A = which.winograd_output(M, np.full(dZ.shape, np.nan, dtype), b=bias, activation="relu")
            np.testing.assert_array_equal(A, np.maximum(plain + (0 if bias is None else
                                                                 bias.reshape(1, co, 1, 1)), 0))
        dM0 = which.winograd_output_backward(dZ, np.empty((16, co, P), dtype))
        for db_dtype in (dtype, np.float64):
            db = np.full(co, np.nan, db_dtype)
            dM = which.winograd_output_backward(dZ, np.full((16, co, P), np.nan, dtype), db=db)
            np.testing.assert_array_equal(dM, dM0)
            assert db.dtype == db_dtype
            np.testing.assert_allclose(db, exact, rtol=1e-6 if db_dtype == np.float32 else 1e-13,
                                       atol=1e-6 if db_dtype == np.float32 else 1e-13)
            db0 = db.copy()
            which.winograd_output_backward(dZ, np.empty((16, co, P), dtype), db=db, accumulate=True)
            np.testing.assert_allclose(db, db0 + exact.astype(db_dtype), rtol=1e-6, atol=1e-5)
    # The fused set's sums: float64 throughout, so a float64 db is the exact sum's rounding.
    db = np.empty(co)
    ops.winograd_output_backward(dZ, np.empty((16, co, P), dtype), db=db)
    np.testing.assert_allclose(db, exact, rtol=1e-14, atol=1e-13)


def test_output_transform_bias_errors(ops):
    M, Z = np.zeros((16, 3, 18), np.float32), np.zeros((2, 3, 5, 5), np.float32)
    dZ = Z
    for which in (ops, REF):
        with pytest.raises(ValueError, match=r"b: expected shape \(3,\)"):
            which.winograd_output(M, Z, b=np.zeros(4, np.float32))
        with pytest.raises(ValueError, match=r"db: expected shape \(3,\)"):
            which.winograd_output_backward(dZ, M, db=np.zeros(2, np.float32))
    for which in (ops, REF):
        with pytest.raises(ValueError, match="activation: the Winograd output transform applies"):
            which.winograd_output(M, Z, activation="tanh")
    with pytest.raises(TypeError, match="b: expected a C-contiguous float32"):
        ops.winograd_output(M, Z, b=np.zeros(3, np.float64))
    with pytest.raises(TypeError, match="db: expected a C-contiguous float32 or float64"):
        ops.winograd_output_backward(dZ, M, db=np.zeros(3, np.int64))
    with pytest.raises(TypeError, match="db: expected"):
        ops.winograd_output_backward(dZ, M, db=np.zeros(6, np.float32)[::2])


@pytest.mark.parametrize("dtype", DTYPES)
def test_fused_transforms_take_tiles_with_rows_apart(ops, rng, dtype):
    """V, dV, M, dM as Conv2d lays them out: 16 C-contiguous rows TILE_PAD elements further apart."""
    N, ci, co, H, W, padding = CASES[0]
    OH, OW, TH, TW = tiles(H, W, padding)
    P = N * TH * TW
    X, _, dZ = random_case(rng, CASES[0], dtype)

    def apart(C):
        return np.full((16, C * P + TILE_PAD), np.nan, dtype)[:, :C * P].reshape(16, C, P)

    V, M = apart(ci), apart(co)
    ops.winograd_input(X, V, padding)
    assert_close(V, REF.winograd_input(X, np.empty((16, ci, P), dtype), padding), tol=1e-6)
    ops.winograd_output_backward(dZ, M)
    assert_close(M, REF.winograd_output_backward(dZ, np.empty((16, co, P), dtype)), tol=1e-6)
    dX = ops.winograd_input_backward(V, np.empty_like(X), padding)
    assert_close(dX, REF.winograd_input_backward(V, np.empty_like(X), padding), tol=1e-6)
    Z = ops.winograd_output(M, np.empty_like(dZ))
    assert_close(Z, REF.winograd_output(M, np.empty_like(dZ)), tol=1e-6)
    with pytest.raises(ValueError, match="V: expected 16 C-contiguous"):
        ops.winograd_input(X, np.zeros((16, P, ci), dtype).transpose(0, 2, 1), padding)


def test_transform_errors(ops):
    X, V = np.zeros((2, 3, 5, 5), np.float32), np.zeros((16, 3, 18), np.float32)
    for which in (ops, REF):
        with pytest.raises(ValueError, match=r"V: expected shape \(16, 3, 18\)"):
            which.winograd_input(X, np.zeros((16, 3, 17), np.float32), 1)
        with pytest.raises(ValueError, match="padding: expected non-negative"):
            which.winograd_input(X, V, -1)
        with pytest.raises(TypeError, match="padding: expected an int or a pair"):
            which.winograd_input(X, V, "same")
        with pytest.raises(ValueError, match="X: a 3x3 kernel with padding"):
            which.winograd_input(np.zeros((2, 3, 1, 5), np.float32), V, 0)
        with pytest.raises(ValueError, match=r"W: expected a \(C_out, C_in, 3, 3\)"):
            which.winograd_filter(np.zeros((2, 3, 5, 5), np.float32), np.zeros((16, 2, 3), np.float32))
        with pytest.raises(ValueError, match=r"M: expected shape \(16, 3, 18\)"):
            which.winograd_output(np.zeros((16, 2, 18), np.float32), np.zeros((2, 3, 5, 5), np.float32))
    with pytest.raises(TypeError):  # the fused set: float32 and float64 arrays, one dtype
        ops.winograd_input(X, V.astype(np.float64), 1)


# ---- Conv2d's Winograd path --------------------------------------------------------------------
# (C_in, C_out, H, W, keyword arguments): ragged sizes, paddings 0-2, every kind of activation,
# no bias; each run whole and in chunks.
LAYER_CASES = [
    (3, 4, 7, 9, {"padding": 1, "activation": "relu"}),
    (5, 6, 6, 5, {"padding": (0, 2), "activation": "tanh"}),
    (16, 16, 9, 8, {"padding": 1}),
    (2, 3, 3, 3, {"padding": 2, "bias": False, "activation": "gelu"}),
    (4, 3, 5, 4, {"activation": "sigmoid"}),
]


def layer_id(case):
    ci, co, H, W, kw = case
    return f"{ci}x{H}x{W}-to-{co}-" + "-".join(f"{k}{v}" for k, v in kw.items()).replace(" ", "")


def _set_chunks(layer, chunk):
    """At most ``chunk`` samples' Winograd tiles (V and M) at a time."""
    T = layer._tiles()[2]
    layer.max_cols_bytes = chunk * 16 * (layer.in_channels + layer.out_channels) * T * 8


@pytest.mark.parametrize("chunk", [5, 2], ids=["whole", "2-a-chunk"])
@pytest.mark.parametrize("case", LAYER_CASES, ids=[layer_id(c) for c in LAYER_CASES])
def test_conv2d_winograd_matches_torch_float64(backend_spec, rng, case, chunk):
    torch = pytest.importorskip("torch")
    from test_layers_conv import random_params, torch_conv

    ci, co, H, W, kw = case
    layer = gb.Conv2d(ci, co, 3, **kw)
    layer.winograd = True
    N = 5
    X = rng.normal(size=(N, ci, H, W))
    dY = rng.normal(size=(N, *layer.build((ci, H, W))))
    _set_chunks(layer, chunk)
    params = random_params(rng, layer)
    Y, dX, grads = run_layer(backend_spec, layer, X, dY, params=params)
    assert layer._winograd()
    Yt, dXt, gt = torch_grads(torch, torch_conv(torch, layer), X, dY, params)
    assert_close(Y, Yt, what="Y")
    assert_close(dX, dXt, what="dX")
    for name in params:
        assert_close(grads[name], gt[name], what=f"d{name}")


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("case", LAYER_CASES, ids=[layer_id(c) for c in LAYER_CASES])
def test_conv2d_winograd_equals_the_gemm_path(backend_spec, rng, case, dtype):
    """Winograd against the im2col + GEMM path of the same layer and weights; gradients that
    accumulate over two backprops and chunks; and inference equals the training forward."""
    ci, co, H, W, kw = case
    N = 4
    X = rng.normal(size=(N, ci, H, W)).astype(dtype)
    results = []
    for winograd in (False, True):
        layer = gb.Conv2d(ci, co, 3, **kw)
        layer.winograd = winograd
        model = model_for(backend_spec, [layer], input_shape=(ci, H, W), dtype=dtype)
        if winograd:
            _set_chunks(layer, 3)  # chunks of 3 and 1 samples
        be = model.backend
        dY = np.random.default_rng(5).normal(size=(N, *layer.output_shape)).astype(dtype)
        model.zero_grads()
        for _ in range(2):
            Y, bp = model.forward(be.to_device(X), train=True)
            dX = bp(be.to_device(dY))
        Yi, _ = model.forward(be.to_device(X), train=False)
        assert layer._winograd() is winograd
        results.append([np.array(be.to_host(a)) for a in (Y, Yi, dX, *layer.grads.values())])
    tol = 2e-5 if dtype == "float32" else 1e-12
    for name, g, w in zip(["Y", "Y inference", "dX", *layer.grads], *results, strict=True):
        assert_close(w.astype(np.float64), g.astype(np.float64), tol=tol, what=name)
    np.testing.assert_array_equal(results[1][0], results[1][1])  # inference = training forward


def test_conv2d_winograd_gradcheck(backend_spec, rng):
    layers = [gb.Conv2d(2, 3, 3, padding=1, activation="tanh"), gb.Conv2d(3, 2, 3, activation="gelu"),
              gb.Flatten(), gb.Dense(2 * 3 * 4, 3)]
    for layer in layers[:2]:
        layer.winograd = True
    model = model_for(backend_spec, layers, input_shape=(2, 5, 6))
    err = gb.gradcheck(model, gb.SoftmaxCrossEntropy(), rng.normal(size=(3, 2, 5, 6)),
                       rng.integers(0, 3, 3))
    assert layers[0]._winograd() and layers[1]._winograd()
    assert err < 1e-6


def test_conv2d_takes_winograd_where_the_rule_and_the_kernel_set_say(backend_spec):
    """"auto": the fused CPU set's Winograd for 3x3 stride-1 convolutions with 16+ channels in and
    out on 4x4 outputs or larger, or 8+ on 32x32 or larger; never for other shapes, whatever the
    setting."""
    model = model_for(backend_spec, [gb.Conv2d(16, 16, 3, padding=1), gb.Conv2d(16, 32, 3, padding=1),
                                     gb.Conv2d(32, 4, 3, padding=1), gb.Conv2d(4, 8, 3, padding=1),
                                     gb.Conv2d(8, 16, 3, stride=2, padding=1),
                                     gb.Conv2d(16, 64, 3, padding=1),
                                     gb.Conv2d(64, 64, 3, dilation=2, padding=2),
                                     gb.Conv2d(64, 64, 3, groups=2, padding=1),
                                     gb.Conv2d(64, 32, 3), gb.Conv2d(32, 8, 3, padding=1),
                                     gb.Conv2d(8, 16, 3, padding=1)],
                      input_shape=(16, 32, 32))
    (wide, wider, thin_out, thin_in, strided, small, dilated, grouped, smaller, narrow,
     eight) = model.layers
    fused_cpu = backend_spec == ("cpu", "fused")
    assert model.backend.ops.winograd_conv is fused_cpu
    assert wide._winograd() is wider._winograd() is fused_cpu  # 16 channels on 32x32
    assert not thin_out._winograd() and not thin_in._winograd()  # 4 channels
    assert small._winograd() is fused_cpu  # 16 in, 64 out on 16x16
    assert smaller._winograd() is fused_cpu  # 32 on 14x14
    assert not narrow._winograd() and not eight._winograd()  # 8 channels on 14x14
    # 8 channels on 32x32; 16 on 4x4 but not on 3x3
    for shape, size, pad, expected in (((8, 32, 32), 16, 1, True), ((8, 31, 32), 16, 1, False),
                                       ((16, 6, 6), 16, 0, True), ((16, 5, 5), 16, 0, False),
                                       ((32, 3, 3), 64, 1, False)):
        layer = gb.Conv2d(shape[0], size, 3, padding=pad)
        assert model_for(backend_spec, [layer], input_shape=shape).backend is not None  # (binds it)
        assert layer._winograd() is (expected and fused_cpu), (shape, size)
    for layer in (strided, dilated, grouped):
        for choice in ("auto", True, False):
            layer.winograd = choice
            assert not layer._winograd()
    thin_out.winograd, wide.winograd = True, False
    assert thin_out._winograd() and not wide._winograd()
    wide.winograd = "yes"
    with pytest.raises(ValueError, match="winograd: expected 'auto', True or False, got 'yes'"):
        wide._winograd()


def test_conv2d_keeps_the_gemm_path_under_16_bit_precision():
    """bf16/fp16 models' conv GEMMs take the 16-bit values themselves (the GPU's numerics)."""
    for precision, expected in (("fp32", True), ("bf16", False), ("fp16", False)):
        layer = gb.Conv2d(16, 16, 3, padding=1)
        model = gb.Sequential([layer], input_shape=(16, 32, 32), kernels="fused", device="cpu",
                              precision=precision)
        assert model.backend.precision == precision  # (binds the layers)
        assert layer._winograd() is expected, precision


def test_conv2d_winograd_halves_give_the_same_bits_on_one_thread_and_two(rng):
    """The fused CPU set runs the two halves of a batch's chunks on two threads: the same halves,
    so the same results, as one after the other."""
    X = rng.normal(size=(7, 16, 9, 10)).astype(np.float32)
    dY = rng.normal(size=(7, 16, 9, 10)).astype(np.float32)
    results = []
    for threads in (1, 2):
        layer = gb.Conv2d(16, 16, 3, padding=1, activation="relu")
        layer.winograd = True
        model = model_for(("cpu", "fused"), [layer], input_shape=(16, 9, 10), dtype="float32")
        model.backend.ops.nchunks = threads
        layer.max_cols_bytes = 2 * 16 * 32 * layer._tiles()[2] * 4  # float32 V and M of 2 samples
        model.zero_grads()
        Y, bp = model.forward(X, train=True)
        dX = bp(dY)
        assert len(layer._workspaces[("winograd", 7)].chunks) == 4
        results.append([np.array(a) for a in (Y, dX, *layer.grads.values())])
    for a, b in zip(*results, strict=True):
        np.testing.assert_array_equal(a, b)


def _tile_buffer(C, P):
    """A flat buffer and its (16, C, P) tile view as Conv2d lays a chunk out (rows C·P + TILE_PAD
    apart), NaN-filled so that a read of an unwritten element shows."""
    flat = np.full(16 * (C * P + TILE_PAD), np.nan)
    return flat, flat.reshape(16, C * P + TILE_PAD)[:, :C * P].reshape(16, C, P)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bias,activation", [(False, "identity"), (True, "relu")])
@pytest.mark.parametrize("own_products", [True, False])
def test_chunked_halves_are_the_ops_one_by_one(rng, dtype, bias, activation, own_products):
    """The fused CPU set's winograd_forward_chunks / winograd_backward_chunks (a half of Conv2d's
    chunks in one call) against the same steps as separate fused ops with NumPy's matmul, chunk
    by chunk (ragged chunks, a ragged last tile row and column): Z, dU, db's float64 sums and dX
    to float rounding (the 16 products a chunk by kernels/cpu/tile_gemm.py or by OpenBLAS, as
    ``winograd_own_products`` says), the V and dM buffers' layout (the last chunk's V stays for
    backprop) bit for bit."""
    from gpubackprop.kernels.cpu import CpuOps

    ops = CpuOps(np, num_threads=1)
    ops.winograd_own_products = 64 if own_products else 0
    N, Ci, Co, H, W, pad = 6, 5, 7, 9, 11, (1, 1)
    chunks = [(0, 3), (3, 5), (5, 6)]
    _, _, TH, TW = tiles(H, W, pad)
    T, P = TH * TW, 3 * TH * TW
    X = rng.standard_normal((N, Ci, H, W)).astype(dtype)
    Wt = rng.standard_normal((Co, Ci, 3, 3)).astype(dtype)
    b = rng.standard_normal(Co).astype(dtype) if bias else None
    dZ = rng.standard_normal((N, Co, H, W)).astype(dtype)
    U = ops.winograd_filter(Wt, np.empty((16, Co, Ci), dtype))
    vflat, _ = _tile_buffer(Ci, P)
    mflat, _ = _tile_buffer(Co, P)
    vflat, mflat = vflat.astype(dtype), mflat.astype(dtype)
    Z = np.full((N, Co, H, W), np.nan, dtype)
    ops.winograd_forward_chunks(X, U, vflat, mflat, Z, chunks, pad, b=b, activation=activation)
    Zr = np.full_like(Z, np.nan)
    for s, e in chunks:
        flat, V = _tile_buffer(Ci, (e - s) * T)
        V = ops.winograd_input(X[s:e], V.astype(dtype), pad)
        M = np.matmul(U, V)
        ops.winograd_output(np.ascontiguousarray(M), Zr[s:e], b=b, activation=activation)
    tol = 1e-12 if dtype == np.float64 else 2e-5
    scale = np.abs(Zr).max()
    assert np.abs(Z - Zr).max() <= tol * scale
    # the last chunk's V in the layout Conv2d reads back
    s, e = chunks[-1]
    n = (e - s) * T
    V_last = vflat[:16 * (Ci * n + TILE_PAD)].reshape(16, -1)[:, :Ci * n].reshape(16, Ci, n)
    np.testing.assert_array_equal(V_last, ops.winograd_input(X[s:e], np.empty((16, Ci, n), dtype), pad))
    # backward: dZ taken as dA ⊙ ReLU' of the forward's output
    if activation == "relu":
        dZ = np.where(Z > 0, dZ, 0).astype(dtype)
    dU, dUc = np.full((16, Co, Ci), np.nan, dtype), np.empty((16, Co, Ci), dtype)
    db = np.zeros(Co) if bias else None
    dX = np.full_like(X, np.nan)
    ops.winograd_backward_chunks(X, dZ, U, vflat, mflat, dU, dUc, dX, chunks, pad, db=db)
    dUr, dbr, dXr = np.zeros((16, Co, Ci)), np.zeros(Co), np.full_like(X, np.nan)
    for s, e in reversed(chunks):
        dM = np.empty((16, Co, (e - s) * T), dtype)
        ops.winograd_output_backward(dZ[s:e], dM, db=dbr, accumulate=True)
        V = ops.winograd_input(X[s:e], np.empty((16, Ci, (e - s) * T), dtype), pad)
        dUr += np.matmul(dM, V.transpose(0, 2, 1))
        ops.winograd_input_backward(np.ascontiguousarray(np.matmul(U.transpose(0, 2, 1), dM)),
                                    dXr[s:e], pad)
    assert np.abs(dU - dUr).max() <= tol * np.abs(dUr).max()
    assert np.abs(dX - dXr).max() <= tol * np.abs(dXr).max()
    if bias:
        np.testing.assert_array_equal(db, dbr)  # the same float64 sums in the same order
    # no input gradient: dU the same (the forward again first: dV overwrote the last chunk's V)
    ops.winograd_forward_chunks(X, U, vflat, mflat, Z, chunks, pad, b=b, activation=activation)
    dU2 = np.empty_like(dU)
    ops.winograd_backward_chunks(X, dZ, U, vflat, mflat, dU2, dUc, None, chunks, pad)
    np.testing.assert_array_equal(dU2, dU)
