"""Functional graphs (gb.Input, layers on symbolic tensors, Add, Concatenate, gb.Model): against
torch.nn in float64 (skipped without torch), gradcheck, several inputs and outputs, checkpoints
and exact resume, the command line, and the errors of building a graph; on every backend."""

import os
import subprocess
import sys

import numpy as np
import pytest
from layer_cases import assert_close, assert_steps_follow_torch, central_differences

import gpubackprop as gb
from gpubackprop.checkpoint import (
    Checkpointer,
    CheckpointError,
    architecture,
    build_layer,
    load_checkpoint,
    save_checkpoint,
)


def branchy(spec, dropout=False, seed=0):
    """x -> conv1 (tanh) = h; a = shared(h); b = shared(sigmoid(h)) (one Conv2d at two places);
    s = a + h (a skip); concat(s, b) over channels -> avgpool -> flatten -> dense."""
    device, kernels = spec
    x = gb.Input((2, 5, 5))
    conv1 = gb.Conv2d(2, 4, 3, padding=1, activation="tanh")
    shared = gb.Conv2d(4, 4, 3, padding=1, activation="relu")
    h = conv1(x)
    a = shared(h)
    b = shared(gb.Activation("sigmoid")(h))
    s = gb.Add()([a, h])
    cat = gb.Concatenate(axis=0)([s, b])
    f = gb.Flatten()(gb.AvgPool2d(2)(cat))
    if dropout:
        f = gb.Dropout(0.3)(f)
    dense = gb.Dense(32, 3)
    y = dense(f)
    model = gb.Model(inputs=x, outputs=y, device=device, dtype="float64", seed=seed, kernels=kernels)
    return model, conv1, shared, dense


def torch_branchy(torch, model, conv1, shared, dense):
    nn = torch.nn

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv1 = nn.Conv2d(2, 4, 3, padding=1)
            self.shared = nn.Conv2d(4, 4, 3, padding=1)
            self.dense = nn.Linear(32, 3)

        def forward(self, x):
            h = torch.tanh(self.conv1(x))
            a = torch.relu(self.shared(h))
            b = torch.relu(self.shared(torch.sigmoid(h)))
            cat = torch.cat([a + h, b], dim=1)
            return self.dense(torch.flatten(nn.functional.avg_pool2d(cat, 2), 1))

    net = Net().double()
    pos = {id(layer): i for i, layer in enumerate(model.layers)}
    names = {f"{pos[id(conv1)]}.weight": "conv1.weight", f"{pos[id(conv1)]}.bias": "conv1.bias",
             f"{pos[id(shared)]}.weight": "shared.weight", f"{pos[id(shared)]}.bias": "shared.bias",
             f"{pos[id(dense)]}.W": "dense.weight", f"{pos[id(dense)]}.b": "dense.bias"}
    state = net.state_dict()
    model.set_params({k: state[v].numpy() for k, v in names.items()})
    return net, names


def test_graph_keys_are_the_distinct_layers_in_first_use_order():
    model, conv1, shared, dense = branchy(("cpu", "reference"))
    assert model.layers[0] is conv1 and model.layers[1] is shared and model.layers[-1] is dense
    assert list(model.get_params()) == ["0.weight", "0.bias", "1.weight", "1.bias", "7.W", "7.b"]
    assert model.input_shape == (2, 5, 5) and model.output_shape == (3,)
    assert isinstance(model, gb.Model) and not isinstance(model, gb.Sequential)


def test_graph_equals_torch_in_float64(backend_spec, rng):
    torch = pytest.importorskip("torch")
    model, conv1, shared, dense = branchy(backend_spec)
    net, names = torch_branchy(torch, model, conv1, shared, dense)
    be = model.backend
    X, dY = rng.normal(size=(5, 2, 5, 5)), rng.normal(size=(5, 3))
    model.zero_grads()
    Y, backprop = model.forward(be.to_device(X), train=True, input_grad=True)
    dX = backprop(be.to_device(dY))
    Xt = torch.tensor(X, requires_grad=True)
    Yt = net(Xt)
    (Yt * torch.tensor(dY)).sum().backward()
    assert_close(np.asarray(be.to_host(Y)), Yt.detach().numpy(), what="outputs")
    assert_close(np.asarray(be.to_host(dX)), Xt.grad.numpy(), what="input gradient")
    params = dict(net.named_parameters())
    grads = model.get_grads()
    for key, torch_name in names.items():  # the shared conv's is the sum over its two uses
        assert_close(grads[key], params[torch_name].grad.numpy(), what=key)
    assert_steps_follow_torch(torch, model, gb.Adam(0.01), net, torch.optim.Adam(net.parameters(), lr=0.01),
                              names, rng.normal(size=(24, 2, 5, 5)), rng.integers(0, 3, 24))


def test_graph_gradcheck(backend_spec, rng):
    model, *_ = branchy(backend_spec)
    err = gb.gradcheck(model, gb.SoftmaxCrossEntropy(), rng.normal(size=(4, 2, 5, 5)),
                       rng.integers(0, 3, 4))
    assert err < 1e-6


def test_a_shared_layers_gradient_is_the_sum_over_its_uses(backend_spec, rng):
    """Dense used twice, y = D(D(x)) + D(x): its gradient against central differences; the
    check fails if either use's contribution is dropped (or overwritten by the other)."""
    device, kernels = backend_spec
    x = gb.Input((3,))
    d = gb.Dense(3, 3, activation="tanh")
    h = d(x)
    model = gb.Model(inputs=x, outputs=gb.Add()([d(h), h]), device=device, dtype="float64",
                     kernels=kernels)
    be = model.backend
    X, R = rng.normal(size=(4, 3)), rng.normal(size=(4, 3))
    Xd = be.to_device(X)
    model.zero_grads()
    _, backprop = model.forward(Xd, train=True)
    dX = backprop(be.to_device(R))
    analytic = np.array(be.to_host(model.flat_grads))

    def f():
        return float((np.asarray(be.to_host(model(Xd))) * R).sum())

    assert_close(analytic, central_differences(f, model.flat_params), 1e-6, "shared Dense")
    assert_close(np.asarray(be.to_host(dX)), central_differences(f, Xd), 1e-6, "input gradient")


def two_in_two_out(spec, seed=0):
    """A (6,) vector and a (2, 4, 4) image in; class logits (3) and a regression (2) out."""
    device, kernels = spec
    v, img = gb.Input((6,)), gb.Input((2, 4, 4))
    hv = gb.Dense(6, 8, activation="tanh")(v)
    hi = gb.Flatten()(gb.MaxPool2d(2)(gb.Conv2d(2, 3, 3, padding=1, activation="relu")(img)))
    joint = gb.Concatenate(axis=-1)([hv, hi])  # 8 + 12 features
    logits = gb.Dense(20, 3)(joint)
    reg = gb.Dense(20, 2)(gb.Add()([joint, joint]))
    return gb.Model(inputs=[v, img], outputs=[logits, reg], device=device, dtype="float64",
                    seed=seed, kernels=kernels)


def two_data(rng, n=12):
    return ([rng.normal(size=(n, 6)), rng.normal(size=(n, 2, 4, 4))],
            [rng.integers(0, 3, n), rng.normal(size=(n, 2))])


def test_two_inputs_two_outputs(backend_spec, rng):
    model = two_in_two_out(backend_spec)
    be = model.backend
    assert model.input_shape == [(6,), (2, 4, 4)] and model.output_shape == [(3,), (2,)]
    X, y = two_data(rng)
    Xd = [be.to_device(a) for a in X]
    R = [rng.normal(size=(12, 3)), rng.normal(size=(12, 2))]
    model.zero_grads()
    Y, backprop = model.forward(Xd, train=True, input_grad=True)
    assert [tuple(a.shape) for a in Y] == [(12, 3), (12, 2)]
    dX = backprop([be.to_device(r) for r in R])
    assert isinstance(dX, list) and [tuple(d.shape) for d in dX] == [(12, 6), (12, 2, 4, 4)]

    def f():
        return sum(float((np.asarray(be.to_host(o)) * r).sum()) for o, r in zip(model(Xd), R, strict=True))

    for i in range(2):  # the input gradients, in inputs= order
        assert_close(np.asarray(be.to_host(dX[i])), central_differences(f, Xd[i]), 1e-6, f"dX[{i}]")
    loss = gb.MultiLoss([gb.SoftmaxCrossEntropy(), gb.MSE()], weights=[1.0, 0.5])
    assert gb.gradcheck(model, loss, X, y) < 1e-6
    before = gb.evaluate(model, loss, X, y)["loss"]
    history = gb.fit(model, loss, gb.Adam(0.02), X, y, epochs=15, batch_size=4, progress=False)
    assert history["loss"][-1] < 0.5 * history["loss"][0]
    assert gb.evaluate(model, [gb.SoftmaxCrossEntropy(), gb.MSE()], X, y)["loss"] < before
    probs, reg = model.predict(X, loss=loss)
    assert probs.shape == (12, 3) and reg.shape == (12, 2)
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, rtol=1e-12)
    np.testing.assert_allclose(reg, model.predict(X)[1], rtol=1e-12)


def test_multi_output_errors():
    model = two_in_two_out(("cpu", "reference"))
    X, y = two_data(np.random.default_rng(0))
    with pytest.raises(ValueError, match=r"loss: the model has 2 outputs; expected a gb.MultiLoss"):
        gb.evaluate(model, gb.SoftmaxCrossEntropy(), X, y)
    with pytest.raises(ValueError, match=r"X: expected a list of 2 input arrays"):
        gb.evaluate(model, [gb.SoftmaxCrossEntropy(), gb.MSE()], X[0], y)
    with pytest.raises(ValueError, match=r"y: expected a list of 2 target arrays"):
        gb.evaluate(model, [gb.SoftmaxCrossEntropy(), gb.MSE()], X, y[0])
    with pytest.raises(ValueError, match=r"X\[1\] and X\[0\]|X\[0\] and X\[1\]"):
        gb.evaluate(model, [gb.SoftmaxCrossEntropy(), gb.MSE()], [X[0], X[1][:5]], y)
    with pytest.raises(ValueError, match=r"weights: expected 2 finite numbers >= 0"):
        gb.MultiLoss([gb.MSE(), gb.MSE()], weights=[1.0])


def test_graph_building_errors():
    x = gb.Input((4,))
    with pytest.raises(ValueError, match=r"Dense\(5, 2, .*\) called on input of shape \(4,\): "
                                         r"expected 5 input features, got 4"):
        gb.Dense(5, 2)(x)
    with pytest.raises(ValueError, match=r"Add\(\) called on input of shape \(4,\), \(3,\): "
                                         r"expected inputs of one shape"):
        gb.Add()([x, gb.Input((3,))])
    with pytest.raises(ValueError, match=r"Concatenate\(axis=1\) .*axis: expected an axis of the "
                                         r"per-sample shape, in \[-1, 0\], got 1"):
        gb.Concatenate(axis=1)([x, x])
    with pytest.raises(ValueError, match=r"expected inputs that agree on every axis but 0"):
        gb.Concatenate(axis=0)([gb.Input((2, 3)), gb.Input((2, 4))])
    with pytest.raises(TypeError, match=r"Dense\(4, 2, .*\): expected a symbolic tensor"):
        gb.Dense(4, 2)(np.zeros((1, 4)))
    y = gb.Dense(4, 2)(x)
    with pytest.raises(ValueError, match=r"outputs: depend on an Input of shape \(4,\) that is not "
                                         r"in inputs="):
        gb.Model(inputs=gb.Input((4,)), outputs=y)
    with pytest.raises(ValueError, match=r"inputs\[1\]: no output depends on it"):
        gb.Model(inputs=[x, gb.Input((2,))], outputs=y)
    with pytest.raises(ValueError, match=r"inputs\[0\]: expected a gb.Input"):
        gb.Model(inputs=y, outputs=y)
    act = gb.Activation("relu")
    act(x)
    with pytest.raises(ValueError, match=r"called at several places with different input shapes"):
        gb.Model(inputs=[x, z := gb.Input((3,))], outputs=[act(x), act(z)])


def test_a_sequential_inside_a_graph_and_a_graph_inside_a_sequential(backend_spec, rng):
    device, kernels = backend_spec
    x = gb.Input((4,))
    block = gb.Sequential([gb.Dense(4, 4, activation="tanh"), gb.Dense(4, 4)])
    y = gb.Add()([block(x), x])
    graph = gb.Model(inputs=x, outputs=y, device="cpu")
    model = gb.Sequential([gb.Dense(3, 4), graph, gb.Dense(4, 2)], device=device, dtype="float64",
                          kernels=kernels)
    assert list(model.get_params()) == ["0.W", "0.b", "1.0.0.W", "1.0.0.b", "1.0.1.W", "1.0.1.b",
                                        "2.W", "2.b"]
    assert gb.gradcheck(model, gb.SoftmaxCrossEntropy(), rng.normal(size=(5, 3)),
                        rng.integers(0, 2, 5)) < 1e-6
    with pytest.raises(RuntimeError, match="part of another model"):
        graph.get_params()


def test_checkpoint_round_trip_and_exact_resume(tmp_path, backend_spec, rng):
    X, y = rng.normal(size=(20, 2, 5, 5)), rng.integers(0, 3, 20)

    def make():
        model, *_ = branchy(backend_spec, dropout=True, seed=3)
        return model, gb.SoftmaxCrossEntropy(), gb.Adam(0.01)

    kw = dict(epochs=3, batch_size=8, progress=False)
    model, loss, opt = make()
    ref_history = gb.fit(model, loss, opt, X, y, **kw)
    ref = model.get_params()

    class Interrupt(Exception):
        pass

    def stop(step):
        if step == 5:
            raise Interrupt

    path = tmp_path / "graph.npz"
    model, loss, opt = make()
    with pytest.raises(Interrupt):
        gb.fit(model, loss, opt, X, y, on_checkpoint=Checkpointer(path, model, opt, loss),
               checkpoint_every=2, on_step=stop, **kw)
    ck = load_checkpoint(path)
    assert ck.architecture["type"] == "Model"
    model, loss, opt = make()
    state = ck.restore(model, opt, loss)
    history = gb.fit(model, loss, opt, X, y, state=state, **kw)
    assert history == ref_history
    for key, value in model.get_params().items():
        assert np.array_equal(value, ref[key]), key
    # A rebuilt model (from the architecture alone) predicts the same.
    save_checkpoint(path, model, opt, loss)
    device, kernels = backend_spec
    rebuilt = load_checkpoint(path).build_model(device=device, kernels=kernels)
    assert isinstance(rebuilt, gb.Model) and architecture(rebuilt) == architecture(model)
    np.testing.assert_array_equal(rebuilt.predict(X), model.predict(X))
    again = build_layer(architecture(model))
    assert architecture(again) == architecture(model)
    other, *_ = branchy(backend_spec)  # no Dropout: another architecture
    with pytest.raises(CheckpointError, match=r"made for the architecture Model\[Conv2d\(2, 4, 3, "
                                              r".*Dropout\(p=0.3\), Dense\(32, 3, identity\)\], but "
                                              r"the model is Model\[Conv2d"):
        load_checkpoint(path).restore_model(other)


def test_the_command_line_evaluates_and_predicts_a_graph_checkpoint(tmp_path):
    rng = np.random.default_rng(0)
    X = rng.normal(size=(60, 6))
    y = (X[:, 0] > 0).astype(np.int64) + (X[:, 1] > 0)
    np.savez(tmp_path / "data.npz", X_train=X, y_train=y, X_test=X, y_test=y)
    x = gb.Input((6,))
    h = gb.Dense(6, 8, activation="tanh")(x)
    out = gb.Dense(14, 3)(gb.Concatenate()([h, x]))
    model = gb.Model(inputs=x, outputs=out, device="cpu", dtype="float32", seed=0,
                     kernels="reference")
    loss = gb.SoftmaxCrossEntropy()
    gb.fit(model, loss, gb.Adam(0.05), X, y, epochs=20, batch_size=16, progress=False)
    ck = tmp_path / "graph.npz"
    config = {"dataset": f"npz:{tmp_path / 'data.npz'}", "scale": "none", "header": "auto",
              "label_column": None, "test_split": 0.2, "val_split": 0.0, "seed": 0}
    save_checkpoint(ck, model, loss=loss, config=config)
    np.savetxt(tmp_path / "in.csv", X[:5], delimiter=",")
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    common = ["--device", "cpu", "--kernels", "reference"]
    r = subprocess.run([sys.executable, "-m", "gpubackprop", "predict", "--checkpoint", str(ck),
                        "--input", str(tmp_path / "in.csv"), "--output", str(tmp_path / "out.csv"),
                        *common], capture_output=True, text=True, env=env, timeout=180)
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "out.csv").exists()
    r = subprocess.run([sys.executable, "-m", "gpubackprop", "evaluate", "--checkpoint", str(ck),
                        "--dataset", f"npz:{tmp_path / 'data.npz'}", "--json", *common],
                       capture_output=True, text=True, env=env, timeout=180)
    assert r.returncode == 0, r.stderr
    assert '"accuracy"' in r.stdout


class OneHot(gb.layers.Layer):
    """Integer class indices (N, 1) -> one-hot rows (N, n) in the model dtype; no input gradient.
    (A test layer reading an integer input, as an embedding would.)"""

    def __init__(self, n):
        self.n = n

    def __repr__(self):
        return f"OneHot({self.n})"

    def config(self):
        return {"n": self.n}

    def infer_shape(self, input_shape):
        return (self.n,)

    def forward(self, X, train=False, input_grad=True):
        xp = self.backend.xp
        assert X.dtype == np.int64 and not input_grad  # indices arrive unconverted, need no gradient
        Y = (X == xp.arange(self.n)).astype(self.backend.dtype)
        return Y, (lambda dY: None) if train else gb.layers.base.no_backprop


@pytest.fixture
def one_hot_registered():
    from gpubackprop.layers import registry

    registry.register(OneHot)
    yield
    del registry.LAYER_TYPES["OneHot"]


def test_integer_inputs_reach_layers_unconverted_and_get_no_gradient(backend_spec, rng,
                                                                     one_hot_registered):
    device, kernels = backend_spec
    idx, feats = gb.Input((1,), dtype="int64"), gb.Input((3,))
    y = gb.Dense(7, 2)(gb.Concatenate()([OneHot(4)(idx), feats]))
    model = gb.Model(inputs=[idx, feats], outputs=y, device=device, dtype="float64",
                     kernels=kernels)
    assert model.input_dtypes == [np.dtype("int64"), None]
    be = model.backend
    ids, F = rng.integers(0, 4, (6, 1)), rng.normal(size=(6, 3))
    _, backprop = model.forward([be.to_device(ids, np.int64), be.to_device(F)], train=True,
                                input_grad=True)
    dI, dF = backprop(be.to_device(rng.normal(size=(6, 2))))
    assert dI is None and tuple(dF.shape) == (6, 3)
    labels = rng.integers(0, 2, 6)
    assert gb.gradcheck(model, gb.SoftmaxCrossEntropy(), [ids, F], labels) < 1e-6
    gb.fit(model, gb.SoftmaxCrossEntropy(), gb.SGD(0.1), [ids, F], labels, epochs=2, batch_size=4,
           progress=False)
    assert model.predict([ids, F]).shape == (6, 2)
    with pytest.raises(TypeError, match=r"X\[0\]: expected integers for an input of dtype int64, "
                                        r"got array of shape \(6, 1\) and dtype float64"):
        model.predict([ids.astype(float), F])
    again = gb.Model.from_config(model.config(), device=device, kernels=kernels, dtype="float64")
    assert again.input_dtypes == model.input_dtypes
    with pytest.raises(ValueError, match=r"dtype: expected None \(the model's dtype\) or an integer"):
        gb.Input((3,), dtype="float16")
