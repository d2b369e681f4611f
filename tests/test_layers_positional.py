"""PositionalEmbedding: Y = X + weight[:T] and its gradients against the NumPy definition (rows past
T get none, stale values cleared; a layer used twice adds), PyTorch (when installed) in float64 to
1e-10 as an nn.Parameter added to an nn.Embedding's output, alone and under a
TransformerEncoderLayer, with a 6-step Adam trajectory; gradcheck; the posemb spec token; config,
checkpoint and state_dict round trips; the errors; on every backend."""

import json

import layer_cases as lc
import numpy as np
import pytest

import gpubackprop as gb
from gpubackprop.checkpoint import load_checkpoint, save_checkpoint
from gpubackprop.modelspec import SpecError, build_model, plan

V, L, D, T, N = 13, 7, 8, 5, 4  # vocabulary, max_len, embedding_dim, time steps (< max_len), batch


def _alone(spec, layer, shape=(T, D)):
    device, kernels = spec
    return gb.Sequential([layer], input_shape=shape, device=device, dtype="float64",
                         kernels=kernels)


def _pass(model, X, dY, stale=None):
    """(Y, dX, grads) of one training pass; ``stale``: the gradient buffer's value before it."""
    be = model.backend
    if stale is not None:
        model.flat_grads[...] = stale  # what an earlier step left: backprop must overwrite it
    model.zero_grads()
    Y, backprop = model.forward(be.to_device(X), train=True, input_grad=True)
    Y = np.array(be.to_host(Y))
    dX = np.array(be.to_host(backprop(be.to_device(dY))))
    return Y, dX, model.get_grads()


def test_follows_its_numpy_definition(backend_spec, rng):
    model = _alone(backend_spec, gb.PositionalEmbedding(L, D))
    W = rng.normal(size=(L, D))
    model.set_params({"0.weight": W})
    X, dY = rng.normal(size=(N, T, D)), rng.normal(size=(N, T, D))
    Y, dX, grads = _pass(model, X, dY, stale=7.0)
    lc.assert_close(Y, X + W[None, :T], tol=1e-15, what="Y")
    np.testing.assert_array_equal(dX, dY)  # the identity's gradient: passed through as it is
    want = np.zeros((L, D))
    want[:T] = dY.sum(axis=0)  # the batch sum; positions T.. get none (the stale 7s cleared)
    lc.assert_close(grads["0.weight"], want, tol=1e-14, what="dweight")
    lc.assert_close(model.predict(X), X + W[None, :T], tol=1e-15, what="predict")
    # The whole table in use (T = max_len) and a batch of one.
    full = _alone(backend_spec, gb.PositionalEmbedding(T, D))
    full.set_params({"0.weight": W[:T]})
    Y, dX, grads = _pass(full, X[:1], dY[:1], stale=-3.0)
    lc.assert_close(Y, X[:1] + W[None, :T], tol=1e-15, what="Y (T = max_len)")
    lc.assert_close(grads["0.weight"], dY[0], tol=1e-15, what="dweight (T = max_len)")


def test_a_layer_used_twice_adds_both_gradients(backend_spec, rng):
    x = gb.Input((T, D))
    pe = gb.PositionalEmbedding(L, D)
    device, kernels = backend_spec
    model = gb.Model(inputs=x, outputs=pe(pe(x)), device=device, dtype="float64", kernels=kernels)
    W = rng.normal(size=(L, D))
    model.set_params({"0.weight": W})
    X, dY = rng.normal(size=(N, T, D)), rng.normal(size=(N, T, D))
    Y, dX, grads = _pass(model, X, dY, stale=5.0)
    lc.assert_close(Y, X + 2 * W[None, :T], tol=1e-15, what="Y")
    want = np.zeros((L, D))
    want[:T] = 2 * dY.sum(axis=0)
    lc.assert_close(grads["0.weight"], want, tol=1e-14, what="dweight")


def test_initial_weights_are_standard_normal(backend_spec):
    W = _alone(backend_spec, gb.PositionalEmbedding(400, 50), shape=(3, 50)).get_params()["0.weight"]
    assert W.shape == (400, 50)
    assert abs(W.mean()) < 0.02 and abs(W.std() - 1.0) < 0.02  # as torch.nn.Embedding's table


def _token_graph(spec, head, dtype="float64", max_len=L, **encoder):
    """Embedding -> PositionalEmbedding [-> TransformerEncoderLayer] -> Flatten -> Dense(3)."""
    x = gb.Input((T,), dtype="int64")
    h = gb.PositionalEmbedding(max_len, D)(gb.Embedding(V, D)(x))
    if encoder:
        h = gb.TransformerEncoderLayer(D, 2, **encoder)(h)
    y = gb.Dense(T * D, head)(gb.Flatten()(h))
    device, kernels = spec
    return gb.Model(inputs=x, outputs=y, device=device, dtype=dtype, kernels=kernels)


ENCODER = {"dim_feedforward": 12, "dropout": 0.0, "norm_first": True, "is_causal": True}


def _twin(torch, encoder):
    """The same network in PyTorch: the positional table an nn.Parameter added to the embeddings."""
    nn = torch.nn

    class Positional(nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = nn.Parameter(torch.zeros(L, D))

        def forward(self, x):
            return x + self.weight[:x.shape[1]]

    class Twin(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb, self.pos = nn.Embedding(V, D), Positional()
            kw = {k: v for k, v in encoder.items() if k != "is_causal"}
            self.enc = nn.TransformerEncoderLayer(D, 2, batch_first=True, **kw) if encoder else None
            self.head = nn.Linear(T * D, 3)

        def forward(self, idx):
            h = self.pos(self.emb(idx))
            if self.enc is not None:
                causal = nn.Transformer.generate_square_subsequent_mask(T, dtype=torch.float64)
                h = self.enc(h, src_mask=causal, is_causal=True)
            return self.head(h.flatten(1))

    return Twin().double()


@pytest.mark.parametrize("encoder", [{}, ENCODER], ids=["alone", "under_a_transformer"])
def test_follows_torch(backend_spec, rng, encoder):
    torch = pytest.importorskip("torch")
    model = _token_graph(backend_spec, 3, **encoder)
    tmodel = _twin(torch, encoder)
    params = {k: rng.normal(size=v.shape) * 0.5 for k, v in model.state_dict().items()}
    model.load_state_dict(params)
    tmodel.load_state_dict({k: torch.tensor(v) for k, v in
                            gb.renumber_state_dict(params, tmodel).items()})
    idx, dY = rng.integers(0, V, (N, T)), rng.normal(size=(N, 3))
    be = model.backend
    model.zero_grads()
    Y, backprop = model.forward(be.to_device(idx, np.int64), train=True, input_grad=True)
    assert backprop(be.to_device(dY)) is None  # integer indices: no input gradient
    tY = tmodel(torch.tensor(idx))
    (tY * torch.tensor(dY)).sum().backward()
    lc.assert_close(np.array(be.to_host(Y)), tY.detach().numpy(), what="Y")
    tgrads = {k: p.grad.numpy() for k, p in tmodel.named_parameters()}
    grads = _state_dict_grads(model)
    assert len(tgrads) == len(grads) == len(params) == (16 if encoder else 4)
    for (key, g), (tkey, tg) in zip(grads.items(), tgrads.items(), strict=True):
        lc.assert_close(g, tg, what=f"{key} / {tkey}")


def _state_dict_grads(model):
    """The gradients under the state_dict's keys and order (Dense's W/b are weight/bias there)."""
    grads = model.get_grads()
    return {k: grads[k if k in grads else k.replace(".weight", ".W").replace(".bias", ".b")]
            for k in model.state_dict()}


def test_adam_steps_follow_torch(backend_spec, rng):
    torch = pytest.importorskip("torch")
    model = _token_graph(backend_spec, 3)
    tmodel = _twin(torch, {})
    tmodel.load_state_dict({k: torch.tensor(v) for k, v in
                            gb.renumber_state_dict(model.state_dict(), tmodel).items()})
    names = dict(zip(_state_dict_grads(model), tmodel.state_dict(), strict=True))
    names = {k if k in model.get_params() else k.replace(".weight", ".W").replace(".bias", ".b"): t
             for k, t in names.items()}
    topt = torch.optim.Adam(tmodel.parameters(), lr=0.05)
    X, y = rng.integers(0, V, (24, T)), rng.integers(0, 3, 24)
    lc.assert_steps_follow_torch(torch, model, gb.Adam(lr=0.05), tmodel, topt, names, X, y)


@pytest.mark.parametrize("encoder", [{}, {**ENCODER, "dim_feedforward": 6}],
                         ids=["alone", "under_a_transformer"])
def test_gradcheck(backend_spec, rng, encoder):
    model = _token_graph(backend_spec, 3, **encoder)
    X = rng.integers(0, V, (3, T))
    assert gb.gradcheck(model, gb.SoftmaxCrossEntropy(), X, rng.integers(0, 3, 3)) < 1e-6


def test_a_transformer_graph_trains(backend_spec, rng):
    # Token 0 of each sequence names the class, and the causal encoder reads it only at the last
    # position through attention: the loss falls only if the whole chain learns.
    model = _token_graph(backend_spec, 3, dtype="float32", **ENCODER)
    X = rng.integers(0, V, (96, T))
    y = X[:, 0] % 3
    loss = gb.SoftmaxCrossEntropy()
    before = gb.evaluate(model, loss, X, y)["loss"]
    gb.fit(model, loss, gb.Adam(0.01), X, y, epochs=15, batch_size=32, progress=False)
    after = gb.evaluate(model, loss, X, y)
    assert after["loss"] < 0.5 * before and after["accuracy"] > 0.9, (before, after)


def test_posemb_spec_token(backend_spec, rng):
    p = plan("posemb-lstm(6)-last-dense(classes)", (T, 3), 4)
    assert p.entries[0][:4] == ("PositionalEmbedding", {"max_len": T, "embedding_dim": 3}, (T, 3),
                                (T, 3))
    assert plan("posemb(9)-ln-last-dense(4)", (T, 3), 4).entries[0][1]["max_len"] == 9
    device, kernels = backend_spec
    model, _ = build_model("posemb(9)-lstm(6)-last-dense(classes)", (T, 3), 4, device=device,
                           dtype="float64", kernels=kernels)
    assert repr(model.layers[0]) == "PositionalEmbedding(9, 3)"
    X = rng.normal(size=(6, T, 3))
    assert gb.gradcheck(model, gb.SoftmaxCrossEntropy(), X, rng.integers(0, 4, 6)) < 1e-6


@pytest.mark.parametrize("spec,shape,match", [
    ("posemb(4)-last-dense(3)", (T, 3),
     r"token 1 'posemb\(4\)' at character 1: max_len: expected sequences of at most max_len=4 "
     r"time steps, got 5"),
    ("posemb-dense(3)", (12,), r"token 1 'posemb' at character 1: needs sequences"),
    ("posemb(x)-last-dense(3)", (T, 3), r"max_len: expected an integer, got 'x'"),
    ("posemb(0)-last-dense(3)", (T, 3), r"max_len: expected a positive value, got '0'"),
])
def test_posemb_spec_errors(spec, shape, match):
    with pytest.raises(SpecError, match=match):
        plan(spec, shape, 3)


def test_config_checkpoint_and_state_dict(backend_spec, rng, tmp_path):
    layer = gb.PositionalEmbedding(L, D)
    assert repr(layer) == "PositionalEmbedding(7, 8)"
    assert layer.config() == {"max_len": L, "embedding_dim": D}
    assert repr(gb.PositionalEmbedding(**json.loads(json.dumps(layer.config())))) == repr(layer)
    model = _token_graph(backend_spec, 3)
    assert list(model.state_dict()) == ["0.weight", "1.weight", "3.weight", "3.bias"]
    X, y = rng.integers(0, V, (7, T)), rng.integers(0, 3, 7)
    gb.fit(model, gb.SoftmaxCrossEntropy(), gb.Adam(0.01), X, y, epochs=1, batch_size=4,
           progress=False)
    expected = model.predict(X)
    save_checkpoint(tmp_path / "c.npz", model)
    device, kernels = backend_spec
    loaded = load_checkpoint(tmp_path / "c.npz").build_model(device=device, kernels=kernels)
    assert repr(loaded.layers[1]) == "PositionalEmbedding(7, 8)"
    np.testing.assert_array_equal(loaded.predict(X), expected)
    twin = _token_graph(backend_spec, 3)
    twin.load_state_dict(model.state_dict())
    np.testing.assert_array_equal(twin.predict(X), expected)


@pytest.mark.parametrize("kw,match", [
    ({"max_len": 0, "embedding_dim": 4}, r"max_len: expected a positive integer, got 0"),
    ({"max_len": 2.5, "embedding_dim": 4}, r"max_len: expected a positive integer, got 2\.5"),
    ({"max_len": True, "embedding_dim": 4}, r"max_len: expected a positive integer, got True"),
    ({"max_len": 8, "embedding_dim": -1}, r"embedding_dim: expected a positive integer, got -1"),
])
def test_bad_arguments(kw, match):
    with pytest.raises(ValueError, match=match):
        gb.PositionalEmbedding(**kw)


def test_shape_errors_name_the_layer_and_max_len(rng):
    with pytest.raises(ValueError, match=r"layers\[0\] PositionalEmbedding\(4, 8\): max_len: "
                                         r"expected sequences of at most max_len=4 time steps, "
                                         r"got 5 \(input shape \(5, 8\)\); make max_len >= 5"):
        gb.Sequential([gb.PositionalEmbedding(4, D)], input_shape=(T, D), device="cpu")
    with pytest.raises(ValueError, match=r"PositionalEmbedding\(8, 8\): expected a sequence of "
                                         r"shape \(T, 8\) \(time steps, embedding_dim\), got "
                                         r"\(5, 6\)"):
        gb.Sequential([gb.PositionalEmbedding(8, D)], input_shape=(T, 6), device="cpu")
    with pytest.raises(ValueError, match=r"got \(40,\)"):
        gb.Sequential([gb.PositionalEmbedding(8, D)], input_shape=(40,), device="cpu")
    model = gb.Sequential([gb.PositionalEmbedding(8, D)], input_shape=(T, D), device="cpu",
                          dtype="float64")
    with pytest.raises(ValueError, match=r"PositionalEmbedding\(8, 8\) input: expected shape "
                                         r"\(batch, 5, 8\), got \(2, 6, 8\)"):
        model.forward(np.zeros((2, 6, D)))
    with pytest.raises(TypeError, match=r"PositionalEmbedding input: expected dtype float64, got "
                                        r"float32"):
        model.forward(np.zeros((2, T, D), np.float32))
