"""Mixed precision (issue 17): the 16-bit rounding ops against NumPy's float16 and ml_dtypes'
bfloat16, the loss scaler's state machine against a plain implementation of GradScaler's rules,
skipped steps, exact resumption from a checkpoint, the policy's rounding points in a model, and
the digits MLP and CNN trained in bf16/fp16 against fp32 (CPU emulation)."""

import numpy as np
import pytest

import gpubackprop as gb
from gpubackprop import precision as P
from gpubackprop.checkpoint import load_checkpoint, save_checkpoint
from gpubackprop.kernels.reference import ACTIVATIONS, ReferenceOps, saves_input

ml_dtypes = pytest.importorskip("ml_dtypes")
BF16 = ml_dtypes.bfloat16


def cpu_sets():
    from gpubackprop.kernels.cpu import CpuOps

    return [ReferenceOps(np), CpuOps(np)]


@pytest.fixture(params=["reference", "fused-cpu"])
def ops(request):
    return {o.name: o for o in cpu_sets()}[request.param]


def numpy_round(X, precision):
    """The rounding by NumPy's own casts (ml_dtypes for bfloat16)."""
    with np.errstate(over="ignore", invalid="ignore"):
        return X.astype(np.float16 if precision == "fp16" else BF16).astype(np.float32)


def random_floats(n, seed=0):
    """Random float32 bit patterns (every exponent, NaNs, infs, subnormals), and the ties."""
    rng = np.random.default_rng(seed)
    u = rng.integers(0, 2**32, n, dtype=np.uint64).astype(np.uint32)
    # Exactly halfway between two halves / two bfloat16s (both parities), and around fp16's limits.
    halves = np.arange(0, 0x7C00, 7, dtype=np.uint32)
    mid16 = (np.float16(1).view(np.uint16) * 0 + halves).astype(np.uint16).view(np.float16)
    ties16 = (mid16.astype(np.float64) + np.spacing(mid16).astype(np.float64) / 2).astype(np.float32)
    ties_bf = ((u[:5000] & np.uint32(0xFFFF0000)) | np.uint32(0x8000)).view(np.float32)
    edges = np.array([65504, 65519.99, 65520, 65536, 2**-24, 2**-25, 2**-25 * 1.0001, 2**-26,
                      6.1e-5, 3.4e38, -0.0, 0.0, np.inf, -np.inf, np.nan], np.float32)
    return np.concatenate([u.view(np.float32), ties16, ties_bf, edges, -edges])


@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_rounding_matches_numpy_and_ml_dtypes(ops, precision):
    X = random_floats(200_000)
    want = numpy_round(X, precision)
    got = ops.round16(X, precision, np.empty_like(X))
    nan = np.isnan(want)
    assert np.array_equal(np.isnan(got), nan)
    assert np.array_equal(got[~nan].view(np.uint32), want[~nan].view(np.uint32))
    H = ops.cast16(X, np.empty(X.shape, P.storage_dtype(precision)), precision)
    with np.errstate(over="ignore", invalid="ignore"):
        ref = X.astype(np.float16 if precision == "fp16" else BF16).view(np.uint16)
    assert np.array_equal(H.view(np.uint16)[~nan], ref[~nan])
    # Every 16-bit pattern widens to its exact value.
    bits = np.arange(1 << 16, dtype=np.uint16)
    H = bits.view(np.float16) if precision == "fp16" else bits
    wide = ops.widen16(H, np.empty(bits.shape, np.float32), precision)
    exact = bits.view(np.float16 if precision == "fp16" else BF16).astype(np.float32)
    nan = np.isnan(exact)
    assert np.array_equal(np.isnan(wide), nan)
    assert np.array_equal(wide[~nan].view(np.uint32), exact[~nan].view(np.uint32))


def test_rounding_in_place_and_policy_helpers(ops):
    X = np.random.default_rng(1).normal(0, 100, (37, 41)).astype(np.float32)
    want = numpy_round(X, "bf16")
    ops.round16(X, "bf16")  # out=None: in place
    assert np.array_equal(X, want)
    H = P.bf16_bits(np, want)  # the integer form CuPy uses equals ml_dtypes'
    assert np.array_equal(H, want.astype(BF16).view(np.uint16))
    assert np.array_equal(P.bf16_values(np, H), want)


@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_16bit_activation_kernels_are_float32_then_one_rounding(ops, activation, precision):
    rng = np.random.default_rng(2)
    B, n = 19, 33
    Z = rng.normal(0, 2, (B, n)).astype(np.float32)
    b = rng.normal(0, 1, n).astype(np.float32)
    ref = ReferenceOps(np)
    Zr = Z.copy()
    Ar = ref.bias_act(Zr, b, activation, np.empty_like(Z))
    Zk = Z.copy()
    A16 = ops.bias_act16(Zk, b, activation, np.empty(Z.shape, P.storage_dtype(precision)),
                         precision)
    np.testing.assert_allclose(Zk, Zr, rtol=2e-7, atol=1e-7)  # Z += b in float32
    got = P.from_storage(np, A16, precision)
    # Within one 16-bit rounding of the float32 value (the fused kernel's own float32 may differ
    # from the reference's by an ulp of float32, which can move a tie).
    ulp = 2.0**-10 if precision == "fp16" else 2.0**-7
    # (atol: the fused CPU set's float32 gelu_tanh in the far left tail, ~1e-6 from the reference)
    np.testing.assert_allclose(got, Ar, rtol=ulp, atol=4e-6)
    saved16 = A16 if not saves_input(activation) else P.to_storage(np, Zr, precision)
    dA16 = P.to_storage(np, rng.normal(0, 1, (B, n)).astype(np.float32), precision)
    dZ16 = ops.act_backward16(dA16, saved16, activation,
                              np.empty(Z.shape, P.storage_dtype(precision)), precision)
    want = ref.act_backward(P.from_storage(np, dA16, precision),
                            P.from_storage(np, saved16, precision), activation,
                            np.empty_like(Z))
    np.testing.assert_allclose(P.from_storage(np, dZ16, precision), want, rtol=ulp, atol=4e-6)


def test_unscale_check(ops):
    g = np.linspace(-3, 3, 1001).astype(np.float32) * 1024
    state = np.array([1024.0, 5.0, 0.0], np.float32)
    ops.unscale_check(g, state)
    np.testing.assert_array_equal(g, np.linspace(-3, 3, 1001).astype(np.float32) * 1024 / 1024)
    assert state[2] == 0 and state[0] == 1024 and state[1] == 5
    for bad in (np.inf, -np.inf, np.nan):
        g = np.ones(777, np.float32)
        g[700] = bad
        state = np.array([2.0, 0.0, 0.0], np.float32)
        ops.unscale_check(g, state)
        assert state[2] == 1
        assert g[0] == 0.5


# ---- the loss scaler's state machine ----------------------------------------------------------
class PlainGradScaler:
    """GradScaler's rules written out (torch/amp/grad_scaler.py, _amp_update_scale_)."""

    def __init__(self, init_scale, growth_factor, backoff_factor, growth_interval):
        self.scale, self.tracker = init_scale, 0
        self.g, self.b, self.interval = growth_factor, backoff_factor, growth_interval

    def update(self, found_inf):
        if found_inf:
            self.scale *= self.b
            self.tracker = 0
        elif self.tracker + 1 == self.interval:
            if self.scale * self.g <= float(np.finfo(np.float32).max):  # not past float32
                self.scale *= self.g
            self.tracker = 0
        else:
            self.tracker += 1


@pytest.mark.parametrize("options", [{}, {"init_scale": 8.0, "growth_factor": 4.0,
                                          "backoff_factor": 0.25, "growth_interval": 3},
                                     {"init_scale": 2.0**126, "growth_interval": 2}])
def test_scaler_state_machine_matches_gradscalers_rules(ops, options):
    be = gb.Backend(device="cpu", kernels="reference" if ops.name == "reference" else "fused")
    scaler = P.LossScaler(**options)
    scaler.attach(be)
    plain = PlainGradScaler(scaler.init_scale, scaler.growth_factor, scaler.backoff_factor,
                            scaler.growth_interval)
    rng = np.random.default_rng(3)
    # Runs of finite steps longer and shorter than the interval, with overflows between them.
    found = ([False] * (scaler.growth_interval + 1) + [True, True] + [False] * 7 + [True]
             + [False] * (2 * scaler.growth_interval + 2)) if scaler.growth_interval < 100 else \
        [False] * 2001 + [True] + [False] * 1999 + [True, False]
    for step, bad in enumerate(found):
        g = rng.normal(0, 1, 64).astype(np.float32)
        if bad:
            g[rng.integers(64)] = [np.inf, np.nan][step % 2]
        ops.unscale_check(g, scaler.state)
        assert bool(scaler.state[P.FOUND_INF]) == bad
        ops.loss_scale_update(scaler.state, scaler.growth_factor, scaler.backoff_factor,
                              scaler.growth_interval)
        plain.update(bad)
        assert scaler.scale == np.float32(plain.scale), step
        assert scaler.get_state()["loss_scale_growth_tracker"] == plain.tracker, step
        assert scaler.state[P.FOUND_INF] == 0


def test_scaler_matches_torch_gradscaler_when_installed():
    torch = pytest.importorskip("torch")
    scaler_t = torch.amp.GradScaler("cpu", init_scale=16.0, growth_interval=3)
    p = torch.nn.Parameter(torch.zeros(4))
    opt_t = torch.optim.SGD([p], lr=0.1)
    be = gb.Backend(device="cpu")
    ours = P.LossScaler(init_scale=16.0, growth_interval=3)
    ours.attach(be)
    for step, bad in enumerate([False] * 4 + [True] + [False] * 3 + [True, True] + [False] * 5):
        grad = np.full(4, 16.0 * ours.scale / 16.0, np.float32)
        if bad:
            grad[1] = np.inf
        scaler_t.scale(torch.ones(()))  # (GradScaler steps only after a scale call)
        p.grad = torch.tensor(grad)
        scaler_t.step(opt_t)
        scaler_t.update()
        g = grad.copy()
        ours.unscale(g)
        ours.update()
        assert ours.scale == scaler_t.get_scale(), step


def fp16_model(**kw):
    return gb.Sequential([gb.Dense(6, 8, activation="tanh"), gb.Dense(8, 3)], device="cpu",
                         seed=4, precision="fp16", **kw)


def test_overflowing_steps_are_skipped_and_back_off():
    # 2^40 times the loss gradient overflows fp16: the first steps must change nothing but S.
    model = fp16_model(loss_scaler={"init_scale": 2.0**40})
    opt = gb.Adam(lr=0.01)
    X = np.random.default_rng(5).normal(size=(16, 6))
    y = np.arange(16) % 3
    before = model.get_params()
    gb.train_step(model, gb.SoftmaxCrossEntropy(), opt, X, y)
    assert model.loss_scaler.scale == 2.0**39
    for k, v in model.get_params().items():
        np.testing.assert_array_equal(v, before[k])
    assert all(not np.any(b) for b in opt.buffers.values())  # Adam's moments untouched
    for _ in range(40):
        gb.train_step(model, gb.SoftmaxCrossEntropy(), opt, X, y)
    assert model.loss_scaler.scale <= 2.0**30  # backed off to where fp16 holds the gradients
    assert any(not np.array_equal(v, before[k]) for k, v in model.get_params().items())
    assert np.isfinite(np.concatenate([v.ravel() for v in model.get_params().values()])).all()


def test_fp16_gradients_equal_fp32_math_on_rounded_values():
    """With S a power of two the scaled fp16 step's unscaled gradient is the plain one (the
    scale moves exponents only, while nothing overflows or underflows)."""
    X = np.random.default_rng(6).normal(size=(8, 6))
    y = np.arange(8) % 3
    grads = []
    for scale in (1.0, 2.0**10):
        model = fp16_model(loss_scaler={"init_scale": scale})
        gb.train_step(model, gb.SoftmaxCrossEntropy(), gb.SGD(lr=0.0), X, y)
        grads.append(model.get_grads())
    for k in grads[0]:
        np.testing.assert_allclose(grads[1][k], grads[0][k], rtol=0, atol=2e-3 * np.abs(
            grads[0][k]).max())


def test_resumed_fp16_run_is_exact(tmp_path):
    X = np.random.default_rng(7).normal(size=(64, 6))
    y = np.arange(64) % 3
    batches = [(X[i::4], y[i::4]) for i in range(4)]
    options = {"loss_scaler": {"init_scale": 2.0**30, "growth_interval": 3}}  # skips, growth

    def run(model, opt, steps):
        for s in steps:
            gb.train_step(model, gb.SoftmaxCrossEntropy(), opt, *batches[s % 4])

    whole, opt_w = fp16_model(**options), gb.Adam(lr=0.01)
    run(whole, opt_w, range(20))
    first, opt_f = fp16_model(**options), gb.Adam(lr=0.01)
    run(first, opt_f, range(9))
    path = tmp_path / "ckpt.npz"
    save_checkpoint(path, first, opt_f, gb.SoftmaxCrossEntropy())
    ckpt = load_checkpoint(path)
    resumed = ckpt.build_model(device="cpu")
    assert resumed.precision == "fp16" and resumed.loss_scaler.growth_interval == 3
    opt_r = gb.Adam(lr=0.01)
    ckpt.restore(resumed, opt_r)
    assert resumed.loss_scaler.scale == first.loss_scaler.scale
    run(resumed, opt_r, range(9, 20))
    for k, v in whole.get_params().items():
        np.testing.assert_array_equal(resumed.get_params()[k], v)
    assert resumed.get_state()["loss_scale"] == whole.get_state()["loss_scale"]
    assert resumed.get_state()["loss_scale_growth_tracker"] == \
        whole.get_state()["loss_scale_growth_tracker"]


# ---- the policy's rounding points ----------------------------------------------------------------
@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_stored_values_are_16bit_and_masters_float32(precision):
    model = gb.Sequential([gb.Dense(5, 7, activation="gelu"), gb.Dense(7, 4, activation="relu"),
                           gb.Dense(4, 3)], device="cpu", seed=8, precision=precision)
    X = np.random.default_rng(9).normal(size=(10, 5))
    Y = model.predict(X)
    assert np.array_equal(numpy_round(Y, precision), Y)
    params = np.concatenate([v.ravel() for v in model.get_params().values()])
    assert not np.array_equal(numpy_round(params.astype(np.float32), precision), params)  # masters
    np.testing.assert_array_equal(model.flat_params16, numpy_round(model.flat_params, precision))
    # The forward is the float32 math on the rounded input and weights, rounded where stored.
    ref = gb.Sequential([gb.Dense(5, 7, activation="gelu"), gb.Dense(7, 4, activation="relu"),
                         gb.Dense(4, 3)], device="cpu", seed=8)
    ref.set_params({k: numpy_round(v, precision) for k, v in model.get_params().items()})
    A = numpy_round(X.astype(np.float32), precision)
    for layer in ref.layers:
        A = numpy_round(layer.forward(A)[0], precision)
    np.testing.assert_allclose(Y, A, rtol=2.0**-7, atol=1e-6)
    # A new master weight reaches the copy at the next forward.
    new = {k: v * 0.5 for k, v in model.get_params().items()}
    model.set_params(new)
    model.predict(X)
    np.testing.assert_array_equal(model.flat_params16, numpy_round(model.flat_params, precision))


def test_errors_and_config():
    with pytest.raises(ValueError, match="precision: expected one of"):
        gb.Sequential([gb.Dense(2, 2)], precision="fp8")
    with pytest.raises(ValueError, match="precision: 'bf16' keeps float32 master weights"):
        gb.Sequential([gb.Dense(2, 2)], dtype="float64", precision="bf16")
    with pytest.raises(ValueError, match="loss_scaler: loss scaling is for precision='fp16'"):
        gb.Sequential([gb.Dense(2, 2)], precision="bf16", loss_scaler={"init_scale": 2.0})
    with pytest.raises(ValueError, match="growth_interval"):
        gb.Sequential([gb.Dense(2, 2)], precision="fp16", loss_scaler={"growth_interval": 0})
    with pytest.raises(ValueError, match="backoff_factor"):
        P.LossScaler(backoff_factor=1.5)

    from gpubackprop.layers import Layer

    class Custom(Layer):
        def forward(self, X, train=False, input_grad=True):
            return X, lambda dY: dY

    model = gb.Sequential([gb.Dense(2, 2), Custom()], device="cpu", precision="bf16")
    with pytest.raises(ValueError, match=r"precision: layers\[1\] Custom has no declared bf16 path"):
        model.predict(np.zeros((1, 2)))
    model = gb.Sequential([gb.Dense(2, 2)], device="cpu", precision="bf16")
    assert "precision='bf16'" in repr(model) and model.precision == "bf16"
    assert gb.Sequential([gb.Dense(2, 2)]).precision == "fp32"
    x = gb.Input((3,))
    graph = gb.Model(x, gb.Dense(3, 2)(x), device="cpu", precision="fp16")
    assert graph.loss_scaler is not None and graph.predict(np.ones((2, 3))).shape == (2, 2)


# ---- accuracy: bf16 and fp16 against fp32, same seed and settings ---------------------------------
def test_digits_mlp_bf16_fp16_within_half_a_point_of_fp32():
    pytest.importorskip("sklearn")
    from gpubackprop.demo import load_digits_split

    Xtr, Xte, ytr, yte = load_digits_split(0)
    acc = {}
    for precision in P.PRECISIONS:
        model = gb.Sequential([gb.Dense(64, 128, activation="relu"),
                               gb.Dense(128, 64, activation="relu"), gb.Dense(64, 10)],
                              device="cpu", seed=0, precision=precision)
        gb.fit(model, gb.SoftmaxCrossEntropy(), gb.Adam(lr=0.002), Xtr, ytr, epochs=30,
               batch_size=32, progress=False)
        acc[precision] = gb.evaluate(model, gb.SoftmaxCrossEntropy(), Xte, yte)["accuracy"]
    assert acc["fp32"] > 0.95
    for precision in ("bf16", "fp16"):
        assert abs(acc[precision] - acc["fp32"]) <= 0.005, acc


@pytest.mark.parametrize("make", [lambda: gb.SGD(lr=0.1, momentum=0.9, nesterov=True),
                                  lambda: gb.RMSprop(lr=0.01, momentum=0.5),
                                  lambda: gb.Adam(lr=0.01, weight_decay=0.1),
                                  lambda: gb.AdamW(lr=0.01, clip_norm=0.5)])
@pytest.mark.parametrize("kernels", ["reference", "fused"])
def test_every_update_kernel_skips_on_the_gate(make, kernels):
    """The gate writes SKIP on overflow; every optimizer's update then changes nothing (also on a
    later step, with its buffers made); a NaN clip factor is not a skip."""
    model = gb.Sequential([gb.Dense(4, 3)], device="cpu", kernels=kernels, seed=1,
                          precision="fp16", loss_scaler={"init_scale": 4.0})
    opt = make()
    X = np.random.default_rng(2).normal(size=(5, 4))
    gb.train_step(model, gb.SoftmaxCrossEntropy(), opt, X, np.arange(5) % 3)  # buffers made
    before = model.get_params()
    buffers = {k: np.array(v) for k, v in opt.buffers.items()}
    model.flat_grads[...] = 1.0
    model.flat_grads[2] = np.inf
    model.loss_scaler.unscale(model.flat_grads)
    opt.step(model)
    assert opt._scale[0] == P.SKIP
    for k, v in model.get_params().items():
        np.testing.assert_array_equal(v, before[k])
    for k, v in opt.buffers.items():
        np.testing.assert_array_equal(v, buffers[k])
    model.loss_scaler.update()
    assert model.loss_scaler.scale == 2.0
    model.flat_grads[...] = 0.5
    model.loss_scaler.unscale(model.flat_grads)
    opt.step(model)  # a finite step: the gate gives the clip factor (or 1) back
    assert 0 < opt._scale[0] <= 1
    assert any(not np.array_equal(v, before[k]) for k, v in model.get_params().items())


def test_gate_keeps_the_clip_factor_and_nan(ops):
    state = np.array([1.0, 0.0, 0.0], np.float32)
    for clipping, factor, want in [(True, 0.25, 0.25), (False, 0.25, 1.0), (True, np.nan, np.nan)]:
        f = np.array([factor], np.float32)
        ops.loss_scale_gate(f, state, clipping)
        np.testing.assert_array_equal(f, [want])
    state[P.FOUND_INF] = 1
    f = np.array([0.25], np.float32)
    ops.loss_scale_gate(f, state, True)
    assert f[0] == P.SKIP


def test_digits_cnn_bf16_fp16_within_half_a_point_of_fp32():
    """examples/cnn_digits.py's network, training (Adam, cosine schedule, 15 epochs of batch 32)
    and seed, with its channels reduced from 32/32/64 to 8/8/16 to keep the test to seconds (the
    full example, measured: fp32 0.9944, bf16 0.9917, fp16 0.9972 test accuracy)."""
    pytest.importorskip("sklearn")
    import importlib.util
    import pathlib

    path = pathlib.Path(__file__).resolve().parent.parent / "examples" / "cnn_digits.py"
    spec = importlib.util.spec_from_file_location("cnn_digits", path)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    narrow = example.SPEC.replace("conv(32,", "conv(8,").replace("conv(64,", "conv(16,")
    assert narrow.count("conv(8,") == 2 and narrow.count("conv(16,") == 1
    acc = {}
    for precision in P.PRECISIONS:
        metrics, _ = example.main(device="cpu", spec=narrow, precision=precision)
        acc[precision] = metrics["accuracy"]
    assert acc["fp32"] > 0.97
    for precision in ("bf16", "fp16"):
        assert abs(acc[precision] - acc["fp32"]) <= 0.005, acc


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_graph_residual_and_norm_outputs_are_16bit_and_the_input_is_left_alone(precision):
    x = gb.Input((6,))
    h = gb.Dense(6, 6, activation="tanh")(x)
    s = gb.Add()([h, x])
    y = gb.Dense(12, 3)(gb.Concatenate()([s, gb.LayerNorm(6)(h)]))
    graph = gb.Model(x, y, device="cpu", seed=3, precision=precision)
    chain = gb.Sequential([gb.Dense(6, 6), gb.Residual(gb.Sequential([gb.Dense(6, 6,
                                                                               activation="relu")])),
                           gb.BatchNorm1d(6), gb.Dense(6, 3)], device="cpu", seed=3,
                          precision=precision)
    X = np.random.default_rng(4).normal(size=(16, 6)).astype(np.float32)
    X0 = X.copy()
    for model in (graph, chain):
        Y = model.predict(X)
        assert np.array_equal(numpy_round(Y, precision), Y)
        np.testing.assert_array_equal(X, X0)  # the model rounds a copy of its input
        loss = gb.SoftmaxCrossEntropy()
        history = gb.fit(model, loss, gb.Adam(lr=0.01), X, np.arange(16) % 3, epochs=3,
                         batch_size=8, progress=False, nan_check_every=1)
        assert np.isfinite(history["loss"]).all()
        np.testing.assert_array_equal(X, X0)


def test_fit_with_nan_checks_goes_through_skipped_fp16_steps():
    model = fp16_model(loss_scaler={"init_scale": 2.0**40})  # the first steps overflow
    X = np.random.default_rng(5).normal(size=(32, 6))
    history = gb.fit(model, gb.SoftmaxCrossEntropy(), gb.SGD(lr=0.1), X, np.arange(32) % 3,
                     epochs=4, batch_size=4, progress=False, nan_check_every=1)
    assert model.loss_scaler.scale < 2.0**40 and np.isfinite(history["loss"]).all()
