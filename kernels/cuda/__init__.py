"""Fused CUDA kernel set: each op of ``ReferenceOps`` as Numba CUDA kernels on CuPy arrays.

Kernel bodies are grid-stride loops (``cuda.grid(1)``, ``cuda.gridsize(1)``), so any launch size
is correct; launchers check dtype, shape and contiguity first (the simulator checks nothing), then
launch on CuPy's current stream. Numba's per-launch CUDA-array-interface sync is switched off in
one place (``backend.numba_cuda``), so nothing synchronises the host.

Each kernel is compiled with an explicit signature for the dtype it is first used with (float32 or
float64), on first use, so that importing this package costs no compilation and needs no GPU.
Constants are made in the array dtype (``X.dtype.type(c)``), since a Python float literal would
promote float32 math to float64; tests/test_cuda_compile.py compiles every kernel with the real
CUDA compiler and fails on float64 arithmetic in a float32 kernel that is not a named accumulator.

Under ``NUMBA_ENABLE_CUDASIM=1`` the same kernels run in Numba's simulator on NumPy arrays.
"""

from gpubackprop.kernels.cuda.attention import AttentionOps
from gpubackprop.kernels.cuda.conv import ConvOps
from gpubackprop.kernels.cuda.dense import DenseOps
from gpubackprop.kernels.cuda.dropout import DropoutOps
from gpubackprop.kernels.cuda.embedding import EmbeddingOps
from gpubackprop.kernels.cuda.launch import THREADS, Launcher
from gpubackprop.kernels.cuda.losses import LossOps
from gpubackprop.kernels.cuda.normalization import NormalizationOps
from gpubackprop.kernels.cuda.optimizers import OptimizerOps
from gpubackprop.kernels.cuda.pooling import PoolingOps
from gpubackprop.kernels.cuda.precision import PrecisionOps
from gpubackprop.kernels.cuda.recurrent import RecurrentOps
from gpubackprop.kernels.reference import ReferenceOps

__all__ = ["THREADS", "CudaOps"]


class CudaOps(DenseOps, LossOps, OptimizerOps, NormalizationOps, DropoutOps, ConvOps, PoolingOps,
              RecurrentOps, EmbeddingOps, AttentionOps, PrecisionOps, Launcher, ReferenceOps):
    """The reference ops as fused Numba CUDA kernels (float32 and float64), on CuPy's stream."""

    name = "fused-cuda"

    def __init__(self, xp):
        Launcher.__init__(self, xp)

    def __repr__(self):
        where = ", simulator" if self.simulator else ""
        return f"{type(self).__name__}(xp={self.xp.__name__}{where})"
