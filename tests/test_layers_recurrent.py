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
                                 bias=layer.bias, batch_first=layer.batch_first, **kw).double()
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
    L, lstm = layer.num_layers, cls is gb.LSTM
    x_shape = (N, T, F) if layer.batch_first else (T, N, F)
    X, dout = rng.normal(size=x_shape), rng.normal(size=(*x_shape[:2], H))
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
    assert sorted(layer.grads) == sorted(tgrads)
    for k, g in tgrads.items():
        assert_close(host(layer.grads[k]), g, what=f"d{k}")


def test_parameter_names_and_shapes_are_torchs(backend_spec):
    torch = pytest.importorskip("torch")
    for cls, name, G in ((gb.RNN, "RNN", 1), (gb.LSTM, "LSTM", 4), (gb.GRU, "GRU", 3)):
        layer = cls(F, H, num_layers=2)
        params = standalone(backend_spec, layer)[0].get_params()
        tm = getattr(torch.nn, name)(F, H, num_layers=2)
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
], ids=["lstm2-laststep", "gru2-laststep", "rnn2-flatten", "relu-rnn-lstm"])
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
              gb.LSTM(H, 5), gb.LastStep(), gb.Dense(5, 3)]
    for layer in layers[:4]:
        again = type(layer)(**json.loads(json.dumps(layer.config())))
        assert repr(again) == repr(layer)
    assert repr(layers[0]) == "RNN(4, 6, num_layers=2, nonlinearity='relu', bias=False)"
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
    (lambda: [gb.LSTM(4, 8), gb.Dense(8, 2)], (5, 4),
     r"layers\[1\] Dense\(8, 2.*\): expected input shape \(8,\), got \(5, 8\)"),
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
