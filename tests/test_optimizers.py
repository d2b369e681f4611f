"""Each optimizer against torch.optim's update rule, computed by hand for two steps."""

import numpy as np
import pytest

import gpubackprop as gb

P0 = np.array([0.5, -1.5, 2.0, 0.25, -0.75])
GRADS = [np.array([0.1, -0.2, 0.3, -0.4, 0.5]), np.array([-0.3, 0.1, 0.2, 0.05, -0.6])]


def run(spec, opt, grads=GRADS, dtype="float64"):
    """Apply ``opt`` to a 1-layer model whose flat parameters are P0, with the given gradients."""
    model = gb.Sequential([gb.Dense(4, 1)], device=spec[0], dtype=dtype, kernels=spec[1])
    be = model.backend
    model.flat_params[...] = be.to_device(P0)
    for g in grads:
        model.flat_grads[...] = be.to_device(g)
        opt.step(model)
    return be.to_host(model.flat_params).copy()


def sgd_ref(lr, momentum=0.0, nesterov=False, wd=0.0):
    p, buf = P0.copy(), None
    for g in GRADS:
        d = g + wd * p
        if momentum:
            buf = d.copy() if buf is None else momentum * buf + d
            d = d + momentum * buf if nesterov else buf
        p = p - lr * d
    return p


def rmsprop_ref(lr, alpha, eps, momentum=0.0, wd=0.0):
    p, sa, buf = P0.copy(), np.zeros(5), np.zeros(5)
    for g in GRADS:
        d = g + wd * p
        sa = alpha * sa + (1 - alpha) * d * d
        step = d / (np.sqrt(sa) + eps)
        if momentum:
            buf = momentum * buf + step
            step = buf
        p = p - lr * step
    return p


def adam_ref(lr, b1, b2, eps, wd=0.0, decoupled=False):
    p, m, v = P0.copy(), np.zeros(5), np.zeros(5)
    for t, g in enumerate(GRADS, start=1):
        if decoupled:
            p = p * (1 - lr * wd)
            d = g
        else:
            d = g + wd * p
        m = b1 * m + (1 - b1) * d
        v = b2 * v + (1 - b2) * d * d
        mhat, vhat = m / (1 - b1**t), v / (1 - b2**t)
        p = p - lr * mhat / (np.sqrt(vhat) + eps)
    return p


@pytest.mark.parametrize("make_opt,expected", [
    (lambda: gb.SGD(lr=0.1), sgd_ref(0.1)),
    (lambda: gb.SGD(lr=0.1, momentum=0.9), sgd_ref(0.1, 0.9)),
    (lambda: gb.SGD(lr=0.1, momentum=0.9, nesterov=True), sgd_ref(0.1, 0.9, True)),
    (lambda: gb.SGD(lr=0.1, momentum=0.5, weight_decay=0.01), sgd_ref(0.1, 0.5, wd=0.01)),
    (lambda: gb.RMSprop(lr=0.01), rmsprop_ref(0.01, 0.99, 1e-8)),
    (lambda: gb.RMSprop(lr=0.01, alpha=0.9, eps=1e-3, momentum=0.8, weight_decay=0.1),
     rmsprop_ref(0.01, 0.9, 1e-3, 0.8, 0.1)),
    (lambda: gb.Adam(lr=0.01), adam_ref(0.01, 0.9, 0.999, 1e-8)),
    (lambda: gb.Adam(lr=0.01, betas=(0.8, 0.99), weight_decay=0.1),
     adam_ref(0.01, 0.8, 0.99, 1e-8, 0.1)),
    (lambda: gb.AdamW(lr=0.01), adam_ref(0.01, 0.9, 0.999, 1e-8, 0.01, decoupled=True)),
    (lambda: gb.AdamW(lr=0.1, weight_decay=0.5, eps=1e-6),
     adam_ref(0.1, 0.9, 0.999, 1e-6, 0.5, decoupled=True)),
], ids=["sgd", "momentum", "nesterov", "sgd-wd", "rmsprop", "rmsprop-all", "adam", "adam-l2",
        "adamw", "adamw-strong"])
def test_two_steps_match_torch_rules(backend_spec, make_opt, expected):
    np.testing.assert_allclose(run(backend_spec, make_opt()), expected, rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(run(backend_spec, make_opt(), dtype="float32"), expected, rtol=2e-6,
                               atol=1e-6)


def test_clip_norm_scales_all_gradients_together(backend_spec):
    norm0, norm1 = (np.linalg.norm(g) for g in GRADS)
    clip = 0.5 * min(norm0, norm1)
    p = P0.copy()
    for g in GRADS:
        p = p - 0.1 * g * min(1.0, clip / (np.linalg.norm(g) + 1e-6))
    np.testing.assert_allclose(run(backend_spec, gb.SGD(lr=0.1, clip_norm=clip)), p, rtol=1e-12)
    # A clip above the norm changes nothing.
    np.testing.assert_allclose(run(backend_spec, gb.SGD(lr=0.1, clip_norm=100.0)), sgd_ref(0.1),
                               rtol=1e-12)


@pytest.mark.parametrize("make_opt", [lambda: gb.SGD(lr=0.1, momentum=0.9),
                                      lambda: gb.RMSprop(lr=0.01, momentum=0.5),
                                      lambda: gb.Adam(lr=0.01), lambda: gb.AdamW(lr=0.01)])
def test_state_round_trip_continues_identically(backend_spec, make_opt):
    model = gb.Sequential([gb.Dense(4, 1)], device=backend_spec[0], dtype="float64",
                          kernels=backend_spec[1])
    be = model.backend
    model.flat_params[...] = be.to_device(P0)
    opt = make_opt()
    model.flat_grads[...] = be.to_device(GRADS[0])
    opt.step(model)
    state, params = opt.state_dict(), model.get_params()
    model.flat_grads[...] = be.to_device(GRADS[1])
    opt.step(model)
    straight = be.to_host(model.flat_params).copy()

    restored = make_opt()
    restored.load_state_dict(state, model)
    model.set_params(params)
    restored.step(model)
    np.testing.assert_array_equal(be.to_host(model.flat_params), straight)
    assert state["steps"] == 1 and set(state["buffers"]) == set(opt.buffer_names)


def test_repr_shows_configuration():
    assert repr(gb.SGD(lr=0.1, momentum=0.9)) == ("SGD(lr=0.1, momentum=0.9, nesterov=False, "
                                                  "weight_decay=0.0, clip_norm=None)")
    assert "betas=[0.9, 0.999]" in repr(gb.Adam())
    assert "weight_decay=0.01" in repr(gb.AdamW())
