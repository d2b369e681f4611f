"""TransformerEncoderLayer: PyTorch's nn.TransformerEncoderLayer (when installed) in float64 to 1e-10
for the output, the input gradient and every parameter gradient, both norm orders, relu and gelu,
causal; a 2-layer nn.TransformerEncoder's state dict loads and predicts the same; dropout in
training against its definition (a NumPy forward with the hashed masks); gradcheck; state_dict
keys, config and checkpoint round trips, errors; on every backend."""

import json
import math

import layer_cases as lc
import numpy as np
import pytest

import gpubackprop as gb
from gpubackprop.checkpoint import load_checkpoint, save_checkpoint
from gpubackprop.kernels.reference import ReferenceOps

E, H, F, T, N = 8, 2, 12, 5, 3
NAMES = ["self_attn.in_proj_weight", "self_attn.in_proj_bias", "self_attn.out_proj.weight",
         "self_attn.out_proj.bias", "linear1.weight", "linear1.bias", "linear2.weight", "linear2.bias",
         "norm1.weight", "norm1.bias", "norm2.weight", "norm2.bias"]
SHAPES = [(3 * E, E), (3 * E,), (E, E), (E,), (F, E), (F,), (E, F), (E,), (E,), (E,), (E,), (E,)]


def _params(rng):
    return {n: rng.normal(size=s) * (0.5 if len(s) == 2 else 1.0) for n, s in zip(NAMES, SHAPES,
                                                                                 strict=True)}


def _model(spec, n_layers=1, dtype="float64", **kw):
    device, kernels = spec
    layers = [gb.TransformerEncoderLayer(E, H, dim_feedforward=F, **{"dropout": 0.0, **kw})
              for _ in range(n_layers)]
    return gb.Sequential(layers, input_shape=(T, E), device=device, dtype=dtype, kernels=kernels)


def _pass(model, X, dY, params):
    model.set_params({f"0.{k}": v for k, v in params.items()})
    be = model.backend
    model.zero_grads()
    Y, backprop = model.forward(be.to_device(X), train=True, input_grad=True)
    Y = np.array(be.to_host(Y))
    dX = np.array(be.to_host(backprop(be.to_device(dY))))
    return Y, dX, model.get_grads()


def _torch_layer(torch, params, **kw):
    tl = torch.nn.TransformerEncoderLayer(E, H, dim_feedforward=F, dropout=0.0, batch_first=True,
                                          **kw).double()
    assert [n for n, _ in tl.named_parameters()] == NAMES
    with torch.no_grad():
        for name, p in tl.named_parameters():
            p.copy_(torch.tensor(params[name]))
    return tl


CASES = {  # name: constructor options
    "post_relu": {},
    "post_gelu": {"activation": "gelu"},
    "pre_relu": {"norm_first": True},
    "pre_gelu": {"norm_first": True, "activation": "gelu"},
    "pre_causal": {"norm_first": True, "is_causal": True},
}


@pytest.mark.parametrize("case", list(CASES))
def test_follows_torch(backend_spec, rng, case):
    torch = pytest.importorskip("torch")
    kw = dict(CASES[case])
    causal = kw.pop("is_causal", False)
    X, dY, params = rng.normal(size=(N, T, E)), rng.normal(size=(N, T, E)), _params(rng)
    Y, dX, grads = _pass(_model(backend_spec, is_causal=causal, **kw), X, dY, params)

    tl = _torch_layer(torch, params, **kw)
    tX = torch.tensor(X, requires_grad=True)
    mask = torch.ones(T, T, dtype=torch.bool).triu(1) if causal else None
    tY = tl(tX, src_mask=mask, is_causal=causal)
    (tY * torch.tensor(dY)).sum().backward()
    lc.assert_close(Y, tY.detach().numpy(), what="Y")
    lc.assert_close(dX, tX.grad.numpy(), what="dX")
    for name, p in tl.named_parameters():
        lc.assert_close(grads[f"0.{name}"], p.grad.numpy(), what=name)


def test_torch_encoder_state_dict_loads_and_predicts_the_same(rng):
    torch = pytest.importorskip("torch")
    torch.manual_seed(0)
    layer = torch.nn.TransformerEncoderLayer(E, H, dim_feedforward=F, dropout=0.0, batch_first=True,
                                             activation="gelu")
    enc = torch.nn.TransformerEncoder(layer, 2, enable_nested_tensor=False).double().eval()
    with torch.no_grad():  # norms away from ones/zeros, so a swapped weight would show
        for name, p in enc.named_parameters():
            if "norm" in name:
                p.copy_(torch.tensor(rng.normal(size=p.shape)))
    model = _model(("cpu", "fused"), n_layers=2, activation="gelu")
    assert list(model.state_dict()) == [f"{i}.{n}" for i in range(2) for n in NAMES]
    assert list(enc.state_dict()) == [f"layers.{i}.{n}" for i in range(2) for n in NAMES]
    model.load_state_dict(gb.renumber_state_dict(enc.state_dict(), model))
    X = rng.normal(size=(N, T, E))
    with torch.no_grad():
        expected = enc(torch.tensor(X)).numpy()
    lc.assert_close(model.predict(X), expected, what="Y")
    back = gb.renumber_state_dict(model.state_dict(), enc)  # and back into torch
    enc.load_state_dict({k: torch.tensor(v) for k, v in back.items()})


def _layer_norm(x, w, b, eps=1e-5):
    mu = x.mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(((x - mu) ** 2).mean(-1, keepdims=True) + eps) * w + b


def _reference(X, P, p, masks, norm_first, activation):
    """The layer's forward in NumPy, dropout applied with the given keep masks."""
    keep_attn, keep_1, keep_ff, keep_2 = masks

    def drop(a, keep):
        return a * keep / (1 - p)

    def self_attn(x):
        D = E // H
        W, b = P["self_attn.in_proj_weight"], P["self_attn.in_proj_bias"]
        Qh, Kh, Vh = ((x @ W[i * E:(i + 1) * E].T + b[i * E:(i + 1) * E]).reshape(N, T, H, D)
                      .transpose(0, 2, 1, 3) for i in range(3))
        S = Qh @ Kh.transpose(0, 1, 3, 2) / math.sqrt(D)
        A = np.exp(S - S.max(-1, keepdims=True))
        A /= A.sum(-1, keepdims=True)
        out = (drop(A, keep_attn) @ Vh).transpose(0, 2, 1, 3).reshape(N, T, E)
        return drop(out @ P["self_attn.out_proj.weight"].T + P["self_attn.out_proj.bias"], keep_1)

    def ff(x):
        h = x @ P["linear1.weight"].T + P["linear1.bias"]
        h = np.maximum(h, 0) if activation == "relu" else \
            0.5 * h * (1 + np.vectorize(math.erf)(h / math.sqrt(2)))
        return drop(drop(h, keep_ff) @ P["linear2.weight"].T + P["linear2.bias"], keep_2)

    def n1(x):
        return _layer_norm(x, P["norm1.weight"], P["norm1.bias"])

    def n2(x):
        return _layer_norm(x, P["norm2.weight"], P["norm2.bias"])

    if norm_first:
        x = X + self_attn(n1(X))
        return x + ff(n2(x))
    x = n1(X + self_attn(X))
    return n2(x + ff(x))


@pytest.mark.parametrize("norm_first,activation", [(False, "relu"), (True, "gelu")])
def test_dropout_follows_its_definition(backend_spec, rng, norm_first, activation):
    """Training with dropout: each of the four dropouts (attention weights, after the attention,
    inside and after the feed-forward) by its own hashed mask, recomputed by hand."""
    p = 0.25
    model = _model(backend_spec, dropout=p, norm_first=norm_first, activation=activation)
    X, dY, params = rng.normal(size=(N, T, E)), rng.normal(size=(N, T, E)), _params(rng)
    Y, _, _ = _pass(model, X, dY, params)
    ref, seed = ReferenceOps(np), model.context.seed
    # Leaf 0's parts: the attention draws as layer 0; the Dropouts (ff, 1, 2) as 0 + k·2^32, k = 5, 6, 7.
    masks = [ref.dropout_mask((N, H, T, T), p, seed, 0, 0),
             ref.dropout_mask((N, T, E), p, seed, 6 << 32, 0),
             ref.dropout_mask((N * T, F), p, seed, 5 << 32, 0).reshape(N, T, F),
             ref.dropout_mask((N, T, E), p, seed, 7 << 32, 0)]
    assert all(0 < m.mean() < 1 for m in masks)
    lc.assert_close(Y, _reference(X, params, p, masks, norm_first, activation), what="Y")
    Yeval = model.predict(X)
    ones = [np.ones_like(m) for m in masks]
    lc.assert_close(Yeval, _reference(X, params, 0.0, ones, norm_first, activation), what="Y eval")


@pytest.mark.parametrize("norm_first,activation", [(False, "relu"), (True, "gelu")])
def test_gradcheck(backend_spec, rng, norm_first, activation):
    device, kernels = backend_spec
    model = gb.Sequential([gb.TransformerEncoderLayer(4, 2, dim_feedforward=6, dropout=0.0,
                                                      norm_first=norm_first, activation=activation),
                           gb.Flatten(), gb.Dense(12, 3)],
                          input_shape=(3, 4), device=device, dtype="float64", kernels=kernels)
    X = rng.normal(size=(4, 3, 4))
    assert gb.gradcheck(model, gb.SoftmaxCrossEntropy(), X, rng.integers(0, 3, 4)) < 1e-6


def test_gradcheck_of_a_layer_shared_by_two_graph_nodes(backend_spec, rng):
    x = gb.Input((3, 4))
    tel = gb.TransformerEncoderLayer(4, 2, dim_feedforward=6, dropout=0.0)
    y = gb.Dense(12, 3)(gb.Flatten()(tel(tel(x))))  # one set of weights, two uses in a step
    device, kernels = backend_spec
    model = gb.Model(inputs=x, outputs=y, device=device, dtype="float64", kernels=kernels)
    X = rng.normal(size=(4, 3, 4))
    assert gb.gradcheck(model, gb.SoftmaxCrossEntropy(), X, rng.integers(0, 3, 4)) < 1e-6


def test_config_and_checkpoint_round_trip(tmp_path, rng):
    mask = rng.normal(size=(T, T))
    mask[0, 1] = -np.inf
    layer = gb.TransformerEncoderLayer(E, H, dim_feedforward=F, dropout=0.1, activation="gelu",
                                       norm_first=True, layer_norm_eps=1e-6, src_mask=mask)
    model = gb.Sequential([layer], input_shape=(T, E), device="cpu", dtype="float64")
    assert repr(layer) == ("TransformerEncoderLayer(8, 2, dim_feedforward=12, dropout=0.1, "
                           "activation='gelu', norm_first=True, layer_norm_eps=1e-06, src_mask=...)")
    again = gb.Sequential.from_config(json.loads(json.dumps(model.config())), device="cpu",
                                      dtype="float64")
    assert again.config() == model.config()
    X = rng.normal(size=(2, T, E))
    again.set_params(model.get_params())
    np.testing.assert_array_equal(again.predict(X), model.predict(X))
    save_checkpoint(tmp_path / "c.npz", model)
    restored = load_checkpoint(tmp_path / "c.npz").build_model(device="cpu")
    np.testing.assert_array_equal(restored.predict(X), model.predict(X))


def test_errors():
    with pytest.raises(ValueError, match="num_heads: expected a divisor of embed_dim=8, got 3"):
        gb.TransformerEncoderLayer(E, 3)
    with pytest.raises(ValueError, match="activation: expected one of"):
        gb.TransformerEncoderLayer(E, H, activation="tanh")
    with pytest.raises(ValueError, match="batch_first: expected True"):
        gb.TransformerEncoderLayer(E, H, batch_first=False)
    with pytest.raises(ValueError, match="dropout: expected a drop probability"):
        gb.TransformerEncoderLayer(E, H, dropout=1.0)
    with pytest.raises(TypeError, match="norm_first: expected True or False"):
        gb.TransformerEncoderLayer(E, H, norm_first=1)
    with pytest.raises(ValueError, match=r"expected a sequence of shape \(T, 8\)"):
        gb.TransformerEncoderLayer(E, H).build((5, 4))
    with pytest.raises(ValueError, match=r"attn_mask: expected shape \(5, 5\)"):
        gb.TransformerEncoderLayer(E, H, src_mask=np.zeros((4, 4))).build((5, E))


# ---- src_key_padding_mask ---------------------------------------------------------------------
def _padded_model(spec, dtype="float64", src_mask=None, is_causal=False, **kw):
    x, pad = gb.Input((T, E)), gb.Input((T,), dtype="bool")
    tel = gb.TransformerEncoderLayer(E, H, dim_feedforward=F, **{"dropout": 0.0, **kw})
    y = tel(x, src_mask=src_mask, src_key_padding_mask=pad, is_causal=is_causal)
    device, kernels = spec
    return gb.Model(inputs=[x, pad], outputs=y, device=device, dtype=dtype, kernels=kernels)


def _padded_pass(model, X, kpm, dY, params):
    model.set_params({f"0.{k}": v for k, v in params.items()})
    be = model.backend
    model.zero_grads()
    Y, backprop = model.forward([be.to_device(X), be.to_device(kpm, np.bool_)], train=True,
                                input_grad=True)
    Y = np.array(be.to_host(Y))
    dX, dpad = backprop(be.to_device(dY))
    assert dpad is None  # a bool mask has no gradient
    return Y, np.array(be.to_host(dX)), model.get_grads()


PAD_CASES = {  # name: (constructor options, src_mask: None | "causal" | "float" | "bool")
    "post_relu": ({}, None),
    "pre_gelu": ({"norm_first": True, "activation": "gelu"}, None),
    "post_causal": ({}, "causal"),
    "pre_float_mask": ({"norm_first": True}, "float"),
    "post_bool_mask": ({"activation": "gelu"}, "bool"),
}


def _kpm():
    kpm = np.zeros((N, T), bool)
    kpm[0, -1] = kpm[2, 1:3] = True  # key 0 never padded: no query loses every key
    return kpm


@pytest.mark.parametrize("case", list(PAD_CASES))
def test_key_padding_follows_torch(backend_spec, rng, case):
    torch = pytest.importorskip("torch")
    kw, which = PAD_CASES[case]
    src_mask = None
    if which == "float":
        src_mask = rng.normal(size=(T, T))
        src_mask[3, 1] = -np.inf
    elif which == "bool":
        src_mask = rng.random((T, T)) < 0.3
        src_mask[:, 0] = False
    X, dY, params, kpm = rng.normal(size=(N, T, E)), rng.normal(size=(N, T, E)), _params(rng), _kpm()
    model = _padded_model(backend_spec, src_mask=src_mask, is_causal=which == "causal", **kw)
    Y, dX, grads = _padded_pass(model, X, kpm, dY, params)

    tl = _torch_layer(torch, params, **kw)
    tX = torch.tensor(X, requires_grad=True)
    mask = torch.ones(T, T, dtype=torch.bool).triu(1) if which == "causal" else \
        None if src_mask is None else torch.tensor(src_mask)
    tpad = torch.tensor(kpm)
    if which == "float":  # torch wants both masks of one kind (bool or float)
        tpad = torch.zeros(N, T, dtype=torch.float64).masked_fill(tpad, -math.inf)
    tY = tl(tX, src_mask=mask, src_key_padding_mask=tpad, is_causal=which == "causal")
    (tY * torch.tensor(dY)).sum().backward()
    lc.assert_close(Y, tY.detach().numpy(), what="Y")
    lc.assert_close(dX, tX.grad.numpy(), what="dX")
    for name, p in tl.named_parameters():
        lc.assert_close(grads[f"0.{name}"], p.grad.numpy(), what=name)


@pytest.mark.parametrize("norm_first", [False, True])
def test_fully_padded_sample_attends_to_nothing(backend_spec, rng, norm_first):
    """A sample whose every position is padding: its attention output is out_proj.bias (torch:
    NaN), the rest of the layer runs on it as usual; the other samples are torch's."""
    torch = pytest.importorskip("torch")
    X, dY, params, kpm = rng.normal(size=(N, T, E)), rng.normal(size=(N, T, E)), _params(rng), _kpm()
    kpm[1] = True
    Y, dX, grads = _padded_pass(_padded_model(backend_spec, norm_first=norm_first), X, kpm, dY,
                                params)
    assert np.isfinite(Y).all() and np.isfinite(dX).all()

    tl = _torch_layer(torch, params, norm_first=norm_first)
    tX, tdY = torch.tensor(X, requires_grad=True), torch.tensor(dY)
    keep = [0, 2]
    t_rest = tl(tX[keep], src_key_padding_mask=torch.tensor(kpm[keep]))

    def ff(h):
        return tl.linear2(torch.relu(tl.linear1(h)))

    a = tX[1] + tl.self_attn.out_proj.bias  # x + self_attn(.), the attention output its bias
    t_pad = a + ff(tl.norm2(a)) if norm_first else tl.norm2(tl.norm1(a) + ff(tl.norm1(a)))
    ((t_rest * tdY[keep]).sum() + (t_pad * tdY[1]).sum()).backward()
    lc.assert_close(Y[keep], t_rest.detach().numpy(), what="Y (samples 0, 2)")
    lc.assert_close(Y[1], t_pad.detach().numpy(), what="Y (the padded sample)")
    lc.assert_close(dX, tX.grad.numpy(), what="dX")
    for name, p in tl.named_parameters():
        lc.assert_close(grads[f"0.{name}"], p.grad.numpy(), what=name)


@pytest.mark.parametrize("norm_first,causal", [(False, False), (True, True)])
def test_gradcheck_with_key_padding(backend_spec, rng, norm_first, causal):
    x, pad = gb.Input((3, 4)), gb.Input((3,), dtype="bool")
    h = gb.TransformerEncoderLayer(4, 2, dim_feedforward=6, dropout=0.0, norm_first=norm_first)(
        x, src_key_padding_mask=pad, is_causal=causal)
    y = gb.Dense(12, 3)(gb.Flatten()(h))
    device, kernels = backend_spec
    model = gb.Model(inputs=[x, pad], outputs=y, device=device, dtype="float64", kernels=kernels)
    kpm = np.zeros((5, 3), bool)
    kpm[1, 2] = kpm[3, 1:] = True
    kpm[4] = True  # a fully padded sample: zero attention, its gradients through the rest
    X = [rng.normal(size=(5, 3, 4)), kpm]
    assert gb.gradcheck(model, gb.SoftmaxCrossEntropy(), X, rng.integers(0, 3, 5)) < 1e-6


def test_key_padding_graph_round_trips(rng):
    model = _padded_model(("cpu", "fused"), is_causal=True)
    again = gb.Model.from_config(json.loads(json.dumps(model.config())), device="cpu",
                                 dtype="float64")
    again.set_params(model.get_params())
    X, kpm = rng.normal(size=(2, T, E)), np.zeros((2, T), bool)
    kpm[0, 3:] = True
    np.testing.assert_array_equal(again.predict([X, kpm]), model.predict([X, kpm]))
    plain = gb.Sequential([gb.TransformerEncoderLayer(E, H, dim_feedforward=F, dropout=0.0,
                                                      is_causal=True)],
                          input_shape=(T, E), device="cpu", dtype="float64")
    plain.set_params(model.get_params())  # sample 1 has no padding: as the layer without a mask
    np.testing.assert_allclose(model.predict([X, kpm])[1], plain.predict(X)[1], rtol=0, atol=1e-12)
    assert not np.allclose(model.predict([X, kpm])[0], plain.predict(X)[0])


def test_key_padding_errors(rng):
    x = gb.Input((T, E))
    tel = gb.TransformerEncoderLayer(E, H, dim_feedforward=F)
    with pytest.raises(ValueError, match=r"src_key_padding_mask: expected shape \(5,\) \(T\), got"):
        tel(x, src_key_padding_mask=gb.Input((T + 1,), dtype="bool"))
    with pytest.raises(TypeError, match="src_key_padding_mask: expected a bool input"):
        tel(x, src_key_padding_mask=gb.Input((T,)))
    with pytest.raises(TypeError, match="src_key_padding_mask: expected a symbolic tensor"):
        tel(x, src_key_padding_mask=np.zeros((2, T), bool))
    with pytest.raises(TypeError, match="src: expected a symbolic tensor"):
        tel(np.zeros((2, T, E)))
    model = _padded_model(("cpu", "fused"))
    X = np.zeros((2, T, E))
    with pytest.raises(ValueError, match=r"src_key_padding_mask: expected a bool array of shape "
                                         r"\(2, 5\) \(batch, T\), got float64"):
        model.forward([X, np.zeros((2, T))])
    with pytest.raises(ValueError, match=r"src_key_padding_mask: expected a bool array of shape "
                                         r"\(2, 5\) \(batch, T\), got bool \(2, 4\)"):
        model.forward([X, np.zeros((2, T - 1), bool)])
    with pytest.raises(ValueError, match="attn_mask/is_causal differ from this layer's"):
        gb.TransformerEncoderLayer(E, H, is_causal=True)(x, src_mask=np.zeros((T, T)))


def test_spec_token_makes_the_encoder_layers():
    from gpubackprop.modelspec import SpecError, plan

    p = plan("transformer(2,ff=12,layers=2,dropout=0.2,gelu=true,prenorm=true,causal=true)-last-"
             "dense(classes)", (T, E), 3)
    layers = p.layers()
    assert [type(la).__name__ for la in layers] == ["TransformerEncoderLayer"] * 2 + ["LastStep",
                                                                                     "Dense"]
    assert repr(layers[0]) == ("TransformerEncoderLayer(8, 2, dim_feedforward=12, dropout=0.2, "
                               "activation='gelu', norm_first=True, is_causal=True)")
    assert repr(plan("transformer(4)-last-dense(3)", (T, E), None).layers()[0]) == \
        "TransformerEncoderLayer(8, 4, dim_feedforward=2048, dropout=0.1)"
    rows = plan("transformer(2,ff=4)-last-dense(classes)", (1, 6, 8), 3).layers()  # image rows
    assert type(rows[0]).__name__ == "Reshape" and rows[1].d_model == 8
    with pytest.raises(SpecError, match=r"needs sequences \(time steps, features\), got 8"):
        plan("transformer(2)-dense(classes)", (8,), 3)
    with pytest.raises(SpecError, match="num_heads: expected a divisor of embed_dim=8, got 3"):
        plan("transformer(3)-last-dense(classes)", (T, E), 3)


def test_training_with_changing_batch_sizes_equals_the_reference_set(rng):
    """Steps at batch 4, 3, 4 (the layer's buffers for one size, then another, then the first
    again), with key padding: the fused CPU set follows the reference set."""
    X, y = rng.normal(size=(4, T, E)), rng.integers(0, 3, 4)
    kpm = np.zeros((4, T), bool)
    kpm[1, 3:] = True
    params = {}
    for kernels in ("reference", "fused"):
        x, pad = gb.Input((T, E)), gb.Input((T,), dtype="bool")
        h = gb.TransformerEncoderLayer(E, H, dim_feedforward=F, dropout=0.1)(
            x, src_key_padding_mask=pad)
        model = gb.Model(inputs=[x, pad], outputs=gb.Dense(T * E, 3)(gb.Flatten()(h)),
                         device="cpu", dtype="float64", kernels=kernels, seed=3)
        opt = gb.SGD(lr=0.1, momentum=0.9)
        for n in (4, 3, 4):
            gb.train_step(model, gb.SoftmaxCrossEntropy(), opt, [X[:n], kpm[:n]], y[:n])
        params[kernels] = model.get_params()
    for k, v in params["reference"].items():
        lc.assert_close(params["fused"][k], v, tol=1e-9, what=k)


def test_steps_with_changing_batch_sizes_follow_torch(backend_spec, rng):
    """SGD steps at batch 4, 3, 4 with key padding (the buffers of one size, another, the first
    again): every parameter as torch's after each step, in float64."""
    torch = pytest.importorskip("torch")
    X, y = rng.normal(size=(4, T, E)), rng.integers(0, 3, 4)
    kpm = np.zeros((4, T), bool)
    kpm[1, 3:] = kpm[3, 1:] = True
    x, pad = gb.Input((T, E)), gb.Input((T,), dtype="bool")
    h = gb.TransformerEncoderLayer(E, H, dim_feedforward=F, dropout=0.0)(x, src_key_padding_mask=pad)
    device, kernels = backend_spec
    model = gb.Model(inputs=[x, pad], outputs=gb.Dense(T * E, 3)(gb.Flatten()(h)), device=device,
                     dtype="float64", kernels=kernels)
    params = _params(rng)
    model.set_params({**{f"0.{k}": v for k, v in params.items()}, **{
        k: v for k, v in model.get_params().items() if k.startswith("2.")}})
    tl = _torch_layer(torch, params)
    head = torch.nn.Linear(T * E, 3).double()
    with torch.no_grad():
        head.weight.copy_(torch.tensor(model.get_params()["2.W"]))
        head.bias.copy_(torch.tensor(model.get_params()["2.b"]))
    opt = gb.SGD(lr=0.1, momentum=0.9)
    topt = torch.optim.SGD(list(tl.parameters()) + list(head.parameters()), lr=0.1, momentum=0.9)
    for n in (4, 3, 4):
        gb.train_step(model, gb.SoftmaxCrossEntropy(), opt, [X[:n], kpm[:n]], y[:n])
        topt.zero_grad()
        out = tl(torch.tensor(X[:n]), src_key_padding_mask=torch.tensor(kpm[:n]))
        torch.nn.functional.cross_entropy(head(out.flatten(1)), torch.tensor(y[:n])).backward()
        topt.step()
        got = model.get_params()
        for name, p in tl.named_parameters():
            lc.assert_close(got[f"0.{name}"], p.detach().numpy(), what=f"{name} after batch {n}")
        lc.assert_close(got["2.W"], head.weight.detach().numpy(), what="head weight")
