"""Fused CPU kernel set: each op of ``ReferenceOps`` as one Numba ``njit`` pass over memory.

Every kernel computes in the dtype of its arrays, as the reference does: constants are made with
``X.dtype.type(c)`` (a bare Python float would promote float32 math to float64), and scalar
hyperparameters arrive as float64 and are rounded to the array dtype once, which is what NumPy
does with a Python scalar and a float32 array. Reductions accumulate in float64 (a little more
accurate than the reference, well within its tolerance) in a fixed order, so results do not depend
on the thread count. No ``fastmath``: it would let LLVM assume there are no NaNs. Every kernel
uses ``error_model="numpy"``: with Python's error model each float division carries a
ZeroDivisionError check that keeps LLVM from vectorizing the loop (Adam's update ran 8x slower).
In float32, exp and tanh are straight-line polynomial code (``_expf``, ``_tanh``) rather than
libm's scalar calls, for the same reason.

Each op has a serial kernel and a ``parallel=True`` one over fixed chunks; the launcher takes the
parallel one only above a size where it pays (a parallel region costs several µs to start).
Kernels compile on first use per dtype and are cached on disk (``cache=True``).
"""

import numba
import numpy as np

from gpubackprop.kernels.cpu.attention import AttentionOps
from gpubackprop.kernels.cpu.conv import ConvOps
from gpubackprop.kernels.cpu.dense import GELU, GELU_TANH, SIGMOID, TANH, DenseOps
from gpubackprop.kernels.cpu.direct_conv import DirectConvOps
from gpubackprop.kernels.cpu.dropout import DropoutOps
from gpubackprop.kernels.cpu.embedding import EmbeddingOps
from gpubackprop.kernels.cpu.losses import LossOps
from gpubackprop.kernels.cpu.normalization import NormalizationOps
from gpubackprop.kernels.cpu.optimizers import OptimizerOps
from gpubackprop.kernels.cpu.pooling import PoolingOps
from gpubackprop.kernels.cpu.precision import PrecisionOps
from gpubackprop.kernels.cpu.recurrent import RecurrentOps
from gpubackprop.kernels.cpu.winograd import WinogradOps
from gpubackprop.kernels.reference import ACTIVATIONS, ReferenceOps

__all__ = ["PAR_MIN_CHEAP", "PAR_MIN_TRANSCENDENTAL", "CpuOps"]

# Element counts from which a parallel kernel runs. In a training step these ops sit between GEMMs,
# and BLAS's threads keep spinning on the cores for a while after each GEMM: a parallel region
# there fights them (measured: a parallel SGD update made the whole L step, 784-1024-1024-10 at
# B=256, 1.34x slower on 2 cores), while a memory-bound op gains < 2x even on free cores. So the
# parallel kernels are for very large arrays only; ``CpuOps(parallel_min=...)`` overrides both,
# NUMBA_NUM_THREADS=1 switches them off.
PAR_MIN_CHEAP = 1 << 24
PAR_MIN_TRANSCENDENTAL = 1 << 22


class CpuOps(DenseOps, LossOps, OptimizerOps, ConvOps, PoolingOps, RecurrentOps, NormalizationOps,
             DropoutOps, EmbeddingOps, AttentionOps, WinogradOps, DirectConvOps, PrecisionOps,
             ReferenceOps):
    """The reference ops as fused Numba CPU kernels (float32 and float64)."""

    name = "fused-cpu"

    def __init__(self, xp=np, num_threads=None, parallel_min=None):
        """``num_threads``: chunks of a parallel kernel (default: Numba's thread count);
        ``parallel_min``: element count from which parallel kernels run (default: measured
        thresholds; 0 forces them, as the tests and ``warm_up`` do)."""
        if xp is not np:
            raise TypeError(f"xp: expected numpy for the fused CPU kernels, got {xp.__name__}")
        super().__init__(xp)
        self.nchunks = int(num_threads or numba.get_num_threads())
        self.parallel = self.nchunks > 1 or parallel_min == 0
        if parallel_min is None:
            self.par_cheap, self.par_transcendental = PAR_MIN_CHEAP, PAR_MIN_TRANSCENDENTAL
        else:
            self.par_cheap = self.par_transcendental = int(parallel_min)
        self.par_by_act = tuple(self.par_transcendental if a in (SIGMOID, TANH, GELU, GELU_TANH)
                                else self.par_cheap for a in range(len(ACTIVATIONS)))

    def warm_up(self, dtype="float32", every=True):
        """Compile (or load from Numba's cache) the kernels, serial and parallel, for ``dtype``:
        every op, or only the MLP ops (dense, loss, optimizers)."""
        from gpubackprop.kernels.info import run_every_op, run_mlp_ops

        run = run_every_op if every else run_mlp_ops
        run(self, dtype)
        run(CpuOps(np, num_threads=2, parallel_min=0), dtype)
