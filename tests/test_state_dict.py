"""PyTorch weights in and out (gpubackprop.state_dict): torch's keys, shapes and dtypes for the
equivalent torch.nn modules; a torch state dict loads and predicts the same in float64; safetensors
round trips are exact; get_grads() is the flat gradient buffer; load errors name the key and change
nothing; renumber_state_dict maps a torch.nn.Sequential's positions. The torch tests skip without
torch; the rest run everywhere."""

import json
import re
import struct

import numpy as np
import pytest

import gpubackprop as gb
from gpubackprop.state_dict import IncompatibleKeys

# ---- models, and their torch.nn equivalents ------------------------------------------------------
# Written layer for layer as torch's modules read (separate Activation layers), so the keys agree.


def mlp(seed=0, dtype="float64", device="cpu", kernels="fused"):
    return gb.Sequential([gb.Dense(6, 8), gb.Activation("tanh"), gb.Dense(8, 8), gb.Activation("relu"),
                          gb.BatchNorm1d(8), gb.Dense(8, 3)],
                         device=device, dtype=dtype, seed=seed, kernels=kernels)


def cnn(seed=0, dtype="float64", device="cpu", kernels="fused"):
    return gb.Sequential([gb.Conv2d(2, 4, 3, padding=1, groups=2), gb.BatchNorm2d(4),
                          gb.Activation("relu"), gb.MaxPool2d(2), gb.Flatten(), gb.Dense(36, 5),
                          gb.Sequential([gb.LayerNorm(5), gb.Dense(5, 3)])],
                         input_shape=(2, 6, 6), device=device, dtype=dtype, seed=seed, kernels=kernels)


def rnn(seed=0, dtype="float64", device="cpu", kernels="fused"):
    return gb.Sequential([gb.LSTM(5, 7, num_layers=2), gb.GRU(7, 6), gb.RNN(6, 4, nonlinearity="relu"),
                          gb.LastStep(), gb.Dense(4, 3)],
                         input_shape=(4, 5), device=device, dtype=dtype, seed=seed, kernels=kernels)


MODELS = {"mlp": (mlp, (6,)), "cnn": (cnn, (2, 6, 6)), "rnn": (rnn, (4, 5))}


def torch_model(name):
    torch = pytest.importorskip("torch")
    nn = torch.nn

    def sequence_output(cls):  # torch's recurrent modules return (output, state); keep their keys
        return type(cls.__name__, (cls,), {"forward": lambda self, x: cls.forward(self, x)[0]})

    class LastStep(nn.Module):
        def forward(self, x):
            return x[:, -1]

    if name == "mlp":
        return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 8), nn.ReLU(), nn.BatchNorm1d(8),
                             nn.Linear(8, 3))
    if name == "cnn":
        return nn.Sequential(nn.Conv2d(2, 4, 3, padding=1, groups=2), nn.BatchNorm2d(4), nn.ReLU(),
                             nn.MaxPool2d(2), nn.Flatten(), nn.Linear(36, 5),
                             nn.Sequential(nn.LayerNorm(5), nn.Linear(5, 3)))
    return nn.Sequential(sequence_output(nn.LSTM)(5, 7, num_layers=2, batch_first=True),
                         sequence_output(nn.GRU)(7, 6, batch_first=True),
                         sequence_output(nn.RNN)(6, 4, nonlinearity="relu", batch_first=True),
                         LastStep(), nn.Linear(4, 3))


def trained_torch(name, rng):
    """A float64 torch model with nothing at its initial value: random affine norm parameters and
    running statistics from a few training-mode passes; in eval mode."""
    torch = pytest.importorskip("torch")
    torch.manual_seed(0)
    model = torch_model(name).double()
    shape = MODELS[name][1]
    with torch.no_grad():
        for key, p in model.named_parameters():
            if key.endswith("weight") and p.ndim == 1:
                p.copy_(torch.from_numpy(rng.uniform(0.5, 1.5, p.shape)))
            elif key.endswith("bias") and p.ndim == 1:
                p.copy_(torch.from_numpy(rng.normal(0, 0.3, p.shape)))
        model.train()
        for _ in range(3):
            model(torch.from_numpy(rng.normal(size=(16, *shape))))
    return model.eval()


def train(model, rng, steps=2):
    """A few SGD steps, so that parameters, running statistics and gradients are all non-trivial."""
    shape = model.input_shape_hint
    X = rng.normal(size=(16, *shape)).astype(model.dtype)
    y = rng.integers(0, 3, 16)
    opt = gb.SGD(lr=0.1)
    for _ in range(steps):
        gb.train_step(model, gb.SoftmaxCrossEntropy(), opt, X, y)
    return X


def assert_bitwise_equal(a, b):
    assert list(a) == list(b)
    for key in a:
        assert a[key].dtype == b[key].dtype and a[key].shape == b[key].shape, key
        assert a[key].tobytes() == b[key].tobytes(), key


# ---- keys and layouts -------------------------------------------------------------------------
def test_keys_follow_positions_and_torch_names_and_match_get_params_and_get_state():
    model = gb.Sequential([gb.Dense(4, 8, activation="relu"),
                           gb.Sequential([gb.Dense(8, 8), gb.Residual(gb.Dense(8, 8, activation="tanh"))]),
                           gb.BatchNorm1d(8), gb.Dense(8, 3)], device="cpu", dtype="float64")
    sd = model.state_dict()
    assert list(sd) == ["0.weight", "0.bias", "1.0.weight", "1.0.bias", "1.1.weight", "1.1.bias",
                        "2.weight", "2.bias", "2.running_mean", "2.running_var",
                        "2.num_batches_tracked", "3.weight", "3.bias"]
    params, state = model.get_params(), model.get_state()
    for key, value in sd.items():
        prefix, name = key.rsplit(".", 1)
        own = f"{prefix}.{ {'weight': 'W', 'bias': 'b'}[name]}" if f"{prefix}.W" in params else key
        expected = params[own] if own in params else state[own]
        np.testing.assert_array_equal(value, expected)
        assert value.dtype == expected.dtype
    assert sd["2.num_batches_tracked"].dtype == np.int64 and sd["2.num_batches_tracked"].shape == ()
    assert "step" not in sd  # training progress: checkpoints keep it, torch modules have none
    with pytest.raises(RuntimeError, match="part of another model: use the outer model's state dict"):
        model.layers[1].state_dict()


@pytest.mark.parametrize("name", list(MODELS))
def test_keys_shapes_and_dtypes_equal_torchs(name):
    torch_sd = torch_model(name).state_dict()
    sd = MODELS[name][0](dtype="float32").state_dict()
    assert list(sd) == list(torch_sd)  # the order too: per module, parameters then buffers
    for key, value in sd.items():
        assert value.shape == tuple(torch_sd[key].shape), key
        assert value.dtype == torch_sd[key].numpy().dtype, key


# ---- PyTorch -> gpubackprop -> PyTorch ------------------------------------------------------------
@pytest.mark.parametrize("name", list(MODELS))
def test_a_torch_state_dict_loads_and_predicts_the_same(name, rng):
    torch = pytest.importorskip("torch")
    reference = trained_torch(name, rng)
    model = MODELS[name][0](seed=7)
    assert model.load_state_dict(reference.state_dict()) == IncompatibleKeys([], [])
    X = rng.normal(size=(9, *MODELS[name][1]))
    with torch.no_grad():
        expected = reference(torch.from_numpy(X)).numpy()
    np.testing.assert_allclose(model.predict(X), expected, rtol=0, atol=1e-12)
    torch_sd = {k: v.numpy() for k, v in reference.state_dict().items()}
    assert_bitwise_equal(model.state_dict(), torch_sd)  # running stats and counts included


@pytest.mark.parametrize("name", list(MODELS))
def test_a_trained_models_state_dict_loads_into_torch_and_predicts_the_same(name, rng):
    torch = pytest.importorskip("torch")
    model = MODELS[name][0]()
    train(model, rng)
    reference = torch_model(name).double()
    reference.load_state_dict({k: torch.from_numpy(v) for k, v in model.state_dict().items()})
    X = rng.normal(size=(9, *MODELS[name][1]))
    with torch.no_grad():
        expected = reference.eval()(torch.from_numpy(X)).numpy()
    np.testing.assert_allclose(model.predict(X), expected, rtol=0, atol=1e-12)


def test_parameters_that_require_grad_and_bfloat16_tensors_load(rng):
    torch = pytest.importorskip("torch")
    reference = trained_torch("mlp", rng)
    model = mlp(seed=3)
    params = dict(reference.named_parameters())  # requires_grad: needs .detach() on the way
    missing, unexpected = model.load_state_dict(params, strict=False)
    assert missing == ["4.running_mean", "4.running_var", "4.num_batches_tracked"] and unexpected == []
    np.testing.assert_array_equal(model.state_dict()["2.weight"], params["2.weight"].detach().numpy())
    half = {k: v.to(torch.bfloat16) if v.is_floating_point() else v
            for k, v in reference.state_dict().items()}
    model.load_state_dict(half)
    np.testing.assert_array_equal(model.state_dict()["0.weight"], half["0.weight"].double().numpy())


# ---- safetensors ------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_safetensors_round_trip_is_exact(backend_spec, dtype, tmp_path, rng):
    device, kernels = backend_spec
    model = cnn(dtype=dtype, device=device, kernels=kernels)
    X = train(model, rng)
    path = tmp_path / "cnn.safetensors"
    model.save_safetensors(path)
    model.save_safetensors(path)  # over the previous file, through the atomic writer
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cnn.safetensors"]
    fresh = cnn(seed=5, dtype=dtype, device=device, kernels=kernels)
    assert fresh.load_safetensors(path) == IncompatibleKeys([], [])
    sd = model.state_dict()
    assert sd["1.num_batches_tracked"] == 2 and np.any(sd["1.running_var"] != 1)
    assert_bitwise_equal(fresh.state_dict(), sd)
    np.testing.assert_array_equal(fresh.predict(X), model.predict(X))

    from safetensors import safe_open

    with safe_open(str(path), framework="numpy") as f:
        assert f.metadata() == {"format": "pt"}
        assert sorted(f.keys()) == sorted(sd)


def test_load_safetensors_names_the_file(tmp_path):
    model = mlp()
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match=re.escape(f"{str(bad)!r} is not one")):
        model.load_safetensors(bad)
    other = tmp_path / "other.safetensors"
    cnn().save_safetensors(other)
    with pytest.raises(ValueError, match=re.escape(f"{other}: missing keys")):
        model.load_safetensors(other)
    with pytest.raises(FileNotFoundError):
        model.load_safetensors(tmp_path / "absent.safetensors")
    header = json.dumps({"0.weight": {"dtype": "C64", "shape": [8, 6], "data_offsets": [0, 384]}})
    odd = tmp_path / "complex.safetensors"
    odd.write_bytes(struct.pack("<Q", len(header)) + header.encode() + bytes(384))
    with pytest.raises((ValueError, TypeError)):
        model.load_safetensors(odd)


def test_load_safetensors_reads_bfloat16_exactly(tmp_path):
    """torch's bf16 weights load (ml_dtypes gives NumPy the dtype), widened exactly."""
    ml_dtypes = pytest.importorskip("ml_dtypes")
    model = mlp()
    w = np.linspace(-2, 2, 48).astype(ml_dtypes.bfloat16).reshape(8, 6)
    header = json.dumps({"0.weight": {"dtype": "BF16", "shape": [8, 6], "data_offsets": [0, 96]}})
    half = tmp_path / "half.safetensors"
    half.write_bytes(struct.pack("<Q", len(header)) + header.encode() + w.tobytes())
    missing, unexpected = model.load_safetensors(half, strict=False)
    assert "0.weight" not in missing and unexpected == []
    np.testing.assert_array_equal(model.get_params()["0.W"], w.astype(np.float64))


# ---- get_grads --------------------------------------------------------------------------------
@pytest.mark.parametrize("make", [mlp, cnn, rnn], ids=["mlp", "cnn", "rnn"])
def test_get_grads_is_the_flat_gradient_buffer_after_a_train_step(make, backend_spec, rng):
    device, kernels = backend_spec
    model = make(device=device, kernels=kernels)
    train(model, rng, steps=1)
    grads = model.get_grads()
    assert list(grads) == list(model.get_params())
    for key, value in model.get_params().items():
        assert grads[key].shape == value.shape and grads[key].dtype == value.dtype
    flat = np.asarray(model.backend.to_host(model.flat_grads))
    np.testing.assert_array_equal(np.concatenate([g.ravel() for g in grads.values()]), flat)
    assert np.all([np.any(g != 0) for g in grads.values()])  # every layer got a gradient
    next(iter(grads.values()))[...] = 1e9  # a copy, not a view
    np.testing.assert_array_equal(np.asarray(model.backend.to_host(model.flat_grads)), flat)


# ---- load_state_dict: checks, strict, no partial writes ------------------------------------------
def _changed(sd):
    """Every entry different from ``sd``'s: a partial write would show."""
    return {k: (v + 1 if v.dtype.kind == "i" else v * 0.5 + 0.25) for k, v in sd.items()}


BAD = [
    ("missing", lambda sd: sd.pop("5.bias"), ValueError, "state_dict: missing keys ['5.bias'], "
                                                         "unexpected keys []"),
    ("unexpected", lambda sd: sd.update({"6.weight": np.zeros((3, 3))}), ValueError,
     "missing keys [], unexpected keys ['6.weight']"),
    ("shape", lambda sd: sd.update({"5.weight": np.zeros((3, 7))}), ValueError,
     "state_dict['5.weight']: expected shape (3, 8), got array of shape (3, 7) and dtype float64"),
    ("int for float", lambda sd: sd.update({"5.bias": np.zeros(3, np.int64)}), TypeError,
     "state_dict['5.bias']: expected floating-point values (cast to the model's float64), got array "
     "of shape (3,) and dtype int64"),
    ("float for count", lambda sd: sd.update({"4.num_batches_tracked": np.array(2.0)}), TypeError,
     "state_dict['4.num_batches_tracked']: expected an integer count (int64), got array of shape () "
     "and dtype float64"),
    ("nan", lambda sd: sd["5.weight"].__setitem__((2, 1), np.nan), ValueError,
     "state_dict['5.weight']: expected finite values, found nan at index (2, 1)"),
    ("ragged", lambda sd: sd.update({"5.bias": [[1.0], [2.0, 3.0]]}), TypeError,
     "state_dict['5.bias']: expected an array-like of numbers"),
]


@pytest.mark.parametrize("case", BAD, ids=[c[0] for c in BAD])
def test_load_state_dict_errors_name_the_key_and_change_nothing(case, backend_spec, rng):
    _, spoil, error, message = case
    device, kernels = backend_spec
    model = mlp(device=device, kernels=kernels)
    train(model, rng, steps=1)
    before = model.state_dict()
    sd = _changed(before)
    spoil(sd)
    with pytest.raises(error, match=re.escape(message)):
        model.load_state_dict(sd)
    assert_bitwise_equal(model.state_dict(), before)


def test_load_state_dict_strict_false_loads_what_matches_and_reports_the_rest(rng):
    model = mlp()
    sd = _changed(model.state_dict())
    del sd["0.bias"]
    sd["9.weight"] = np.zeros(2)
    with pytest.raises(ValueError, match=re.escape("renumber_state_dict(sd, model)")):
        model.load_state_dict(sd)  # missing and unexpected ones: maybe torch's positions
    missing, unexpected = model.load_state_dict(sd, strict=False)
    assert (missing, unexpected) == (["0.bias"], ["9.weight"])
    after = model.state_dict()
    for key in after:
        if key != "0.bias":
            np.testing.assert_array_equal(after[key], sd[key])
    with pytest.raises(ValueError, match=re.escape("state_dict['5.weight']: expected shape (3, 8)")):
        model.load_state_dict({"5.weight": np.zeros(3)}, strict=False)  # shapes: an error anyway
    with pytest.raises(TypeError, match="strict: expected True or False, got 'no'"):
        model.load_state_dict(sd, strict="no")
    with pytest.raises(TypeError, match="state_dict: expected a dict {key: array} like "
                                        "model.state_dict"):
        model.load_state_dict(list(sd.items()))


def test_state_dict_into_a_fresh_model_with_another_seed_predicts_identically(rng):
    model = cnn(dtype="float32")
    X = train(model, rng)
    fresh = cnn(seed=11, dtype="float32")
    assert not np.array_equal(fresh.predict(X), model.predict(X))
    fresh.load_state_dict(model.state_dict())
    np.testing.assert_array_equal(fresh.predict(X), model.predict(X))
    # Cast on the way in, as torch's copy_: float64 values into a float32 model.
    fresh.load_state_dict({k: v.astype(np.float64) if v.dtype.kind == "f" else v
                           for k, v in model.state_dict().items()})
    np.testing.assert_array_equal(fresh.predict(X), model.predict(X))


def test_tensor_like_values_load_without_torch():
    class Tensor:  # what load_state_dict asks of a torch tensor
        def __init__(self, a):
            self.a = a

        def detach(self):
            return self

        def cpu(self):
            return self

        def numpy(self):
            return self.a

    class ArrayLike:
        def __init__(self, a):
            self.a = a

        def __array__(self, dtype=None, copy=None):
            return self.a

    source = mlp(seed=4)
    sd = {k: (Tensor(v) if i % 2 else ArrayLike(v)) for i, (k, v) in enumerate(source.state_dict().items())}
    model = mlp()
    model.load_state_dict(sd)
    assert_bitwise_equal(model.state_dict(), source.state_dict())


# ---- renumber_state_dict: torch.nn.Sequential positions with separate ReLU modules ------------------
def fused_mlp(seed=0):
    """mlp() with the activations fused into the Dense layers: positions 0..3, torch's 0, 2, 4, 5."""
    return gb.Sequential([gb.Dense(6, 8, activation="tanh"), gb.Dense(8, 8, activation="relu"),
                          gb.BatchNorm1d(8), gb.Dense(8, 3)], device="cpu", dtype="float64", seed=seed)


def test_renumber_maps_positions_in_order_both_ways(rng):
    separate = mlp(seed=1)
    train(separate, rng)
    fused = fused_mlp()
    sd = gb.renumber_state_dict(separate.state_dict(), fused)
    assert list(sd) == ["0.weight", "0.bias", "1.weight", "1.bias", "2.weight", "2.bias",
                        "2.running_mean", "2.running_var", "2.num_batches_tracked", "3.weight", "3.bias"]
    fused.load_state_dict(sd)
    X = rng.normal(size=(5, 6))
    np.testing.assert_array_equal(fused.predict(X), separate.predict(X))
    back = gb.renumber_state_dict(fused.state_dict(), separate.state_dict())  # a dict target
    assert_bitwise_equal(back, separate.state_dict())


RENUMBER_BAD = [
    ("names", {"0.weight": np.zeros((2, 2)), "0.bias": np.zeros(2)},
     {"0.weight": np.zeros((2, 2)), "1.weight": np.zeros(2)},
     "sd: entry 1, '0.bias', does not line up with the target's '1.weight' (the names differ)"),
    ("shapes", {"0.weight": np.zeros((2, 3))}, {"0.weight": np.zeros((3, 2))},
     "sd: entry 0, '0.weight', does not line up with the target's '0.weight' (the shapes differ: "
     "(2, 3) vs (3, 2))"),
    ("split module", {"0.weight": np.zeros(2), "0.bias": np.zeros(2)},
     {"0.weight": np.zeros(2), "1.bias": np.zeros(2)},
     "module '0''s entries would go to both '0' and '1'"),
    ("merged modules", {"0.weight": np.zeros(2), "1.bias": np.zeros(2)},
     {"0.weight": np.zeros(2), "0.bias": np.zeros(2)},
     "modules '0' and '1' would both go to '0'"),
    ("counts", {"0.weight": np.zeros(2), "1.weight": np.zeros(2)}, {"2.weight": np.zeros(2)},
     "sd: 2 entries, the target 1; sd has more: ['1.weight']"),
]


@pytest.mark.parametrize("case", RENUMBER_BAD, ids=[c[0] for c in RENUMBER_BAD])
def test_renumber_refuses_entries_that_do_not_line_up(case):
    _, sd, target, message = case
    with pytest.raises(ValueError, match=re.escape(message)):
        gb.renumber_state_dict(sd, target)


def test_renumber_names_a_model_that_differs():
    with pytest.raises(ValueError, match=re.escape("entry 4, '2.weight', does not line up with the "
                                                   "target's '2.weight' (the shapes differ: (8,) vs "
                                                   "(8, 8))")):
        gb.renumber_state_dict(fused_mlp().state_dict(), gb.Sequential([
            gb.Dense(6, 8), gb.Dense(8, 8), gb.Dense(8, 8), gb.Dense(8, 3)], device="cpu"))
    with pytest.raises(TypeError, match="target: expected a model, a torch module or a dict"):
        gb.renumber_state_dict(fused_mlp().state_dict(), 3)


# ---- bidirectional recurrent layers: the "*_reverse" keys ----------------------------------------
def birnn(seed=0, dtype="float64"):
    return gb.Sequential([gb.LSTM(5, 7, num_layers=2, bidirectional=True, dropout=0.2),
                          gb.GRU(14, 6, bidirectional=True),
                          gb.RNN(12, 4, nonlinearity="relu", bidirectional=True, num_layers=2),
                          gb.LastStep(), gb.Dense(8, 3)],
                         input_shape=(4, 5), device="cpu", dtype=dtype, seed=seed)


def torch_birnn():
    torch = pytest.importorskip("torch")
    nn = torch.nn

    def sequence_output(cls):
        return type(cls.__name__, (cls,), {"forward": lambda self, x: cls.forward(self, x)[0]})

    class LastStep(nn.Module):
        def forward(self, x):
            return x[:, -1]

    return nn.Sequential(
        sequence_output(nn.LSTM)(5, 7, num_layers=2, batch_first=True, bidirectional=True, dropout=0.2),
        sequence_output(nn.GRU)(14, 6, batch_first=True, bidirectional=True),
        sequence_output(nn.RNN)(12, 4, nonlinearity="relu", batch_first=True, bidirectional=True,
                                num_layers=2),
        LastStep(), nn.Linear(8, 3))


def test_bidirectional_keys_and_shapes_equal_torchs_and_torch_weights_predict_the_same(rng):
    torch = pytest.importorskip("torch")
    reference = torch_birnn().double().eval()
    model = birnn(seed=7)
    torch_sd = reference.state_dict()
    assert list(model.state_dict()) == list(torch_sd)  # l0, l0_reverse, l1, ...: torch's order
    assert "0.weight_hh_l1_reverse" in torch_sd
    for key, value in model.state_dict().items():
        assert value.shape == tuple(torch_sd[key].shape), key
    assert model.load_state_dict(torch_sd) == IncompatibleKeys([], [])
    X = rng.normal(size=(9, 4, 5))
    with torch.no_grad():
        expected = reference(torch.from_numpy(X)).numpy()
    np.testing.assert_allclose(model.predict(X), expected, rtol=0, atol=1e-12)
    train(model, rng)  # and back: a trained model's weights into torch
    reference.load_state_dict({k: torch.from_numpy(v) for k, v in model.state_dict().items()})
    with torch.no_grad():
        np.testing.assert_allclose(reference(torch.from_numpy(X)).numpy(), model.predict(X),
                                   rtol=0, atol=1e-12)
