"""Layers, one module per family, all written to the protocol in ``gpubackprop.layers.base``.

Every module of this package is imported here, and each registers its layer classes and their
model-spec tokens with ``gpubackprop.layers.registry``; ``LAYER_TYPES`` (type name -> class) is the
registry's, which checkpoints rebuild models from, and ``LAYERS`` the classes exported as
``gpubackprop.<Name>`` and from here. A new layer is therefore one module (plus its kernels).
"""

import importlib
import pkgutil

from gpubackprop.layers.base import Layer, ModelContext
from gpubackprop.layers.dense import INITS, init_weights
from gpubackprop.layers.graph import GraphModel, Input, SymbolicTensor
from gpubackprop.layers.model import LayerShapeError, Model
from gpubackprop.layers.registry import LAYER_TYPES, SPEC_TOKENS

for _module in pkgutil.iter_modules(__path__):  # each registers its layers as it is imported
    importlib.import_module(f"{__name__}.{_module.name}")

# By class name ("Model" is the functional graph's type name; gb.Model stays the base class).
LAYERS = {cls.__name__: cls for cls in LAYER_TYPES.values() if cls is not GraphModel}
globals().update(LAYERS)

__all__ = [*LAYERS, "GraphModel", "INITS", "Input", "LAYERS", "LAYER_TYPES", "Layer",
           "LayerShapeError", "Model", "ModelContext", "SPEC_TOKENS", "SymbolicTensor",
           "init_weights"]
