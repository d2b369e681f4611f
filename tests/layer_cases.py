"""Shared helpers of the layer tests: run one layer through a model, and the PyTorch twins."""

import numpy as np

import gpubackprop as gb

TORCH_ACTS = {
    "identity": lambda F, z: z,
    "relu": lambda F, z: F.relu(z),
    "tanh": lambda F, z: F.tanh(z),
    "sigmoid": lambda F, z: F.sigmoid(z),
    "leaky_relu": lambda F, z: F.leaky_relu(z, 0.01),
    "gelu": lambda F, z: F.gelu(z),
    "gelu_tanh": lambda F, z: F.gelu(z, approximate="tanh"),
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


def central_differences(f, a, h=1e-6):
    """∂f/∂a by central differences, element by element, as a host float64 array: ``f()`` reads
    ``a`` (a host or device array, changed in place and put back) and returns a float."""
    g = np.empty(a.shape)
    flat, gf = a.reshape(-1), g.reshape(-1)
    for i in range(flat.size):
        old = float(flat[i])
        flat[i] = old + h
        up = f()
        flat[i] = old - h
        down = f()
        flat[i] = old
        gf[i] = (up - down) / (2 * h)
    return g


def assert_steps_follow_torch(torch, model, opt, tmodel, topt, names, X, y, steps=6, batch=8):
    """``steps`` train_steps of ``model`` (softmax cross-entropy) against the same steps of its
    PyTorch twin on rotating batches of X: every loss and every parameter (gpubackprop name ->
    ``names``' torch name) after every step to 1e-9."""
    loss = gb.SoftmaxCrossEntropy()
    batches = len(X) // batch
    for step in range(steps):
        rows = slice(step % batches * batch, step % batches * batch + batch)
        value = gb.train_step(model, loss, opt, X[rows], y[rows])
        topt.zero_grad()
        tloss = torch.nn.functional.cross_entropy(tmodel(torch.tensor(X[rows])),
                                                  torch.tensor(y[rows]))
        tloss.backward()
        topt.step()
        assert abs(value - tloss.item()) <= 1e-9 * abs(tloss.item())
        state = tmodel.state_dict()
        for k, v in model.get_params().items():
            assert_close(v, state[names[k]].numpy(), tol=1e-9, what=f"step {step} {k}")
