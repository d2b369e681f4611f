"""Gradient check: backprop against central differences, in float64."""

import numpy as np

from gpubackprop.training import check_pair


def gradcheck(model, loss, X, y, eps=1e-6, max_params=None, seed=0):
    """Max relative error between backprop's and central differences' parameter gradients.

    The error of each parameter array is max|g_bp − g_fd| / max(max|g_bp|, max|g_fd|), so an
    array of tiny gradients is judged by its own scale; one that is zero up to rounding (below
    1e-10 of the model's largest gradient, or below the differences' own rounding noise) is not
    judged. The model must be float64 (the differences of a float32 loss carry ~1e-4 rounding
    noise). ``max_params`` checks a seeded random subset of the parameters instead of all of them.

    Every loss is taken in training mode, the mode backprop differentiates (batch statistics, the
    dropout masks of one step): the model's state (running statistics, step counter) is put back
    before each pass, and is as it was when this returns.
    """
    be = model.backend
    if be.dtype != np.float64:
        raise TypeError(f"model dtype: gradcheck expects a float64 model, got {be.dtype}; build "
                        f"it with dtype='float64'")
    Xh, Th = check_pair(model, loss, X, y)
    Xd, Td = be.to_device(Xh), be.to_device(Th, Th.dtype)
    xp = be.xp
    saved = {dt: xp.array(buf, copy=True) for dt, buf in model.state_buffers.items()}
    step = model.context.step

    def restore():
        for dt, buf in model.state_buffers.items():
            buf[...] = saved[dt]
        model.context.step = step

    def train_loss():
        restore()
        Y, _ = model.forward(Xd, train=True, input_grad=False)
        return float(loss.value(be, Y, Td))

    try:
        restore()
        model.zero_grads()
        Y, backprop = model.forward(Xd, train=True)
        value, dY = loss.loss_and_grad(be, Y, Td)
        backprop(dY)
        loss_at_start = float(value)
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
            plus = train_loss()
            p[i] = orig - eps
            minus = train_loss()
            p[i] = orig
            numeric[i] = (plus - minus) / (2 * eps)
    finally:
        restore()

    mask = np.zeros(n, bool)
    mask[index] = True
    arrays = []
    for start, size in model.param_slices():
        sl = slice(start, start + size)
        a, b = analytic[sl][mask[sl]], numeric[sl][mask[sl]]
        if a.size:
            arrays.append((a, b, max(np.abs(a).max(), np.abs(b).max())))
    # An array whose gradient is zero (a bias right before a batch norm) shows only rounding, in
    # backprop (~1e-16) and in the differences alike. A difference quotient cannot resolve less
    # than its own noise, the loss's rounding over 2·eps (~1e-10 for a loss of 1; a GPU's
    # reductions round differently and gave 3e-10): an array below 100 times that, or below 1e-10
    # of the model's largest gradient, counts as zero.
    noise = np.finfo(np.float64).eps * max(abs(loss_at_start), 1.0) / (2 * eps)
    floor = max(1e-10 * max((scale for _, _, scale in arrays), default=0.0), 100 * noise)
    worst = 0.0
    for a, b, scale in arrays:
        if scale > floor:
            worst = max(worst, float(np.abs(a - b).max() / scale))
    return worst
