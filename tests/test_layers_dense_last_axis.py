"""Dense on the last axis of any per-sample shape (..., n_in), as torch's nn.Linear: against torch
in float64, the same numbers as the flat (rows, n_in) layer, central differences, the shape rules
and the places that count a Dense's rows (GEMM plans, activation memory)."""

import types

import numpy as np
import pytest

import gpubackprop as gb
from gpubackprop.benchmark.gemm_limit import plan_step_gemms
from gpubackprop.memory import activation_bytes


def dense_model(backend_spec, shape, n_out, activation="identity", dtype="float64", seed=0):
    return gb.Sequential([gb.Dense(shape[-1], n_out, activation=activation)], input_shape=shape,
                         device=backend_spec[0], kernels=backend_spec[1], dtype=dtype, seed=seed)


def run(model, X, dY):
    """(Y, dX, dW, db) of one training pass as host arrays."""
    be = model.backend
    model.zero_grads()
    Y, backprop = model.forward(be.to_device(X), train=True, input_grad=True)
    dX = backprop(be.to_device(dY))
    g = model.get_grads()
    return be.to_host(Y).copy(), be.to_host(dX).copy(), g["0.W"], g["0.b"]


@pytest.mark.parametrize("shape", [(5, 3), (2, 3, 4)], ids=["(T,in)", "(A,B,in)"])
@pytest.mark.parametrize("activation", ["identity", "tanh", "gelu"])
def test_matches_torch_linear_on_the_last_axis(backend_spec, shape, activation, rng):
    torch = pytest.importorskip("torch")
    model = dense_model(backend_spec, shape, 6, activation)
    X = rng.normal(size=(4, *shape))
    dY = rng.normal(size=(4, *shape[:-1], 6))
    Y, dX, dW, db = run(model, X, dY)
    assert Y.shape == (4, *shape[:-1], 6) and dX.shape == X.shape
    linear = torch.nn.Linear(shape[-1], 6).double()
    linear.load_state_dict({k[2:]: torch.from_numpy(v) for k, v in model.state_dict().items()})
    act = {"identity": torch.nn.Identity(), "tanh": torch.nn.Tanh(), "gelu": torch.nn.GELU()}
    Xt = torch.from_numpy(X).requires_grad_()
    Yt = act[activation](linear(Xt))
    Yt.backward(torch.from_numpy(dY))
    np.testing.assert_allclose(Y, Yt.detach().numpy(), rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(dX, Xt.grad.numpy(), rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(dW, linear.weight.grad.numpy(), rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(db, linear.bias.grad.numpy(), rtol=1e-10, atol=1e-12)  # all rows


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_the_same_numbers_as_the_flat_layer_on_the_rows(backend_spec, dtype, rng):
    """(N, T, in) through Dense is (N·T, in) through the flat Dense, bit for bit: one GEMM on the
    rows view, BP3/BP4 over all rows, the input gradient reshaped back."""
    seq = dense_model(backend_spec, (7, 5), 3, "relu", dtype)
    flat = dense_model(backend_spec, (5,), 3, "relu", dtype)
    assert seq.get_params().keys() == flat.get_params().keys()
    flat.set_params(seq.get_params())
    X = rng.normal(size=(6, 7, 5)).astype(dtype)
    dY = rng.normal(size=(6, 7, 3)).astype(dtype)
    for a, b in zip(run(seq, X, dY), run(flat, X.reshape(42, 5), dY.reshape(42, 3)), strict=True):
        np.testing.assert_array_equal(a.reshape(b.shape), b)
    np.testing.assert_array_equal(seq.predict(X).reshape(42, 3), flat.predict(X.reshape(42, 5)))


def test_flat_inputs_are_unchanged(backend_spec, rng):
    """(N, in) -> (N, out): Z = X Wᵀ + b as ever, the batch of one included."""
    model = dense_model(backend_spec, (4,), 3)
    p = model.get_params()
    for n in (1, 5):
        X, dY = rng.normal(size=(n, 4)), rng.normal(size=(n, 3))
        Y, dX, dW, db = run(model, X, dY)
        np.testing.assert_allclose(Y, X @ p["0.W"].T + p["0.b"], rtol=1e-12)
        np.testing.assert_allclose(dX, dY @ p["0.W"], rtol=1e-12)
        np.testing.assert_allclose(dW, dY.T @ X, rtol=1e-12)
        np.testing.assert_allclose(db, dY.sum(0), rtol=1e-12)
    assert model.output_shape == (3,)


def test_gradcheck_of_a_per_position_head(backend_spec, rng):
    """A sequence model with Dense layers on every position, softmax-CE at every position."""
    x = gb.Input((5, 3))
    h = gb.Dense(3, 4, activation="gelu")(x)
    y = gb.Dense(4, 6)(gb.LayerNorm(4)(h))
    model = gb.Model(inputs=x, outputs=y, device=backend_spec[0], kernels=backend_spec[1],
                     dtype="float64", seed=1)
    assert model.backend is not None  # builds it: the shapes are known from here on
    assert model.output_shape == (5, 6)
    X, T = rng.normal(size=(4, 5, 3)), rng.integers(0, 6, (4, 5))
    assert gb.gradcheck(model, gb.SoftmaxCrossEntropy(), X, T) < 1e-6


@pytest.mark.parametrize("make,shape,pattern", [
    (lambda: gb.Dense(4, 2), (5, 3),
     r"Dense\(4, 2, .*\): expected input shape \(\.\.\., 4\) \(4 features on the last axis\), got "
     r"\(5, 3\)"),
    (lambda: gb.Dense(4, 2), (3,), r"Dense\(4, 2, .*\): expected 4 input features, got 3"),
    (lambda: gb.Dense(12, 2), (2, 2, 3),
     r"expected input shape \(12,\), got \(2, 2, 3\); put a Flatten\(\) before it"),
])
def test_shape_errors_name_the_last_axis(make, shape, pattern):
    with pytest.raises(ValueError, match=pattern):
        gb.Sequential([make()], input_shape=shape, device="cpu")


def test_forward_refuses_a_wrong_last_axis():
    model = dense_model(("cpu", "fused"), (5, 3), 2)
    with pytest.raises(ValueError, match=r"Dense\(3, 2\) input: expected shape \(batch, \.\.\., 3\),"
                                         r" got \(2, 5, 4\)"):
        model.layers[0].forward(np.zeros((2, 5, 4)), train=True)


def test_shapes_and_output_memory_follow_the_positions():
    model = gb.Sequential([gb.Dense(3, 8), gb.Dense(8, 2)], input_shape=(5, 3), device="cpu")
    assert model.output_shape == (5, 2) and model.n_params == 3 * 8 + 8 + 8 * 2 + 2
    itemsize = model.backend.dtype.itemsize
    # input (5·3) + each layer's output and its gradient (2·5·8, 2·5·2), per sample
    assert activation_bytes(model, 4) == 4 * itemsize * (15 + 80 + 20)


def test_the_gemm_plan_counts_a_row_per_position():
    plan = types.SimpleNamespace(entries=[("Dense", {"n_in": 8, "n_out": 4}, (5, 8), (5, 4), None),
                                          ("Dense", {"n_in": 4, "n_out": 2}, (4,), (2,), None)])
    assert plan_step_gemms(plan, 3) == [
        ("dense forward", 1, 15, 8, 4), ("dense weight gradient", 1, 4, 15, 8),
        ("dense forward", 1, 3, 4, 2), ("dense weight gradient", 1, 2, 3, 4),
        ("dense input gradient", 1, 3, 2, 4)]


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_on_positions_equals_the_rows(precision, rng):
    """The 16-bit GEMM path sees the same (rows, in) view: the same numbers as the flat model."""
    seq = gb.Sequential([gb.Dense(5, 3, activation="gelu")], input_shape=(7, 5), device="cpu",
                        precision=precision, seed=2)
    flat = gb.Sequential([gb.Dense(5, 3, activation="gelu")], input_shape=(5,), device="cpu",
                         precision=precision, seed=2)
    X = rng.normal(size=(4, 7, 5)).astype(np.float32)
    np.testing.assert_array_equal(seq.predict(X).reshape(28, 3), flat.predict(X.reshape(28, 5)))
