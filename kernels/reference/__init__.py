"""Reference kernel set: every fused op written as the plain, unfused xp (NumPy/CuPy) expression.

This is the math in one place. The fused sets (``kernels/cpu``, ``kernels/cuda``) override these ops with
one-pass kernels and are tested against them. Every op works for float32 and float64 arrays and
writes into the ``out`` buffers it is given (the callers own and reuse them).

Conventions shared by all kernel sets:
- ``activation`` is one of ``ACTIVATIONS``; ``saved`` is what the forward pass kept for the
  backward pass: the output A for every activation except the gelus, whose derivatives need Z.
- ``scale`` is a 1-element device array holding the gradient-clipping factor, so clipping needs
  no host synchronisation.
- ``labels`` is a 1-D integer device array already checked on the host to lie in [0, C).

Each set is a package with one module per family of ops (``dense``, ``losses``, ``optimizers``,
...), the same module names in every set, so the three versions of an op sit side by side.
"""

from gpubackprop.kernels.reference.attention import AttentionOps
from gpubackprop.kernels.reference.conv import ConvOps
from gpubackprop.kernels.reference.dense import (
    ACTIVATIONS,
    GELU_C,
    GELU_K,
    LEAKY_SLOPE,
    DenseOps,
    saves_input,
)
from gpubackprop.kernels.reference.dropout import DropoutOps
from gpubackprop.kernels.reference.embedding import EmbeddingOps
from gpubackprop.kernels.reference.losses import LossOps
from gpubackprop.kernels.reference.normalization import NormalizationOps
from gpubackprop.kernels.reference.optimizers import OptimizerOps, adam_coefficients
from gpubackprop.kernels.reference.pooling import PoolingOps
from gpubackprop.kernels.reference.precision import PrecisionOps
from gpubackprop.kernels.reference.recurrent import RecurrentOps
from gpubackprop.kernels.reference.winograd import WinogradOps

__all__ = ["ACTIVATIONS", "GELU_C", "GELU_K", "LEAKY_SLOPE", "ReferenceOps", "adam_coefficients",
           "saves_input"]


class ReferenceOps(DenseOps, LossOps, OptimizerOps, ConvOps, PoolingOps, RecurrentOps,
                   NormalizationOps, DropoutOps, EmbeddingOps, AttentionOps, WinogradOps,
                   PrecisionOps):
    """The unfused xp expressions; the baseline the fused sets are checked and benchmarked against."""

    name = "reference"

    def __init__(self, xp):
        self.xp = xp

    def __repr__(self):
        return f"{type(self).__name__}(xp={self.xp.__name__})"
