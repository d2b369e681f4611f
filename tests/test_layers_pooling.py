"""Pooling layers and Flatten against PyTorch (forward and input gradient, float64), central
differences through a small CNN, and their argument and shape errors; on every backend."""

import numpy as np
import pytest
from layer_cases import assert_close, model_for, run_layer, torch_grads

import gpubackprop as gb

# (kernel, keyword arguments, input (C, H, W)): non-square windows, strides other than the
# kernel, padding up to half the kernel, dilation, odd sizes, windows that miss the last rows.
MAX_CASES = [
    (2, {}, (3, 6, 8)),
    (3, {"stride": 2, "padding": 1}, (2, 7, 9)),
    ((2, 3), {"stride": (1, 2), "padding": (1, 1)}, (2, 5, 7)),
    (3, {"stride": 1, "dilation": 2, "padding": 1}, (1, 8, 7)),
    ((3, 1), {"dilation": (1, 3)}, (2, 9, 4)),
    (1, {"stride": 2}, (3, 5, 5)),
    (5, {"padding": 2}, (2, 3, 4)),
]
AVG_CASES = [
    (2, {}, (3, 6, 8)),
    (3, {"stride": 2, "padding": 1}, (2, 7, 9)),
    (3, {"stride": 2, "padding": 1, "count_include_pad": False}, (2, 7, 9)),
    ((2, 3), {"stride": (1, 2), "padding": (1, 1), "count_include_pad": False}, (2, 5, 7)),
    ((4, 2), {"stride": (3, 1)}, (1, 9, 5)),
    (5, {"padding": 2, "count_include_pad": False}, (2, 3, 4)),
]


def ids(cases):
    return [f"k{k}-{'x'.join(map(str, s))}-" + "-".join(f"{a}{b}" for a, b in kw.items())
            for k, kw, s in cases]


def check_against_torch(spec, rng, layer, shape, torch_fn):
    torch = pytest.importorskip("torch")
    N = 4
    X = rng.normal(size=(N, *shape))
    dY = rng.normal(size=(N, *layer.build(shape)))
    Y, dX, _ = run_layer(spec, layer, X, dY)
    Yt, dXt, _ = torch_grads(torch, lambda X: torch_fn(torch.nn.functional, X), X, dY, {})
    assert_close(Y, Yt, what="Y")
    assert_close(dX, dXt, what="dX")


@pytest.mark.parametrize("case", MAX_CASES, ids=ids(MAX_CASES))
def test_max_pool2d_matches_torch(backend_spec, rng, case):
    k, kw, shape = case
    layer = gb.MaxPool2d(k, **kw)
    check_against_torch(backend_spec, rng, layer, shape, lambda F, X: F.max_pool2d(
        X, layer.kernel_size, layer.stride, layer.padding, layer.dilation))


@pytest.mark.parametrize("case", AVG_CASES, ids=ids(AVG_CASES))
def test_avg_pool2d_matches_torch(backend_spec, rng, case):
    k, kw, shape = case
    layer = gb.AvgPool2d(k, **kw)
    check_against_torch(backend_spec, rng, layer, shape, lambda F, X: F.avg_pool2d(
        X, layer.kernel_size, layer.stride, layer.padding,
        count_include_pad=layer.count_include_pad))


@pytest.mark.parametrize("shape", [(3, 5, 7), (1, 1, 1), (4, 2, 9)])
def test_global_avg_pool_and_flatten_match_torch(backend_spec, rng, shape):
    torch = pytest.importorskip("torch")
    check_against_torch(backend_spec, rng, gb.GlobalAvgPool2d(), shape,
                        lambda F, X: F.adaptive_avg_pool2d(X, 1).flatten(1))
    check_against_torch(backend_spec, rng, gb.Flatten(), shape,
                        lambda F, X: torch.nn.Flatten()(X))


def test_max_pool2d_ties_take_the_first_and_nan_wins(backend_spec):
    torch = pytest.importorskip("torch")
    X = np.zeros((1, 1, 4, 4))
    X[0, 0, 1, 1] = X[0, 0, 1, 2] = 5.0  # a tie in one window
    X[0, 0, 3, 3] = np.nan
    dY = np.ones((1, 1, 2, 2))
    layer = gb.MaxPool2d(2)
    model = model_for(backend_spec, [layer], input_shape=(1, 4, 4))
    be = model.backend
    Y, bp = model.forward(be.to_device(X), train=True)
    Y = np.array(be.to_host(Y))
    dX = np.array(be.to_host(bp(be.to_device(dY))))
    Xt = torch.tensor(X, requires_grad=True)
    Yt = torch.nn.functional.max_pool2d(Xt, 2)
    Yt.backward(torch.tensor(dY))
    np.testing.assert_array_equal(Y, Yt.detach().numpy())
    np.testing.assert_array_equal(dX, Xt.grad.numpy())


@pytest.mark.parametrize("pool", [lambda: gb.MaxPool2d(2, stride=1, padding=1),
                                  lambda: gb.AvgPool2d(3, stride=2, padding=1,
                                                       count_include_pad=False),
                                  lambda: gb.GlobalAvgPool2d()], ids=["max", "avg", "global"])
def test_pooling_gradcheck(backend_spec, rng, pool):
    shape = (2, 5, 4)

    def layers():
        return [gb.Conv2d(2, 3, 3, padding=1, activation="tanh"), pool(), gb.Flatten()]

    n = gb.Sequential(layers(), input_shape=shape, device="cpu").n_out
    model = model_for(backend_spec, layers() + [gb.Dense(n, 3)], input_shape=shape)
    err = gb.gradcheck(model, gb.SoftmaxCrossEntropy(), rng.normal(size=(3, *shape)),
                       rng.integers(0, 3, 3))
    assert err < 1e-6


def test_training_buffers_are_reused(backend_spec, rng):
    model = model_for(backend_spec, [gb.MaxPool2d(2), gb.AvgPool2d(2, stride=1),
                                     gb.GlobalAvgPool2d()], input_shape=(2, 6, 6))
    X = model.backend.to_device(rng.normal(size=(3, 2, 6, 6)))
    Y1, bp1 = model.forward(X, train=True)
    dX1 = bp1(model.backend.to_device(rng.normal(size=(3, 2))))
    Y2, bp2 = model.forward(X, train=True)
    assert Y1 is Y2 and bp2(model.backend.to_device(rng.normal(size=(3, 2)))) is dX1
    assert model(X) is not Y2


@pytest.mark.parametrize("make,error,pattern", [
    (lambda: gb.MaxPool2d(0), ValueError, r"kernel_size: expected an integer >= 1"),
    (lambda: gb.MaxPool2d(3, padding=2), ValueError,
     r"padding: expected at most half the kernel size 3 \(as PyTorch\), got 2"),
    (lambda: gb.AvgPool2d((2, 4), padding=(1, 3)), ValueError,
     r"padding: expected at most half the kernel size \(2, 4\) \(as PyTorch\), got \(1, 3\)"),
    (lambda: gb.MaxPool2d(2, dilation=0), ValueError, r"dilation: expected an integer >= 1"),
    (lambda: gb.AvgPool2d(2, count_include_pad="yes"), TypeError,
     r"count_include_pad: expected True or False, got 'yes'"),
])
def test_bad_pooling_arguments(make, error, pattern):
    with pytest.raises(error, match=pattern):
        make()


@pytest.mark.parametrize("layers,shape,pattern", [
    (lambda: [gb.MaxPool2d(4)], (2, 3, 5),
     r"layers\[0\] MaxPool2d\(4\): kernel 4x4 larger than the padded input 3x5"),
    (lambda: [gb.Conv2d(1, 2, 3), gb.AvgPool2d(3, stride=2, padding=1), gb.MaxPool2d(3)],
     (1, 5, 5), r"layers\[2\] MaxPool2d\(3\): kernel 3x3 larger than the padded input 2x2 "
                r"\(input shape \(2, 2, 2\), padding 0\)"),
    (lambda: [gb.Flatten(), gb.GlobalAvgPool2d()], (2, 3, 5),
     r"layers\[1\] GlobalAvgPool2d\(\): expected a per-sample input of shape \(C, H, W\), got "
     r"shape \(30,\)"),
])
def test_pooling_shape_errors(layers, shape, pattern):
    with pytest.raises(ValueError, match=pattern):
        gb.Sequential(layers(), input_shape=shape, device="cpu")


def test_shapes_and_reprs():
    model = gb.Sequential([gb.MaxPool2d((2, 3), stride=1, padding=1, dilation=(1, 2)),
                           gb.AvgPool2d(2, count_include_pad=False), gb.GlobalAvgPool2d()],
                          input_shape=(3, 7, 8), device="cpu")
    assert [layer.output_shape for layer in model.layers] == [(3, 8, 6), (3, 4, 3), (3,)]
    assert repr(model.layers[0]) == "MaxPool2d((2, 3), stride=1, padding=1, dilation=(1, 2))"
    assert repr(model.layers[1]) == "AvgPool2d(2, count_include_pad=False)"
    assert model.n_params == 0 and model.get_params() == {}
