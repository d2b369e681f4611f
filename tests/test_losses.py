"""Losses against their textbook formulas and against central differences, on every backend."""

import numpy as np
import pytest

import gpubackprop as gb
from gpubackprop.backend import Backend


def backend(spec, dtype="float64"):
    return Backend(device=spec[0], dtype=dtype, kernels=spec[1])


def loss_and_grad(spec, loss, Y, T, dtype="float64"):
    be = backend(spec, dtype)
    Th = loss.targets(T, Y.shape[1], be.dtype)
    value, dY = loss.loss_and_grad(be, be.to_device(Y), be.to_device(Th, Th.dtype))
    return float(value), be.to_host(dY).copy()


def central_difference(f, Y, eps=1e-6):
    g = np.zeros_like(Y)
    for idx in np.ndindex(*Y.shape):
        Yp, Ym = Y.copy(), Y.copy()
        Yp[idx] += eps
        Ym[idx] -= eps
        g[idx] = (f(Yp) - f(Ym)) / (2 * eps)
    return g


CASES = [
    (gb.MSE, lambda rng: rng.normal(size=(5, 3))),
    (gb.SoftmaxCrossEntropy, lambda rng: rng.integers(0, 3, 5)),
    (gb.BinaryCrossEntropy, lambda rng: rng.uniform(0, 1, (5, 3))),
]


@pytest.mark.parametrize("make_loss,make_targets", CASES, ids=["mse", "ce", "bce"])
def test_gradient_matches_central_differences(backend_spec, make_loss, make_targets, rng):
    loss = make_loss()
    Y, T = rng.normal(size=(5, 3)) * 3, make_targets(rng)
    _, dY = loss_and_grad(backend_spec, loss, Y, T)
    numeric = central_difference(lambda Yx: loss_and_grad(backend_spec, loss, Yx, T)[0], Y)
    np.testing.assert_allclose(dY, numeric, rtol=1e-6, atol=1e-8)


def test_mse_is_the_mean_over_all_elements(backend_spec, rng):
    Y, T = rng.normal(size=(4, 3)), rng.normal(size=(4, 3))
    value, dY = loss_and_grad(backend_spec, gb.MSE(), Y, T)
    assert value == pytest.approx(np.mean((Y - T) ** 2), rel=1e-12)
    np.testing.assert_allclose(dY, 2 * (Y - T) / Y.size, rtol=1e-12)


def test_softmax_cross_entropy_value_and_gradient(backend_spec, rng):
    Y, y = rng.normal(size=(6, 4)), rng.integers(0, 4, 6)
    value, dY = loss_and_grad(backend_spec, gb.SoftmaxCrossEntropy(), Y, y)
    p = np.exp(Y) / np.exp(Y).sum(1, keepdims=True)
    assert value == pytest.approx(-np.mean(np.log(p[np.arange(6), y])), rel=1e-12)
    onehot = np.eye(4)[y]
    np.testing.assert_allclose(dY, (p - onehot) / 6, rtol=1e-10, atol=1e-15)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_softmax_cross_entropy_is_stable_for_huge_logits(backend_spec, dtype):
    Y = np.array([[1e4, 0.0, -1e4], [-1e4, 1e4, 1e4]])
    value, dY = loss_and_grad(backend_spec, gb.SoftmaxCrossEntropy(), Y, np.array([1, 2]), dtype)
    assert np.isfinite(value) and np.all(np.isfinite(dY))
    assert value == pytest.approx((1e4 + np.log(2)) / 2, rel=1e-6)
    np.testing.assert_allclose(dY, [[0.5, -0.5, 0], [0, 0.25, -0.25]], atol=1e-6)


def test_binary_cross_entropy_value_and_stability(backend_spec, rng):
    Y, T = rng.normal(size=(5, 2)), rng.integers(0, 2, (5, 2)).astype(float)
    value, dY = loss_and_grad(backend_spec, gb.BinaryCrossEntropy(), Y, T)
    s = 1 / (1 + np.exp(-Y))
    assert value == pytest.approx(-np.mean(T * np.log(s) + (1 - T) * np.log(1 - s)), rel=1e-12)
    np.testing.assert_allclose(dY, (s - T) / T.size, rtol=1e-10)
    big, dbig = loss_and_grad(backend_spec, gb.BinaryCrossEntropy(), np.array([[800.0], [-800.0]]),
                              np.array([0.0, 1.0]))
    assert big == pytest.approx(800.0) and np.allclose(dbig, [[0.5], [-0.5]])


def test_binary_cross_entropy_accepts_1d_labels(backend_spec):
    loss = gb.BinaryCrossEntropy()
    assert loss.targets([0, 1, 1], 1, np.float64).shape == (3, 1)
