"""Embedding: PyTorch's nn.Embedding (when installed) for the output, the weight gradient with and
without padding_idx and a 6-step Adam trajectory, in float64 to 1e-10; gradcheck through a graph
with an int64 input; a Sequential that starts with an Embedding; checkpoints, state_dict keys and
the errors; on every backend."""

import json

import layer_cases as lc
import numpy as np
import pytest

import gpubackprop as gb
from gpubackprop.checkpoint import load_checkpoint, save_checkpoint

V, D, T = 11, 4, 5


def _graph(spec, embedding, n_out=3, dtype="float64", index_dtype="int64"):
    x = gb.Input((T,), dtype=index_dtype)
    y = gb.Dense(T * D, n_out)(gb.Flatten()(embedding(x)))
    device, kernels = spec
    return gb.Model(inputs=x, outputs=y, device=device, dtype=dtype, kernels=kernels)


def _indices(rng, n, padding_idx=None):
    idx = rng.integers(0, V, (n, T))
    idx[:, 0] = 3  # a row indexed by every sample: its gradient sums many terms
    if padding_idx is not None:
        idx[::2, 1] = padding_idx % V
    return idx


def _layer_pass(spec, layer, idx, dY, weight):
    """(Y, weight gradient) of ``layer`` alone in a float64 graph model, as host arrays."""
    x = gb.Input(idx.shape[1:], dtype="int64")
    device, kernels = spec
    model = gb.Model(inputs=x, outputs=layer(x), device=device, dtype="float64", kernels=kernels)
    model.set_params({"0.weight": weight})
    be = model.backend
    model.zero_grads()
    Y, backprop = model.forward(be.to_device(idx, np.int64), train=True, input_grad=True)
    Y = np.array(be.to_host(Y))
    assert backprop(be.to_device(dY)) is None  # integer indices: no input gradient
    return Y, model.get_grads()["0.weight"]


@pytest.mark.parametrize("padding_idx", [None, 2, -1])
def test_forward_and_weight_gradient_follow_torch(backend_spec, rng, padding_idx):
    torch = pytest.importorskip("torch")
    idx = _indices(rng, 6, padding_idx)[:, :, None].repeat(2, axis=2)  # per-sample shape (T, 2)
    dY = rng.normal(size=(*idx.shape, D))
    weight = rng.normal(size=(V, D))
    Y, dW = _layer_pass(backend_spec, gb.Embedding(V, D, padding_idx=padding_idx), idx, dY, weight)
    temb = torch.nn.Embedding(V, D, padding_idx=padding_idx).double()
    with torch.no_grad():
        temb.weight.copy_(torch.tensor(weight))
    tY = temb(torch.tensor(idx))
    (tY * torch.tensor(dY)).sum().backward()
    lc.assert_close(Y, tY.detach().numpy(), what="Y")
    lc.assert_close(dW, temb.weight.grad.numpy(), what="dW")
    if padding_idx is not None:
        assert not dW[padding_idx % V].any()  # the padding row gets no gradient


def test_initial_weights_are_standard_normal_with_a_zero_padding_row(backend_spec):
    device, kernels = backend_spec
    model = gb.Sequential([gb.Embedding(400, 50, padding_idx=-3)], device=device, kernels=kernels,
                          input_shape=(2,))
    W = model.get_params()["0.weight"]
    assert W.shape == (400, 50) and not W[397].any()
    rest = np.delete(W, 397, axis=0)
    assert abs(rest.mean()) < 0.02 and abs(rest.std() - 1.0) < 0.02  # N(0, 1), as torch


def test_adam_steps_follow_torch(backend_spec, rng):
    torch = pytest.importorskip("torch")
    device, kernels = backend_spec
    model = gb.Sequential([gb.Embedding(V, D, padding_idx=0), gb.Flatten(), gb.Dense(T * D, 3)],
                          device=device, dtype="float64", kernels=kernels, input_shape=(T,))
    nn = torch.nn
    tmodel = nn.Sequential(nn.Embedding(V, D, padding_idx=0), nn.Flatten(), nn.Linear(T * D, 3))
    tmodel = tmodel.double()
    names = {"0.weight": "0.weight", "2.W": "2.weight", "2.b": "2.bias"}
    tmodel.load_state_dict({names[k]: torch.tensor(v) for k, v in model.get_params().items()})
    topt = torch.optim.Adam(tmodel.parameters(), lr=0.05)
    X, y = _indices(rng, 24, padding_idx=0), rng.integers(0, 3, 24)
    lc.assert_steps_follow_torch(torch, model, gb.Adam(lr=0.05), tmodel, topt, names, X, y)


@pytest.mark.parametrize("index_dtype", ["int64", "int32"])
def test_gradcheck_through_a_graph_with_integer_input(backend_spec, rng, index_dtype):
    model = _graph(backend_spec, gb.Embedding(V, D), index_dtype=index_dtype)
    X = _indices(rng, 6).astype(index_dtype)
    assert gb.gradcheck(model, gb.SoftmaxCrossEntropy(), X, rng.integers(0, 3, 6)) < 1e-6


def test_sequential_starting_with_an_embedding_trains_and_predicts(backend_spec, rng):
    device, kernels = backend_spec
    model = gb.Sequential([gb.Embedding(V, D), gb.Flatten(), gb.Dense(T * D, 3)], device=device,
                          dtype="float64", kernels=kernels, input_shape=(T,))
    assert model.input_dtypes == [np.dtype("int64")]
    X, y = _indices(rng, 8), rng.integers(0, 3, 8)
    assert gb.gradcheck(model, gb.SoftmaxCrossEntropy(), X, y) < 1e-6
    gb.fit(model, gb.SoftmaxCrossEntropy(), gb.SGD(0.1), X, y, epochs=2, batch_size=4,
           progress=False)
    graph = _graph(backend_spec, gb.Embedding(V, D))
    graph.set_params(model.get_params())
    np.testing.assert_array_equal(model.predict(X), graph.predict(X))
    with pytest.raises(TypeError, match=r"X: expected integers for an input of dtype int64, got "
                                        r"array of shape \(8, 5\) and dtype float64"):
        model.predict(X.astype(float))


def test_config_checkpoint_and_state_dict(backend_spec, rng, tmp_path):
    layer = gb.Embedding(V, D, padding_idx=-2)
    assert repr(layer) == "Embedding(11, 4, padding_idx=9)"  # as torch, counted from the end
    again = gb.Embedding(**json.loads(json.dumps(layer.config())))
    assert repr(again) == repr(layer)
    model = _graph(backend_spec, layer)
    assert list(model.state_dict()) == ["0.weight", "2.weight", "2.bias"]
    X = _indices(rng, 7)
    gb.fit(model, gb.SoftmaxCrossEntropy(), gb.Adam(0.01), X, rng.integers(0, 3, 7), epochs=1,
           batch_size=4, progress=False)
    expected = model.predict(X)
    save_checkpoint(tmp_path / "c.npz", model)
    device, kernels = backend_spec
    loaded = load_checkpoint(tmp_path / "c.npz").build_model(device=device, kernels=kernels)
    assert repr(loaded.layers[0]) == "Embedding(11, 4, padding_idx=9)"
    np.testing.assert_array_equal(loaded.predict(X), expected)
    twin = _graph(backend_spec, gb.Embedding(V, D, padding_idx=9))
    twin.load_state_dict(model.state_dict())
    np.testing.assert_array_equal(twin.predict(X), expected)


@pytest.mark.parametrize("bad", [V, -1])
def test_out_of_range_indices_are_rejected_before_any_kernel(bad, rng, backend_spec):
    # fit, evaluate and predict check the whole input on the host, on every device, naming X's row.
    model = _graph(backend_spec, gb.Embedding(V, D))
    X = _indices(rng, 4)
    X[1, 3] = bad
    before = model.get_params()
    pattern = (rf"X: expected indices in \[0, 11\) for Embedding\(11, 4\), got {bad} at "
               rf"X\[1, 3\]")
    with pytest.raises(ValueError, match=pattern):
        model.predict(X)
    with pytest.raises(ValueError, match=pattern):
        gb.fit(model, gb.SoftmaxCrossEntropy(), gb.SGD(0.1), X, np.zeros(4, int), epochs=1)
    with pytest.raises(ValueError, match=pattern):
        gb.evaluate(model, gb.SoftmaxCrossEntropy(), X, np.zeros(4, int))
    for k, v in model.get_params().items():
        np.testing.assert_array_equal(v, before[k])


@pytest.mark.parametrize("bad", [V, -1])
def test_a_direct_forward_checks_host_indices(bad, rng):
    # Where the indices are host memory (the CPU backends), forward itself checks the batch.
    for kernels in ("reference", "fused"):
        model = _graph(("cpu", kernels), gb.Embedding(V, D))
        X = _indices(rng, 4)
        X[1, 3] = bad
        with pytest.raises(ValueError, match=rf"Embedding\(11, 4\) input: expected indices in "
                                             rf"\[0, 11\), got {bad} at index \(1, 3\) of the "
                                             rf"batch of shape \(4, 5\)"):
            model.forward(model.backend.to_device(X, X.dtype))


@pytest.mark.parametrize("args,pattern", [
    ((0, 4), r"num_embeddings: expected an integer >= 1, got 0"),
    ((5.0, 4), r"num_embeddings: expected an integer >= 1, got 5.0"),
    ((5, True), r"embedding_dim: expected an integer >= 1, got True"),
    ((5, 4, 5), r"padding_idx: expected None or an integer in \[-5, 5\) \(within num_embeddings\), "
                r"got 5"),
    ((5, 4, -6), r"padding_idx: expected None or an integer in \[-5, 5\)"),
    ((5, 4, 1.0), r"padding_idx: expected None or an integer in \[-5, 5\)"),
])
def test_bad_arguments(args, pattern):
    with pytest.raises(ValueError, match=pattern):
        gb.Embedding(*args)


def test_float_input_is_rejected_by_the_layer():
    model = gb.Sequential([gb.Embedding(V, D)], device="cpu", input_shape=(T,))
    with pytest.raises(TypeError, match=r"Embedding\(11, 4\) input: expected int32 or int64 "
                                        r"indices .*, got dtype float32"):
        model.forward(np.zeros((2, T), np.float32))
