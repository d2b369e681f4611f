"""The layer registry: one declaration per layer class gives its checkpoint type, its gb.* export,
its model-spec token (parsed, built, errors with the token's position) and its --model help line."""

import inspect

import numpy as np
import pytest

import gpubackprop as gb
from gpubackprop import layers, modelspec
from gpubackprop.checkpoint import architecture, build_layer
from gpubackprop.cli.train import model_help
from gpubackprop.layers import registry
from gpubackprop.layers.base import Layer, no_backprop


class Scale(Layer):
    """Y = f·X on vectors: a layer written outside the package, registered as a new one would be."""

    def __init__(self, f=2.0):
        self.f = float(f)

    def __repr__(self):
        return f"Scale(f={self.f})"

    def config(self):
        return {"f": self.f}

    def infer_shape(self, input_shape):
        if len(input_shape) != 1:
            raise ValueError(f"expected feature vectors, got shape {input_shape}")
        return input_shape

    def forward(self, X, train=False, input_grad=True):
        Y = X * self.f
        if not train:
            return Y, no_backprop
        return Y, lambda dY: dY * self.f if input_grad else None


@pytest.fixture
def scale_registered():
    registry.register(Scale, registry.SpecToken(
        "scale", lambda ctx: [("Scale", {"f": ctx.params["f"]})], {"f": ("eps", 2.0)},
        positional=("f",), example="scale(0.5)", help="scale(f=2)    multiply by f"))
    yield
    del registry.LAYER_TYPES["Scale"], registry.SPEC_TOKENS["scale"]


def test_one_registration_gives_spec_token_checkpoint_and_help(scale_registered):
    p = modelspec.plan("dense(4)-scale(0.5)-dense(classes)", (6,), 3)
    assert [e[0] for e in p.entries] == ["Dense", "Scale", "Dense"] and p.entries[1][1] == {"f": 0.5}
    with pytest.raises(modelspec.SpecError, match=r"model: token 1 'scale' at character 1: expected "
                                                  r"feature vectors, got shape \(1, 4, 4\)"):
        modelspec.plan("scale-flatten-dense(3)", (1, 4, 4), 3)
    with pytest.raises(modelspec.SpecError, match=r"unknown argument 'g'; scale takes f"):
        modelspec.parse("scale(g=1)")
    assert "  scale(f=2)    multiply by f" in model_help()
    model, _ = modelspec.build_model("dense(4)-scale(0.5)-dense(classes)", (6,), 3, device="cpu",
                                     dtype="float64")
    desc = architecture(model)
    assert desc["layers"][1] == {"type": "Scale", "f": 0.5}
    assert architecture(build_layer(desc)) == desc
    again = gb.Sequential.from_config({k: v for k, v in desc.items() if k != "type"}, dtype="float64")
    X = np.random.default_rng(0).normal(size=(4, 6))
    again.set_params(model.get_params())
    np.testing.assert_array_equal(again.predict(X), model.predict(X))


def test_every_layer_class_of_the_package_is_registered_and_exported():
    """A layer class in gpubackprop/layers that is not registered would be missing from
    checkpoints and gb.*: each public Layer subclass there must be in the registry."""
    import importlib
    import pkgutil

    for info in pkgutil.iter_modules(layers.__path__):
        module = importlib.import_module(f"gpubackprop.layers.{info.name}")
        for name, cls in inspect.getmembers(module, inspect.isclass):
            if issubclass(cls, Layer) and cls.__module__ == module.__name__ \
                    and not name.startswith("_") and cls not in (Layer, gb.Model):
                assert registry.type_name(cls.__new__(cls)) in registry.LAYER_TYPES, name
    for name, cls in layers.LAYERS.items():
        assert getattr(gb, name) is cls and name in gb.__all__
    assert gb.Model is layers.Model and gb.Input is layers.Input


def test_registering_twice_is_an_error():
    with pytest.raises(ValueError, match="layer type 'Dense' registered twice"):
        registry.register(type("Dense", (Layer,), {}))
    with pytest.raises(ValueError, match="spec token 'dense' registered twice"):
        registry.register(gb.Dense, registry.SpecToken("dense", lambda ctx: []))
