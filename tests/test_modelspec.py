"""Model specs: parsing, shape inference, activation fusion, presets, and errors that say where."""

import numpy as np
import pytest

import gpubackprop as gb
from gpubackprop import modelspec
from gpubackprop.modelspec import SpecError, parse, plan, preset_spec

EXAMPLE = ("conv(32,3,pad=1)-relu-maxpool(2)-conv(64,3,pad=1)-relu-maxpool(2)-flatten-dense(128)-"
           "relu-dropout(0.5)-dense(10)")


def kinds(p):
    return [e[0] for e in p.entries]


def shapes(p):
    return [e[3] for e in p.entries]


# ---- parsing ----------------------------------------------------------------------------------
def test_parse_tokens_positions_and_arguments():
    toks = parse(" conv(32, 3, stride=2x1 ,pad=1)-relu - dense(classes, init=he)")
    assert [t.name for t in toks] == ["conv", "relu", "dense"]
    assert [t.index for t in toks] == [1, 2, 3]
    assert [t.char for t in toks] == [2, 33, 40]
    assert toks[0].params == {"out": 32, "k": 3, "stride": (2, 1), "pad": 1, "dil": 1,
                              "groups": 1, "bias": True, "init": None}
    assert toks[2].params == {"n": "classes", "init": "he"}


def test_parse_nested_residual_and_floats_with_exponents():
    toks = parse("res(conv(8,3,pad=1)-bn(eps=1e-3)-relu)-dropout-ln(eps=2.5e-6)")
    assert [t.name for t in toks] == ["res", "dropout", "ln"]
    assert [t.name for t in toks[0].inner] == ["conv", "bn", "relu"]
    assert toks[0].inner[1].params == {"eps": 1e-3, "momentum": 0.1}
    assert toks[0].inner[1].char == 21  # positions count in the whole spec
    assert toks[1].params == {"p": 0.5} and toks[2].params == {"eps": 2.5e-6}


# ---- shapes and fusion ------------------------------------------------------------------------
def test_the_example_spec_on_mnist_images():
    p = plan(EXAMPLE, (1, 28, 28), 10)
    assert kinds(p) == ["Conv2d", "MaxPool2d", "Conv2d", "MaxPool2d", "Flatten", "Dense",
                        "Dropout", "Dense"]
    assert shapes(p) == [(32, 28, 28), (32, 14, 14), (64, 14, 14), (64, 7, 7), (3136,), (128,),
                         (128,), (10,)]
    conv1, conv2, dense1 = p.entries[0][1], p.entries[2][1], p.entries[5][1]
    assert conv1 == {"in_channels": 1, "out_channels": 32, "kernel_size": 3, "stride": 1,
                     "padding": 1, "dilation": 1, "groups": 1, "bias": True,
                     "activation": "relu", "init": None}
    assert conv2["in_channels"] == 32 and conv2["activation"] == "relu"
    assert dense1["n_in"] == 3136 and dense1["activation"] == "relu"
    assert p.entries[-1][1]["activation"] == "identity"
    assert p.entries[1][1] == {"kernel_size": 2, "stride": 2, "padding": 0, "dilation": 1}
    assert p.output_shape == (10,)
    assert "Conv2d(1,32,3,padding=1,relu) 32x28x28" in p.summary()


def test_output_sizes_follow_pytorch_floor_rules():
    p = plan("conv(4,3x5,stride=2,pad=1x2,dil=2)-avgpool(3,stride=2,pad=1)-maxpool(2,stride=1)-"
             "gap-dense(3)", (2, 17, 13), 3)
    # conv: H (17+2-2*2-1)//2+1 = 8, W (13+4-2*4-1)//2+1 = 5; avgpool: (8+2-3)//2+1 = 4,
    # (5+2-3)//2+1 = 3; maxpool 2 stride 1: 3x2 (as torch.nn gives)
    assert shapes(p)[:3] == [(4, 8, 5), (4, 4, 3), (4, 3, 2)]
    assert p.entries[0][1]["kernel_size"] == (3, 5) and p.entries[0][1]["padding"] == (1, 2)
    assert kinds(p)[3:] == ["GlobalAvgPool2d", "Dense"]


def test_dense_on_images_flattens_first_and_bn_ln_pick_their_form():
    p = plan("bn-ln-dense(6)-tanh-bn-ln-dense(classes)", (3, 4, 4), 5)
    assert kinds(p) == ["BatchNorm2d", "LayerNorm", "Flatten", "Dense", "BatchNorm1d",
                        "LayerNorm", "Dense"]
    assert p.entries[0][1]["num_features"] == 3
    assert p.entries[1][1]["normalized_shape"] == (3, 4, 4)
    assert p.entries[3][1] == {"n_in": 48, "n_out": 6, "activation": "tanh", "init": None}
    assert p.entries[4][1]["num_features"] == 6 and p.entries[5][1]["normalized_shape"] == 6
    assert p.entries[-1][1]["n_out"] == 5


@pytest.mark.parametrize("act", modelspec.ACTIVATIONS)
def test_every_activation_fuses_into_conv_and_dense(act):
    p = plan(f"conv(2,1)-{act}-flatten-dense(3)-{act}-dense(2)", (1, 2, 2), 2)
    assert p.entries[0][1]["activation"] == act and p.entries[2][1]["activation"] == act
    assert len(p.entries) == 4


def test_conv_options_and_groups():
    p = plan("conv(8,3,groups=2,bias=false,init=xavier)-gap-dense(2)", (4, 5, 5), 2)
    kw = p.entries[0][1]
    assert kw["groups"] == 2 and kw["bias"] is False and kw["init"] == "xavier"


def test_residual_block_keeps_the_shape():
    p = plan("conv(8,3,pad=1)-res(conv(8,3,pad=1)-tanh-conv(8,3,pad=1))-gap-dense(2)", (1, 6, 6), 2)
    assert kinds(p) == ["Conv2d", "Residual", "GlobalAvgPool2d", "Dense"]
    inner = p.entries[1][1]["block"]
    assert [e[0] for e in inner] == ["Conv2d", "Conv2d"]
    assert inner[0][1]["activation"] == "tanh" and inner[1][1]["activation"] == "identity"


# ---- presets ----------------------------------------------------------------------------------
def test_mlp_preset_is_the_old_default_and_flattens_images():
    assert preset_spec("mlp", (64,)) == "dense(128)-relu-dense(64)-relu-dense(classes)"
    assert preset_spec("mlp", (1, 8, 8), hidden=[16], activation="tanh", init="lecun") == \
        "flatten-dense(16,init=lecun)-tanh-dense(classes,init=lecun)"
    assert preset_spec("mlp", (5,), hidden=[]) == "dense(classes)"
    p = plan("mlp", (64,), 10)
    assert [(e[1]["n_in"], e[1]["n_out"], e[1]["activation"]) for e in p.entries] == \
        [(64, 128, "relu"), (128, 64, "relu"), (64, 10, "identity")]
    assert kinds(plan("mlp", (1, 8, 8), 10))[0] == "Flatten"


def test_lenet5_preset_classic_on_28x28_and_adapted_to_8x8():
    p = plan("lenet5", (1, 28, 28), 10)
    assert p.spec == ("conv(6,5,pad=2)-relu-maxpool(2)-conv(16,5)-relu-maxpool(2)-flatten-"
                      "dense(120)-relu-dense(84)-relu-dense(classes)")
    assert shapes(p) == [(6, 28, 28), (6, 14, 14), (16, 10, 10), (16, 5, 5), (400,), (120,),
                         (84,), (10,)]
    small = plan("LeNet5".lower(), (1, 8, 8), 10)
    assert shapes(small)[:5] == [(6, 8, 8), (6, 4, 4), (16, 4, 4), (16, 2, 2), (64,)]
    assert plan("lenet5", (3, 32, 32), 7).entries[0][1]["in_channels"] == 3


def test_resnet_preset():
    p = plan("resnet", (1, 8, 8), 10)
    assert kinds(p).count("Residual") == 2
    assert kinds(p)[-2:] == ["GlobalAvgPool2d", "Dense"]
    assert p.entries[-1][1]["n_in"] == 32
    res = [e for e in p.entries if e[0] == "Residual"]
    assert [e[3] for e in res] == [(16, 8, 8), (32, 4, 4)]
    block = [e[0] for e in res[0][1]["block"]]
    assert block.count("Conv2d") == 2 and block.count("BatchNorm2d") == 2
    assert block == ["Conv2d", "BatchNorm2d", "Conv2d", "BatchNorm2d"]  # bn-relu: one layer
    assert [e[1]["activation"] for e in res[0][1]["block"]] == ["identity", "relu", "identity",
                                                               "identity"]
    after = kinds(p)[kinds(p).index("Residual") + 1]
    assert after == "Activation"  # a relu after the sum


@pytest.mark.parametrize("name", ["lenet5", "resnet"])
def test_image_presets_refuse_feature_vectors(name):
    with pytest.raises(SpecError, match=f"the {name} preset needs image data"):
        plan(name, (64,), 10)


# ---- errors: token, number and character ------------------------------------------------------
ERRORS = [
    ("conv(32,x)", r"token 1 'conv\(32,x\)' at character 1: k: expected an integer or HxW, got 'x'"),
    ("conv(8,3)-relux-flatten-dense(10)", r"token 2 'relux' at character 11: unknown layer "
                                          r"'relux'.*did you mean relu"),
    ("conv(8,3", r"token 1 'conv\(8,3' at character 1: expected '\)' to close the '\(' at "
                 r"character 5"),
    ("conv(8,3)--dense(10)", r"token 2 at character 11: expected a layer name .* got '-'"),
    ("dense(10)-maxpool(2)", r"token 2 'maxpool\(2\)' at character 11: needs image input"),
    # Shape rules are the layers' own (their words, with where the token is).
    ("conv(3,9)-flatten-dense(10)", r"token 1 'conv\(3,9\)' at character 1: kernel 9x9 larger "
                                    r"than the padded input 8x8 \(input shape \(1, 8, 8\)"),
    ("flatten-dense(5)", r"token 2 'dense\(5\)' at character 9: the model ends with 5 outputs but "
                         r"the data has 10 classes"),
    ("conv(8,3)", r"token 1 'conv\(8,3\)' at character 1: the model's output is 8x6x6 per sample"),
    ("dense(10,foo=1)", r"token 1 'dense\(10,foo=1\)' at character 1: unknown argument 'foo'"),
    ("dense(10,n=3)", r"argument 'n' given twice"),
    ("conv(8,3,pad=1,2)-gap-dense(10)", r"positional argument '2' after a keyword argument"),
    ("conv(8,3,1)-gap-dense(10)", r"expected at most 2 positional arguments \(out, k\), got 3"),
    ("dense()", r"token 1 'dense\(\)' at character 1: missing argument 'n'"),
    ("dropout(1.5)-dense(10)", r"p: expected a probability in \[0, 1\), got '1.5'"),
    ("conv(8,3) x", r"token 1 'conv\(8,3\)' at character 1: expected '-' between tokens, got 'x' "
                    r"at character 11"),
    ("flatten-dense(10)-", r"token 3 at character 19: expected a layer name .* the end of the spec"),
    ("res(dense(5))-dense(10)", r"token 1 'res\(dense\(5\)\)' at character 1: the residual block "
                                r"maps 1x8x8 to 5 features"),
    ("res-dense(10)", r"token 1 'res' at character 1: expected a block in parentheses"),
    ("relu(2)-dense(10)", r"token 1 'relu\(2\)' at character 1: relu takes no arguments"),
    ("conv(6,3,groups=4)-gap-dense(10)", r"token 1 'conv\(6,3,groups=4\)' at character 1: groups: "
                                         r"expected a divisor of in_channels \(1\)"),
    ("maxpool(2,pad=2)-dense(10)", r"token 1 'maxpool\(2,pad=2\)' at character 1: padding: expected "
                                   r"at most half the kernel size 2"),
    ("conv(2,3)-conv(4,3)-conv(4,3)-conv(4,3)-dense(10)",
     r"token 4 'conv\(4,3\)' at character 31: kernel 3x3 larger than the padded input 2x2"),
    ("conv(8,3,bias=maybe)-gap-dense(10)", r"bias: expected true or false, got 'maybe'"),
    ("dense(10,init=zeros)", r"init: expected one of he, xavier, lecun, normal, got 'zeros'"),
    ("conv(0,3)-gap-dense(10)", r"out: expected a positive value, got '0'"),
    ("", r"model: expected a spec like"),
    ("flatten-dense(10,)", r"token 2 'dense\(10,\)' at character 9: empty argument at "
                           r"character 18"),
]


@pytest.mark.parametrize("spec,match", ERRORS, ids=[e[0] or "empty" for e in ERRORS])
def test_errors_name_the_token_and_position(spec, match):
    with pytest.raises(SpecError, match=match) as info:
        plan(spec, (1, 8, 8), 10)
    assert str(info.value).startswith("model: ")
    assert "\n" not in str(info.value)
    assert isinstance(info.value, ValueError)


def test_activation_not_after_conv_or_dense():
    spec = "flatten-relu-dense(10)"
    assert kinds(plan(spec, (1, 8, 8), 10)) == ["Flatten", "Activation", "Dense"]


def test_a_second_activation_does_not_fuse_twice():
    spec = "flatten-dense(4)-relu-tanh-dense(10)"
    assert kinds(plan(spec, (1, 8, 8), 10)) == ["Flatten", "Dense", "Activation", "Dense"]


def test_bad_input_shapes():
    with pytest.raises(SpecError, match="expected samples of shape"):
        plan("mlp", (2, 3, 4, 5), 10)
    with pytest.raises(SpecError, match="expected samples of shape"):
        plan("mlp", (0,), 10)
    with pytest.raises(SpecError, match="unknown preset|unknown layer"):
        plan("vgg16", (1, 8, 8), 10)


# ---- recurrent models ---------------------------------------------------------------------------
def test_recurrent_tokens_on_sequences():
    p = plan("gru(16,layers=2)-last-dense(classes)", (5, 3), 4)
    assert kinds(p) == ["GRU", "LastStep", "Dense"]
    assert shapes(p) == [(5, 16), (16,), (4,)]
    assert p.entries[0][1] == {"input_size": 3, "hidden_size": 16, "num_layers": 2}
    p = plan("rnn(8,relu=true)-last-dense(3)", (5, 3), 3)
    assert p.entries[0][1]["nonlinearity"] == "relu"
    assert kinds(plan("lstm(4)-lstm(6)-last-dense(2)", (7, 3), 2)) == ["LSTM", "LSTM", "LastStep",
                                                                        "Dense"]


def test_one_channel_images_are_read_row_by_row_and_the_lstm_preset():
    p = plan("lstm", (1, 8, 8), 10)
    assert kinds(p) == ["Reshape", "LSTM", "LastStep", "Dense"]
    assert shapes(p) == [(8, 8), (8, 128), (128,), (10,)]


@pytest.mark.parametrize("spec,shape,match", [
    ("lstm(8)-last-dense(3)", (3, 8, 8), r"token 1 'lstm\(8\)' at character 1: needs sequences"),
    ("last-dense(3)", (12,), r"token 1 'last' at character 1: needs sequences"),
    ("lstm(8)", (5, 3), r"the model.s output is 5x8 per sample"),
    ("lstm(x)-last-dense(3)", (5, 3), r"h: expected an integer, got 'x'"),
])
def test_recurrent_errors(spec, shape, match):
    with pytest.raises(SpecError, match=match):
        plan(spec, shape, 3)


def test_an_lstm_spec_trains_on_digits_rows():
    from gpubackprop.training import train_step

    model, _ = modelspec.build_model("lstm(6)-last-dense(classes)", (1, 4, 3), 3, device="cpu",
                                     dtype="float64", seed=0, kernels="fused")
    rng = np.random.default_rng(0)
    X, y = rng.random((5, 1, 4, 3)), np.arange(5) % 3
    loss, opt = gb.SoftmaxCrossEntropy(), gb.Adam(lr=0.05)
    first = train_step(model, loss, opt, X, y)
    for _ in range(30):
        last = train_step(model, loss, opt, X, y)
    assert last < 0.5 * first


# ---- real layers ------------------------------------------------------------------------------
@pytest.mark.parametrize("spec", [EXAMPLE.replace("dense(10)", "dense(classes)"), "lenet5",
                                  "resnet", "mlp",
                                  "conv(4,3,pad=1)-tanh-avgpool(2)-bn-ln-dropout(0.2)-gap-dense(3)"
                                  "-gelu-dense(classes)"])
def test_built_models_run_forward_and_backward(spec):
    from gpubackprop.training import train_step

    model, p = modelspec.build_model(spec, (1, 8, 8), 4, device="cpu", dtype="float64", seed=0,
                                     kernels="reference")
    rng = np.random.default_rng(0)
    X = rng.random((5, 1, 8, 8))
    y = np.arange(5) % 4
    value = train_step(model, gb.SoftmaxCrossEntropy(), gb.SGD(lr=0.01), X, y)
    assert np.isfinite(value)
    assert model.predict(X).shape == (5, 4)
    assert len(model.layers) == len(p.entries)



@pytest.mark.parametrize("spec", ["flatten-dense(10)-", "conv(8,3)--dense(10)"],
                         ids=["end of the spec", "empty token"])
def test_expected_a_layer_name_lists_every_token_the_parser_takes(spec):
    """The list comes from the parser's own table: the recurrent layers and last are in it."""
    from gpubackprop.kernels.reference import ACTIVATIONS

    with pytest.raises(SpecError, match="expected a layer name") as info:
        parse(spec)
    listed = str(info.value).split("expected a layer name (")[1].split(")")[0].split(", ")
    assert {"lstm", "gru", "rnn", "last", "res"} <= set(listed)
    assert sorted(listed) == sorted((*modelspec.LAYER_TOKENS, "res", *ACTIVATIONS))
    for name in listed:  # and each one listed parses
        required = [v for v in modelspec.LAYER_TOKENS.get(name, ((), {}))[1].values()
                    if v is modelspec.REQUIRED]
        parse("res(relu)" if name == "res" else f"{name}({','.join('4' * len(required))})")


@pytest.mark.parametrize("name", [n for n, (_, kw) in modelspec.LAYER_TOKENS.items()
                                  if modelspec.REQUIRED in kw.values()])
def test_a_missing_argument_shows_an_example_for_every_token(name):
    with pytest.raises(SpecError, match=rf"token 1 '{name}\(\)' at character 1: missing argument "
                                        rf"'\w+'; e\.g\. {name}\(\d"):
        parse(f"{name}()")


def test_an_unknown_name_suggests_the_nearest_token():
    with pytest.raises(SpecError, match=r"unknown layer 'lstn'; .* \(did you mean lstm\?\)"):
        parse("lstn(8)-last-dense(2)")
    with pytest.raises(SpecError, match=r"did you mean relu\?"):
        parse("dense(8)-relux")


def test_bn_fuses_the_activation_after_it():
    """"bn-relu" is one BatchNorm (activation="relu"), as "conv-relu" is one Conv2d; only the
    token right after bn fuses, on images and on vectors."""
    p = plan("conv(4,3,pad=1)-bn-relu-relu-flatten-dense(6)-bn(momentum=0.2)-tanh-dense(classes)",
             (2, 5, 5), 3)
    assert kinds(p) == ["Conv2d", "BatchNorm2d", "Activation", "Flatten", "Dense", "BatchNorm1d",
                        "Dense"]
    assert p.entries[1][1] == {"num_features": 4, "eps": 1e-5, "momentum": 0.1,
                               "activation": "relu"}
    assert p.entries[5][1]["activation"] == "tanh" and p.entries[5][1]["momentum"] == 0.2
    layers = p.layers()
    assert repr(layers[1]) == "BatchNorm2d(4, activation='relu')"
    assert "BatchNorm2d(4,relu) 4x5x5" in p.summary()
    assert "BatchNorm1d(6,momentum=0.2,tanh) 6" in p.summary()
    assert kinds(plan("conv(4,3)-bn-flatten-dense(3)", (1, 5, 5), 3))[1] == "BatchNorm2d"
    assert plan("bn-flatten-dense(3)", (1, 5, 5), 3).entries[0][1]["activation"] == "identity"
