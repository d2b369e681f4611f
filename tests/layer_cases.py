"""Shared helpers of the layer tests: run one layer through a model, and the PyTorch twins."""

import numpy as np

import gpubackprop as gb

TORCH_ACTS = {
    "identity": lambda F, z: z,
    "relu": lambda F, z: F.relu(z),
    "tanh": lambda F, z: F.tanh(z),
    "sigmoid": lambda F, z: F.sigmoid(z),
    "leaky_relu": lambda F, z: F.leaky_relu(z, 0.01),
    "gelu": lambda F, z: F.gelu(z, approximate="tanh"),
}


def model_for(spec, layers, input_shape=None, dtype="float64", seed=0):
    device, kernels = spec
    return gb.Sequential(layers, device=device, dtype=dtype, seed=seed, kernels=kernels,
                         input_shape=input_shape)


def run_layer(spec, layer, X, dY, seed=0, params=None, input_grad=True):
    """(Y, dX, {name: grad}) of ``layer`` alone in a float64 model, as host arrays."""
    model = model_for(spec, [layer], input_shape=X.shape[1:], seed=seed)
    be = model.backend
    if params is not None:
        model.set_params({f"0.{k}": v for k, v in params.items()})
    model.zero_grads()
    Y, backprop = model.forward(be.to_device(X), train=True, input_grad=input_grad)
    Y = np.array(be.to_host(Y))
    dX = backprop(be.to_device(dY))
    dX = None if dX is None else np.array(be.to_host(dX))
    grads = {k: np.array(be.to_host(v)) for k, v in getattr(layer, "grads", {}).items()}
    return Y, dX, grads


def torch_grads(torch, fn, X, dY, params):
    """Y, dX and parameter gradients of ``fn(X, **params)`` by autograd, in float64."""
    Xt = torch.tensor(X, dtype=torch.float64, requires_grad=True)
    pt = {k: torch.tensor(v, dtype=torch.float64, requires_grad=True) for k, v in params.items()}
    Y = fn(Xt, **pt)
    (Y * torch.tensor(dY, dtype=torch.float64)).sum().backward()
    return (Y.detach().numpy(), Xt.grad.numpy(),
            {k: v.grad.numpy() for k, v in pt.items()})


def assert_close(actual, expected, tol=1e-10, what=""):
    """|actual − expected| <= tol · max(|expected|) elementwise (relative to the array's scale)."""
    expected = np.asarray(expected)
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape}"
    scale = max(float(np.abs(expected).max()) if expected.size else 0.0, 1e-300)
    err = float(np.abs(actual - expected).max()) / scale if expected.size else 0.0
    assert err <= tol, f"{what}: relative error {err:.3e} > {tol:.0e}"
