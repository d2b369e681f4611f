"""Training end to end: a known trajectory, reproducibility, and small problems that must be learnt."""

import numpy as np
import pytest

import gpubackprop as gb


def model_for(spec, layers, dtype="float32", seed=0):
    return gb.Sequential(layers, device=spec[0], dtype=dtype, seed=seed, kernels=spec[1])


def numpy_trajectory(params, X, y, steps, lr, momentum):
    """The classic algorithm written out in float64 NumPy: tanh hidden layer, softmax CE, SGD."""
    W1, b1, W2, b2 = (params[k].astype(np.float64) for k in ("0.W", "0.b", "1.W", "1.b"))
    vel = [np.zeros_like(a) for a in (W1, b1, W2, b2)]
    losses = []
    B = len(y)
    for _ in range(steps):
        A1 = np.tanh(X @ W1.T + b1)
        Z2 = A1 @ W2.T + b2
        P = np.exp(Z2 - Z2.max(1, keepdims=True))
        P /= P.sum(1, keepdims=True)
        losses.append(-np.mean(np.log(P[np.arange(B), y])))
        D2 = (P - np.eye(Z2.shape[1])[y]) / B           # BP1
        D1 = (D2 @ W2) * (1 - A1**2)                     # BP2
        grads = [D1.T @ X, D1.sum(0), D2.T @ A1, D2.sum(0)]  # BP3, BP4
        for p, v, g in zip((W1, b1, W2, b2), vel, grads, strict=True):
            v *= momentum
            v += g
            p -= lr * v
    return np.array(losses), {"0.W": W1, "0.b": b1, "1.W": W2, "1.b": b2}


def test_training_follows_the_known_trajectory(backend_spec, rng):
    model = model_for(backend_spec, [gb.Dense(6, 5, activation="tanh"), gb.Dense(5, 3)],
                      dtype="float64")
    X, y = rng.normal(size=(8, 6)), rng.integers(0, 3, 8)
    expected_losses, expected_params = numpy_trajectory(model.get_params(), X, y, 5, 0.3, 0.9)
    loss, opt = gb.SoftmaxCrossEntropy(), gb.SGD(lr=0.3, momentum=0.9)
    losses = [gb.train_step(model, loss, opt, X, y) for _ in range(5)]
    np.testing.assert_allclose(losses, expected_losses, rtol=1e-12)
    for k, v in model.get_params().items():
        np.testing.assert_allclose(v, expected_params[k], rtol=1e-11, atol=1e-14)


def test_seeded_run_reproduces_bit_for_bit(backend_spec, rng):
    X, y = rng.normal(size=(50, 4)), rng.integers(0, 3, 50)

    def run():
        model = model_for(backend_spec, [gb.Dense(4, 8, activation="relu"), gb.Dense(8, 3)], seed=7)
        hist = gb.fit(model, gb.SoftmaxCrossEntropy(), gb.Adam(lr=0.01), X, y, epochs=3,
                      batch_size=16, progress=False)
        return hist, model.get_params()

    (h1, p1), (h2, p2) = run(), run()
    assert h1 == h2
    for k in p1:
        np.testing.assert_array_equal(p1[k], p2[k])


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_xor_is_learnt(backend_spec, dtype):
    X = np.array([[0, 0], [0, 1], [1, 0], [1, 1]], dtype=float)
    y = np.array([0, 1, 1, 0])
    model = model_for(backend_spec, [gb.Dense(2, 8, activation="tanh"), gb.Dense(8, 2)],
                      dtype=dtype, seed=0)
    loss = gb.SoftmaxCrossEntropy()
    hist = gb.fit(model, loss, gb.SGD(lr=0.5, momentum=0.9), X, y, epochs=300, batch_size=4,
                  progress=False)
    assert hist["loss"][-1] < 0.05 < hist["loss"][0]
    assert gb.evaluate(model, loss, X, y)["accuracy"] == 1.0
    assert model.predict(X).dtype == np.dtype(dtype)


def test_xor_with_binary_cross_entropy_and_batch_size_one(backend_spec):
    X = np.array([[0, 0], [0, 1], [1, 0], [1, 1]], dtype=float)
    y = np.array([0, 1, 1, 0])
    model = model_for(backend_spec, [gb.Dense(2, 8, activation="sigmoid"), gb.Dense(8, 1)], seed=1)
    loss = gb.BinaryCrossEntropy()
    gb.fit(model, loss, gb.Adam(lr=0.05), X, y, epochs=300, batch_size=1, progress=False)
    assert gb.evaluate(model, loss, X, y)["accuracy"] == 1.0
    probs = gb.predict(model, X, loss=loss)[:, 0]
    assert np.all((probs > 0.5) == (y == 1))


def test_sine_is_fitted_with_mse(backend_spec):
    from gpubackprop.schedules import CosineLR

    x = np.linspace(-np.pi, np.pi, 200).reshape(-1, 1)
    t = np.sin(x)
    model = model_for(backend_spec, [gb.Dense(1, 32, activation="tanh"),
                                     gb.Dense(32, 32, activation="tanh"), gb.Dense(32, 1)], seed=0)
    loss = gb.MSE()
    # Annealed to 0: at a constant lr of 0.01 Adam's last epochs jump between 1e-5 and 1e-2, and
    # where the run stopped decided the test (a GPU's rounding ended it at 1.2e-3). Annealed, the
    # end is ~2e-5 for every seed, dtype, kernel set and device tried.
    hist = gb.fit(model, loss, gb.Adam(lr=0.01), x, t, epochs=300, batch_size=20, progress=False,
                  schedule=CosineLR(0.01, total_steps=300 * 10))
    assert "accuracy" not in hist
    mse = gb.evaluate(model, loss, x, t)["loss"]
    assert mse < 1e-4 < hist["loss"][0]
    # predict must agree with evaluate's loss, and no point may be far off (an unfitted sine is
    # off by up to 1).
    err = model.predict(x).astype(np.float64) - t
    assert np.sqrt(np.mean(err**2)) == pytest.approx(np.sqrt(mse), rel=1e-3)
    assert np.abs(err).max() < 0.05


def test_fit_reports_validation_and_evaluate_matches(backend_spec, rng):
    X, y = rng.normal(size=(60, 5)), rng.integers(0, 4, 60)
    Xv, yv = rng.normal(size=(20, 5)), rng.integers(0, 4, 20)
    model = model_for(backend_spec, [gb.Dense(5, 16, activation="relu"), gb.Dense(16, 4)],
                      dtype="float64")
    loss = gb.SoftmaxCrossEntropy()
    hist = gb.fit(model, loss, gb.SGD(lr=0.1), X, y, epochs=4, batch_size=7, validation=(Xv, yv),
                  progress=False)
    assert set(hist) == {"loss", "accuracy", "val_loss", "val_accuracy"}
    assert all(len(v) == 4 for v in hist.values())
    metrics = gb.evaluate(model, loss, Xv, yv)
    assert metrics["loss"] == pytest.approx(hist["val_loss"][-1], rel=1e-12)
    logits = model.predict(Xv)
    assert metrics["accuracy"] == pytest.approx(np.mean(logits.argmax(1) == yv))
    p = np.exp(logits - logits.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    assert metrics["loss"] == pytest.approx(-np.mean(np.log(p[np.arange(20), yv])), rel=1e-10)


def test_fit_on_digits_reaches_the_demo_accuracy():
    from gpubackprop.demo import load_digits_split

    X_train, X_test, y_train, y_test = load_digits_split(0)
    results = {}
    for kernels in ("reference", "fused"):
        model = gb.Sequential([gb.Dense(64, 128, activation="relu"),
                               gb.Dense(128, 64, activation="relu"), gb.Dense(64, 10)],
                              device="cpu", seed=0, kernels=kernels)
        loss = gb.SoftmaxCrossEntropy()
        gb.fit(model, loss, gb.Adam(lr=0.002), X_train, y_train, epochs=30, batch_size=32,
               progress=False)
        results[kernels] = gb.evaluate(model, loss, X_test, y_test)["accuracy"]
    assert results["reference"] >= 0.97 and results["fused"] >= 0.97
    assert abs(results["reference"] - results["fused"]) <= 0.01


def test_float32_and_float64_agree_on_a_short_run(backend_spec, rng):
    X, y = rng.normal(size=(40, 3)), rng.integers(0, 2, 40)
    params = {}
    for dtype in ("float32", "float64"):
        model = model_for(backend_spec, [gb.Dense(3, 6, activation="tanh"), gb.Dense(6, 2)],
                          dtype=dtype, seed=3)
        gb.fit(model, gb.SoftmaxCrossEntropy(), gb.SGD(lr=0.1, momentum=0.9), X, y, epochs=5,
               batch_size=8, progress=False)
        params[dtype] = model.get_params()
    for k in params["float32"]:
        np.testing.assert_allclose(params["float32"][k], params["float64"][k], rtol=1e-4, atol=1e-5)


class _Stderr:
    """A stand-in for sys.stderr that is, or is not, a terminal."""

    def __init__(self, tty):
        self.tty, self.text = tty, []

    def isatty(self):
        return self.tty

    def write(self, s):
        self.text.append(s)
        return len(s)

    def flush(self):
        pass


@pytest.mark.parametrize("progress, tty, drawn", [
    (None, False, False),  # the default: no bar into a log file or a pipe
    (None, True, True),    # ... and a bar on a terminal
    ("auto", False, False),
    (True, False, True),   # True forces it
    (False, True, False),
])
def test_the_progress_bar_is_drawn_by_default_only_on_a_terminal(monkeypatch, progress, tty, drawn):
    stderr = _Stderr(tty)
    monkeypatch.setattr("sys.stderr", stderr)
    model = gb.Sequential([gb.Dense(2, 2)], device="cpu", seed=0)
    kw = {} if progress is None else {"progress": progress}
    gb.fit(model, gb.SoftmaxCrossEntropy(), gb.SGD(lr=0.1), np.ones((4, 2)), np.array([0, 1, 0, 1]),
           epochs=1, batch_size=2, **kw)
    assert ("batch" in "".join(stderr.text)) == drawn, "".join(stderr.text)


def test_a_progress_that_is_not_auto_or_a_bool_is_an_error():
    model = gb.Sequential([gb.Dense(2, 2)], device="cpu", seed=0)
    with pytest.raises(ValueError, match=r"progress: expected 'auto', True or False, got 'yes'"):
        gb.fit(model, gb.SoftmaxCrossEntropy(), gb.SGD(lr=0.1), np.ones((4, 2)), np.array([0, 1, 0, 1]),
               epochs=1, batch_size=2, progress="yes")
