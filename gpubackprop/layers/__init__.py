"""Layers, one module per family, all written to the protocol in ``gpubackprop.layers.base``.

``LAYER_TYPES`` maps each layer class name to its class: checkpoints rebuild a model from it.
"""

from gpubackprop.layers.base import Layer, ModelContext
from gpubackprop.layers.combinators import LayerShapeError, Residual, Sequential
from gpubackprop.layers.conv import Conv2d
from gpubackprop.layers.dense import INITS, Activation, Dense, Flatten, Reshape, init_weights
from gpubackprop.layers.dropout import Dropout
from gpubackprop.layers.normalization import BatchNorm1d, BatchNorm2d, LayerNorm
from gpubackprop.layers.pooling import AvgPool2d, GlobalAvgPool2d, MaxPool2d
from gpubackprop.layers.recurrent import GRU, LSTM, RNN, LastStep

__all__ = ["Activation", "GRU", "INITS", "LSTM", "RNN", "AvgPool2d", "BatchNorm1d", "BatchNorm2d",
           "Conv2d", "Dense",
           "Dropout", "Flatten", "LastStep", "GlobalAvgPool2d", "LAYER_TYPES", "Layer", "LayerNorm",
           "LayerShapeError", "MaxPool2d", "ModelContext", "Reshape", "Residual", "Sequential",
           "init_weights"]

LAYER_TYPES = {cls.__name__: cls for cls in (
    Dense, Activation, Flatten, Reshape, Conv2d, MaxPool2d, AvgPool2d, GlobalAvgPool2d, BatchNorm1d,
    BatchNorm2d,
    LayerNorm, Dropout, RNN, LSTM, GRU, LastStep, Residual, Sequential)}
