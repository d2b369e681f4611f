"""gpubackprop: backpropagation, batched and fast, on an NVIDIA GPU or the CPU, same code on both."""

from gpubackprop.backend import Backend
from gpubackprop.gradcheck import gradcheck
from gpubackprop.layers import (
    GRU,
    LSTM,
    RNN,
    Activation,
    Add,
    AvgPool2d,
    BatchNorm1d,
    BatchNorm2d,
    Concatenate,
    Conv2d,
    Dense,
    Dropout,
    Flatten,
    GlobalAvgPool2d,
    Input,
    LastStep,
    LayerNorm,
    MaxPool2d,
    Model,
    Reshape,
    Residual,
    Sequential,
)
from gpubackprop.losses import MSE, BinaryCrossEntropy, MultiLoss, SoftmaxCrossEntropy
from gpubackprop.optimizers import SGD, Adam, AdamW, RMSprop
from gpubackprop.state_dict import renumber_state_dict
from gpubackprop.training import evaluate, fit, predict, train_step

__version__ = "0.1.0"

__all__ = [
    "Backend", "Dense", "Activation", "Conv2d", "MaxPool2d", "AvgPool2d", "GlobalAvgPool2d", "Flatten",
    "BatchNorm1d", "BatchNorm2d", "LayerNorm", "Dropout", "RNN", "LSTM", "GRU", "LastStep",
    "Reshape", "Residual", "Sequential", "Model", "Input", "Add", "Concatenate", "MSE", "MultiLoss",
    "SoftmaxCrossEntropy", "BinaryCrossEntropy", "SGD", "RMSprop", "Adam", "AdamW", "train_step",
    "fit", "evaluate", "predict", "gradcheck", "renumber_state_dict", "__version__",
]
