"""Conv2d against PyTorch (forward, input and parameter gradients, float64), central differences,
a few training steps of a small CNN, and its shape errors; on every backend."""

import math

import numpy as np
import pytest
from layer_cases import TORCH_ACTS, assert_close, assert_steps_follow_torch, model_for, run_layer, torch_grads

import gpubackprop as gb

# (in, out, kernel, keyword arguments, input H x W): non-square kernels, stride, padding,
# dilation, groups (depthwise too), 1x1 (the no-columns path and the strided im2col one), a
# kernel larger than the unpadded input, odd sizes, every activation; each run whole and in
# chunks (ragged ones too).
CONV_CASES = [
    (1, 1, 1, {}, (1, 1)),
    (3, 4, 3, {}, (7, 9)),
    (2, 5, (2, 3), {"stride": (2, 1), "padding": (1, 0), "activation": "relu"}, (6, 7)),
    (4, 6, 3, {"stride": 2, "padding": 1, "dilation": 2, "groups": 2, "activation": "tanh"},
     (9, 8)),
    (6, 6, (3, 1), {"padding": (1, 0), "groups": 6, "activation": "sigmoid"}, (5, 4)),
    (3, 2, 1, {"activation": "gelu"}, (5, 5)),
    (4, 8, 1, {"stride": 2, "groups": 4, "activation": "leaky_relu"}, (5, 6)),
    (2, 3, 5, {"padding": 2, "bias": False}, (3, 3)),
    (3, 4, (1, 4), {"stride": (3, 2), "dilation": (1, 2), "bias": False, "activation": "relu"},
     (10, 11)),
    (6, 4, (2, 2), {"stride": 3, "padding": 1, "groups": 2, "activation": "gelu"}, (8, 5)),
    # More output channels (a group) than output positions: BP3's other GEMM arrangement.
    (3, 12, 3, {"stride": 2, "activation": "relu"}, (4, 5)),
    (4, 8, 2, {"stride": 2, "groups": 2}, (3, 3)),
    # 32+ output channels a group and 64+ rows of columns a group: the fused CPU set's one GEMM a
    # chunk on batch-inner columns (chunks of one sample keep a GEMM a sample).
    (8, 32, 3, {"padding": 1, "activation": "relu"}, (5, 6)),
    (7, 33, (3, 4), {"stride": (2, 1), "padding": (2, 1), "dilation": (1, 2), "activation": "tanh"},
     (7, 8)),
    (16, 64, 3, {"stride": 2, "groups": 2, "bias": False}, (7, 6)),
]


def case_id(case):
    ci, co, k, kw, hw = case
    extra = "-".join(f"{a}{b}" for a, b in kw.items()).replace(" ", "")
    return f"{ci}x{co}k{k}-{hw[0]}x{hw[1]}-{extra}".replace(" ", "")


def torch_conv(torch, layer):
    F = torch.nn.functional
    act = TORCH_ACTS[layer.activation]

    def fn(X, weight, bias=None):
        Z = F.conv2d(X, weight, bias, stride=layer.stride, padding=layer.padding,
                     dilation=layer.dilation, groups=layer.groups)
        return act(F, Z)

    return fn


def random_params(rng, layer):
    return {name: rng.normal(size=shape) for name, shape in layer.param_specs()}


@pytest.mark.parametrize("chunk", [5, 3, 1], ids=["whole", "3-a-chunk", "1-a-chunk"])
@pytest.mark.parametrize("case", CONV_CASES, ids=[case_id(c) for c in CONV_CASES])
def test_conv2d_matches_torch(backend_spec, rng, case, chunk):
    torch = pytest.importorskip("torch")
    ci, co, k, kw, (H, W) = case
    layer = gb.Conv2d(ci, co, k, **kw)
    N = 5
    X = rng.normal(size=(N, ci, H, W))
    shape_out = layer.build((ci, H, W))
    dY = rng.normal(size=(N, *shape_out))
    kh, kwid = layer.kernel_size  # at most ``chunk`` samples' columns at a time
    layer.max_cols_bytes = chunk * ci * kh * kwid * shape_out[1] * shape_out[2] * 8
    params = random_params(rng, layer)
    Y, dX, grads = run_layer(backend_spec, layer, X, dY, params=params)
    Yt, dXt, gt = torch_grads(torch, torch_conv(torch, layer), X, dY, params)
    assert_close(Y, Yt, what="Y")
    assert_close(dX, dXt, what="dX")
    for name in params:
        assert_close(grads[name], gt[name], what=f"d{name}")


def test_conv2d_gradients_accumulate_over_chunks_and_calls(backend_spec, rng):
    torch = pytest.importorskip("torch")
    layer = gb.Conv2d(3, 4, 3, padding=1, activation="tanh")
    layer.max_cols_bytes = 1  # one sample a chunk
    model = model_for(backend_spec, [layer], input_shape=(3, 5, 6))
    be = model.backend
    X, dY = rng.normal(size=(3, 3, 5, 6)), rng.normal(size=(3, 4, 5, 6))
    params = {k[2:]: v for k, v in model.get_params().items()}
    _, _, gt = torch_grads(torch, torch_conv(torch, layer), X, dY, params)
    model.zero_grads()
    for _ in range(2):
        _, bp = model.forward(be.to_device(X), train=True, input_grad=False)
        assert bp(be.to_device(dY)) is None
    for name in params:
        assert_close(np.array(be.to_host(layer.grads[name])), 2 * gt[name], what=name)


def test_conv2d_chunks_shrink_to_the_kernel_sets_cache_once_over_the_budget(backend_spec, rng):
    """A batch whose columns exceed the budget runs in chunks of at most ``ops.cols_cache_bytes``
    (the fused CPU set: 2 MiB; the reference and CUDA sets: None, the budget alone); a batch within
    the budget stays one chunk, except where the kernel set runs im2col in two halves (the fused
    set: cache-sized chunks then, for both cores). Either way the layer equals torch."""
    torch = pytest.importorskip("torch")
    layer = gb.Conv2d(2, 3, 3, padding=1, activation="relu")
    model = model_for(backend_spec, [layer], input_shape=(2, 4, 5))
    ops = model.backend.ops
    assert ops.cols_cache_bytes == (2 << 20 if backend_spec == ("cpu", "fused") else None)
    per_sample = 2 * 3 * 3 * 4 * 5 * 8  # float64 columns of one sample
    layer.max_cols_bytes = 4 * per_sample
    ops.cols_cache_bytes = 2 * per_sample + 1
    if layer._im2col_halves():  # the fused set: cache-sized chunks in two halves always
        assert layer._chunks(4) == [(0, 2), (2, 4)]
    else:  # within the budget: one chunk, no recompute, whatever the cache
        assert layer._chunks(4) == [(0, 4)]
    assert layer._chunks(7) == [(0, 2), (2, 4), (4, 6), (6, 7)]
    ops.cols_cache_bytes = None
    assert layer._chunks(7) == [(0, 4), (4, 7)]
    ops.cols_cache_bytes = 2 * per_sample
    X, dY = rng.normal(size=(7, 2, 4, 5)), rng.normal(size=(7, 3, 4, 5))
    params = {k[2:]: v for k, v in model.get_params().items()}
    model.zero_grads()
    Y, bp = model.forward(model.backend.to_device(X), train=True)
    dX = bp(model.backend.to_device(dY))
    Yt, dXt, gt = torch_grads(torch, torch_conv(torch, layer), X, dY, params)
    assert_close(np.array(model.backend.to_host(Y)), Yt, what="Y")
    assert_close(np.array(model.backend.to_host(dX)), dXt, what="dX")
    for name in params:
        assert_close(np.array(model.backend.to_host(layer.grads[name])), gt[name], what=name)


@pytest.mark.parametrize("ci,co,k,kw,hw", [
    (3, 5, 3, {"stride": 2, "padding": 1}, (9, 8)),  # a GEMM a sample for BP3
    (3, 12, 3, {"stride": 2}, (5, 5)),  # C_out > L: BP3 as one GEMM over the chunk
    (8, 32, 3, {"padding": 1, "groups": 1}, (5, 6)),  # batch-inner columns
    (6, 4, 1, {"groups": 2}, (4, 5)),  # 1x1: no columns
], ids=["per-sample", "over-the-chunk", "batch-inner", "pointwise"])
def test_conv2d_im2col_halves_give_the_same_bits_on_one_thread_and_two(rng, ci, co, k, kw, hw):
    """The fused CPU set runs the two halves of a batch's im2col chunks on two threads: the same
    halves, so the same bits as one after the other (training forward, inference, dX, gradients
    accumulated over two calls); and the layer equals the reference set to float32 rounding."""
    X = rng.normal(size=(7, ci, *hw)).astype(np.float32)
    results, dY = [], None
    for kernels, threads in (("fused", 1), ("fused", 2), ("reference", 1)):
        layer = gb.Conv2d(ci, co, k, activation="relu", **kw)
        model = model_for(("cpu", kernels), [layer], input_shape=(ci, *hw), dtype="float32")
        model.backend.ops.nchunks = threads
        layer.max_cols_bytes = 2 * layer._Ktot * math.prod(layer.output_shape[1:]) * 4
        if dY is None:
            dY = rng.normal(size=(7, *layer.output_shape)).astype(np.float32)
        model.zero_grads()
        for _ in range(2):
            Y, bp = model.forward(X, train=True)
            dX = bp(dY)
        assert len(layer._workspaces[7].chunks) == 4
        assert layer._two_halves() is (kernels == "fused" and threads == 2)
        results.append([np.array(a) for a in (Y, model(X), dX, *layer.grads.values())])
    for a, b in zip(results[0], results[1], strict=True):
        np.testing.assert_array_equal(a, b)
    for a, b in zip(results[0], results[2], strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4 * np.abs(b).max())


def test_conv2d_one_gemm_a_chunk_is_taken_where_the_kernel_set_offers_it(backend_spec):
    """The batch-inner path the wider CONV_CASES exercise: the fused CPU set's, for chunks of
    several samples of a layer not too thin (32+ channels out and 64+ column rows a group)."""
    model = model_for(backend_spec, [gb.Conv2d(8, 32, 3, padding=1), gb.Conv2d(32, 16, 3, padding=1),
                                     gb.Conv2d(16, 32, (1, 3), padding=(0, 1))], input_shape=(8, 5, 6))
    offered = model.backend.ops.batch_inner_gemm  # (binds the layers)
    assert offered is (backend_spec == ("cpu", "fused"))
    wide, thin_out, thin_k = model.layers
    assert wide._batch_inner(wide._chunks(5)) is offered
    assert not wide._batch_inner([(0, 1), (1, 2)])  # one sample a chunk: a GEMM a sample is one
    assert not thin_out._batch_inner(thin_out._chunks(5))  # 16 channels out
    assert not thin_k._batch_inner(thin_k._chunks(5))  # 16·1·3 = 48 column rows


@pytest.mark.parametrize("layers,shape", [
    (lambda: [gb.Conv2d(2, 3, 3, padding=1, activation="tanh"),
              gb.Conv2d(3, 4, (2, 3), stride=2, activation="gelu"), gb.Flatten(), gb.Dense(24, 3)],
     (2, 5, 7)),
    (lambda: [gb.Conv2d(4, 4, 3, padding=2, dilation=2, groups=2, activation="sigmoid"),
              gb.Conv2d(4, 2, 1, bias=False), gb.Flatten(), gb.Dense(2 * 4 * 4, 3)], (4, 4, 4)),
], ids=["stride-pad", "dilated-groups-pointwise"])
def test_conv2d_gradcheck(backend_spec, rng, layers, shape):
    model = model_for(backend_spec, layers(), input_shape=shape)
    err = gb.gradcheck(model, gb.SoftmaxCrossEntropy(), rng.normal(size=(4, *shape)),
                       rng.integers(0, 3, 4))
    assert err < 1e-6


def test_conv2d_inference_equals_training_forward(backend_spec, rng):
    layer = gb.Conv2d(3, 5, 3, stride=2, padding=1, activation="gelu")
    layer.max_cols_bytes = 1
    model = model_for(backend_spec, [layer], input_shape=(3, 7, 6))
    X = model.backend.to_device(rng.normal(size=(3, 3, 7, 6)))
    Y, _ = model.forward(X, train=True)
    np.testing.assert_array_equal(model.backend.to_host(model(X)), model.backend.to_host(Y))


def test_default_init_is_torchs(backend_spec):
    layer = gb.Conv2d(4, 300, (3, 2), groups=2)
    p = model_for(backend_spec, [layer], input_shape=(4, 5, 5)).get_params()
    bound = 1 / np.sqrt(2 * 3 * 2)  # fan_in = in/groups · kh · kw
    for key in ("0.weight", "0.bias"):
        assert np.abs(p[key]).max() <= bound
        assert np.abs(p[key]).max() > 0.9 * bound and abs(p[key].mean()) < 0.1 * bound
    assert p["0.weight"].shape == (300, 2, 3, 2)
    he = model_for(backend_spec, [gb.Conv2d(4, 300, 3, init="he")], input_shape=(4, 5, 5))
    w = he.get_params()["0.weight"]
    assert abs(w.std() - np.sqrt(2 / 36)) < 0.05 * np.sqrt(2 / 36)
    assert np.all(he.get_params()["0.bias"] == 0)


def small_cnn():
    return [gb.Conv2d(1, 4, 3, padding=1, activation="relu"), gb.MaxPool2d(2),
            gb.Conv2d(4, 6, (3, 2), stride=(1, 2), groups=2, activation="tanh"),
            gb.AvgPool2d(2, stride=1), gb.Flatten(), gb.Dense(6, 5, activation="gelu"),
            gb.Dense(5, 3)]


def torch_cnn(torch, params):
    nn = torch.nn
    model = nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(4, 6, (3, 2), stride=(1, 2), groups=2), nn.Tanh(), nn.AvgPool2d(2, stride=1),
        nn.Flatten(), nn.Linear(6, 5), nn.GELU(), nn.Linear(5, 3)).double()
    names = {"0.weight": "0.weight", "0.bias": "0.bias", "2.weight": "3.weight",
             "2.bias": "3.bias", "5.W": "7.weight", "5.b": "7.bias", "6.W": "9.weight",
             "6.b": "9.bias"}
    model.load_state_dict({names[k]: torch.tensor(v) for k, v in params.items()})
    return model, names


def test_sgd_momentum_steps_follow_torch(backend_spec, rng):
    torch = pytest.importorskip("torch")
    model = model_for(backend_spec, small_cnn(), input_shape=(1, 8, 8))
    tmodel, names = torch_cnn(torch, model.get_params())
    topt = torch.optim.SGD(tmodel.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-3)
    opt = gb.SGD(lr=0.1, momentum=0.9, weight_decay=1e-3)
    X, y = rng.normal(size=(24, 1, 8, 8)), rng.integers(0, 3, 24)
    assert_steps_follow_torch(torch, model, opt, tmodel, topt, names, X, y)


@pytest.mark.parametrize("layers,shape,pattern", [
    (lambda: [gb.Conv2d(3, 8, 3), gb.Conv2d(8, 16, 3), gb.Conv2d(16, 32, 3)], (3, 16, 16), None),
    (lambda: [gb.Conv2d(3, 8, 3), gb.Conv2d(16, 32, 3)], (3, 14, 14),
     r"layers\[1\] Conv2d\(16, 32, 3\): expected 16 input channels, got 8 \(input shape "
     r"\(8, 12, 12\)\)"),
    (lambda: [gb.Conv2d(1, 4, 5)], (1, 3, 3),
     r"layers\[0\] Conv2d\(1, 4, 5\): kernel 5x5 larger than the padded input 3x3"),
    (lambda: [gb.Conv2d(1, 4, 3, dilation=2)], (1, 4, 9),
     r"kernel 3x3 with dilation 2 \(extent 5x5\) larger than the padded input 4x9"),
    (lambda: [gb.Conv2d(1, 4, 3)], (1, 12),
     r"layers\[0\] Conv2d\(1, 4, 3\): expected a per-sample input of shape \(C, H, W\) with "
     r"C = 1, got shape \(1, 12\)"),
    (lambda: [gb.Conv2d(1, 2, 3), gb.Dense(50, 3)], (1, 7, 7),
     r"layers\[1\] Dense\(50, 3, .*\): expected input shape \(50,\), got \(2, 5, 5\); put a "
     r"Flatten\(\) before it"),
    (lambda: [gb.Conv2d(1, 2, 3), gb.Residual(gb.Sequential([gb.Conv2d(2, 2, 3, padding=1),
                                                               gb.Conv2d(3, 2, 1)]))], (1, 7, 7),
     r"layers\[1\]\[1\] Conv2d\(3, 2, 1\): expected 3 input channels, got 2"),
    (lambda: [gb.Residual(gb.Conv2d(2, 4, 3, padding=1))], (2, 5, 5),
     r"layers\[0\] Residual\(Conv2d\(2, 4, 3, padding=1\)\): expected its block to keep the "
     r"input shape \(2, 5, 5\), got \(4, 5, 5\)"),
])
def test_shapes_are_checked_at_construction(layers, shape, pattern):
    if pattern is None:
        model = gb.Sequential(layers(), input_shape=shape, device="cpu")
        assert model.output_shape == (32, 10, 10)
        return
    with pytest.raises(ValueError, match=pattern):
        gb.Sequential(layers(), input_shape=shape, device="cpu")


def test_a_model_of_images_needs_its_input_shape():
    model = gb.Sequential([gb.Conv2d(1, 2, 3), gb.Flatten(), gb.Dense(18, 2)], device="cpu")
    with pytest.raises(ValueError, match=r"input_shape: the first layer, Conv2d\(1, 2, 3\), takes "
                                         r"inputs of several shapes; give the per-sample input "
                                         r"shape, e.g. Sequential\(..., input_shape=\(C, H, W\)\)"):
        model.backend  # noqa: B018


@pytest.mark.parametrize("make,error,pattern", [
    (lambda: gb.Conv2d(0, 2, 3), ValueError, r"in_channels: expected a positive integer, got 0"),
    (lambda: gb.Conv2d(2, 2, (3, 0)), ValueError,
     r"kernel_size: expected an integer >= 1 or a pair of them, got \(3, 0\)"),
    (lambda: gb.Conv2d(2, 2, 3, padding=-1), ValueError,
     r"padding: expected an integer >= 0 or a pair of them, got -1"),
    (lambda: gb.Conv2d(2, 2, 3, stride=(1, 2, 3)), ValueError, r"stride: expected an integer"),
    (lambda: gb.Conv2d(6, 4, 3, groups=4), ValueError,
     r"groups: expected a divisor of in_channels \(6\) and out_channels \(4\), got 4"),
    (lambda: gb.Conv2d(2, 2, 3, bias=1), TypeError, r"bias: expected True or False, got 1"),
    (lambda: gb.Conv2d(2, 2, 3, activation="swish"), ValueError, r"activation: expected one of"),
    (lambda: gb.Conv2d(2, 2, 3, init="kaiming"), ValueError, r"init: expected one of"),
])
def test_bad_conv_arguments(make, error, pattern):
    with pytest.raises(error, match=pattern):
        make()


def test_bad_image_data_is_a_clear_error():
    model = gb.Sequential([gb.Conv2d(1, 2, 3), gb.Flatten(), gb.Dense(18, 2)], device="cpu",
                          input_shape=(1, 5, 5))
    loss, opt = gb.SoftmaxCrossEntropy(), gb.SGD(0.1)
    with pytest.raises(ValueError, match=r"X: expected an array of shape \(n, 1, 5, 5\) \(samples "
                                         r"× per-sample shape \(1, 5, 5\)\), got array of shape "
                                         r"\(4, 25\)"):
        gb.fit(model, loss, opt, np.zeros((4, 25)), [0, 1, 0, 1], progress=False)
    with pytest.raises(ValueError, match=r"Conv2d\(1, 2, 3\) input: expected shape \(batch, 1, 5, "
                                         r"5\), got \(2, 1, 5, 4\)"):
        model.forward(np.zeros((2, 1, 5, 4), np.float32), train=True)
    with pytest.raises(TypeError, match=r"Conv2d input: expected dtype float32, got float64"):
        model.forward(np.zeros((2, 1, 5, 5)), train=True)
    no_head = gb.Sequential([gb.Conv2d(1, 2, 3)], device="cpu", input_shape=(1, 5, 5))
    with pytest.raises(ValueError, match=r"model output: expected one vector of outputs per sample "
                                         r"for SoftmaxCrossEntropy, got per-sample shape "
                                         r"\(2, 3, 3\); end the model with Flatten\(\)"):
        gb.evaluate(no_head, loss, np.zeros((4, 1, 5, 5)), [0, 1, 0, 1])
    assert no_head.predict(np.zeros((4, 1, 5, 5))).shape == (4, 2, 3, 3)
