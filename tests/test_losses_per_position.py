"""SoftmaxCrossEntropy on per-position logits (N, ..., C) with targets (N, ...): against torch's
CrossEntropyLoss in float64 (its (N, C, T) layout, and the flattened rows), central differences,
the host checks (shape, range with the position named), accuracy over all positions in fit and
evaluate, and predict's probabilities on the last axis."""

import re

import numpy as np
import pytest

import gpubackprop as gb
from gpubackprop.backend import Backend


def loss_and_grad(spec, Y, T, dtype="float64"):
    be = Backend(device=spec[0], dtype=dtype, kernels=spec[1])
    loss = gb.SoftmaxCrossEntropy()
    Th = loss.targets(T, Y.shape[1:], be.dtype)
    value, dY = loss.loss_and_grad(be, be.to_device(Y.astype(dtype)), be.to_device(Th, Th.dtype))
    return float(value), be.to_host(dY).copy()


@pytest.mark.parametrize("shape", [(4, 7, 5), (3, 2, 4, 6)], ids=["(N,T,C)", "(N,A,B,C)"])
def test_matches_torch_cross_entropy(backend_spec, shape, rng):
    torch = pytest.importorskip("torch")
    Y = rng.normal(size=shape) * 3
    T = rng.integers(0, shape[-1], shape[:-1])
    value, dY = loss_and_grad(backend_spec, Y, T)
    assert dY.shape == Y.shape
    # torch puts the classes on axis 1: logits (N, C, d1, ...) with targets (N, d1, ...); the
    # batch-first (N, ..., C) logits are that with the class axis moved, and are the flattened
    # (N·prod(...), C) rows with targets (N·prod(...),): all the same mean over every position.
    Yt = torch.from_numpy(Y).requires_grad_()
    ref = torch.nn.functional.cross_entropy(Yt.movedim(-1, 1), torch.from_numpy(T))
    ref.backward()
    flat = torch.nn.functional.cross_entropy(torch.from_numpy(Y).reshape(-1, shape[-1]),
                                             torch.from_numpy(T).reshape(-1))
    assert value == pytest.approx(ref.item(), rel=1e-10)
    assert flat.item() == pytest.approx(ref.item(), rel=1e-12)
    np.testing.assert_allclose(dY, Yt.grad.numpy(), rtol=1e-10, atol=1e-14)


def test_gradient_matches_central_differences(backend_spec, rng):
    Y, T = rng.normal(size=(3, 4, 5)) * 2, rng.integers(0, 5, (3, 4))
    _, dY = loss_and_grad(backend_spec, Y, T)
    num, eps = np.zeros_like(Y), 1e-6
    for idx in np.ndindex(*Y.shape):
        Yp, Ym = Y.copy(), Y.copy()
        Yp[idx] += eps
        Ym[idx] -= eps
        num[idx] = (loss_and_grad(backend_spec, Yp, T)[0] - loss_and_grad(backend_spec, Ym, T)[0]) \
            / (2 * eps)
    np.testing.assert_allclose(dY, num, rtol=1e-6, atol=1e-9)


def test_the_mean_is_over_every_position(backend_spec, rng):
    Y, T = rng.normal(size=(2, 3, 4)), rng.integers(0, 4, (2, 3))
    value, dY = loss_and_grad(backend_spec, Y, T)
    p = np.exp(Y) / np.exp(Y).sum(-1, keepdims=True)
    n, t = np.indices(T.shape)
    assert value == pytest.approx(-np.log(p[n, t, T]).mean(), rel=1e-12)
    np.testing.assert_allclose(dY, (p - np.eye(4)[T]) / T.size, rtol=1e-10, atol=1e-15)


def test_host_checks_name_the_shapes_and_the_position():
    loss = gb.SoftmaxCrossEntropy()
    with pytest.raises(ValueError, match=r"y: expected class indices in \[0, 3\] for 4 outputs, "
                                         r"got 7 at y\[1, 2\]"):
        loss.targets([[0, 1, 2], [3, 0, 7]], (3, 4))
    with pytest.raises(ValueError, match=r"y: expected class indices in \[0, 3\] for 4 outputs, "
                                         r"got -1$"):
        loss.targets([0, -1], 4)  # per sample: no position to name
    with pytest.raises(ValueError, match=r"y: expected class indices of shape \(n, 3\) \(one a "
                                         r"position of the outputs \(n, 3, 4\)\), got array of "
                                         r"shape \(2, 2\)"):
        loss.targets([[0, 1], [1, 0]], (3, 4))
    with pytest.raises(ValueError, match=r"model output: expected one vector of outputs per sample"
                                         r" for SoftmaxCrossEntropy, got per-sample shape \(3, 4\);"
                                         r" .* or give y one class index a position, of shape "
                                         r"\(n, 3\)"):
        loss.targets([0, 1], (3, 4))
    with pytest.raises(ValueError, match=r"expected integer class indices"):
        loss.targets([[0.5, 1, 2]], (3, 4))
    np.testing.assert_array_equal(loss.targets(np.array([[1, 2, 3]], np.int32), (3, 4)),
                                  [[1, 2, 3]])


def test_a_shape_mismatch_on_the_device_names_both_shapes():
    be = Backend(device="cpu", dtype="float64")
    loss = gb.SoftmaxCrossEntropy()
    Y = np.zeros((2, 3, 4))
    for T in (np.zeros((2, 4), np.int64), np.zeros((2,), np.int64), np.zeros((2, 3, 1), np.int64)):
        want = (f"SoftmaxCrossEntropy: expected targets of shape (2, 3) for logits of shape "
                f"(2, 3, 4) (one class index a position), got targets of shape {tuple(T.shape)}")
        with pytest.raises(ValueError, match=re.escape(want)):
            loss.loss_and_grad(be, Y, T)
    with pytest.raises(ValueError, match=r"expected targets of shape \(2,\) for logits of shape "
                                         r"\(2, 4\)"):
        loss.loss_and_grad(be, np.zeros((2, 4)), np.zeros((3,), np.int64))


def per_position_model(backend_spec, T=6, C=5, seed=0):
    x = gb.Input((T, 3))
    y = gb.Dense(8, C)(gb.Dense(3, 8, activation="tanh")(x))
    return gb.Model(inputs=x, outputs=y, device=backend_spec[0], kernels=backend_spec[1],
                    seed=seed)


def test_evaluate_and_fit_count_accuracy_over_all_positions(backend_spec, rng):
    model = per_position_model(backend_spec)
    loss = gb.SoftmaxCrossEntropy()
    X, T = rng.normal(size=(40, 6, 3)), rng.integers(0, 5, (40, 6))
    logits = model.predict(X)
    assert logits.shape == (40, 6, 5)
    metrics = gb.evaluate(model, loss, X, T, batch_size=16)
    assert metrics["accuracy"] == pytest.approx((logits.argmax(-1) == T).mean(), abs=1e-12)
    p = np.exp(logits - logits.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    n, t = np.indices(T.shape)
    assert metrics["loss"] == pytest.approx(-np.log(p[n, t, T]).mean(), rel=1e-5)
    np.testing.assert_allclose(model.predict(X, loss=loss), p, rtol=1e-5, atol=1e-7)
    history = gb.fit(model, loss, gb.Adam(0.05, clip_norm=1.0), X, T, epochs=3, batch_size=16,
                     validation=(X[:20], T[:20]), progress=False)
    assert all(0 <= a <= 1 for a in history["accuracy"] + history["val_accuracy"])
    after = gb.evaluate(model, loss, X[:20], T[:20])
    assert history["val_accuracy"][-1] == pytest.approx(after["accuracy"], abs=1e-12)
    assert history["val_loss"][-1] == pytest.approx(after["loss"], rel=1e-6)
    assert history["loss"][-1] < history["loss"][0]
    # an accuracy over 240 positions of 40 samples: a multiple of 1/240 (not of 1/40)
    assert (after["accuracy"] * 120) == pytest.approx(round(after["accuracy"] * 120), abs=1e-9)


def test_train_step_takes_per_position_targets(rng):
    model = per_position_model(("cpu", "fused"))
    X, T = rng.normal(size=(8, 6, 3)), rng.integers(0, 5, (8, 6))
    value = gb.train_step(model, gb.SoftmaxCrossEntropy(), gb.SGD(0.1), X, T)
    assert np.isfinite(value) and value > 0
    with pytest.raises(ValueError, match=r"y_batch: expected class indices in \[0, 4\] for 5 "
                                         r"outputs, got 5 at y_batch\[0, 1\]"):
        T[0, 1] = 5
        gb.train_step(model, gb.SoftmaxCrossEntropy(), gb.SGD(0.1), X, T)


@pytest.mark.parametrize("ignore_index", [-100, 0, 3])
def test_ignore_index_matches_torch(backend_spec, ignore_index, rng):
    """Padding targets left out of the mean, the gradient and the accuracy, as torch's."""
    torch = pytest.importorskip("torch")
    Y = rng.normal(size=(4, 6, 5)) * 2
    T = rng.integers(0, 5, (4, 6))
    T[rng.uniform(size=T.shape) < 0.4] = ignore_index
    T[0, 0] = 1 if ignore_index != 1 else 2  # at least one kept
    be = Backend(device=backend_spec[0], dtype="float64", kernels=backend_spec[1])
    loss = gb.SoftmaxCrossEntropy(ignore_index=ignore_index)
    assert repr(loss) == f"SoftmaxCrossEntropy(ignore_index={ignore_index})"
    Th = loss.targets(T, (6, 5))
    value, dY = loss.loss_and_grad(be, be.to_device(Y), be.to_device(Th, Th.dtype))
    Yt = torch.from_numpy(Y).requires_grad_()
    ref = torch.nn.functional.cross_entropy(Yt.movedim(-1, 1), torch.from_numpy(T),
                                            ignore_index=ignore_index)
    ref.backward()
    assert float(value) == pytest.approx(ref.item(), rel=1e-10)
    np.testing.assert_allclose(be.to_host(dY), Yt.grad.numpy(), rtol=1e-10, atol=1e-14)
    kept = T != ignore_index
    assert int(loss.correct(be, be.to_device(Y), be.to_device(Th, Th.dtype))) == \
        ((Y.argmax(-1) == T) & kept).sum()
    assert int(loss.n_predictions(Th)) == kept.sum()


def test_ignore_index_checks_and_the_empty_batch():
    loss = gb.SoftmaxCrossEntropy(ignore_index=-100)
    np.testing.assert_array_equal(loss.targets([[0, -100]], (2, 3)), [[0, -100]])
    with pytest.raises(ValueError, match=r"got -1 at y\[0, 1\]"):
        loss.targets([[0, -1]], (2, 3))
    with pytest.raises(TypeError, match=r"ignore_index: expected an integer or None, got 1.5"):
        gb.SoftmaxCrossEntropy(ignore_index=1.5)
    be = Backend(device="cpu", dtype="float64")
    with np.errstate(all="raise"):  # no warning: a NaN loss (torch's 0/0), a zero gradient
        value, dY = loss.loss_and_grad(be, np.ones((2, 3)), np.full(2, -100, np.int64))
    assert np.isnan(float(value)) and not dY.any()


def test_fit_and_evaluate_with_padding(rng):
    """A padded sequence task: accuracy over the kept positions only, the loss of the kept."""
    model = per_position_model(("cpu", "fused"))
    loss = gb.SoftmaxCrossEntropy(ignore_index=-1)
    X, T = rng.normal(size=(24, 6, 3)), rng.integers(0, 5, (24, 6))
    T[:, 4:] = -1  # the last two positions are padding
    metrics = gb.evaluate(model, loss, X, T)
    logits = model.predict(X)
    assert metrics["accuracy"] == pytest.approx((logits.argmax(-1) == T)[:, :4].mean(), abs=1e-12)
    full = gb.evaluate(model, gb.SoftmaxCrossEntropy(), X[:, :], np.where(T < 0, 0, T))
    assert metrics["loss"] != pytest.approx(full["loss"], rel=1e-6)
    p = np.exp(logits - logits.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    n, t = np.indices((24, 4))
    assert metrics["loss"] == pytest.approx(-np.log(p[:, :4][n, t, T[:, :4]]).mean(), rel=1e-5)
    history = gb.fit(model, loss, gb.Adam(0.05), X, T, epochs=2, batch_size=8, progress=False)
    assert history["loss"][-1] < history["loss"][0] and 0 <= history["accuracy"][-1] <= 1
    assert type(metrics["accuracy"]) is float and type(history["accuracy"][-1]) is float
