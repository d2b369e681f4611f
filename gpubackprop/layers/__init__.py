"""Layers, one module per family, all written to the protocol in ``gpubackprop.layers.base``.

``LAYER_TYPES`` maps each layer type name to its class (``gpubackprop.layers.registry``, filled by
the modules' ``register`` calls): checkpoints rebuild a model from it.
"""

from gpubackprop.layers.base import Layer, ModelContext
from gpubackprop.layers.combinators import Residual, Sequential
from gpubackprop.layers.conv import Conv2d
from gpubackprop.layers.dense import INITS, Activation, Dense, Flatten, Reshape, init_weights
from gpubackprop.layers.dropout import Dropout
from gpubackprop.layers.graph import Add, Concatenate, GraphModel, Input, SymbolicTensor
from gpubackprop.layers.model import LayerShapeError, Model
from gpubackprop.layers.normalization import BatchNorm1d, BatchNorm2d, LayerNorm
from gpubackprop.layers.pooling import AvgPool2d, GlobalAvgPool2d, MaxPool2d
from gpubackprop.layers.recurrent import GRU, LSTM, RNN, LastStep
from gpubackprop.layers.registry import LAYER_TYPES, SPEC_TOKENS

__all__ = ["Activation", "Add", "Concatenate", "GRU", "GraphModel", "INITS", "Input", "LSTM", "RNN",
           "AvgPool2d", "BatchNorm1d", "BatchNorm2d", "Conv2d", "Dense", "Dropout", "Flatten",
           "LastStep", "GlobalAvgPool2d", "LAYER_TYPES", "Layer", "LayerNorm", "LayerShapeError",
           "MaxPool2d", "Model", "ModelContext", "SPEC_TOKENS", "Reshape", "Residual", "Sequential",
           "SymbolicTensor", "init_weights"]
