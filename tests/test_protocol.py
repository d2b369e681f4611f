"""The layer protocol: a layer written only to it works with every part of the library (flat
buffers, state, step counter, gradcheck, optimizers, checkpoints); shape inference and its
errors; model state and exact resume of a CNN from a checkpoint."""

import numpy as np
import pytest
from layer_cases import model_for

import gpubackprop as gb
from gpubackprop.checkpoint import (
    Checkpoint,
    Checkpointer,
    CheckpointError,
    architecture,
    build_layer,
    load_checkpoint,
    save_checkpoint,
)
from gpubackprop.layers import Layer
from gpubackprop.layers.base import no_backprop


class Scale(Layer):
    """Y = X · weight[c] per channel (axis 1); keeps the running max |X| and a call count."""

    seen_steps = None

    def __init__(self, n):
        self.n = n

    def __repr__(self):
        return f"Scale({self.n})"

    def infer_shape(self, input_shape):
        if input_shape[0] != self.n:
            raise ValueError(f"expected {self.n} channels, got {input_shape[0]}")
        return input_shape

    def param_specs(self):
        return [("weight", (self.n,))]

    def state_specs(self):
        return [("peak", (self.n,), None), ("calls", (), "int64")]

    def initial_params(self, rng):
        return {"weight": rng.uniform(0.5, 1.5, self.n)}

    def forward(self, X, train=False, input_grad=True):
        self.check_input(X)
        xp = self.backend.xp
        axes = (0,) + tuple(range(2, X.ndim))
        w = self.params["weight"].reshape((1, self.n) + (1,) * (X.ndim - 2))
        Y = X * w
        if not train:
            return Y, no_backprop
        xp.maximum(self.state["peak"], xp.abs(X).max(axis=axes), out=self.state["peak"])
        self.state["calls"] += 1
        if self.seen_steps is not None:
            self.seen_steps.append((self.index, self.context.step))

        def backprop(dY):
            g = (dY * X).sum(axis=axes)
            if self.take_accumulate():
                self.grads["weight"] += g
            else:
                self.grads["weight"][...] = g
            return dY * w if input_grad else None

        return Y, backprop


def test_a_layer_written_to_the_protocol_works_everywhere(backend_spec, rng):
    model = model_for(backend_spec, [gb.Dense(4, 6, activation="tanh"), Scale(6), gb.Dense(6, 3)])
    assert list(model.get_params()) == ["0.W", "0.b", "1.weight", "2.W", "2.b"]
    assert model.n_params == 4 * 6 + 6 + 6 + 6 * 3 + 3
    state = model.get_state()
    assert sorted(state) == ["1.calls", "1.peak", "step"]
    assert state["1.calls"].dtype == np.int64 and state["1.peak"].dtype == np.float64
    X, y = rng.normal(size=(8, 4)), rng.integers(0, 3, 8)
    loss = gb.SoftmaxCrossEntropy()
    assert gb.gradcheck(model, loss, X, y) < 1e-6
    after = model.get_state()  # gradcheck puts the state back
    assert all(np.array_equal(after[k], state[k]) for k in state)
    opt = gb.Adam(0.05)
    hist = gb.fit(model, loss, opt, X, y, epochs=30, batch_size=4, progress=False)
    assert hist["loss"][-1] < hist["loss"][0]
    state = model.get_state()
    assert int(state["1.calls"]) == int(state["step"]) == 60
    np.testing.assert_allclose(state["1.peak"], np.tanh(np.abs(
        X @ model.get_params()["0.W"].T + model.get_params()["0.b"])).max(0), rtol=0.5)
    other = model_for(backend_spec, [gb.Dense(4, 6, activation="tanh"), Scale(6), gb.Dense(6, 3)])
    other.set_params(model.get_params())
    other.set_state(state)
    assert all(np.array_equal(other.get_state()[k], state[k]) for k in state)
    np.testing.assert_array_equal(other.predict(X), model.predict(X))


def test_set_state_checks_keys_shapes_and_step():
    model = gb.Sequential([gb.Dense(2, 3), Scale(3)], device="cpu")
    state = model.get_state()
    with pytest.raises(ValueError, match=r"state: expected keys \['1.calls', '1.peak'\], missing "
                                         r"\['1.calls'\], unexpected \['2.peak'\]"):
        model.set_state({"1.peak": state["1.peak"], "2.peak": state["1.peak"]})
    with pytest.raises(ValueError, match=r"state\['1.peak'\]: expected shape \(3,\), got array of "
                                         r"shape \(2,\)"):
        model.set_state({**state, "1.peak": np.zeros(2)})
    with pytest.raises(ValueError, match=r"state\['step'\]: expected an integer >= 0"):
        model.set_state({**state, "step": np.array(-1)})
    model.set_state({k: v for k, v in state.items() if k != "step"})  # "step" may be left out
    model.set_state({**state, "step": np.array(7)})
    assert model.step == 7 and int(model.get_state()["step"]) == 7


def test_step_counter_and_layer_indices():
    seen = []
    probes = [Scale(3) for _ in range(3)]
    for p in probes:
        p.seen_steps = seen
    model = gb.Sequential([gb.Dense(2, 3), probes[0], gb.Residual(gb.Sequential([probes[1],
                                                                               probes[2]]))],
                          device="cpu", dtype="float64")
    X = model.backend.to_device(np.ones((2, 2)))
    assert [p.index for p in probes] == [1, 2, 3]  # leaf layers numbered in forward order
    assert model.step == 0
    model(X)  # inference does not count
    for _ in range(2):
        model.forward(X, train=True)
    assert seen == [(1, 0), (2, 0), (3, 0), (1, 1), (2, 1), (3, 1)] and model.step == 2


def test_residual_with_a_pass_through_block_leaves_dy_alone(backend_spec, rng):
    model = model_for(backend_spec, [gb.Dense(3, 4), gb.Residual(gb.Flatten())])
    be = model.backend
    _, bp = model.forward(be.to_device(rng.normal(size=(2, 3))), train=True)
    dYh = rng.normal(size=(2, 4))
    dY = be.to_device(dYh)
    bp(dY)
    np.testing.assert_array_equal(be.to_host(dY), dYh)
    W = model.get_params()["0.W"]
    model.zero_grads()
    X = rng.normal(size=(2, 3))
    _, bp = model.forward(be.to_device(X), train=True)
    bp(be.to_device(dYh))
    np.testing.assert_allclose(be.to_host(model.dense_layers()[0].dW), 2 * dYh.T @ X, rtol=1e-12)
    assert W.shape == (4, 3)


def test_residual_conv_block_gradcheck(backend_spec, rng):
    block = gb.Sequential([gb.Conv2d(3, 3, 3, padding=1, activation="relu"),
                           gb.Conv2d(3, 3, 1, activation="tanh")])
    model = model_for(backend_spec, [gb.Conv2d(1, 3, 3, padding=1, activation="tanh"),
                                     gb.Residual(block), gb.GlobalAvgPool2d(), gb.Dense(3, 2)],
                      input_shape=(1, 4, 5))
    assert list(model.get_params()) == ["0.weight", "0.bias", "1.0.weight", "1.0.bias",
                                        "1.1.weight", "1.1.bias", "3.W", "3.b"]
    err = gb.gradcheck(model, gb.SoftmaxCrossEntropy(), rng.normal(size=(3, 1, 4, 5)),
                       rng.integers(0, 2, 3))
    assert err < 1e-6


@pytest.mark.parametrize("make,pattern", [
    (lambda: gb.Sequential([gb.Dense(4, 3)], input_shape=(5,)),
     r"layers\[0\] Dense\(4, 3, .*\): expected 4 input features, got 5 \(input shape \(5,\)\)"),
    (lambda: gb.Sequential([gb.Dense(2, 3), gb.Sequential([gb.Dense(3, 4), gb.Dense(5, 1)])]),
     r"layers\[1\] Dense\(5, 1, .*\): expected 5 input features, got 4"),
    (lambda: gb.Sequential([gb.Dense(2, 3), gb.Residual(gb.Sequential([gb.Dense(3, 3),
                                                                        Scale(4)]))]),
     r"layers\[1\] Scale\(4\): expected 4 channels, got 3"),
    (lambda: gb.Sequential([gb.Dense(2, 3)], input_shape=(2, 0)),
     r"input_shape: expected a shape \(a tuple of positive integers\), got \(2, 0\)"),
])
def test_shape_errors_name_the_layer(make, pattern):
    with pytest.raises(ValueError, match=pattern):
        make()


def test_a_layer_object_used_twice_is_refused():
    conv = gb.Conv2d(2, 2, 3, padding=1)
    model = gb.Sequential([conv, conv], input_shape=(2, 4, 4), device="cpu")
    with pytest.raises(ValueError, match=r"layers: the same Conv2d object appears twice"):
        model.backend  # noqa: B018


def test_model_shapes_and_repr():
    model = gb.Sequential([gb.Conv2d(3, 4, 3, stride=2), gb.Flatten(), gb.Dense(36, 5)],
                          input_shape=[3, 7, 8], device="cpu")
    assert model.input_shape == (3, 7, 8) and model.output_shape == (5,)
    assert model.n_in == 3 * 7 * 8 and model.n_out == 5
    assert model.layers[1].output_shape == (36,)
    assert "input_shape=(3, 7, 8)" in repr(model)
    assert repr(gb.Conv2d(3, 4, (3, 5), stride=2, padding=(1, 2), dilation=1, groups=1,
                          bias=False, activation="relu", init="he")) == \
        "Conv2d(3, 4, (3, 5), stride=2, padding=(1, 2), bias=False, activation='relu', init='he')"


def cnn_layers():
    layers = [gb.Conv2d(1, 4, 3, padding=1, activation="relu")]
    if hasattr(gb, "BatchNorm2d"):
        layers.append(gb.BatchNorm2d(4))
    layers += [gb.MaxPool2d(2), gb.Conv2d(4, 4, 3, padding=1, groups=2)]
    if hasattr(gb, "Dropout"):
        layers.append(gb.Dropout(0.25))
    layers += [gb.AvgPool2d(2), gb.Flatten(), gb.Dense(4 * 2 * 2, 3)]
    return layers


def test_architecture_round_trip():
    model = gb.Sequential(cnn_layers() + [gb.Residual(gb.Dense(3, 3, activation="tanh"))],
                          input_shape=(1, 8, 8), device="cpu")
    desc = architecture(model)
    assert desc["input_shape"] == [1, 8, 8]
    assert desc["layers"][0] == {"type": "Conv2d", "in_channels": 1, "out_channels": 4,
                                 "kernel_size": [3, 3], "stride": [1, 1], "padding": [1, 1],
                                 "dilation": [1, 1], "groups": 1, "bias": True,
                                 "activation": "relu", "init": None}
    assert architecture(build_layer(desc)) == desc
    dense = gb.Sequential([gb.Dense(3, 4)], device="cpu")
    assert architecture(dense) == {"type": "Sequential", "layers": [
        {"type": "Dense", "n_in": 3, "n_out": 4, "activation": "identity", "init": "xavier"}]}
    with pytest.raises(TypeError, match=r"layer: expected one of the layers in "
                                        r"gpubackprop.layers.LAYER_TYPES .*got Scale"):
        architecture(gb.Sequential([gb.Dense(2, 3), Scale(3)]))
    with pytest.raises(CheckpointError, match=r"architecture: unknown layer description"):
        build_layer({"type": "Scale", "n": 3})
    with pytest.raises(CheckpointError, match=r"architecture: bad layer description .*groups"):
        build_layer({**desc["layers"][0], "groups": 3})


def make_cnn(spec):
    device, kernels = spec
    model = gb.Sequential(cnn_layers(), device=device, kernels=kernels, dtype="float64", seed=5,
                          input_shape=(1, 8, 8))
    return model, gb.SoftmaxCrossEntropy(), gb.SGD(0.05, momentum=0.9, nesterov=True)


class Interrupt(Exception):
    pass


@pytest.mark.parametrize("stop_at", [3, 8])  # mid-epoch, an epoch end
def test_cnn_resumes_from_a_checkpoint_bit_for_bit(tmp_path, backend_spec, stop_at):
    rng = np.random.default_rng(0)
    X, y = rng.normal(size=(40, 1, 8, 8)), rng.integers(0, 3, 40)
    kw = dict(epochs=3, batch_size=8, progress=False)
    model, loss, opt = make_cnn(backend_spec)
    ref_hist = gb.fit(model, loss, opt, X, y, **kw)
    ref, ref_state = model.get_params(), model.get_state()

    path = tmp_path / "cnn.npz"
    model, loss, opt = make_cnn(backend_spec)

    def stop(step):
        if step == stop_at:
            raise Interrupt

    with pytest.raises(Interrupt):
        gb.fit(model, loss, opt, X, y, on_checkpoint=Checkpointer(path, model, opt, loss),
               checkpoint_every=2, on_step=stop, **kw)
    ck = load_checkpoint(path)
    assert int(ck.model_state["step"]) == ck.meta["training"]["step"]
    model = ck.build_model(device=backend_spec[0], kernels=backend_spec[1])
    opt = gb.SGD(0.05, momentum=0.9, nesterov=True)
    state = ck.restore(model, opt, loss)
    hist = gb.fit(model, loss, opt, X, y, state=state, **kw)
    for k, v in model.get_params().items():
        assert np.array_equal(v, ref[k]), k
    for k, v in model.get_state().items():
        assert np.array_equal(v, ref_state[k]), k
    assert hist == ref_hist


def test_checkpoint_round_trip_of_state_and_older_checkpoints(tmp_path):
    model = gb.Sequential([gb.Dense(2, 3), gb.Dense(3, 2)], device="cpu")
    model.forward(model.backend.to_device(np.ones((1, 2))), train=True)
    save_checkpoint(tmp_path / "a.npz", model)
    ck = load_checkpoint(tmp_path / "a.npz")
    assert ck.model_state == {"step": 1}
    fresh = gb.Sequential([gb.Dense(2, 3), gb.Dense(3, 2)], device="cpu")
    ck.restore_model(fresh)
    assert fresh.step == 1
    # A checkpoint written before model state existed restores a model without running statistics.
    old = Checkpoint("old.npz", ck.meta, {k: v for k, v in ck.arrays.items()
                                          if not k.startswith("buffer/")})
    fresh = gb.Sequential([gb.Dense(2, 3), gb.Dense(3, 2)], device="cpu")
    old.restore_model(fresh)
    assert fresh.step == 0
    for k, v in model.get_params().items():
        np.testing.assert_array_equal(fresh.get_params()[k], v)


def test_gradcheck_runs_in_training_mode_and_keeps_the_state(backend_spec, rng):
    # Batch statistics and one step's dropout masks: every loss of the check is the training
    # loss of the same step, and the running statistics and step counter are put back. The conv
    # bias before the batch norm has a zero gradient (rounding only): not a failure.
    model = model_for(backend_spec, [gb.Conv2d(1, 3, 3, padding=1), gb.BatchNorm2d(3),
                                     gb.Dropout(0.3), gb.Flatten(), gb.Dense(3 * 4 * 4, 5),
                                     gb.LayerNorm(5), gb.Dense(5, 3)], input_shape=(1, 4, 4))
    before = model.get_state()
    err = gb.gradcheck(model, gb.SoftmaxCrossEntropy(), rng.normal(size=(4, 1, 4, 4)),
                       rng.integers(0, 3, 4))
    assert err < 1e-6
    after = model.get_state()
    assert all(np.array_equal(after[k], before[k]) for k in before)
