"""Shared cases of the StepValues tests (CPU sets here, the CUDA set in the simulator): the
``*_values`` ops and a model's steps with the per-step values read from StepValues' array must
give the same bits as the host-scalar ops fed the same numbers."""

import numpy as np

import gpubackprop as gb
from gpubackprop.schedules import CosineLR, Warmup
from gpubackprop.step_values import SLOT, StepValues
from gpubackprop.training import step_on_device

# Each optimizer's update paths: momentum, Nesterov, L2 decay, RMSprop's momentum, Adam's L2,
# AdamW's decoupled decay, clipping.
OPTIMIZERS = {
    "sgd": lambda: gb.SGD(lr=0.1),
    "sgd-nesterov-wd": lambda: gb.SGD(lr=0.1, momentum=0.9, nesterov=True, weight_decay=0.01),
    "rmsprop-momentum-wd": lambda: gb.RMSprop(lr=0.01, momentum=0.5, weight_decay=0.02),
    "adam-l2-clip": lambda: gb.Adam(lr=0.01, weight_decay=0.01, clip_norm=0.5),
    "adamw": lambda: gb.AdamW(lr=0.01, weight_decay=0.05),
}
STEPS = 5


def schedule():
    """A learning rate that changes every step (warm-up, then a cosine)."""
    return Warmup(CosineLR(0.05, total_steps=STEPS, min_lr=0.001), warmup_steps=2)


def host_rows(model, opt, sched, steps, start=0):
    """StepValues rows of the next ``steps`` steps of ``model`` trained by ``opt`` from global step
    ``start``: the learning rate, the optimizer's corrections and the model's Dropout step."""
    return [{**opt.step_row(sched(start + j), opt.steps + j + 1), "step": model.context.step + j}
            for j in range(steps)]


def train(device, kernels, make_opt, use_values, dtype="float32", steps=STEPS):
    """Flat parameters (host) after ``steps`` steps of an MLP with Dropout on fixed data, the
    learning rate from ``schedule()``: set on ``opt.lr`` (host scalars) or read from StepValues."""
    model = gb.Sequential([gb.Dense(6, 40, activation="relu"), gb.Dropout(0.3),
                           gb.Dense(40, 3)], device=device, dtype=dtype, seed=3, kernels=kernels)
    be = model.backend
    rng = np.random.default_rng(0)
    X = be.to_device(rng.standard_normal((9, 6)))
    T = be.to_device(rng.integers(0, 3, 9), np.int64)
    loss, opt, sched = gb.SoftmaxCrossEntropy(), make_opt(), schedule()
    sv = None
    if use_values:
        sv = StepValues(be, rows=steps + 2)
        sv.fill(host_rows(model, opt, sched, steps), start=1)  # from row 1: the counter follows
        model.context.step_values = sv
    for t in range(steps):
        if sv is None:
            opt.lr = sched(t)
        else:
            sv.advance()
        step_on_device(model, loss, opt, X, T)
    model.context.step_values = None
    return be.to_host(model.flat_params).copy(), sv


def check_train_same_bits(device, kernels, name, dtype="float32"):
    eager, _ = train(device, kernels, OPTIMIZERS[name], False, dtype)
    with_values, sv = train(device, kernels, OPTIMIZERS[name], True, dtype)
    np.testing.assert_array_equal(with_values, eager)
    values = sv.host()
    assert values["lr"] == schedule()(STEPS - 1)  # the last step's row was read
    assert values["step"] == STEPS - 1
    from gpubackprop.backend import to_numpy

    assert int(to_numpy(sv.counter)[0]) == STEPS + 1


def check_ops_same_bits(ops, dev, rng, dtype):
    """Each ``*_values`` op against its host-scalar op on equal inputs, bit for bit, and the
    dropout ops; ``ops`` one kernel set, ``dev`` numpy -> its arrays."""
    from gpubackprop.backend import to_numpy

    n = 300  # several blocks and a ragged tail in the simulator
    p0, g = rng.standard_normal(n).astype(dtype), rng.standard_normal(n).astype(dtype)
    scale = np.array([0.75], dtype)
    values = np.zeros(len(SLOT))
    lr, step = 0.0375, 7
    lr_c, sqrt_bc2, _, decay = _adam_coefficients(lr, 0.9, 0.99, 0.05, True, step)
    values[[SLOT["lr"], SLOT["lr_c"], SLOT["sqrt_bc2"], SLOT["decay"], SLOT["step"]]] = \
        [lr, lr_c, sqrt_bc2, decay, 11]

    def pair(run_host, run_values, nbuf):
        bufs0 = [np.abs(rng.standard_normal(n)).astype(dtype) for _ in range(nbuf)]
        outs = []
        for run in (run_host, run_values):
            p, bufs = dev(p0.copy()), [dev(b.copy()) for b in bufs0]
            run(p, dev(g), bufs, dev(scale))
            outs.append([to_numpy(a) for a in (p, *bufs)])
        for a, b in zip(*outs, strict=True):
            np.testing.assert_array_equal(b, a)

    vd = dev(values)
    pair(lambda p, g_, b, s: ops.sgd(p, g_, b[0], lr, 0.9, True, 0.01, s),
         lambda p, g_, b, s: ops.sgd_values(p, g_, b[0], vd, 0.9, True, 0.01, s), 1)
    pair(lambda p, g_, b, s: ops.sgd(p, g_, None, lr, 0.0, False, 0.0, s),
         lambda p, g_, b, s: ops.sgd_values(p, g_, None, vd, 0.0, False, 0.0, s), 0)
    pair(lambda p, g_, b, s: ops.rmsprop(p, g_, b[0], b[1], lr, 0.9, 1e-8, 0.01, 0.5, s),
         lambda p, g_, b, s: ops.rmsprop_values(p, g_, b[0], b[1], vd, 0.9, 1e-8, 0.01, 0.5, s),
         2)
    for wd, decoupled in [(0.0, False), (0.05, False), (0.05, True)]:
        lr_c, sqrt_bc2, _, decay = _adam_coefficients(lr, 0.9, 0.99, wd, decoupled, step)
        v = values.copy()
        v[[SLOT["lr_c"], SLOT["sqrt_bc2"], SLOT["decay"]]] = [lr_c, sqrt_bc2, decay]
        v = dev(v)
        pair(lambda p, g_, b, s, wd=wd, dc=decoupled: ops.adam(p, g_, b[0], b[1], lr, 0.9, 0.99,
                                                               1e-8, wd, dc, step, s),
             lambda p, g_, b, s, wd=wd, dc=decoupled, v=v: ops.adam_values(
                 p, g_, b[0], b[1], v, 0.9, 0.99, 1e-8, wd, dc, s), 2)
    X = rng.standard_normal((7, 13)).astype(dtype)
    Y0 = to_numpy(ops.dropout(dev(X), dev(np.empty_like(X)), 0.4, 5, 2, 11))
    Y1 = to_numpy(ops.dropout_values(dev(X), dev(np.empty_like(X)), 0.4, 5, 2, vd))
    np.testing.assert_array_equal(Y1, Y0)
    assert 0 < np.count_nonzero(Y1 == 0) < X.size  # a real mask
    D0 = to_numpy(ops.dropout_backward(dev(X), dev(np.empty_like(X)), 0.4, 5, 2, 11))
    D1 = to_numpy(ops.dropout_backward_values(dev(X), dev(np.empty_like(X)), 0.4, 5, 2, vd))
    np.testing.assert_array_equal(D1, D0)
    Y2 = to_numpy(ops.dropout(dev(X), dev(np.empty_like(X)), 0.4, 5, 2, 12))
    assert not np.array_equal(Y2, Y1)  # the step matters: the value was really read


def check_step_advance(ops, dev):
    """Row ``counter`` of the table into the host slots, the counter incremented, other slots
    (a device slot) untouched."""
    from gpubackprop.backend import to_numpy

    k = 5
    table = dev(np.arange(3 * k, dtype=np.float64).reshape(3, k) + 0.5)
    counter = dev(np.array([1], np.int64))
    values = dev(np.full(k + 1, -2.0))
    ops.step_advance(table, counter, values)
    np.testing.assert_array_equal(to_numpy(values), [5.5, 6.5, 7.5, 8.5, 9.5, -2.0])
    ops.step_advance(table, counter, values)
    np.testing.assert_array_equal(to_numpy(values)[:k], to_numpy(table)[2])
    assert int(to_numpy(counter)[0]) == 3
    ops.step_advance(table, counter, values)  # past the end: the last row again
    np.testing.assert_array_equal(to_numpy(values), [*to_numpy(table)[2], -2.0])
    assert int(to_numpy(counter)[0]) == 4


def _adam_coefficients(*args):
    from gpubackprop.kernels.reference import adam_coefficients

    return adam_coefficients(*args)
