"""Gradient check: backprop against central differences, in float64."""

import numbers

import numpy as np

from gpubackprop.losses import as_loss
from gpubackprop.training import check_pair, upload_inputs, upload_targets

# The step of the central differences, for the float64 models gradcheck takes. Their error is the
# truncation, ~eps² times the loss's third derivative, plus the loss's rounding over the step,
# ~u·|loss|/eps (u = 2.2e-16). Below 1e-9 the rounding alone is above 1e-7 of a gradient of 1 (a
# tenth of the 1e-6 checks are judged at) and the zero-gradient floor below, 100 times that
# rounding, excuses gradients up to 1e-5: the check would judge too little to mean anything (1e-30
# excused everything and returned 0.0). Above 0.1 the truncation of a curved loss, and the kinks of
# ReLU within ±eps, dominate and a correct backprop fails. 1e-6 sits between (near u^(1/3), the
# optimum for a loss of 1).
EPS_RANGE = (1e-9, 0.1)


def _check_eps(eps):
    lo, hi = EPS_RANGE
    if isinstance(eps, bool) or not isinstance(eps, numbers.Real) or not np.isfinite(eps) \
            or not lo <= eps <= hi:
        raise ValueError(f"eps: expected a finite step in [{lo:g}, {hi:g}] for the central "
                         f"differences of a float64 model, got {eps!r}")
    return float(eps)


def _check_max_params(max_params):
    if max_params is None:
        return None
    if isinstance(max_params, bool) or not isinstance(max_params, numbers.Integral) \
            or max_params < 1:
        raise ValueError(f"max_params: expected None (all parameters) or an integer >= 1, got "
                         f"{max_params!r}")
    return int(max_params)


def gradcheck(model, loss, X, y, eps=1e-6, max_params=None, seed=0):
    """Max relative error between backprop's and central differences' parameter gradients.

    The error of each parameter array is max|g_bp − g_fd| / max(max|g_bp|, max|g_fd|), so an
    array of tiny gradients is judged by its own scale; one that is zero up to rounding (below
    1e-10 of the model's largest gradient, or below the differences' own rounding noise) is not
    judged. The model must be float64 (the differences of a float32 loss carry ~1e-4 rounding
    noise). ``max_params`` checks a seeded random subset of the parameters instead of all of them;
    ``eps``, the step, lies in ``EPS_RANGE``.

    It never passes vacuously: a ``ValueError`` says so when the model has no parameters, when the
    loss at the start is not finite, or when every checked gradient is zero up to rounding (nothing
    was compared); a non-finite gradient, of backprop or of the differences, returns ``inf``.

    Every loss is taken in training mode, the mode backprop differentiates (batch statistics, the
    dropout masks of one step): the model's state (running statistics, step counter) is put back
    before each pass, and is as it was when this returns.
    """
    eps = _check_eps(eps)
    max_params = _check_max_params(max_params)
    be = model.backend
    if be.dtype != np.float64:
        raise TypeError(f"model dtype: gradcheck expects a float64 model, got {be.dtype}; build "
                        f"it with dtype='float64'")
    loss = as_loss(loss)
    Xh, Th = check_pair(model, loss, X, y)
    Xd, Td = upload_inputs(be, model, Xh), upload_targets(be, Th)
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
        if not np.isfinite(loss_at_start):
            raise ValueError(f"model: the loss at its parameters is {loss_at_start}, expected a "
                             f"finite loss to check gradients at")
        analytic = be.to_host(model.flat_grads).copy()

        p = model.flat_params
        n = p.size
        if n == 0:
            raise ValueError("model: has no parameters, expected at least one to check")
        index = np.arange(n)
        if max_params is not None and max_params < n:
            index = np.sort(np.random.default_rng(seed).choice(n, max_params, replace=False))
        numeric = np.zeros(n)
        for i in index:
            orig = float(p[i])
            # The step as the parameters hold it (2·eps but for rounding): nothing when eps is
            # below the parameter's resolution, where the quotient would be 0 and mean nothing.
            h = (orig + eps) - (orig - eps)
            if h == 0:
                raise ValueError(f"eps: {eps!r} is below the resolution of parameter {i}, "
                                 f"{orig:g} (± eps rounds to itself); expected eps >= "
                                 f"{np.spacing(abs(orig)):.3g} for it")
            p[i] = orig + eps
            plus = train_loss()
            p[i] = orig - eps
            minus = train_loss()
            p[i] = orig
            numeric[i] = (plus - minus) / h
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
    if not all(np.isfinite(a).all() and np.isfinite(b).all() for a, b, _ in arrays):
        return float("inf")  # (max() would skip a NaN error and pass)
    judged = [float(np.abs(a - b).max() / scale) for a, b, scale in arrays if scale > floor]
    if not judged:
        raise ValueError(f"gradcheck: every checked gradient ({index.size} of {n} parameters) is "
                         f"zero up to rounding (below {floor:.3g}), so nothing was compared; use "
                         f"inputs X, y that give non-zero gradients, or check more parameters "
                         f"(max_params)")
    return max(judged)
