"""gpubackprop: backpropagation, batched and fast, on an NVIDIA GPU or the CPU, same code on both."""

from gpubackprop.backend import Backend
from gpubackprop.gradcheck import gradcheck
from gpubackprop.layers import LAYERS, Input, Model
from gpubackprop.losses import MSE, BinaryCrossEntropy, MultiLoss, SoftmaxCrossEntropy
from gpubackprop.optimizers import SGD, Adam, AdamW, RMSprop
from gpubackprop.precision import LossScaler
from gpubackprop.state_dict import renumber_state_dict
from gpubackprop.training import evaluate, fit, predict, train_step

__version__ = "0.1.0"

# The layers (gb.Dense, gb.Conv2d, ...) come from the layer registry: a module that registers a
# layer class exports it here too, without an edit to this file.
globals().update(LAYERS)

__all__ = [
    "Backend", *LAYERS, "Model", "Input", "MSE", "MultiLoss",
    "SoftmaxCrossEntropy", "BinaryCrossEntropy", "SGD", "RMSprop", "Adam", "AdamW", "LossScaler",
    "train_step",
    "fit", "evaluate", "predict", "gradcheck", "renumber_state_dict", "__version__",
]
