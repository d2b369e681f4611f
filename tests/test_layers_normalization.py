"""BatchNorm1d, BatchNorm2d, LayerNorm and Dropout layers: central differences (float64) of the
input and parameter gradients on every backend, PyTorch's layers (when installed) for the
forward, backward, running statistics and inference output, and Dropout's mask bookkeeping."""

import json

import layer_cases as lc
import numpy as np
import pytest

import gpubackprop as gb
from gpubackprop.kernels.reference import ReferenceOps
from gpubackprop.layers.dropout import Dropout
from gpubackprop.layers.normalization import BatchNorm1d, BatchNorm2d, LayerNorm

# (factory, input shape with the batch axis) for every normalization layer and input layout.
NORM_CASES = {
    "bn1d-NC": (lambda: BatchNorm1d(3), (6, 3)),
    "bn1d-NCL": (lambda: BatchNorm1d(3, momentum=0.3), (4, 3, 5)),
    "bn2d": (lambda: BatchNorm2d(2, eps=1e-3), (3, 2, 3, 4)),
    # the fused activation (spec "bn-relu"): ReLU fused in the CPU set's batch norm passes
    # (L = 1, odd planes), GELU composed with the activation ops on every set
    "bn1d-NC-relu": (lambda: BatchNorm1d(3, activation="relu"), (6, 3)),
    "bn1d-NCL1-relu": (lambda: BatchNorm1d(4, momentum=0.3, activation="relu"), (5, 4, 1)),
    "bn2d-relu": (lambda: BatchNorm2d(2, eps=1e-3, activation="relu"), (3, 2, 5, 7)),
    "bn2d-gelu": (lambda: BatchNorm2d(3, activation="gelu"), (2, 3, 3, 3)),
    "ln-1d": (lambda: LayerNorm(5), (4, 5)),
    "ln-2d": (lambda: LayerNorm((3, 4)), (2, 3, 4)),
    "ln-last-of-3": (lambda: LayerNorm(4, eps=1e-3), (2, 3, 4)),
}
IDS = sorted(NORM_CASES)


def _random_params(layer, rng):
    return {name: rng.uniform(0.5, 1.5, shape) if name == "weight" else rng.normal(size=shape)
            for name, shape in layer.param_specs()}


def _build(spec, layer, shape, rng, dtype="float64", seed=0):
    model = lc.model_for(spec, [layer], input_shape=shape[1:], dtype=dtype, seed=seed)
    if layer.param_specs():
        model.set_params({f"0.{k}": v for k, v in _random_params(layer, rng).items()})
    return model


def _inputs(rng, shape):
    # Channel-dependent offsets, so a mean over the wrong axis shows.
    return rng.normal(size=shape) * 1.5 + np.arange(shape[1]).reshape((1, -1) + (1,) * (len(shape) - 2))


# ---- central differences ---------------------------------------------------------------------------
@pytest.mark.parametrize("case", IDS)
def test_central_differences(backend_spec, case, rng):
    """L = Σ W·Y in training mode: backprop's dX and parameter gradients against (L(+h) − L(−h))/2h."""
    make, shape = NORM_CASES[case]
    layer = make()
    model = _build(backend_spec, layer, shape, rng)
    be = model.backend
    X = _inputs(rng, shape)
    W = rng.normal(size=shape)

    def loss():
        Y, _ = model.forward(be.to_device(X), train=True, input_grad=False)
        return float(np.sum(W * be.to_host(Y)))

    model.zero_grads()
    _, backprop = model.forward(be.to_device(X), train=True)
    dX = np.array(be.to_host(backprop(be.to_device(W))))
    analytic = np.array(be.to_host(model.flat_grads))
    lc.assert_close(dX, lc.central_differences(loss, X), 1e-6, f"{case} dX")
    lc.assert_close(analytic, lc.central_differences(loss, model.flat_params), 1e-6,
                    f"{case} parameter gradients")


@pytest.mark.parametrize("case", ["bn1d-NC", "bn2d", "ln-2d"])
def test_gradcheck_in_a_model(backend_spec, case, rng):
    """The layer between Dense/Conv layers: the library's gradcheck (parameters, float64)."""
    if case == "bn2d":
        # No conv bias: batch norm removes any per-channel constant, so its gradient is 0.
        layers = [gb.Conv2d(1, 2, 3, padding=1, bias=False), BatchNorm2d(2), gb.Flatten(),
                  gb.Dense(32, 3)]
        X, shape = rng.normal(size=(5, 1, 4, 4)), (1, 4, 4)
    elif case == "ln-2d":
        layers = [gb.Flatten(), LayerNorm(12), gb.Dense(12, 3, activation="tanh")]
        X, shape = rng.normal(size=(5, 3, 4)), (3, 4)
    else:
        layers = [gb.Dense(4, 3, activation="tanh"), BatchNorm1d(3), gb.Dense(3, 3)]
        X, shape = rng.normal(size=(5, 4)), (4,)
    model = lc.model_for(backend_spec, layers, input_shape=shape)
    err = gb.gradcheck(model, gb.SoftmaxCrossEntropy(), X, rng.integers(0, 3, 5))
    assert err < 1e-6


# ---- PyTorch's layers --------------------------------------------------------------------------------
def _torch_twin(torch, case, layer):
    nn = torch.nn
    if isinstance(layer, BatchNorm2d):
        m = nn.BatchNorm2d(layer.num_features, eps=layer.eps, momentum=layer.momentum)
    elif isinstance(layer, BatchNorm1d):
        m = nn.BatchNorm1d(layer.num_features, eps=layer.eps, momentum=layer.momentum)
    else:
        m = nn.LayerNorm(layer.normalized_shape, eps=layer.eps)
    act = getattr(layer, "activation", "identity")
    if act != "identity":  # BatchNorm2d then nn.ReLU (nn.GELU), the twin keeping BN's attributes
        fn = {"relu": nn.ReLU(), "gelu": nn.GELU()}[act]
        m.register_forward_hook(lambda _module, _inputs, out: fn(out))
    return m.double()


@pytest.mark.parametrize("case", IDS)
def test_forward_backward_equal_torch(backend_spec, case, rng):
    torch = pytest.importorskip("torch")
    make, shape = NORM_CASES[case]
    layer = make()
    params = _random_params(layer, rng)
    X, dY = _inputs(rng, shape), rng.normal(size=shape)
    Y, dX, grads = lc.run_layer(backend_spec, layer, X, dY, params=params)
    twin = _torch_twin(torch, case, layer).train()
    with torch.no_grad():
        twin.weight.copy_(torch.tensor(params["weight"]))
        twin.bias.copy_(torch.tensor(params["bias"]))
    Xt = torch.tensor(X, requires_grad=True)
    Yt = twin(Xt)
    Yt.backward(torch.tensor(dY))
    lc.assert_close(Y, Yt.detach().numpy(), 1e-10, f"{case} Y")
    lc.assert_close(dX, Xt.grad.numpy(), 1e-10, f"{case} dX")
    lc.assert_close(grads["weight"], twin.weight.grad.numpy(), 1e-10, f"{case} dweight")
    lc.assert_close(grads["bias"], twin.bias.grad.numpy(), 1e-10, f"{case} dbias")


@pytest.mark.parametrize("case", IDS)
def test_running_stats_and_eval_equal_torch(backend_spec, case, rng):
    """Several training steps (each batch different), then inference on new data."""
    torch = pytest.importorskip("torch")
    make, shape = NORM_CASES[case]
    layer = make()
    model = _build(backend_spec, layer, shape, rng)
    be = model.backend
    params = model.get_params()
    twin = _torch_twin(torch, case, layer).train()
    with torch.no_grad():
        twin.weight.copy_(torch.tensor(params["0.weight"]))
        twin.bias.copy_(torch.tensor(params["0.bias"]))
    for _ in range(4):
        X = _inputs(rng, shape) * rng.uniform(0.5, 2)
        Y, _ = model.forward(be.to_device(X), train=True)
        lc.assert_close(np.array(be.to_host(Y)), twin(torch.tensor(X)).detach().numpy(), 1e-10,
                        f"{case} training output")
    state = model.get_state()
    assert int(state["step"]) == 4
    if isinstance(layer, LayerNorm):
        assert set(state) == {"step"}
    else:
        lc.assert_close(state["0.running_mean"], twin.running_mean.numpy(), 1e-12, "running_mean")
        lc.assert_close(state["0.running_var"], twin.running_var.numpy(), 1e-12, "running_var")
        assert int(state["0.num_batches_tracked"]) == int(twin.num_batches_tracked) == 4
    twin.eval()
    X = _inputs(rng, shape)
    Y = model.predict(X)
    lc.assert_close(Y, twin(torch.tensor(X)).detach().numpy(), 1e-10, f"{case} eval output")


# ---- batch norm specifics -----------------------------------------------------------------------------
def test_running_stats_formula(rng):
    """PyTorch's convention, written out: running = (1 − m)·running + m·batch, var unbiased."""
    layer = BatchNorm1d(3, momentum=0.25)
    model = lc.model_for(("cpu", "fused"), [layer], input_shape=(3,))
    X1, X2 = rng.normal(size=(5, 3)) + 2, rng.normal(size=(7, 3)) * 3
    model.forward(model.backend.to_device(X1), train=True)
    model.forward(model.backend.to_device(X2), train=True)
    rm, rv = np.zeros(3), np.ones(3)
    for X in (X1, X2):
        rm = 0.75 * rm + 0.25 * X.mean(axis=0)
        rv = 0.75 * rv + 0.25 * X.var(axis=0, ddof=1)
    state = model.get_state()
    np.testing.assert_allclose(state["0.running_mean"], rm, rtol=1e-12)
    np.testing.assert_allclose(state["0.running_var"], rv, rtol=1e-12)
    # Inference uses them, and changes nothing.
    X = rng.normal(size=(4, 3))
    Y = model.predict(X)
    np.testing.assert_allclose(Y, (X - rm) / np.sqrt(rv + 1e-5), rtol=1e-12, atol=1e-14)
    np.testing.assert_array_equal(model.get_state()["0.running_mean"], state["0.running_mean"])


def test_float32_model_close_to_float64(rng):
    X = rng.normal(size=(16, 4, 3, 3)) * 2 + 1
    outs = []
    for dtype in ("float32", "float64"):
        model = lc.model_for(("cpu", "fused"), [BatchNorm2d(4), LayerNorm((4, 3, 3))],
                             input_shape=(4, 3, 3), dtype=dtype)
        Y, bp = model.forward(model.backend.to_device(X), train=True)
        dX = bp(model.backend.to_device(np.ones_like(X) + X))
        outs.append((np.asarray(Y, np.float64), np.asarray(dX, np.float64)))
    np.testing.assert_allclose(outs[0][0], outs[1][0], rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(outs[0][1], outs[1][1], rtol=1e-4, atol=1e-4)


def test_one_value_per_channel_is_refused_in_training():
    model = lc.model_for(("cpu", "fused"), [BatchNorm1d(3)], input_shape=(3,))
    with pytest.raises(ValueError, match=r"expected more than 1 value per channel when training"):
        model.forward(np.zeros((1, 3)), train=True)
    assert model.predict(np.zeros((1, 3))).shape == (1, 3)  # inference is fine


def test_shape_errors_name_the_layer():
    with pytest.raises(ValueError, match=r"BatchNorm2d\(3\): expected 3 channels .*got 2"):
        gb.Sequential([BatchNorm2d(3)], input_shape=(2, 4, 4))
    with pytest.raises(ValueError, match=r"expected a per-sample input of shape \(C, H, W\)"):
        gb.Sequential([BatchNorm2d(3)], input_shape=(3, 4))
    with pytest.raises(ValueError, match=r"expected a per-sample input of shape \(C,\) or \(C, L\)"):
        gb.Sequential([BatchNorm1d(3)], input_shape=(3, 4, 4))
    with pytest.raises(ValueError, match=r"last dimensions are \(3, 4\), got shape \(4, 3\)"):
        gb.Sequential([LayerNorm((3, 4))], input_shape=(4, 3))


@pytest.mark.parametrize("bad,match", [
    (lambda: BatchNorm1d(0), r"num_features"),
    (lambda: BatchNorm2d(3, eps=0), r"eps: expected a finite number > 0, got 0"),
    (lambda: BatchNorm2d(3, momentum=1.5), r"momentum: expected a number in \[0, 1\]"),
    (lambda: BatchNorm1d(3, momentum=None), r"momentum"),
    (lambda: LayerNorm(()), r"normalized_shape"),
    (lambda: LayerNorm(4, eps=-1.0), r"eps"),
    (lambda: Dropout(1.0), r"p: expected a drop probability in \[0, 1\), got 1.0 \(p = 1 would"),
    (lambda: Dropout(-0.1), r"p: expected a drop probability"),
    (lambda: Dropout("0.5"), r"p: expected a drop probability"),
])
def test_bad_arguments(bad, match):
    with pytest.raises(ValueError, match=match):
        bad()


def test_repr_and_config_round_trip():
    for layer in (BatchNorm1d(3), BatchNorm2d(8, eps=1e-3, momentum=0.01), LayerNorm((3, 4)),
                  LayerNorm(7), Dropout(0.25)):
        again = type(layer)(**json.loads(json.dumps(layer.config())))
        assert repr(again) == repr(layer)
        assert again.config() == layer.config()
    assert repr(BatchNorm2d(8, eps=1e-3, momentum=0.01)) == "BatchNorm2d(8, eps=0.001, momentum=0.01)"
    assert repr(LayerNorm((3, 4))) == "LayerNorm((3, 4))" and repr(LayerNorm(7)) == "LayerNorm(7)"
    assert repr(Dropout(0.25)) == "Dropout(p=0.25)"


def test_batch_norm_activation_repr_config_and_errors():
    layer = BatchNorm2d(8, momentum=0.2, activation="relu")
    assert repr(layer) == "BatchNorm2d(8, momentum=0.2, activation='relu')"
    assert layer.config() == {"num_features": 8, "eps": 1e-5, "momentum": 0.2, "activation": "relu"}
    again = BatchNorm2d(**json.loads(json.dumps(layer.config())))
    assert repr(again) == repr(layer) and again.config() == layer.config()
    # identity: the config (a checkpoint's architecture) as before activation= existed
    assert BatchNorm1d(3, activation="identity").config() == BatchNorm1d(3).config() == \
        {"num_features": 3, "eps": 1e-5, "momentum": 0.1}
    assert repr(BatchNorm1d(3, activation="identity")) == "BatchNorm1d(3)"
    with pytest.raises(ValueError, match=r"activation"):
        BatchNorm1d(3, activation="relux")
    model = lc.model_for(("cpu", "fused"), [BatchNorm1d(3, activation="relu")], input_shape=(3,))
    assert list(model.get_params()) == ["0.weight", "0.bias"]


def test_param_and_state_names():
    model = lc.model_for(("cpu", "reference"), [BatchNorm1d(3), LayerNorm(3)], input_shape=(3,))
    assert list(model.get_params()) == ["0.weight", "0.bias", "1.weight", "1.bias"]
    assert sorted(model.get_state()) == ["0.num_batches_tracked", "0.running_mean",
                                         "0.running_var", "step"]
    p, s = model.get_params(), model.get_state()
    np.testing.assert_array_equal(p["0.weight"], np.ones(3))
    np.testing.assert_array_equal(p["1.bias"], np.zeros(3))
    np.testing.assert_array_equal(s["0.running_var"], np.ones(3))
    assert s["0.num_batches_tracked"].dtype == np.int64


# ---- Dropout ---------------------------------------------------------------------------------------------
def test_dropout_mask_from_seed_index_and_step(backend_spec, rng):
    p = 0.4
    model = lc.model_for(backend_spec, [gb.Dense(5, 6), Dropout(p), gb.Dense(6, 6), Dropout(p)],
                         seed=17)
    be = model.backend
    X = rng.normal(size=(8, 5))
    ref = ReferenceOps(np)
    masks = []
    for step in range(3):
        assert model.step == step
        # The Dropout layers are leaves 1 and 3; each has its own mask, new every step.
        leaves = [layer for _, layer in model.leaves()]
        assert [leaf.index for leaf in leaves] == [0, 1, 2, 3]
        m1 = ref.dropout_mask((8, 6), p, 17, 1, step)
        m3 = ref.dropout_mask((8, 6), p, 17, 3, step)
        masks += [m1, m3]
        for leaf, mask in ((leaves[1], m1), (leaves[3], m3)):
            Y, bp = leaf.forward(be.to_device(np.ones((8, 6))), train=True)
            np.testing.assert_array_equal(np.asarray(be.to_host(Y)), mask / (1 - p))
            dX = bp(be.to_device(np.full((8, 6), 2.0)))
            np.testing.assert_array_equal(np.asarray(be.to_host(dX)), 2 * mask / (1 - p))
        model.zero_grads()
        _, backprop = model.forward(be.to_device(X), train=True)  # counts the step
        backprop(be.to_device(np.ones((8, 6))))
    assert all(not np.array_equal(a, b) for i, a in enumerate(masks) for b in masks[i + 1:])


def test_dropout_identity_in_inference_and_gradcheck(backend_spec, rng):
    model = lc.model_for(backend_spec, [gb.Dense(4, 8, activation="tanh"), Dropout(0.3),
                                        gb.Dense(8, 3)])
    X = rng.normal(size=(6, 4))
    no_dropout = lc.model_for(backend_spec, [gb.Dense(4, 8, activation="tanh"), gb.Dense(8, 3)])
    no_dropout.set_params({k.replace("2.", "1."): v for k, v in model.get_params().items()})
    np.testing.assert_array_equal(model.predict(X), no_dropout.predict(X))
    err = gb.gradcheck(model, gb.SoftmaxCrossEntropy(), X, rng.integers(0, 3, 6))
    assert err < 1e-6


def test_dropout_keep_rate_and_scale():
    model = lc.model_for(("cpu", "fused"), [Dropout(0.25)], input_shape=(1000,))
    Y, _ = model.forward(np.ones((100, 1000)), train=True)
    kept = Y != 0
    assert abs(kept.mean() - 0.75) < 5 * np.sqrt(0.75 * 0.25 / kept.size)
    np.testing.assert_array_equal(Y[kept], 1 / 0.75)


def test_dropout_resumed_run_draws_the_same_masks(rng):
    """The step counter is model state: set_state puts it back, and with it the masks."""
    X = rng.normal(size=(4, 6))
    a = lc.model_for(("cpu", "fused"), [Dropout(0.5)], input_shape=(6,), seed=3)
    for _ in range(5):
        a.forward(X, train=True)
    Ya = np.array(a.forward(X, train=True)[0])
    b = lc.model_for(("cpu", "fused"), [Dropout(0.5)], input_shape=(6,), seed=3)
    b.set_state({"step": np.array(5)})
    np.testing.assert_array_equal(np.array(b.forward(X, train=True)[0]), Ya)
