"""Gradient check: backprop against central differences, in float64."""

import numpy as np

from gpubackprop.training import _check_pair


def gradcheck(model, loss, X, y, eps=1e-6, max_params=None, seed=0):
    """Max relative error between backprop's and central differences' parameter gradients.

    The error of each parameter array is max|g_bp − g_fd| / max(max|g_bp|, max|g_fd|), so an
    array of tiny gradients is judged by its own scale. The model must be float64 (the
    differences of a float32 loss carry ~1e-4 rounding noise). ``max_params`` checks a seeded
    random subset of the parameters instead of all of them.
    """
    be = model.backend
    if be.dtype != np.float64:
        raise TypeError(f"model dtype: gradcheck expects a float64 model, got {be.dtype}; build "
                        f"it with dtype='float64'")
    Xh, Th = _check_pair(model, loss, X, y)
    Xd, Td = be.to_device(Xh), be.to_device(Th, Th.dtype)

    model.zero_grads()
    Y, backprop = model.forward(Xd, train=True)
    _, dY = loss.loss_and_grad(be, Y, Td)
    backprop(dY)
    analytic = be.to_host(model.flat_grads).copy()

    p = model.flat_params
    n = p.size
    index = np.arange(n)
    if max_params is not None and max_params < n:
        index = np.sort(np.random.default_rng(seed).choice(n, max_params, replace=False))
    numeric = np.zeros(n)
    for i in index:
        orig = float(p[i])
        p[i] = orig + eps
        plus = float(loss.value(be, model(Xd), Td))
        p[i] = orig - eps
        minus = float(loss.value(be, model(Xd), Td))
        p[i] = orig
        numeric[i] = (plus - minus) / (2 * eps)

    worst = 0.0
    offset = 0
    mask = np.zeros(n, bool)
    mask[index] = True
    for layer in model.dense_layers():
        for size in (layer.n_out * layer.n_in, layer.n_out):
            sl = slice(offset, offset + size)
            offset += size
            a, b = analytic[sl][mask[sl]], numeric[sl][mask[sl]]
            if a.size == 0:
                continue
            scale = max(np.abs(a).max(), np.abs(b).max())
            if scale > 0:
                worst = max(worst, float(np.abs(a - b).max() / scale))
    return worst
