"""RNN, LSTM, GRU and LastStep: against PyTorch (outputs, final states, every gradient, float64),
central differences through several steps and two layers, SGD steps of a sequence classifier, the
shape errors, gradient clipping across time, checkpoints; on every backend."""

import json

import numpy as np
import pytest
from layer_cases import assert_close, assert_steps_follow_torch, model_for

import gpubackprop as gb
from gpubackprop.checkpoint import load_checkpoint, save_checkpoint

N, T, F, H = 3, 5, 4, 6

# (our class, torch class name, keyword arguments)
CASES = [
    (gb.RNN, "RNN", {}),
    (gb.RNN, "RNN", {"nonlinearity": "relu", "num_layers": 2}),
    (gb.LSTM, "LSTM", {"num_layers": 2}),
    (gb.LSTM, "LSTM", {"bias": False}),
    (gb.GRU, "GRU", {"num_layers": 2}),
    (gb.GRU, "GRU", {"bias": False, "batch_first": False}),
    (gb.LSTM, "LSTM", {"num_layers": 2, "batch_first": False}),
    # Bidirectional: layer 1 reads both directions of layer 0; states (num_layers * 2, N, H).
    (gb.LSTM, "LSTM", {"num_layers": 2, "bidirectional": True}),
    (gb.GRU, "GRU", {"num_layers": 2, "bidirectional": True}),
    (gb.RNN, "RNN", {"num_layers": 2, "bidirectional": True}),
    (gb.RNN, "RNN", {"nonlinearity": "relu", "num_layers": 2, "bidirectional": True}),
    (gb.LSTM, "LSTM", {"num_layers": 2, "bidirectional": True, "batch_first": False}),
    (gb.GRU, "GRU", {"bidirectional": True, "bias": False}),
    # Dropout between layers does nothing in inference and, at p = 0, in training: as torch.
    (gb.LSTM, "LSTM", {"num_layers": 2, "bidirectional": True, "dropout": 0.0}),
]


def case_id(case):
    cls, _, kw = case
    return cls.__name__ + "".join(f"-{k}={v}" for k, v in kw.items())


def standalone(spec, layer, T=T):
    """The layer in a one-layer float64 model (which owns its parameters), and the backend."""
    model = model_for(spec, [layer], input_shape=(T, layer.input_size))
    return model, model.backend


def torch_twin(torch, name, layer, params):
    kw = {"nonlinearity": layer.nonlinearity} if name == "RNN" else {}
    tm = getattr(torch.nn, name)(layer.input_size, layer.hidden_size, num_layers=layer.num_layers,
                                 bias=layer.bias, batch_first=layer.batch_first,
                                 bidirectional=layer.bidirectional, dropout=layer.dropout,
                                 **kw).double()
    tm.load_state_dict({k.split(".", 1)[1]: torch.tensor(v) for k, v in params.items()})
    return tm


@pytest.mark.parametrize("case", CASES, ids=[case_id(c) for c in CASES])
def test_run_matches_torch_outputs_states_and_gradients(backend_spec, rng, case):
    torch = pytest.importorskip("torch")
    cls, name, kw = case
    layer = cls(F, H, **kw)
    model, be = standalone(backend_spec, layer)
    params = {k: rng.uniform(-0.6, 0.6, v.shape) for k, v in model.get_params().items()}
    model.set_params(params)
    tm = torch_twin(torch, name, layer, params)
    D = 2 if layer.bidirectional else 1
    L, lstm = layer.num_layers * D, cls is gb.LSTM
    x_shape = (N, T, F) if layer.batch_first else (T, N, F)
    X, dout = rng.normal(size=x_shape), rng.normal(size=(*x_shape[:2], D * H))
    h0, c0, dh, dc = (rng.normal(size=(L, N, H)) for _ in range(4))
    dev = be.to_device

    model.zero_grads()
    state = (dev(h0), dev(c0)) if lstm else dev(h0)
    out, state_n, backward = layer.run(dev(X), state, train=True)
    dX, dstate0 = backward(dev(dout), (dev(dh), dev(dc)) if lstm else dev(dh))

    t = {k: torch.tensor(v, requires_grad=True) for k, v in (("X", X), ("h0", h0), ("c0", c0))}
    if lstm:
        to, (thn, tcn) = tm(t["X"], (t["h0"], t["c0"]))
        tloss = (to * torch.tensor(dout)).sum() + (thn * torch.tensor(dh)).sum() \
            + (tcn * torch.tensor(dc)).sum()
    else:
        to, thn = tm(t["X"], t["h0"])
        tloss = (to * torch.tensor(dout)).sum() + (thn * torch.tensor(dh)).sum()
    tloss.backward()

    host = be.to_host
    h_n = state_n[0] if lstm else state_n
    dh0 = dstate0[0] if lstm else dstate0
    assert_close(host(out), to.detach().numpy(), what="out")
    assert_close(host(h_n), thn.detach().numpy(), what="h_n")
    assert_close(host(dX), t["X"].grad.numpy(), what="dX")
    assert_close(host(dh0), t["h0"].grad.numpy(), what="dh0")
    if lstm:
        assert_close(host(state_n[1]), tcn.detach().numpy(), what="c_n")
        assert_close(host(dstate0[1]), t["c0"].grad.numpy(), what="dc0")
    tgrads = {k: v.grad.numpy() for k, v in tm.named_parameters()}
    assert list(layer.grads) == list(tgrads)  # names and order (get_params, state_dict) as torch's
    assert list(layer.params) == list(tgrads)
    for k, g in tgrads.items():
        assert_close(host(layer.grads[k]), g, what=f"d{k}")


@pytest.mark.parametrize("bidirectional", [False, True])
def test_parameter_names_and_shapes_are_torchs(backend_spec, bidirectional):
    torch = pytest.importorskip("torch")
    for cls, name, G in ((gb.RNN, "RNN", 1), (gb.LSTM, "LSTM", 4), (gb.GRU, "GRU", 3)):
        layer = cls(F, H, num_layers=2, bidirectional=bidirectional)
        params = standalone(backend_spec, layer)[0].get_params()
        tm = getattr(torch.nn, name)(F, H, num_layers=2, bidirectional=bidirectional)
        assert [(k[2:], v.shape) for k, v in params.items()] == \
            [(k, tuple(v.shape)) for k, v in tm.named_parameters()]
        assert params["0.weight_ih_l0"].shape == (G * H, F)
        bound = 1 / np.sqrt(H)
        every = np.concatenate([v.ravel() for v in params.values()])
        assert np.abs(every).max() <= bound and np.abs(every).max() > 0.9 * bound


def test_no_state_means_zeros_and_unused_state_gradient(backend_spec, rng):
    layer = gb.LSTM(F, H)
    model, be = standalone(backend_spec, layer)
    X, dout = be.to_device(rng.normal(size=(N, T, F))), be.to_device(rng.normal(size=(N, T, H)))
    zeros = be.to_device(np.zeros((1, N, H)))
    model.zero_grads()
    out, (h_n, c_n), backward = layer.run(X, None, train=True)
    out, h_n, c_n = (np.array(be.to_host(a)) for a in (out, h_n, c_n))
    dX, (dh0, dc0) = backward(dout, None)
    dX, dh0 = np.array(be.to_host(dX)), np.array(be.to_host(dh0))
    grads = model.get_params()  # shapes only
    g1 = {k: np.array(be.to_host(v)) for k, v in layer.grads.items()}
    model.zero_grads()
    out2, _, backward2 = layer.run(X, (zeros, zeros), train=True)
    np.testing.assert_array_equal(be.to_host(out2), out)
    dX2, (dh02, _) = backward2(dout, (zeros, zeros))
    np.testing.assert_array_equal(be.to_host(dX2), dX)
    np.testing.assert_array_equal(be.to_host(dh02), dh0)
    for k in grads:
        np.testing.assert_array_equal(be.to_host(layer.grads[k[2:]]), g1[k[2:]])
    np.testing.assert_array_equal(h_n[0], out[:, -1])  # h_n is the last output


def test_inference_equals_training_forward(backend_spec, rng):
    for layer in (gb.RNN(F, H, num_layers=2), gb.LSTM(F, H), gb.GRU(F, H, num_layers=2)):
        model = model_for(backend_spec, [layer, gb.LastStep()], input_shape=(T, F))
        X = model.backend.to_device(rng.normal(size=(N, T, F)))
        Y, _ = model.forward(X, train=True)
        np.testing.assert_array_equal(model.backend.to_host(model(X)), model.backend.to_host(Y))


@pytest.mark.parametrize("layers", [
    lambda: [gb.LSTM(3, 4, num_layers=2), gb.LastStep(), gb.Dense(4, 3)],
    lambda: [gb.GRU(3, 4, num_layers=2), gb.LastStep(), gb.Dense(4, 3)],
    lambda: [gb.RNN(3, 4, num_layers=2), gb.Flatten(), gb.Dense(6 * 4, 3)],
    lambda: [gb.RNN(3, 5, nonlinearity="relu"), gb.LSTM(5, 4, bias=False), gb.Flatten(),
             gb.Dense(6 * 4, 3)],
    lambda: [gb.LSTM(3, 4, num_layers=2, bidirectional=True), gb.LastStep(), gb.Dense(8, 3)],
    lambda: [gb.GRU(3, 4, num_layers=2, bidirectional=True), gb.Flatten(), gb.Dense(6 * 8, 3)],
    lambda: [gb.RNN(3, 4, num_layers=2, bidirectional=True), gb.Flatten(), gb.Dense(6 * 8, 3)],
    lambda: [gb.RNN(3, 4, num_layers=2, nonlinearity="relu", bidirectional=True), gb.Flatten(),
             gb.Dense(6 * 8, 3)],
], ids=["lstm2-laststep", "gru2-laststep", "rnn2-flatten", "relu-rnn-lstm", "bilstm2-laststep",
        "bigru2-flatten", "birnn2-flatten", "birnn2-relu-flatten"])
def test_gradcheck_through_time(backend_spec, rng, layers):
    model = model_for(backend_spec, layers(), input_shape=(6, 3))
    err = gb.gradcheck(model, gb.SoftmaxCrossEntropy(), rng.normal(size=(4, 6, 3)),
                       rng.integers(0, 3, 4))
    assert err < 1e-6


def test_sgd_steps_of_an_lstm_classifier_follow_torch(backend_spec, rng):
    torch = pytest.importorskip("torch")
    model = model_for(backend_spec, [gb.LSTM(F, H, num_layers=2), gb.LastStep(), gb.Dense(H, 3)],
                      input_shape=(T, F))
    nn = torch.nn

    class Twin(nn.Module):
        def __init__(self):
            super().__init__()
            self.lstm = nn.LSTM(F, H, num_layers=2, batch_first=True)
            self.fc = nn.Linear(H, 3)

        def forward(self, x):
            return self.fc(self.lstm(x)[0][:, -1])

    tmodel = Twin().double()
    names = {k: (f"lstm.{k[2:]}" if k[0] == "0" else {"2.W": "fc.weight", "2.b": "fc.bias"}[k])
             for k in model.get_params()}
    tmodel.load_state_dict({names[k]: torch.tensor(v) for k, v in model.get_params().items()})
    topt = torch.optim.SGD(tmodel.parameters(), lr=0.5, momentum=0.9)
    opt = gb.SGD(lr=0.5, momentum=0.9)
    X, y = rng.normal(size=(24, T, F)), rng.integers(0, 3, 24)
    assert_steps_follow_torch(torch, model, opt, tmodel, topt, names, X, y)


def test_clip_norm_bounds_the_update_across_time(backend_spec, rng):
    def make():
        return model_for(backend_spec, [gb.RNN(F, H, num_layers=2), gb.LastStep(), gb.Dense(H, 3)],
                         input_shape=(T, F), seed=3)

    X, y = 30 * rng.normal(size=(8, T, F)), rng.integers(0, 3, 8)
    free, clipped = make(), make()
    before = free.get_params()
    gb.train_step(free, gb.SoftmaxCrossEntropy(), gb.SGD(lr=1.0), X, y)
    gb.train_step(clipped, gb.SoftmaxCrossEntropy(), gb.SGD(lr=1.0, clip_norm=0.01), X, y)

    def step_norm(model):
        return np.sqrt(sum(((model.get_params()[k] - v) ** 2).sum() for k, v in before.items()))

    assert step_norm(free) > 0.05  # the gradient through time is well above the clip
    assert step_norm(clipped) <= 0.01 * (1 + 1e-6)
    assert step_norm(clipped) > 0.0099
    # The clipped update is the free one scaled: the direction through every step is kept.
    ratio = step_norm(clipped) / step_norm(free)
    for k, v in before.items():
        assert_close(clipped.get_params()[k] - v, ratio * (free.get_params()[k] - v), tol=1e-9,
                     what=k)


def test_config_round_trip_and_checkpoint(backend_spec, rng, tmp_path):
    layers = [gb.RNN(F, H, num_layers=2, nonlinearity="relu", bias=False), gb.GRU(H, H),
              gb.LSTM(H, 5, num_layers=2, bidirectional=True, dropout=0.25), gb.LastStep(),
              gb.Dense(10, 3)]
    for layer in layers[:4]:
        again = type(layer)(**json.loads(json.dumps(layer.config())))
        assert repr(again) == repr(layer)
    assert repr(layers[0]) == "RNN(4, 6, num_layers=2, nonlinearity='relu', bias=False)"
    assert repr(layers[2]) == "LSTM(6, 5, num_layers=2, dropout=0.25, bidirectional=True)"
    model = model_for(backend_spec, layers, input_shape=(T, F))
    X = rng.normal(size=(N, T, F))
    expected = model.predict(X)
    save_checkpoint(tmp_path / "c.npz", model)
    ckpt = load_checkpoint(tmp_path / "c.npz")
    again = ckpt.build_model(device=backend_spec[0], kernels=backend_spec[1])
    np.testing.assert_array_equal(again.predict(X), expected)
    # Saved on a GPU, it loads on the CPU: the same numbers up to the devices' rounding (float64).
    on_cpu = ckpt.build_model(device="cpu", kernels=backend_spec[1])
    np.testing.assert_allclose(on_cpu.predict(X), expected, rtol=1e-12, atol=1e-14)


# ---- errors ------------------------------------------------------------------------------------
@pytest.mark.parametrize("layers,shape,pattern", [
    (lambda: [gb.LSTM(4, 8)], (10, 3),
     r"layers\[0\] LSTM\(4, 8\): expected 4 input features per time step, got 3 \(input shape "
     r"\(10, 3\)\)"),
    (lambda: [gb.GRU(4, 8)], (4,),
     r"layers\[0\] GRU\(4, 8\): expected a sequence per sample, of shape \(T, 4\) \(time steps x 4 "
     r"input features\), got shape \(4,\)"),
    (lambda: [gb.RNN(4, 8), gb.LSTM(6, 8)], (5, 4),
     r"layers\[1\] LSTM\(6, 8\): expected 6 input features per time step, got 8"),
    # a Dense after a sequence acts on its last axis (as torch's nn.Linear): the features must fit
    (lambda: [gb.LSTM(4, 8), gb.Dense(6, 2)], (5, 4),
     r"layers\[1\] Dense\(6, 2.*\): expected input shape \(\.\.\., 6\) \(6 features on the last "
     r"axis\), got \(5, 8\)"),
    (lambda: [gb.Dense(4, 8), gb.LastStep()], None,
     r"layers\[1\] LastStep\(\): expected a sequence per sample, of shape \(T, features\), got "
     r"shape \(8,\)"),
])
def test_shape_errors_name_the_shapes(layers, shape, pattern):
    with pytest.raises(ValueError, match=pattern):
        gb.Sequential(layers(), input_shape=shape, device="cpu")


def test_run_errors_name_the_shapes(backend_spec, rng):
    lstm = gb.LSTM(F, H, num_layers=2)
    model, be = standalone(backend_spec, lstm)
    dev = be.to_device
    X = dev(rng.normal(size=(N, T, F)))
    with pytest.raises(ValueError, match=r"LSTM\(4, 6, num_layers=2\) input: expected a batch of "
                                         r"sequences of shape \(N, T, 4\), got shape \(3, 4\)"):
        lstm.run(dev(rng.normal(size=(N, F))))
    with pytest.raises(ValueError, match=r"expected shape \(N, T, 4\) \(4 input features per "
                                         r"step\), got shape \(3, 5, 5\)"):
        lstm.run(dev(rng.normal(size=(N, T, 5))))
    h = dev(np.zeros((1, N, H)))
    with pytest.raises(ValueError, match=r"state\[0\] \(h\): expected shape \(2, 3, 6\) "
                                         r"\(num_layers, batch, hidden_size\), got shape \(1, 3, 6\)"):
        lstm.run(X, (h, dev(np.zeros((2, N, H)))))
    with pytest.raises(ValueError, match=r"state: expected a pair \(h, c\)"):
        lstm.run(X, dev(np.zeros((2, N, H))))
    gru = gb.GRU(F, H)
    standalone(backend_spec, gru)
    with pytest.raises(ValueError, match=r"state: expected one array h of shape \(1, 3, 6\)"):
        gru.run(X, (h, h))
    with pytest.raises(TypeError, match="expected dtype float64, got float32"):
        gru.run(X.astype(np.float32))
    _, _, backward = gru.run(X, None, train=True)
    with pytest.raises(ValueError, match=r"d_out: expected shape \(3, 5, 6\)"):
        backward(dev(np.zeros((N, T, H + 1))), None)
    with pytest.raises(RuntimeError, match="not part of a built model"):
        gb.RNN(F, H).run(X)
    with pytest.raises(ValueError, match="nonlinearity: expected one of"):
        gb.RNN(F, H, nonlinearity="sigmoid")
    seq_major = gb.GRU(F, H, batch_first=False)
    model, _ = standalone(backend_spec, seq_major)
    with pytest.raises(ValueError, match="batch_first=True"):
        model.forward(X)


def test_sequence_data_is_checked_by_the_model(backend_spec, rng):
    model = model_for(backend_spec, [gb.LSTM(F, H), gb.LastStep(), gb.Dense(H, 2)],
                      input_shape=(T, F))
    with pytest.raises(ValueError, match=r"X: expected an array of shape \(n, 5, 4\)"):
        model.predict(rng.normal(size=(N, F)))


@pytest.mark.parametrize("cls", [gb.RNN, gb.LSTM, gb.GRU])
def test_gradients_accumulate_over_calls(backend_spec, rng, cls):
    layer = cls(F, H, num_layers=2)
    model, be = standalone(backend_spec, layer)
    X, dout = be.to_device(rng.normal(size=(N, T, F))), be.to_device(rng.normal(size=(N, T, H)))
    model.zero_grads()
    _, _, backward = layer.run(X, None, train=True)
    backward(dout)
    once = {k: np.array(be.to_host(v)) for k, v in layer.grads.items()}
    for _ in range(2):  # a second forward/backward adds to the gradients
        _, _, backward = layer.run(X, None, train=True)
        backward(dout)
        backward = None
    for k, v in once.items():
        assert_close(np.array(be.to_host(layer.grads[k])), 3 * v, what=k)


def test_digits_rows_is_a_sequence_task_an_lstm_learns(rng):
    pytest.importorskip("sklearn")
    from gpubackprop.datasets import digits_rows

    data = digits_rows(test_split=0.25, seed=1)
    assert data.sample_shape == (8, 8) and data.n_classes == 10
    assert len(data.X_train) + len(data.X_test) == 1797 and len(data.X_test) == 449
    assert data.X_train.min() == 0.0 and data.X_train.max() == 1.0
    model = gb.Sequential([gb.LSTM(8, 16), gb.LastStep(), gb.Dense(16, 10)], input_shape=(8, 8),
                          device="cpu", seed=0)
    loss = gb.SoftmaxCrossEntropy()
    history = gb.fit(model, loss, gb.Adam(lr=0.02), data.X_train[:400], data.y_train[:400],
                     epochs=4, batch_size=32, progress=False)
    assert history["loss"][-1] < 0.6 * history["loss"][0]


class _Interrupt(Exception):
    pass


@pytest.mark.parametrize("stop_at", [3, 6])
def test_a_checkpointed_lstm_run_resumes_bit_for_bit(tmp_path, backend_spec, stop_at):
    from gpubackprop.checkpoint import Checkpointer

    rng = np.random.default_rng(0)
    X, y = rng.normal(size=(30, 5, 3)), rng.integers(0, 3, 30)
    kw = dict(epochs=3, batch_size=8, progress=False)

    def make():
        model = gb.Sequential([gb.LSTM(3, 6, num_layers=2), gb.LastStep(), gb.Dense(6, 3)],
                              device=backend_spec[0], kernels=backend_spec[1], dtype="float64",
                              seed=1, input_shape=(5, 3))
        return model, gb.SoftmaxCrossEntropy(), gb.Adam(lr=0.01, clip_norm=1.0)

    model, loss, opt = make()
    ref_hist = gb.fit(model, loss, opt, X, y, **kw)
    ref = model.get_params()

    path = tmp_path / "lstm.npz"
    model, loss, opt = make()

    def stop(step):
        if step == stop_at:
            raise _Interrupt

    with pytest.raises(_Interrupt):
        gb.fit(model, loss, opt, X, y, on_checkpoint=Checkpointer(path, model, opt, loss),
               checkpoint_every=2, on_step=stop, **kw)
    ck = load_checkpoint(path)
    model = ck.build_model(device=backend_spec[0], kernels=backend_spec[1])
    opt = gb.Adam(lr=0.01, clip_norm=1.0)
    hist = gb.fit(model, loss, opt, X, y, state=ck.restore(model, opt, loss), **kw)
    for k, v in model.get_params().items():
        assert np.array_equal(v, ref[k]), k
    assert hist == ref_hist


# ---- bidirectional layers and dropout between layers ------------------------------------------
@pytest.mark.parametrize("name", ["LSTM", "GRU", "RNN"])
def test_sgd_steps_of_a_bidirectional_classifier_follow_torch(backend_spec, rng, name):
    """LastStep after a bidirectional layer is torch's out[:, -1] (the forward direction's last
    step beside the reverse direction's first)."""
    torch = pytest.importorskip("torch")
    cls = getattr(gb, name)
    model = model_for(backend_spec, [cls(F, H, num_layers=2, bidirectional=True), gb.LastStep(),
                                     gb.Dense(2 * H, 3)], input_shape=(T, F))
    nn = torch.nn

    class Twin(nn.Module):
        def __init__(self):
            super().__init__()
            self.rnn = getattr(nn, name)(F, H, num_layers=2, batch_first=True, bidirectional=True)
            self.fc = nn.Linear(2 * H, 3)

        def forward(self, x):
            return self.fc(self.rnn(x)[0][:, -1])

    tmodel = Twin().double()
    names = {k: (f"rnn.{k[2:]}" if k[0] == "0" else {"2.W": "fc.weight", "2.b": "fc.bias"}[k])
             for k in model.get_params()}
    assert list(names.values()) == [k for k, _ in tmodel.named_parameters()]
    tmodel.load_state_dict({names[k]: torch.tensor(v) for k, v in model.get_params().items()})
    topt = torch.optim.SGD(tmodel.parameters(), lr=0.5, momentum=0.9)
    opt = gb.SGD(lr=0.5, momentum=0.9)
    X, y = rng.normal(size=(24, T, F)), rng.integers(0, 3, 24)
    assert_steps_follow_torch(torch, model, opt, tmodel, topt, names, X, y)


def test_bidirectional_shapes_states_and_the_reverse_direction_reads_backwards(backend_spec, rng):
    layer = gb.GRU(F, H, bidirectional=True)
    model, be = standalone(backend_spec, layer)
    X = rng.normal(size=(N, T, F))
    out, h_n, _ = layer.run(be.to_device(X))
    out, h_n = np.array(be.to_host(out)), np.array(be.to_host(h_n))
    assert out.shape == (N, T, 2 * H) and h_n.shape == (2, N, H)
    np.testing.assert_array_equal(h_n[0], out[:, -1, :H])  # forward: ends at the last step
    np.testing.assert_array_equal(h_n[1], out[:, 0, H:])  # reverse: ends at the first step
    # The reverse direction on X is a forward layer with its weights on X reversed in time.
    fwd = gb.GRU(F, H)
    m2, be2 = standalone(backend_spec, fwd)
    m2.set_params({"0." + n.replace("_reverse", ""): np.array(be.to_host(v))
                   for n, v in layer.params.items() if n.endswith("_reverse")})
    rev, _, _ = fwd.run(be2.to_device(X[:, ::-1].copy()))
    assert_close(np.array(be2.to_host(rev))[:, ::-1], out[:, :, H:], tol=1e-13, what="reverse")
    with pytest.raises(ValueError, match=r"state: expected shape \(2, 3, 6\) "
                                         r"\(num_layers \* 2, batch, hidden_size\), got shape "
                                         r"\(1, 3, 6\)"):
        layer.run(be.to_device(X), be.to_device(np.zeros((1, N, H))))


def _hand_dropout_twin(torch, name, layer, params, masks, p):
    """torch layers one at a time, with the given masks (N, T, 2H) applied by hand between them."""
    tms = []
    for k in range(layer.num_layers):
        tm = getattr(torch.nn, name)(layer.input_size if k == 0 else 2 * layer.hidden_size,
                                     layer.hidden_size, batch_first=True,
                                     bidirectional=True).double()
        tm.load_state_dict({n.replace(f"_l{k}", "_l0"): torch.tensor(v) for n, v in params.items()
                            if f"_l{k}" in n})
        tms.append(tm)

    def run(x):
        for k, tm in enumerate(tms):
            x = tm(x)[0]
            if k < len(tms) - 1:
                x = x * torch.tensor(masks[k]) / (1 - p)
        return x

    return run, tms


@pytest.mark.parametrize("name", ["LSTM", "GRU"])
def test_dropout_between_layers_is_the_hashed_mask_applied_by_hand(backend_spec, rng, name):
    """In training each layer's output but the last is multiplied by keep/(1 − p), keep the
    library's counter-based hash of (seed, layer key, step, index over the time-major (T, N, 2H)
    output): checked against torch layers run one by one with that mask applied by hand."""
    torch = pytest.importorskip("torch")
    p, L = 0.4, 3
    layer = getattr(gb, name)(F, H, num_layers=L, bidirectional=True, dropout=p)
    model, be = standalone(backend_spec, layer)
    params = {k[2:]: rng.uniform(-0.6, 0.6, v.shape) for k, v in model.get_params().items()}
    model.set_params({"0." + k: v for k, v in params.items()})
    seed, step = layer.context.seed, layer.context.step
    masks = [np.asarray(be.to_host(be.ops.dropout_mask((T, N, 2 * H), p, seed,
                                                       layer.dropout_layer_key(k), step)))
             .transpose(1, 0, 2).astype(np.float64) for k in range(L - 1)]
    assert 0.2 < 1 - masks[0].mean() < 0.6 and not np.array_equal(masks[0], masks[1])
    X, dout = rng.normal(size=(N, T, F)), rng.normal(size=(N, T, 2 * H))
    model.zero_grads()
    out, _, backward = layer.run(be.to_device(X), None, train=True)
    dX, _ = backward(be.to_device(dout), None)

    run, tms = _hand_dropout_twin(torch, name, layer, params, masks, p)
    tx = torch.tensor(X, requires_grad=True)
    to = run(tx)
    (to * torch.tensor(dout)).sum().backward()
    assert_close(np.array(be.to_host(out)), to.detach().numpy(), what="out")
    assert_close(np.array(be.to_host(dX)), tx.grad.numpy(), what="dX")
    for k, tm in enumerate(tms):
        for n, v in tm.named_parameters():
            key = n.replace("_l0", f"_l{k}")
            assert_close(np.array(be.to_host(layer.grads[key])), v.grad.numpy(), what=key)
    # Inference: no dropout, torch's eval mode.
    tm = torch_twin(torch, name, layer, {"0." + k: v for k, v in params.items()}).eval()
    assert_close(np.array(be.to_host(layer.run(be.to_device(X))[0])),
                 tm(torch.tensor(X))[0].detach().numpy(), what="inference")


def test_dropout_masks_change_with_the_step_and_are_the_same_on_every_kernel_set(rng):
    outs = {}
    for kernels in ("reference", "fused"):
        layer = gb.LSTM(F, H, num_layers=2, dropout=0.5)
        model = gb.Sequential([layer], input_shape=(T, F), device="cpu", kernels=kernels,
                              dtype="float64", seed=3)
        X = model.backend.to_device(np.random.default_rng(0).normal(size=(N, T, F)))
        first = np.array(model.forward(X, train=True)[0])
        model.context.step += 1
        second = np.array(model.forward(X, train=True)[0])
        assert not np.array_equal(first, second)
        outs[kernels] = first
    np.testing.assert_allclose(outs["fused"], outs["reference"], rtol=1e-12, atol=1e-13)


def test_dropout_is_checked_and_warns_for_one_layer_as_torch():
    with pytest.warns(UserWarning, match="non-zero dropout expects num_layers greater than 1, but "
                                         "got dropout=0.5 and num_layers=1"):
        gb.GRU(F, H, dropout=0.5)
    for bad in (1, 1.0, -0.1, float("nan"), "0.1", True):
        with pytest.raises(ValueError, match=r"dropout: expected a drop probability in \[0, 1\), "
                                             "got"):
            gb.LSTM(F, H, num_layers=2, dropout=bad)
    with pytest.raises(TypeError, match="bidirectional: expected True or False, got 1"):
        gb.RNN(F, H, bidirectional=1)


def test_the_modelspec_tokens_take_bidir_and_dropout():
    from gpubackprop import modelspec
    from gpubackprop.cli.train import model_help
    from gpubackprop.layers.registry import SPEC_TOKENS

    p = modelspec.plan("lstm(8,layers=2,bidir=true,dropout=0.1)-gru(4,bidir=true)-last-dense(3)",
                       (5, 3), 3)
    assert [e[0] for e in p.entries] == ["LSTM", "GRU", "LastStep", "Dense"]
    assert p.entries[0][1] == {"input_size": 3, "hidden_size": 8, "num_layers": 2,
                               "bidirectional": True, "dropout": 0.1}
    assert p.entries[1][1]["input_size"] == 16
    model, _ = modelspec.build_model("rnn(4,bidir=true,relu=true)-last-dense(classes)", (5, 3), 3,
                                     device="cpu", seed=0)
    assert repr(model.layers[0]) == "RNN(3, 4, nonlinearity='relu', bidirectional=True)"
    with pytest.raises(ValueError, match=r"dropout: expected a probability in \[0, 1\)"):
        modelspec.plan("lstm(8,layers=2,dropout=1.5)-last-dense(3)", (5, 3), 3)
    for token in ("lstm", "gru", "rnn"):  # --model's help is the registry's
        assert f"{token}(h,layers=1,bidir=false,dropout=0" in SPEC_TOKENS[token].help
        assert SPEC_TOKENS[token].help in model_help()


# ---- the fused CPU time loops split the batch over threads ------------------------------------
@pytest.mark.parametrize("make", [lambda: gb.LSTM(F, H, num_layers=2, bidirectional=True),
                                  lambda: gb.GRU(F, H, num_layers=2, bidirectional=True),
                                  lambda: gb.RNN(F, H, nonlinearity="relu", bidirectional=True)],
                         ids=["bilstm2", "bigru2", "birnn-relu"])
def test_a_batch_split_over_threads_equals_the_reference(rng, make):
    """A batch of 50 on 3 threads: the fused CPU loops run 3 ragged chunks of rows (16, 17, 17);
    outputs, states and every gradient equal the reference set's (float64)."""
    from gpubackprop.kernels.cpu import CpuOps

    n = 50
    X, dout = rng.normal(size=(n, T, F)), rng.normal(size=(n, T, 2 * H))
    L = 2 * make().num_layers
    states = [rng.normal(size=(L, n, H)) for _ in range(4)]
    results = []
    for kernels in ("fused", "reference"):
        layer = make()
        model, be = standalone(("cpu", kernels), layer)
        if kernels == "fused":
            be.ops = CpuOps(np, num_threads=3)
            assert be.ops._steps_chunks(n) == 3
        lstm = isinstance(layer, gb.LSTM)
        model.zero_grads()
        out, state_n, backward = layer.run(X, (states[0], states[1]) if lstm else states[0],
                                           train=True)
        dX, dstate = backward(dout, (states[2], states[3]) if lstm else states[2])
        flat = [out, *(state_n if lstm else (state_n,)), dX, *(dstate if lstm else (dstate,))]
        results.append([np.array(a) for a in flat] + [np.array(model.flat_grads)])
    for got, want in zip(*results, strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("cls", [gb.LSTM, gb.GRU])
def test_a_batch_split_accumulates_gradients_over_calls(rng, cls):
    from gpubackprop.kernels.cpu import CpuOps

    layer = cls(F, H)
    model, be = standalone(("cpu", "fused"), layer)
    be.ops = CpuOps(np, num_threads=2)
    X, dout = rng.normal(size=(40, T, F)), rng.normal(size=(40, T, H))
    model.zero_grads()
    _, _, backward = layer.run(X, None, train=True)
    backward(dout)
    once = np.array(model.flat_grads)
    for _ in range(2):  # a second and third forward/backward add to the gradients (biases too)
        _, _, backward = layer.run(X, None, train=True)
        backward(dout)
    np.testing.assert_allclose(model.flat_grads, 3 * once, rtol=1e-12, atol=1e-12)


def test_split_training_is_deterministic_and_equals_serial(rng):
    """Training steps with the batch split over 2 threads repeat bit for bit, and equal a serial
    run's to float32 rounding."""
    from gpubackprop.kernels.cpu import CpuOps

    X, y = rng.normal(size=(64, T, F)).astype(np.float32), rng.integers(0, 3, 64)
    params = []
    for threads in (2, 2, 1):
        model = gb.Sequential([gb.LSTM(F, H), gb.LastStep(), gb.Dense(H, 3)], input_shape=(T, F),
                              device="cpu", dtype="float32", seed=3)
        model.backend.ops = CpuOps(np, num_threads=threads)
        assert model.backend.ops._steps_chunks(64) == threads
        gb.fit(model, gb.SoftmaxCrossEntropy(), gb.Adam(lr=0.01), X, y, epochs=2, batch_size=64,
               progress=False)
        params.append(model.get_params())
    for k in params[0]:
        assert np.array_equal(params[0][k], params[1][k]), k
        np.testing.assert_allclose(params[0][k], params[2][k], rtol=1e-4, atol=1e-5, err_msg=k)
