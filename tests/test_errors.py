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
     r"activation: expected one of \('identity', .*'gelu', 'gelu_tanh'\), got 'swish'"),
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


def _float64_setup(rng):
    model = gb.Sequential([gb.Dense(3, 4, activation="tanh"), gb.Dense(4, 2)], device="cpu",
                          dtype="float64", seed=0)
    return model, gb.SoftmaxCrossEntropy(), rng.normal(size=(5, 3)), rng.integers(0, 2, 5)


BAD_GRADCHECK_ARGUMENTS = [
    # Before: 0 a bare ZeroDivisionError, -1 an error of 0.55, nan and 1e-30 a pass with 0.0.
    (dict(eps=0), r"eps: expected a finite step in \[1e-09, 0.1\] .*float64 model, got 0$"),
    (dict(eps=-1), r"eps: expected a finite step .*got -1$"),
    (dict(eps=float("nan")), r"eps: expected a finite step .*got nan$"),
    (dict(eps=float("inf")), r"eps: expected a finite step .*got inf$"),
    (dict(eps=1e-30), r"eps: expected a finite step .*got 1e-30$"),
    (dict(eps=1.0), r"eps: expected a finite step .*got 1.0$"),
    (dict(eps="1e-6"), r"eps: expected a finite step .*got '1e-6'$"),
    (dict(eps=True), r"eps: expected a finite step .*got True$"),
    # Before: 0 a pass with 0.0, -1 NumPy's "negative dimensions are not allowed".
    (dict(max_params=0), r"max_params: expected None \(all parameters\) or an integer >= 1, got 0$"),
    (dict(max_params=-1), r"max_params: expected None .*got -1$"),
    (dict(max_params=2.5), r"max_params: expected None .*got 2.5$"),
    (dict(max_params=True), r"max_params: expected None .*got True$"),
]


@pytest.mark.parametrize("kw,pattern", BAD_GRADCHECK_ARGUMENTS,
                         ids=[",".join(f"{k}={v!r}" for k, v in kw.items())
                              for kw, _ in BAD_GRADCHECK_ARGUMENTS])
def test_gradcheck_rejects_bad_eps_and_max_params(rng, kw, pattern):
    model, loss, X, y = _float64_setup(rng)
    with pytest.raises(ValueError, match=pattern):
        gb.gradcheck(model, loss, X, y, **kw)


def test_gradcheck_accepts_the_ends_of_its_eps_range_and_one_parameter(rng):
    from gpubackprop.gradcheck import EPS_RANGE

    model, loss, X, y = _float64_setup(rng)
    assert gb.gradcheck(model, loss, X, y, eps=EPS_RANGE[0]) < 1e-4
    assert gb.gradcheck(model, loss, X, y, eps=np.float64(1e-4)) < 1e-6
    assert gb.gradcheck(model, loss, X, y, eps=EPS_RANGE[1]) < 1e-1
    assert gb.gradcheck(model, loss, X, y, max_params=np.int64(30)) < 1e-6


def test_gradcheck_never_passes_by_comparing_nothing(rng):
    # No parameters: nothing to check (it returned 0.0).
    bare = gb.Sequential([gb.Activation("tanh")], input_shape=(3,), device="cpu", dtype="float64")
    with pytest.raises(ValueError, match=r"model: has no parameters, expected at least one"):
        gb.gradcheck(bare, gb.MSE(), np.ones((2, 3)), np.zeros((2, 3)))
    # Targets equal to the outputs: every gradient is zero, none is judged (it returned 0.0).
    model, _, X, _ = _float64_setup(rng)
    with pytest.raises(ValueError, match=r"gradcheck: every checked gradient \(26 of 26 "
                                         r"parameters\) is zero up to rounding .*nothing was "
                                         r"compared"):
        gb.gradcheck(model, gb.MSE(), X, model.predict(X))
    # A non-finite loss at the start: nothing can be compared (it returned 0.0).
    model, loss, X, y = _float64_setup(rng)
    model.backend.synchronize()  # builds the model: its flat buffers exist from here on
    model.flat_params[-1] = np.inf  # a diverged model (set_params refuses it)
    with pytest.raises(ValueError, match=r"model: the loss at its parameters is (nan|inf), "
                                         r"expected a finite loss"):
        gb.gradcheck(model, loss, X, y)


def test_gradcheck_reports_a_nan_gradient_as_an_infinite_error(rng):
    class NanGradient(gb.SoftmaxCrossEntropy):  # a backprop bug: the loss is fine, BP1 is not
        def loss_and_grad(self, be, Y, T):
            value, dY = super().loss_and_grad(be, Y, T)
            return value, dY * np.nan

    model, _, X, y = _float64_setup(rng)
    assert gb.gradcheck(model, NanGradient(), X, y) == np.inf  # it returned 0.0


def test_gradcheck_eps_below_a_parameters_resolution(rng):
    model, loss, X, y = _float64_setup(rng)
    params = model.get_params()
    params["0.W"][0, 0] = 1e9  # spacing 1.2e-7: 1e9 ± 1e-9 is 1e9
    model.set_params(params)
    with pytest.raises(ValueError, match=r"eps: 1e-09 is below the resolution of parameter 0, "
                                         r"1e\+09 .*expected eps >= 1.19e-07 for it"):
        gb.gradcheck(model, loss, X, y, eps=1e-9)
