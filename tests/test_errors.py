"""Every bad input raises a ValueError/TypeError that says what was expected and what was given."""

import numpy as np
import pytest

import gpubackprop as gb
from gpubackprop.backend import cuda_available


@pytest.fixture
def setup():
    model = gb.Sequential([gb.Dense(3, 4, activation="relu"), gb.Dense(4, 2)], device="cpu")
    return model, gb.SoftmaxCrossEntropy(), gb.SGD(lr=0.1)


X_OK = np.zeros((4, 3))
Y_OK = np.array([0, 1, 1, 0])


@pytest.mark.parametrize("X,y,error,pattern", [
    (np.zeros((4, 5)), Y_OK, ValueError, r"X: expected 3 features .*got shape \(4, 5\)"),
    (np.zeros(4), Y_OK, ValueError, r"X: expected a 2-D array .*got array of shape \(4,\)"),
    (np.zeros((0, 3)), Y_OK[:0], ValueError, r"X: expected at least one sample"),
    (np.array([["a", "b", "c"]] * 4), Y_OK, TypeError, r"X: expected real numbers .*got dtype <U1"),
    (np.zeros((4, 3), dtype=complex), Y_OK, TypeError, r"X: expected real numbers .*complex128"),
    (np.array([[0, np.nan, 0]] * 4), Y_OK, ValueError, r"X: expected finite values, found nan at "
                                                        r"index \(0, 1\)"),
    (np.array([[0, 0, np.inf]] * 4), Y_OK, ValueError, r"X: expected finite values, found inf"),
    (X_OK, np.array([0, 1, 2, 0]), ValueError, r"y: expected class indices in \[0, 1\] for 2 "
                                               r"outputs, got 2"),
    (X_OK, np.array([0, -1, 1, 0]), ValueError, r"y: expected class indices in \[0, 1\].*got -1"),
    (X_OK, np.array([0, 0.5, 1, 0]), ValueError, r"y: expected integer class indices, got "
                                                 r"non-integer values of dtype float64"),
    (X_OK, np.array([0, np.nan, 1, 0]), ValueError, r"y: expected finite values, found nan"),
    (X_OK, np.array([0, 1, 1]), ValueError, r"X and y: expected the same number of samples, got "
                                            r"4 and 3"),
    (X_OK, np.zeros((4, 2)), ValueError, r"y: expected 1-D class indices, got array of shape "
                                         r"\(4, 2\)"),
])
def test_bad_data(setup, X, y, error, pattern):
    model, loss, opt = setup
    for call in (lambda: gb.fit(model, loss, opt, X, y, progress=False),
                 lambda: gb.train_step(model, loss, opt, X, y),
                 lambda: gb.evaluate(model, loss, X, y)):
        with pytest.raises(error, match=pattern.replace("X:", "X[_a-z]*:").replace("y:", "y[_a-z]*:")
                           .replace("X and y", "X[_a-z]* and y[_a-z]*")):
            call()


def test_bad_targets_for_mse_and_bce():
    model = gb.Sequential([gb.Dense(3, 2)], device="cpu")
    with pytest.raises(ValueError, match=r"y: expected MSE targets of shape \(n, 2\), got array "
                                         r"of shape \(4, 3\)"):
        gb.evaluate(model, gb.MSE(), X_OK, np.zeros((4, 3)))
    with pytest.raises(ValueError, match=r"y: expected binary targets in \[0, 1\], got values in "
                                         r"\[0.0, 2.0\]"):
        gb.evaluate(model, gb.BinaryCrossEntropy(), X_OK, np.array([[0, 2.0]] * 4))


def test_bad_training_arguments(setup):
    model, loss, opt = setup
    with pytest.raises(ValueError, match=r"batch_size: expected a positive integer, got 0"):
        gb.fit(model, loss, opt, X_OK, Y_OK, batch_size=0, progress=False)
    with pytest.raises(ValueError, match=r"epochs: expected an integer >= 0, got -1"):
        gb.fit(model, loss, opt, X_OK, Y_OK, epochs=-1, progress=False)
    with pytest.raises(ValueError, match=r"validation: expected a pair \(X_val, y_val\)"):
        gb.fit(model, loss, opt, X_OK, Y_OK, validation=X_OK, progress=False)
    with pytest.raises(ValueError, match=r"X_val: expected 3 features"):
        gb.fit(model, loss, opt, X_OK, Y_OK, validation=(np.zeros((2, 2)), [0, 1]), progress=False)


@pytest.mark.parametrize("make,error,pattern", [
    (lambda: gb.Dense(3, 4, activation="swish"), ValueError,
     r"activation: expected one of \('identity', .*'gelu'\), got 'swish'"),
    (lambda: gb.Dense(3, 4, init="orthogonal"), ValueError,
     r"init: expected one of \('he', 'xavier', 'lecun', 'normal'\), got 'orthogonal'"),
    (lambda: gb.Dense(0, 4), ValueError, r"n_in: expected a positive integer, got 0"),
    (lambda: gb.Dense(3, 2.5), ValueError, r"n_out: expected a positive integer, got 2.5"),
    (lambda: gb.Sequential([gb.Dense(3, 4), gb.Dense(5, 2)]), ValueError,
     r"layers\[1\] Dense\(5, 2, .*\): expected 5 input features, got 4 \(input shape \(4,\)\)"),
    (lambda: gb.Sequential([]), ValueError, r"layers: expected a non-empty list of layers"),
    (lambda: gb.Sequential(["dense"]), TypeError, r"layers\[0\]: expected a layer .*got str"),
    (lambda: gb.Residual(gb.Dense(3, 4)), ValueError,
     r"Residual block: expected it to map n features to n, got 3 -> 4"),
    # Bad model configuration fails at construction, not at first use.
    (lambda: gb.Sequential([gb.Dense(3, 4)], device="tpu"), ValueError,
     r"device: expected one of \('auto', 'cpu', 'cuda'\), got 'tpu'"),
    (lambda: gb.Sequential([gb.Dense(3, 4)], dtype="float16"), ValueError,
     r"dtype: expected one of \('float32', 'float64'\), got 'float16'"),
    (lambda: gb.Sequential([gb.Dense(3, 4)], dtype="half-ish"), ValueError,
     r"dtype: expected one of \('float32', 'float64'\), got 'half-ish'"),
    (lambda: gb.Sequential([gb.Dense(3, 4)], kernels="fast"), ValueError,
     r"kernels: expected one of \('fused', 'reference'\), got 'fast'"),
    (lambda: gb.Sequential([gb.Dense(3, 4)], seed=-1), ValueError,
     r"seed: expected an integer >= 0, got -1"),
    (lambda: gb.SGD(lr=-0.1), ValueError, r"lr: expected a finite number >= 0, got -0.1"),
    (lambda: gb.SGD(lr=float("nan")), ValueError, r"lr: expected a finite number >= 0, got nan"),
    (lambda: gb.SGD(lr=0.1, momentum=1.5), ValueError, r"momentum: expected a number in \[0, 1\)"),
    (lambda: gb.SGD(lr=0.1, nesterov=True), ValueError, r"nesterov: expected momentum > 0"),
    (lambda: gb.Adam(betas=(0.9,)), ValueError, r"betas: expected a pair"),
    (lambda: gb.Adam(clip_norm=0), ValueError, r"clip_norm: expected a finite number > 0, got 0"),
    (lambda: gb.RMSprop(eps=0), ValueError, r"eps: expected a finite number > 0, got 0"),
])
def test_bad_configuration(make, error, pattern):
    with pytest.raises(error, match=pattern):
        make()


@pytest.mark.skipif(cuda_available(), reason="a CUDA device (or the simulator) is usable here")
def test_cuda_without_a_gpu_fails_at_construction():
    with pytest.raises(RuntimeError, match=r"device: 'cuda' was requested but no CUDA GPU is usable"):
        gb.Sequential([gb.Dense(3, 4)], device="cuda")


def test_unknown_optimizer_and_loss_names():
    from gpubackprop.optimizers import make_optimizer

    with pytest.raises(ValueError, match=r"optimizer: expected one of \('sgd', 'momentum', "
                                         r"'rmsprop', 'adam', 'adamw'\), got 'lbfgs'"):
        make_optimizer("lbfgs", 0.1)


def test_cuda_without_a_gpu_is_a_clear_error():
    from gpubackprop.backend import cuda_available

    if cuda_available():
        pytest.skip("a CUDA device (or the simulator) is available here")
    with pytest.raises(RuntimeError, match=r"device: 'cuda' was requested but no CUDA GPU"):
        gb.Sequential([gb.Dense(3, 4)], device="cuda").backend  # noqa: B018


def test_set_params_checks_keys_and_shapes_and_writes_nothing_on_error(setup):
    model, _, _ = setup
    before = model.get_params()
    bad = dict(before)
    bad["1.W"] = np.zeros((3, 3))
    bad["0.W"] = np.ones_like(before["0.W"])  # valid, but must not be written: 1.W is bad
    with pytest.raises(ValueError, match=r"params\['1.W'\]: expected shape \(2, 4\), got array "
                                         r"of shape \(3, 3\)"):
        model.set_params(bad)
    np.testing.assert_array_equal(model.get_params()["0.W"], before["0.W"])
    with pytest.raises(ValueError, match=r"missing \['1.b'\], unexpected \['2.W'\]"):
        model.set_params({"0.W": before["0.W"], "0.b": before["0.b"], "1.W": before["1.W"],
                          "2.W": before["1.W"]})
    with pytest.raises(TypeError, match=r"params: expected a dict"):
        model.set_params([1, 2])


def test_layer_input_checks(setup):
    model, _, _ = setup
    with pytest.raises(ValueError, match=r"Dense\(3, 4\) input: expected shape \(batch, 3\), got "
                                         r"\(2, 5\)"):
        model.forward(np.zeros((2, 5), np.float32), train=True)
    with pytest.raises(TypeError, match=r"Dense input: expected dtype float32, got float64"):
        model.forward(np.zeros((2, 3)), train=True)


def test_optimizer_state_for_another_model(setup):
    model, loss, opt = setup
    gb.train_step(model, loss, gb.SGD(lr=0.1, momentum=0.9), X_OK, Y_OK)
    other = gb.Sequential([gb.Dense(3, 2)], device="cpu")
    opt = gb.SGD(lr=0.1, momentum=0.9)
    gb.train_step(model, loss, opt, X_OK, Y_OK)
    with pytest.raises(ValueError, match=r"optimizer state: made for 26 parameters, the model has 8"):
        gb.train_step(other, loss, opt, X_OK, Y_OK)
    with pytest.raises(ValueError, match=r"optimizer state buffer 'momentum': expected shape \(8,\)"):
        gb.SGD(lr=0.1, momentum=0.9).load_state_dict(opt.state_dict(), other)
    with pytest.raises(ValueError, match=r"optimizer state: expected type Adam, got 'SGD'"):
        gb.Adam().load_state_dict(opt.state_dict(), other)


def test_gradcheck_requires_float64(setup):
    model, loss, _ = setup
    with pytest.raises(TypeError, match=r"gradcheck expects a float64 model, got float32"):
        gb.gradcheck(model, loss, X_OK, Y_OK)
