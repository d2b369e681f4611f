"""MultiheadAttention: PyTorch's nn.MultiheadAttention (when installed) in float64 to 1e-10 for the
output, the query/key/value gradients and every parameter gradient, with no mask, causal, float and
bool attention masks, key padding and cross-attention; dropout against its definition; gradcheck
through a graph; state_dict keys, checkpoint config and the errors; on every backend."""

import json

import layer_cases as lc
import numpy as np
import pytest

import gpubackprop as gb
from gpubackprop.kernels.reference import ReferenceOps

E, H, TQ, TK, N = 8, 2, 5, 4, 3
NAMES = ["in_proj_weight", "in_proj_bias", "out_proj.weight", "out_proj.bias"]


def _params(rng):
    return {"in_proj_weight": rng.normal(size=(3 * E, E)) * 0.5, "in_proj_bias": rng.normal(size=3 * E),
            "out_proj.weight": rng.normal(size=(E, E)) * 0.5, "out_proj.bias": rng.normal(size=E)}


def _model(spec, cross, pad, dtype="float64", **kw):
    q = gb.Input((TQ, E))
    kv = gb.Input((TK, E)) if cross else q
    inputs = [q, kv] if cross else [q]
    m = None
    if pad:
        m = gb.Input((TK if cross else TQ,), dtype="bool")
        inputs.append(m)
    mha = gb.MultiheadAttention(E, H, dropout=kw.pop("dropout", 0.0))
    y = mha(q, kv, kv, key_padding_mask=m, **kw)
    device, kernels = spec
    return gb.Model(inputs=inputs, outputs=y, device=device, dtype=dtype, kernels=kernels)


def _pass(model, Xs, dY, params):
    model.set_params({f"0.{k}": v for k, v in params.items()})
    be = model.backend
    model.zero_grads()
    devs = [be.to_device(X, X.dtype if X.dtype == np.bool_ else None) for X in Xs]
    Y, backprop = model.forward(devs, train=True, input_grad=True)
    Y = np.array(be.to_host(Y))
    dXs = [None if d is None else np.array(be.to_host(d)) for d in backprop(be.to_device(dY))]
    return Y, dXs, model.get_grads()


CASES = {  # name: (cross-attention, key padding, call options)
    "self": (False, False, {}),
    "causal": (False, False, {"is_causal": True}),
    "float_mask": (True, False, {"attn_mask": "float"}),
    "bool_mask": (False, False, {"attn_mask": "bool"}),
    "key_padding": (True, True, {}),
    "causal_padding": (False, True, {"is_causal": True}),
}


@pytest.mark.parametrize("case", list(CASES))
def test_follows_torch(backend_spec, rng, case):
    torch = pytest.importorskip("torch")
    cross, pad, kw = CASES[case]
    Tk = TK if cross else TQ
    if kw.get("attn_mask") == "float":
        kw = {"attn_mask": rng.normal(size=(TQ, Tk))}
        kw["attn_mask"][1, 2] = -np.inf
    elif kw.get("attn_mask") == "bool":
        kw = {"attn_mask": rng.random((TQ, Tk)) < 0.3}
        kw["attn_mask"][:, 0] = False  # no fully masked row: torch gives NaN there
    q = rng.normal(size=(N, TQ, E))
    kv = rng.normal(size=(N, Tk, E)) if cross else q
    Xs = [q, kv] if cross else [q]
    kpm = None
    if pad:
        kpm = np.zeros((N, Tk), bool)
        kpm[0, -1] = kpm[2, 1:3] = True
        Xs.append(kpm)
    dY = rng.normal(size=(N, TQ, E))
    params = _params(rng)
    Y, dXs, grads = _pass(_model(backend_spec, cross, pad, **kw), Xs, dY, params)

    tm = torch.nn.MultiheadAttention(E, H, batch_first=True).double()
    with torch.no_grad():
        for name, p in tm.named_parameters():
            p.copy_(torch.tensor(params[name]))
    assert [n for n, _ in tm.named_parameters()] == NAMES
    tq = torch.tensor(q, requires_grad=True)
    tkv = torch.tensor(kv, requires_grad=True) if cross else tq
    mask = kw.get("attn_mask")
    if kw.get("is_causal"):
        mask = torch.ones(TQ, TQ, dtype=torch.bool).triu(1)  # True = masked, as the key padding
    elif mask is not None:
        mask = torch.tensor(mask)
    tY, _ = tm(tq, tkv, tkv, key_padding_mask=None if kpm is None else torch.tensor(kpm),
               attn_mask=mask, need_weights=False, is_causal=bool(kw.get("is_causal")))
    (tY * torch.tensor(dY)).sum().backward()
    lc.assert_close(Y, tY.detach().numpy(), what="Y")
    lc.assert_close(dXs[0], tq.grad.numpy(), what="dquery")
    if cross:
        lc.assert_close(dXs[1], tkv.grad.numpy(), what="dkey+dvalue")
    if pad:
        assert dXs[-1] is None  # a bool mask has no gradient
    for name, p in tm.named_parameters():
        lc.assert_close(grads[f"0.{name}"], p.grad.numpy(), what=name)


@pytest.mark.parametrize("bias", [True, False])
def test_separate_key_and_value_follow_torch(backend_spec, rng, bias):
    torch = pytest.importorskip("torch")
    q, k, v = gb.Input((TQ, E)), gb.Input((TK, E)), gb.Input((TK, E))
    device, kernels = backend_spec
    model = gb.Model(inputs=[q, k, v], outputs=gb.MultiheadAttention(E, H, bias=bias)(q, k, v),
                     device=device, dtype="float64", kernels=kernels)
    Xs = [rng.normal(size=(N, TQ, E)), rng.normal(size=(N, TK, E)), rng.normal(size=(N, TK, E))]
    dY, params = rng.normal(size=(N, TQ, E)), _params(rng)
    if not bias:
        params = {k: v for k, v in params.items() if "bias" not in k}
    Y, dXs, grads = _pass(model, Xs, dY, params)
    tm = torch.nn.MultiheadAttention(E, H, bias=bias, batch_first=True).double()
    with torch.no_grad():
        for name, p in tm.named_parameters():
            p.copy_(torch.tensor(params[name]))
    ts = [torch.tensor(X, requires_grad=True) for X in Xs]
    tY, _ = tm(*ts, need_weights=False)
    (tY * torch.tensor(dY)).sum().backward()
    lc.assert_close(Y, tY.detach().numpy(), what="Y")
    for d, t, what in zip(dXs, ts, ("dquery", "dkey", "dvalue"), strict=True):
        lc.assert_close(d, t.grad.numpy(), what=what)
    for name, p in tm.named_parameters():
        lc.assert_close(grads[f"0.{name}"], p.grad.numpy(), what=name)


def test_fully_masked_query_gives_the_bias_not_nan(backend_spec, rng):
    kpm = np.zeros((N, TQ), bool)
    kpm[1] = True  # every key of sample 1 is padding
    params = _params(rng)
    Y, dXs, _ = _pass(_model(backend_spec, False, True), [rng.normal(size=(N, TQ, E)), kpm],
                      rng.normal(size=(N, TQ, E)), params)
    assert np.isfinite(Y).all() and np.isfinite(dXs[0]).all()
    np.testing.assert_allclose(Y[1], np.broadcast_to(params["out_proj.bias"], (TQ, E)), atol=1e-12)


def test_dropout_follows_its_definition(backend_spec, rng):
    """Attention weights dropped by Dropout's hashed mask (seed, layer, step), recomputed by hand."""
    p = 0.3
    model = _model(backend_spec, False, False, dropout=p)
    q, dY, params = rng.normal(size=(N, TQ, E)), rng.normal(size=(N, TQ, E)), _params(rng)
    Y, _, _ = _pass(model, [q], dY, params)
    keep = ReferenceOps(np).dropout_mask((N, H, TQ, TQ), p, model.context.seed, 0, 0)
    assert 0 < keep.mean() < 1
    D = E // H
    W, b = params["in_proj_weight"], params["in_proj_bias"]
    Qh, Kh, Vh = ((q @ W[i * E:(i + 1) * E].T + b[i * E:(i + 1) * E]).reshape(N, TQ, H, D)
                  .transpose(0, 2, 1, 3) for i in range(3))
    S = Qh @ Kh.transpose(0, 1, 3, 2) / np.sqrt(D)
    A = np.exp(S - S.max(-1, keepdims=True))
    A /= A.sum(-1, keepdims=True)
    out = ((A * keep / (1 - p)) @ Vh).transpose(0, 2, 1, 3).reshape(N, TQ, E)
    lc.assert_close(Y, out @ params["out_proj.weight"].T + params["out_proj.bias"], what="Y")
    Yeval = np.array(model.backend.to_host(model([model.backend.to_device(q)])))
    assert not np.allclose(Yeval, Y)  # inference: no dropout


def test_gradcheck_through_a_graph(backend_spec, rng):
    q, kv = gb.Input((3, 4)), gb.Input((2, 4))
    m = gb.Input((2,), dtype="bool")
    h = gb.MultiheadAttention(4, 2)(q, kv, kv, key_padding_mask=m)
    y = gb.Dense(12, 3)(gb.Flatten()(gb.Add()([h, q])))
    device, kernels = backend_spec
    model = gb.Model(inputs=[q, kv, m], outputs=y, device=device, dtype="float64", kernels=kernels)
    X = [rng.normal(size=(5, 3, 4)), rng.normal(size=(5, 2, 4)), np.zeros((5, 2), bool)]
    X[2][1, 0] = True
    assert gb.gradcheck(model, gb.SoftmaxCrossEntropy(), X, rng.integers(0, 3, 5)) < 1e-6


def test_gradcheck_of_a_layer_shared_by_self_and_cross_attention(backend_spec, rng):
    """One layer used twice in a step, once as self-attention (its q, k, v GEMM at once) and
    once across two tensors (a GEMM each): the second backprop adds to the first's gradients."""
    q, kv = gb.Input((3, 4)), gb.Input((3, 4))  # a shared layer takes one set of shapes
    mha = gb.MultiheadAttention(4, 2)
    h = mha(mha(q), kv, kv)
    y = gb.Dense(12, 3)(gb.Flatten()(h))
    device, kernels = backend_spec
    model = gb.Model(inputs=[q, kv], outputs=y, device=device, dtype="float64", kernels=kernels)
    params = {k: rng.normal(size=v.shape) * 0.5 for k, v in model.get_params().items()}
    model.set_params(params)
    X = [rng.normal(size=(5, 3, 4)), rng.normal(size=(5, 3, 4))]
    assert gb.gradcheck(model, gb.SoftmaxCrossEntropy(), X, rng.integers(0, 3, 5)) < 1e-6


def test_state_dict_keys_equal_torch_and_config_round_trips(rng):
    q = gb.Input((TQ, E))
    mask = rng.normal(size=(TQ, TQ))
    mask[0, 1] = -np.inf
    model = gb.Model(inputs=q, outputs=gb.MultiheadAttention(E, H, attn_mask=mask)(q, q, q),
                     device="cpu", dtype="float64")
    assert list(model.state_dict()) == [f"0.{n}" for n in NAMES]
    cfg = json.loads(json.dumps(model.config()))
    again = gb.Model.from_config(cfg, device="cpu", dtype="float64")
    again.set_params(model.get_params())
    X = rng.normal(size=(2, TQ, E))
    np.testing.assert_array_equal(again.predict(X), model.predict(X))
    no_bias = gb.MultiheadAttention(E, H, bias=False)
    no_bias.build([(TQ, E)] * 3)
    assert [n for n, _ in no_bias.param_specs()] == ["in_proj_weight", "out_proj.weight"]


def test_errors():
    q = gb.Input((TQ, E))
    with pytest.raises(ValueError, match="num_heads: expected a divisor of embed_dim=8, got 3"):
        gb.MultiheadAttention(E, 3)
    with pytest.raises(ValueError, match="batch_first: expected True"):
        gb.MultiheadAttention(E, H, batch_first=False)
    with pytest.raises(ValueError, match="dropout: expected a drop probability"):
        gb.MultiheadAttention(E, H, dropout=1.0)
    with pytest.raises(ValueError, match=r"attn_mask: expected shape \(5, 5\)"):
        gb.MultiheadAttention(E, H)(q, q, q, attn_mask=np.zeros((5, 4)))
    with pytest.raises(ValueError, match="is_causal: expected False when attn_mask is given"):
        gb.MultiheadAttention(E, H)(q, q, q, attn_mask=np.zeros((5, 5)), is_causal=True)
    with pytest.raises(ValueError, match=r"key: expected shape \(T, 8\)"):
        gb.MultiheadAttention(E, H)(q, gb.Input((TQ, 4)))
    with pytest.raises(TypeError, match="key_padding_mask: expected a bool input"):
        gb.MultiheadAttention(E, H)(q, q, q, key_padding_mask=gb.Input((TQ,)))
    shared = gb.MultiheadAttention(E, H)
    shared(shared(shared(q, is_causal=True), is_causal=True))  # the same mask again, or none
    with pytest.raises(ValueError, match="attn_mask/is_causal differ from this layer's"):
        shared(q, attn_mask=np.zeros((TQ, TQ)))
    assert shared.is_causal and shared.attn_mask is None
    unmasked = gb.MultiheadAttention(E, H)
    unmasked(q)
    with pytest.raises(ValueError, match="attn_mask/is_causal differ from this layer's"):
        unmasked(q, is_causal=True)  # would change the earlier call's node too
    given = gb.MultiheadAttention(E, H, attn_mask=np.zeros((TQ, TQ)))
    given(q, attn_mask=np.zeros((TQ, TQ)))
    with pytest.raises(ValueError, match="attn_mask/is_causal differ from this layer's"):
        given(q, attn_mask=np.ones((TQ, TQ)))
    with pytest.raises(TypeError, match="value: expected a symbolic tensor"):
        gb.MultiheadAttention(E, H)(q, q, np.zeros((2, TQ, E)))
