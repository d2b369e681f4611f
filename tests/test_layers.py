"""Layers against central differences (float64), on every backend."""

import numpy as np
import pytest

import gpubackprop as gb
from gpubackprop.kernels.reference import ACTIVATIONS

LOSSES = {
    "ce": (gb.SoftmaxCrossEntropy, lambda rng, n, k: rng.integers(0, k, n)),
    "mse": (gb.MSE, lambda rng, n, k: rng.normal(size=(n, k))),
    "bce": (gb.BinaryCrossEntropy, lambda rng, n, k: rng.integers(0, 2, (n, k)).astype(float)),
}


def model_for(spec, layers, dtype="float64", seed=0):
    device, kernels = spec
    return gb.Sequential(layers, device=device, dtype=dtype, seed=seed, kernels=kernels)


@pytest.mark.parametrize("loss_name", sorted(LOSSES))
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_gradcheck_every_activation_and_loss(backend_spec, activation, loss_name, rng):
    make_loss, make_y = LOSSES[loss_name]
    model = model_for(backend_spec, [gb.Dense(5, 7, activation=activation),
                                     gb.Dense(7, 6, activation=activation),
                                     gb.Dense(6, 3)])
    X = rng.normal(size=(9, 5))
    err = gb.gradcheck(model, make_loss(), X, make_y(rng, 9, 3))
    assert err < 1e-6, f"{activation} × {loss_name}: relative error {err:.2e}"


def test_gradcheck_with_a_single_sample(backend_spec, rng):
    model = model_for(backend_spec, [gb.Dense(5, 4, activation="sigmoid"), gb.Dense(4, 3)])
    err = gb.gradcheck(model, gb.SoftmaxCrossEntropy(), rng.normal(size=(1, 5)), [2])
    assert err < 1e-6


def test_gradcheck_detects_a_wrong_gradient(backend_spec, rng):
    # The check must be able to fail: corrupt BP4 (bias gradient) and expect a large error.
    model = model_for(backend_spec, [gb.Dense(4, 5, activation="tanh"), gb.Dense(5, 3)])
    model.backend.ops.bias_grad = lambda dZ, db, accumulate=False: db.fill(0.5)
    err = gb.gradcheck(model, gb.SoftmaxCrossEntropy(), rng.normal(size=(6, 4)),
                       rng.integers(0, 3, 6))
    assert err > 1e-2


def test_residual_and_nested_sequential_gradients(backend_spec, rng):
    inner = gb.Sequential([gb.Dense(6, 8, activation="tanh"), gb.Dense(8, 6, activation="sigmoid")])
    model = model_for(backend_spec, [
        gb.Dense(4, 6, activation="relu"),
        gb.Residual(inner),
        gb.Residual(gb.Dense(6, 6, activation="gelu")),
        gb.Sequential([gb.Dense(6, 5, activation="leaky_relu"), gb.Dense(5, 3)]),
    ])
    assert list(model.get_params()) == ["0.W", "0.b", "1.0.W", "1.0.b", "1.1.W", "1.1.b",
                                        "2.W", "2.b", "3.0.W", "3.0.b", "3.1.W", "3.1.b"]
    err = gb.gradcheck(model, gb.SoftmaxCrossEntropy(), rng.normal(size=(7, 4)),
                       rng.integers(0, 3, 7))
    assert err < 1e-6


def test_residual_adds_its_input(backend_spec, rng):
    block = gb.Dense(4, 4, activation="tanh")
    model = model_for(backend_spec, [gb.Residual(block)])
    X = rng.normal(size=(3, 4))
    p = model.get_params()
    expected = X + np.tanh(X @ p["0.W"].T + p["0.b"])
    np.testing.assert_allclose(model.predict(X), expected, rtol=1e-12)


def test_forward_matches_numpy(backend_spec, rng):
    model = model_for(backend_spec, [gb.Dense(5, 4, activation="relu"),
                                     gb.Dense(4, 3, activation="sigmoid")], dtype="float32")
    X = rng.normal(size=(6, 5)).astype(np.float32)
    p = model.get_params()
    h = np.maximum(X @ p["0.W"].T + p["0.b"], 0)
    expected = 1 / (1 + np.exp(-(h @ p["1.W"].T + p["1.b"])))
    out = model.predict(X)
    assert out.dtype == np.float32 and out.shape == (6, 3)
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-6)


def test_predict_with_loss_gives_probabilities(backend_spec, rng):
    model = model_for(backend_spec, [gb.Dense(5, 4)])
    X = rng.normal(size=(6, 5))
    logits = model.predict(X)
    probs = gb.predict(model, X, loss=gb.SoftmaxCrossEntropy())
    e = np.exp(logits - logits.max(1, keepdims=True))
    np.testing.assert_allclose(probs, e / e.sum(1, keepdims=True), rtol=1e-12)
    np.testing.assert_allclose(gb.predict(model, X, loss=gb.BinaryCrossEntropy()),
                               1 / (1 + np.exp(-logits)), rtol=1e-12)


def test_params_are_views_of_one_flat_buffer(backend_spec):
    model = model_for(backend_spec, [gb.Dense(3, 4), gb.Dense(4, 2)])
    assert model.n_params == 3 * 4 + 4 + 4 * 2 + 2
    model.flat_params[...] = 0
    assert all(np.all(v == 0) for v in model.get_params().values())
    layer = model.dense_layers()[1]
    assert layer.W.shape == (2, 4) and layer.b.shape == (2,)


def test_get_set_params_round_trip(backend_spec, rng):
    a = model_for(backend_spec, [gb.Dense(3, 4, activation="tanh"), gb.Dense(4, 2)], seed=1)
    b = model_for(backend_spec, [gb.Dense(3, 4, activation="tanh"), gb.Dense(4, 2)], seed=2)
    X = rng.normal(size=(5, 3))
    assert not np.array_equal(a.predict(X), b.predict(X))
    b.set_params(a.get_params())
    np.testing.assert_array_equal(a.predict(X), b.predict(X))
    params = a.get_params()
    params["0.W"][...] = 7  # get_params gives copies
    assert not np.any(a.get_params()["0.W"] == 7)


@pytest.mark.parametrize("init,check", [
    ("he", lambda W, n_in, n_out: abs(W.std() - np.sqrt(2 / n_in)) < 0.1 * np.sqrt(2 / n_in)),
    ("lecun", lambda W, n_in, n_out: abs(W.std() - np.sqrt(1 / n_in)) < 0.1 * np.sqrt(1 / n_in)),
    ("xavier", lambda W, n_in, n_out: np.abs(W).max() <= np.sqrt(6 / (n_in + n_out))
     and abs(W.std() - np.sqrt(2 / (n_in + n_out))) < 0.1 * np.sqrt(2 / (n_in + n_out))),
    ("normal", lambda W, n_in, n_out: abs(W.std() - 0.05) < 0.005),
])
def test_init_schemes_have_their_scale_and_are_seeded(init, check):
    def weights(seed):
        model = gb.Sequential([gb.Dense(200, 300, init=init)], device="cpu", seed=seed)
        return model.get_params()["0.W"]

    W = weights(0)
    assert check(W.astype(np.float64), 200, 300)
    np.testing.assert_array_equal(W, weights(0))
    assert not np.array_equal(W, weights(1))
    assert np.all(gb.Sequential([gb.Dense(2, 3, init=init)], device="cpu").get_params()["0.b"] == 0)


def test_default_init_follows_the_activation():
    assert gb.Dense(2, 3, activation="relu").init == "he"
    assert gb.Dense(2, 3, activation="gelu").init == gb.Dense(2, 3, activation="gelu_tanh").init == "he"
    assert gb.Dense(2, 3, activation="tanh").init == "xavier"
    assert "activation='relu'" in repr(gb.Dense(2, 3, activation="relu"))


@pytest.mark.parametrize("activation,approximate", [("gelu", "none"), ("gelu_tanh", "tanh")])
def test_dense_gelus_follow_torch(backend_spec, activation, approximate, rng):
    """gelu is torch.nn.GELU() (erf), gelu_tanh its approximate="tanh": outputs, input and parameter
    gradients in float64 to 1e-10, on inputs wide enough to reach both tails."""
    torch = pytest.importorskip("torch")
    from layer_cases import assert_close, run_layer, torch_grads

    X, dY = rng.normal(size=(9, 7)) * 4, rng.normal(size=(9, 5))
    params = {"W": rng.normal(size=(5, 7)), "b": rng.normal(size=5)}
    Y, dX, grads = run_layer(backend_spec, gb.Dense(7, 5, activation=activation), X, dY, params=params)
    gelu = torch.nn.GELU(approximate=approximate)
    Yt, dXt, gt = torch_grads(torch, lambda X, W, b: gelu(torch.nn.functional.linear(X, W, b)), X, dY,
                              params)
    assert_close(Y, Yt, what="Y")
    assert_close(dX, dXt, what="dX")
    assert_close(grads["W"], gt["W"], what="dW")
    assert_close(grads["b"], gt["b"], what="db")


def test_training_buffers_are_reused_and_inference_is_fresh(backend_spec, rng):
    model = model_for(backend_spec, [gb.Dense(3, 4, activation="relu"), gb.Dense(4, 2)],
                      dtype="float32")
    X = model.backend.to_device(rng.normal(size=(5, 3)))
    Y1, _ = model.forward(X, train=True)
    Y2, _ = model.forward(X, train=True)
    assert Y1 is Y2  # no allocation per step
    Y3 = model(X)
    assert Y3 is not Y2
    _, bp = model.forward(X, train=False)
    with pytest.raises(RuntimeError, match="train=True"):
        bp(Y3)


@pytest.mark.parametrize("batch", [1, 4])  # one sample: BP3 is an outer product, its own path
def test_backprop_accumulates_until_zero_grads(backend_spec, rng, batch):
    model = model_for(backend_spec, [gb.Dense(3, 2, activation="tanh")])
    be = model.backend
    X = be.to_device(rng.normal(size=(batch, 3)))
    dY = be.to_device(rng.normal(size=(batch, 2)))
    model.zero_grads()
    _, bp = model.forward(X, train=True)
    bp(dY)
    once = be.to_host(model.flat_grads).copy()
    _, bp = model.forward(X, train=True)
    bp(dY)
    np.testing.assert_allclose(be.to_host(model.flat_grads), 2 * once, rtol=1e-12)
    model.zero_grads()
    _, bp = model.forward(X, train=True)
    bp(dY)
    np.testing.assert_allclose(be.to_host(model.flat_grads), once, rtol=1e-12)


def test_input_gradient_matches_central_differences(backend_spec, rng):
    model = model_for(backend_spec, [gb.Dense(3, 4, activation="sigmoid"), gb.Dense(4, 2)])
    be = model.backend
    Xh = rng.normal(size=(2, 3))
    dYh = rng.normal(size=(2, 2))
    _, bp = model.forward(be.to_device(Xh), train=True)
    dX = be.to_host(bp(be.to_device(dYh)))
    eps, num = 1e-6, np.zeros_like(Xh)
    for idx in np.ndindex(*Xh.shape):
        for sign in (1, -1):
            Xp = Xh.copy()
            Xp[idx] += sign * eps
            num[idx] += sign * np.sum(model.predict(Xp) * dYh) / (2 * eps)
    np.testing.assert_allclose(dX, num, rtol=1e-6, atol=1e-9)


# ---- Activation and Reshape: layers that hold no parameters -------------------------------------
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_standalone_activation_after_a_norm_gradchecks_and_leaves_its_input(backend_spec, activation,
                                                                            rng):
    from gpubackprop.kernels.reference import ReferenceOps

    layers = [gb.Conv2d(1, 3, 3, padding=1, bias=False), gb.BatchNorm2d(3), gb.Activation(activation),
              gb.Flatten(), gb.Dense(48, 3)]
    model = gb.Sequential(layers, device=backend_spec[0], kernels=backend_spec[1], dtype="float64",
                          input_shape=(1, 4, 4), seed=0)
    X, y = rng.normal(size=(6, 1, 4, 4)), np.arange(6) % 3
    assert gb.gradcheck(model, gb.SoftmaxCrossEntropy(), X, y) < 1e-6
    act = model.layers[2]
    Xd = model.backend.to_device(rng.normal(size=(5, 3, 4, 4)) * 3)
    before = model.backend.to_host(Xd).copy()
    Y, _ = act.forward(Xd, train=True)
    expected = ReferenceOps(np).bias_act(before.reshape(5, -1).copy(), np.zeros(48), activation,
                                         np.empty((5, 48)))
    np.testing.assert_allclose(model.backend.to_host(Y), expected.reshape(5, 3, 4, 4), rtol=1e-12,
                               atol=1e-14)
    np.testing.assert_array_equal(model.backend.to_host(Xd), before)  # the input is not written
    assert repr(act) == f"Activation({activation!r})" and act.config() == {"activation": activation}


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_standalone_activation_gives_the_bits_of_bias_act_with_a_bias_of_minus_zero(
        backend_spec, activation, rng):
    """One pass A = σ(X) (ops.activation; the gelus keep X itself for σ') gives the bits of the
    former path, X copied into Z, Z += -0.0 and A = σ(Z) by bias_act; a non-contiguous X too."""
    model = gb.Sequential([gb.Activation(activation)], device=backend_spec[0],
                          kernels=backend_spec[1], dtype="float32", input_shape=(3, 5, 7), seed=0)
    be, ops = model.backend, model.backend.ops
    act = model.layers[0]
    X = (rng.normal(size=(4, 3, 5, 7)) * 3).astype(np.float32)
    dY = rng.normal(size=X.shape).astype(np.float32)
    Z = be.to_device(X.reshape(4, -1).copy())
    A = ops.bias_act(Z, be.xp.full(105, -0.0, dtype=np.float32), activation, be.empty(Z.shape))
    saved = Z if activation in ("gelu", "gelu_tanh") else A
    dX = ops.act_backward(be.to_device(dY.reshape(4, -1)), saved, activation, be.empty(Z.shape))
    for Xd in (be.to_device(X), be.to_device(X.transpose(0, 1, 3, 2).copy()).transpose(0, 1, 3, 2)):
        Y, backprop = act.forward(Xd, train=True)
        np.testing.assert_array_equal(be.to_host(Y).view(np.uint32),
                                      be.to_host(A).reshape(X.shape).view(np.uint32))
        np.testing.assert_array_equal(be.to_host(backprop(be.to_device(dY))).view(np.uint32),
                                      be.to_host(dX).reshape(X.shape).view(np.uint32))
        Y_eval, _ = act.forward(Xd, train=False)
        np.testing.assert_array_equal(be.to_host(Y_eval), be.to_host(Y))
    with pytest.raises(TypeError, match=r"Activation input: expected dtype float32, got float64"):
        act.forward(be.xp.asarray(X, dtype=np.float64), train=True)


def test_reshape_moves_data_only(backend_spec, rng):
    model = gb.Sequential([gb.Reshape((4, 3)), gb.LSTM(3, 5), gb.LastStep(), gb.Dense(5, 2)],
                          device=backend_spec[0], kernels=backend_spec[1], dtype="float64",
                          input_shape=(1, 4, 3), seed=0)
    X, y = rng.normal(size=(4, 1, 4, 3)), np.arange(4) % 2
    assert gb.gradcheck(model, gb.SoftmaxCrossEntropy(), X, y) < 1e-6
    with pytest.raises(ValueError, match=r"expected an input of 12 values per sample to reshape "
                                         r"to \(4, 3\)|expected an input of 12 values"):
        gb.Sequential([gb.Reshape((4, 3)), gb.Flatten()], device="cpu", input_shape=(1, 5, 3))
