"""The mixed-precision GEMM on a GPU: 16-bit inputs, float32 output and float32 accumulation on
tensor cores (cuBLAS ``cublasGemmEx`` / ``cublasGemmStridedBatchedEx`` with CUDA_R_16F or
CUDA_R_16BF operands, CUDA_R_32F C and CUBLAS_COMPUTE_32F), through nvmath-python's bindings.

Why not ``cupy.matmul`` on float16 arrays: CuPy's matmul writes C in its inputs' dtype (a float16
Z, where the bias+activation wants float32 to round once), CuPy has no bfloat16 dtype (our bf16 is
uint16 bits, which CuPy would multiply as integers), and CuPy's cuBLAS wrappers raise inside a CUDA
graph capture (kernels/cuda/cublas.py). CuPy's own compute-type switch
(``cupy._core._routines_linalg``: COMPUTE_TYPE_DEFAULT/PEDANTIC/FP16/FP32/TF32, ``CUPY_TF32``)
picks the accumulation of a float16 GEMM, not its output type. So the GEMM is called directly,
with the row-major -> column-major mapping of ``cublas.gemm_calls``.

An operand is either 16-bit storage (float16, or uint16 holding bfloat16 bits: what Dense keeps
on the CUDA set, its activations, Δ and the model's 16-bit weight copy), read as it is, or a
float32 array holding 16-bit values (a float32 input reaching a 16-bit Dense), cast to a 16-bit scratch
copy first (exact: the values are already 16-bit) in its own layout (a transposed view stays a
transposed view: ``op T``) by the CUDA set's ``cast16``. C is float32, or 16-bit storage (Dense's
BP2 GEMM feeding the layer below: cuBLAS rounds the float32 accumulator once, to nearest even).

``Widened16Matmul`` is the same contract without GemmEx (Numba's simulator, a GPU without
nvmath-python): 16-bit operands widened exactly to float32, xp.matmul's float32 GEMM, a 16-bit C
cast from its float32 result: the same numbers, no tensor cores.
"""

import numpy as np

from gpubackprop.kernels.cuda.cublas import CublasMatmul, element_strides, gemm_calls

F32 = np.dtype(np.float32)
# cudaDataType_t and cublasComputeType_t / cublasGemmAlgo_t values (the CUDA headers'; nvmath's
# enums hold the same numbers, checked by tests/test_precision_gemm.py).
CUDA_R_32F, CUDA_R_16F, CUDA_R_16BF = 0, 2, 14
CUBLAS_COMPUTE_32F = 68
CUBLAS_GEMM_DEFAULT = -1
TYPE16 = {"fp16": CUDA_R_16F, "bf16": CUDA_R_16BF}
BINDINGS = {"gemm_ex": 19, "gemm_strided_batched_ex": 23}  # name -> arguments passed (tests)


def as16(xp, ops, a, precision, scratch):
    """A 16-bit storage copy of the float32 array ``a`` (holding 16-bit values), in a's layout
    where a or its last-two-axes transpose is C-contiguous (else a contiguous copy);
    ``scratch(shape)`` gives the buffer. A 16-bit storage ``a`` is returned as it is."""
    if a.dtype != F32:
        return a
    if a.flags.c_contiguous:
        return ops.cast16(a, scratch(a.shape), precision)
    t = a.swapaxes(-1, -2)
    if t.flags.c_contiguous:
        return ops.cast16(t, scratch(t.shape), precision).swapaxes(-1, -2)
    a = xp.ascontiguousarray(a)
    return ops.cast16(a, scratch(a.shape), precision)


class Matmul16(CublasMatmul):
    """``matmul(a, b, out)`` of float32 arrays holding 16-bit values, by cuBLAS GemmEx on 16-bit
    copies with float32 output and accumulation; other dtypes go to ``cupy.matmul``."""

    def __init__(self, cp, cublas, ops, precision):
        super().__init__(cp, cublas, tf32=False)
        if precision not in TYPE16:
            raise ValueError(f"precision: expected one of {tuple(TYPE16)}, got {precision!r}")
        self.ops, self.precision, self.type16 = ops, precision, TYPE16[precision]
        self.storage = np.dtype(np.float16 if precision == "fp16" else np.uint16)
        self._buffers = {}
        self._one, self._zero = np.ones(1, F32), np.zeros(1, F32)

    def _scratch(self, slot):
        def make(shape):
            key = (slot, tuple(shape))
            buf = self._buffers.get(key)
            if buf is None:
                if len(self._buffers) > 64:
                    self._buffers.clear()
                buf = self._buffers[key] = self.cp.empty(shape, self.storage)
            return buf
        return make

    def takes(self, *arrays):
        """Whether this GEMM handles these operands (float32 or this precision's 16-bit storage,
        at least 2-D); others go to ``cupy.matmul``."""
        return all(x is None or (x.ndim >= 2 and x.dtype in (F32, self.storage)) for x in arrays)

    def __call__(self, a, b, out=None):
        cp = self.cp
        if not self.takes(a, b, out):
            return cp.matmul(a, b, out=out)
        if out is None:
            shape = np.broadcast_shapes(a.shape[:-2], b.shape[:-2]) + (a.shape[-2], b.shape[-1])
            out = cp.empty(shape, F32)
        if out.size == 0:
            return out
        if a.shape[-1] == 0:
            out[...] = 0
            return out
        ctype, c_size = (CUDA_R_32F, 4) if out.dtype == F32 else (self.type16, 2)
        a16 = as16(cp, self.ops, a, self.precision, self._scratch("a"))
        b16 = as16(cp, self.ops, b, self.precision, self._scratch("b"))
        calls = gemm_calls(a16.shape, element_strides(a16), b16.shape, element_strides(b16),
                           out.shape, element_strides(out))
        if calls is None:  # broadcast batch strides gemm_calls cannot express: contiguous copies
            a16, b16 = cp.ascontiguousarray(a16), cp.ascontiguousarray(b16)
            calls = gemm_calls(a16.shape, element_strides(a16), b16.shape, element_strides(b16),
                               out.shape, element_strides(out))
        h = self.handle()
        c16 = self.cublas
        alpha, beta = self._one.ctypes.data, self._zero.ctypes.data  # pointer mode HOST
        pa, pb, pc, t = a16.data.ptr, b16.data.ptr, out.data.ptr, self.type16
        for c in calls:
            # cuBLAS's A is our b, its B our a (kernels/cuda/cublas.py's docstring).
            A, B, C = pb + 2 * c.a_offset, pa + 2 * c.b_offset, pc + c_size * c.c_offset
            if c.batch == 1:
                c16.gemm_ex(h, c.transa, c.transb, c.m, c.n, c.k, alpha, A, t, c.lda, B, t, c.ldb,
                            beta, C, ctype, c.ldc, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT)
            else:
                c16.gemm_strided_batched_ex(h, c.transa, c.transb, c.m, c.n, c.k, alpha, A, t,
                                            c.lda, c.stride_a, B, t, c.ldb, c.stride_b, beta, C,
                                            ctype, c.ldc, c.stride_c, c.batch,
                                            CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT)
        return out


class Widened16Matmul:
    """Matmul16's contract without GemmEx (the simulator, a GPU without nvmath-python): 16-bit
    storage operands widened exactly to float32 (``widen16``), xp.matmul's float32 GEMM, a 16-bit
    ``out`` cast from the float32 product (``cast16``); float32 operands go to xp.matmul as they
    are. The buffers are kept per shape, so a step allocates nothing after the first."""

    def __init__(self, xp, ops, precision):
        if precision not in TYPE16:
            raise ValueError(f"precision: expected one of {tuple(TYPE16)}, got {precision!r}")
        self.xp, self.ops, self.precision = xp, ops, precision
        self.storage = np.dtype(np.float16 if precision == "fp16" else np.uint16)
        self._buffers = {}
        self.__name__ = "matmul"  # as xp.matmul (the graph tests' capture names the GEMM)

    def _buffer(self, slot, shape):
        key = (slot, tuple(shape))
        buf = self._buffers.get(key)
        if buf is None:
            if len(self._buffers) > 64:
                self._buffers.clear()
            buf = self._buffers[key] = self.xp.empty(shape, F32)
        return buf

    def _widened(self, slot, a):
        if a.dtype != self.storage:
            return a
        if a.flags.c_contiguous:
            return self.ops.widen16(a, self._buffer(slot, a.shape), self.precision)
        t = a.swapaxes(-1, -2)  # a transposed view (W.T, Δᵀ): widen its contiguous base
        if t.flags.c_contiguous:
            return self.ops.widen16(t, self._buffer(slot, t.shape), self.precision).swapaxes(-1, -2)
        a = self.xp.ascontiguousarray(a)
        return self.ops.widen16(a, self._buffer(slot, a.shape), self.precision)

    def __call__(self, a, b, out=None):
        xp = self.xp
        a32, b32 = self._widened("a", a), self._widened("b", b)
        if out is None or out.dtype != self.storage:
            return xp.matmul(a32, b32, out=out)
        c32 = self._buffer("c", out.shape)
        xp.matmul(a32, b32, out=c32)
        return self.ops.cast16(c32, out, self.precision)
