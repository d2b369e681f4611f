"""Row-major GEMMs through cuBLAS (nvmath-python's bindings), callable during CUDA graph capture.

CuPy's cuBLAS wrappers raise while a stream captures (CuPy issue 6290: its handle setup and
pointer-mode switches are not capture-safe), so the GEMMs of a captured step call cuBLAS through
``nvmath.bindings.cublas`` (NVIDIA's maintained bindings): one handle per stream, bound to it with
``cublasSetStream`` and given a fixed workspace with ``cublasSetWorkspace`` before any capture (a
handle without one would allocate during capture), pointer mode HOST (alpha = 1 and beta = 0 are
read when the call is made, which the graph records by value), and no TF32 unless the user asked
for it (``backend.tf32_enabled``), as CuPy's matmul.

The row-major -> column-major mapping (``gemm_calls``, pure Python, tested on the CPU by
``emulate``): cuBLAS computes C' = op(A')·op(B') on column-major matrices. A row-major C (m × n,
row stride ldc) is, read column-major, Cᵀ (n × m, leading dimension ldc); and Cᵀ = Bᵀ·Aᵀ. So the
call is cuBLAS(A' = our B, B' = our A, m' = n, n' = m, k' = k). A row-major operand X (r × c, row
stride s) read column-major is Xᵀ with ld = s, which is exactly the factor Cᵀ = Bᵀ·Aᵀ wants: op N.
A transposed view (column stride s, unit row stride: X = Yᵀ of a row-major Y) read column-major
is X itself with ld = s, so it needs op T. Anything else (a non-unit inner stride) is copied to a
contiguous array first. Leading batch axes (numpy's matmul broadcasting) become one strided-batched
call over the longest run of batch axes that collapses to one stride per operand (a broadcast axis
has stride 0), and a host loop over the rest (a handful of calls: the conv's samples).
"""

import math
from typing import NamedTuple

import numpy as np

OP_N, OP_T = 0, 1  # cublasOperation_t: CUBLAS_OP_N, CUBLAS_OP_T
WORKSPACE_BYTES = 32 << 20  # cuBLAS's recommendation for Hopper (4 MiB suffices before it)


class GemmCall(NamedTuple):
    """One cuBLAS (strided-batched) GEMM, in cuBLAS's own terms: its A is our right operand.
    Offsets and strides count elements; ``batch`` 1 means a plain gemm."""

    transa: int
    transb: int
    m: int
    n: int
    k: int
    lda: int
    ldb: int
    ldc: int
    a_offset: int
    b_offset: int
    c_offset: int
    batch: int
    stride_a: int
    stride_b: int
    stride_c: int


def _operand(rows, cols, strides):
    """(op, ld) of a matrix (rows × cols, element strides) as cuBLAS's factor of Cᵀ = Bᵀ·Aᵀ;
    None when neither of its strides is 1 (it must be copied). A stride along an axis of size 1
    is never used, so such an axis takes whatever layout works."""
    s0, s1 = strides
    if s1 == 1 or cols == 1:  # row-major: read column-major it is Xᵀ (cols × rows), ld >= cols
        ld = s0 if rows > 1 else max(cols, 1)
        if ld >= max(cols, 1):
            return OP_N, ld
    if s0 == 1 or rows == 1:  # column-major (a transposed view): X itself, ld >= rows
        ld = s1 if cols > 1 else max(rows, 1)
        if ld >= max(rows, 1):
            return OP_T, ld
    return None


def _collapse(sizes, strides):
    """One stride for a run of batch axes (outer first) read as one flat index, or None."""
    s = None
    span = 1
    for size, st in zip(reversed(sizes), reversed(strides), strict=True):
        if size == 1:
            span *= size
            continue
        if s is None:
            s = st // span if span else st
            if st != s * span:
                return None
        elif st != s * span:
            return None
        span *= size
    return 0 if s is None else s


def gemm_calls(a_shape, a_strides, b_shape, b_strides, c_shape, c_strides):
    """The cuBLAS calls computing C = A @ B (numpy matmul semantics, batch axes broadcast) on
    arrays given by shape and element strides; None when an operand needs a copy first.

    A is (..., m, k), B (..., k, n), C (..., m, n) with C's matrices row-major (unit column
    stride). Returns a list of ``GemmCall``."""
    if len(a_shape) < 2 or len(b_shape) < 2:
        raise ValueError(f"a, b: expected arrays of 2 or more axes, got shapes {tuple(a_shape)} "
                         f"and {tuple(b_shape)}")
    m, k = a_shape[-2:]
    k2, n = b_shape[-2:]
    batch = tuple(c_shape[:-2])
    if k2 != k or tuple(c_shape[-2:]) != (m, n):
        raise ValueError(f"out: expected shape (..., {m}, {n}) for a {tuple(a_shape)} @ "
                         f"{tuple(b_shape)} product, got {tuple(c_shape)}")
    nb = len(batch)

    def batch_strides(shape, strides, name):
        lead = tuple(shape[:-2])
        if len(lead) > nb:
            raise ValueError(f"{name}: {len(lead)} batch axes, more than out's {nb}")
        lead = (1,) * (nb - len(lead)) + lead
        st = (0,) * (nb - len(strides[:-2])) + tuple(strides[:-2])
        out = []
        for size, bsize, s in zip(lead, batch, st, strict=True):
            if size not in (1, bsize):
                raise ValueError(f"{name}: batch shape {tuple(shape[:-2])} does not broadcast to "
                                 f"{batch}")
            out.append(0 if size == 1 else s)
        return out

    sa, sb, sc = (batch_strides(a_shape, a_strides, "a"), batch_strides(b_shape, b_strides, "b"),
                  list(c_strides[:-2]))
    # C's matrices: row-major with unit column stride (an out= array of the layers: contiguous).
    if n > 1 and c_strides[-1] != 1:
        return None
    ldc = c_strides[-2] if m > 1 else max(n, 1)
    if ldc < max(n, 1):
        return None
    opb = _operand(k, n, b_strides[-2:])  # cuBLAS's A
    opa = _operand(m, k, a_strides[-2:])  # cuBLAS's B
    if opa is None or opb is None:
        return None
    # The longest run of inner batch axes that collapses to one stride in every operand.
    split = nb
    for i in range(nb + 1):
        parts = [_collapse(batch[i:], s[i:]) for s in (sa, sb, sc)]
        if all(p is not None for p in parts):
            split = i
            break
    inner = math.prod(batch[split:])
    ia, ib, ic = (_collapse(batch[split:], s[split:]) for s in (sa, sb, sc))
    calls = []
    for outer in np.ndindex(*batch[:split]):
        oa = sum(i * s for i, s in zip(outer, sa, strict=False))
        ob = sum(i * s for i, s in zip(outer, sb, strict=False))
        oc = sum(i * s for i, s in zip(outer, sc, strict=False))
        calls.append(GemmCall(opb[0], opa[0], n, m, k, opb[1], opa[1], ldc, ob, oa, oc, inner,
                              ib, ia, ic))
    return calls


def emulate(call, a_flat, b_flat, c_flat):
    """What cuBLAS does for one ``GemmCall`` on flat element buffers (a model for tests):
    column-major C' = op(A')·op(B') for each of the batch, A' read from ``a_flat`` (cuBLAS's A,
    our B), B' from ``b_flat``."""
    def matrix(buf, offset, op, rows, cols, ld):
        # op(X) is rows × cols; X is stored column-major: X[i, j] at offset + i + j·ld.
        r, c = (rows, cols) if op == OP_N else (cols, rows)
        i, j = np.meshgrid(np.arange(r), np.arange(c), indexing="ij")
        x = buf[offset + i + j * ld]
        return x if op == OP_N else x.T

    for t in range(call.batch):
        A = matrix(a_flat, call.a_offset + t * call.stride_a, call.transa, call.m, call.k,
                   call.lda)
        B = matrix(b_flat, call.b_offset + t * call.stride_b, call.transb, call.k, call.n,
                   call.ldb)
        i, j = np.meshgrid(np.arange(call.m), np.arange(call.n), indexing="ij")
        c_flat[call.c_offset + t * call.stride_c + i + j * call.ldc] = A @ B


def element_strides(a):
    """An array's strides in elements (its byte strides divided by the item size)."""
    return tuple(s // a.itemsize for s in a.strides)


# ---- on a GPU: handles, workspace and the calls --------------------------------------------------
_GEMM = {np.dtype(np.float32): ("sgemm", "sgemm_strided_batched"),
         np.dtype(np.float64): ("dgemm", "dgemm_strided_batched")}
BINDINGS = {  # name -> the number of arguments this module passes (tests check nvmath's)
    "create": 0, "destroy": 1, "set_stream": 2, "set_workspace": 3, "set_pointer_mode": 2, "set_math_mode": 2,
    "sgemm": 14, "dgemm": 14, "sgemm_strided_batched": 18, "dgemm_strided_batched": 18,
}


class CublasMatmul:
    """``matmul(a, b, out)`` (numpy semantics, ``out`` C-contiguous) by cuBLAS on CuPy's current
    stream: a handle and a fixed workspace per stream, made on first use there (outside capture:
    the warm-up steps), then only the GEMM calls, which stream capture records."""

    def __init__(self, cp, cublas, tf32=False):
        self.cp, self.cublas, self.tf32 = cp, cublas, bool(tf32)
        self._handles = {}  # stream pointer -> (handle, workspace array kept alive)
        self._alpha = {dt: np.ones(1, dt) for dt in _GEMM}
        self._beta = {dt: np.zeros(1, dt) for dt in _GEMM}

    def handle(self):
        """The current stream's handle (created, bound and given its workspace on first use)."""
        ptr = self.cp.cuda.get_current_stream().ptr
        entry = self._handles.get(ptr)
        if entry is None:
            if self.cp.cuda.get_current_stream().is_capturing():
                raise RuntimeError("cuBLAS: no handle for this stream yet; run one eager step on "
                                   "it before capturing (the handle's workspace is allocated "
                                   "then)")
            c = self.cublas
            h = c.create()
            c.set_stream(h, ptr)
            ws = self.cp.empty(WORKSPACE_BYTES, np.uint8)
            c.set_workspace(h, ws.data.ptr, WORKSPACE_BYTES)
            c.set_pointer_mode(h, int(c.PointerMode.HOST))
            c.set_math_mode(h, int(c.Math.TF32_TENSOR_OP_MATH if self.tf32 else
                                   c.Math.DEFAULT_MATH))
            entry = self._handles[ptr] = (h, ws)
        return entry[0]

    def close(self):
        """Destroy the handles (cublasDestroy waits for their work); their workspaces go with them."""
        for h, _ in self._handles.values():
            self.cublas.destroy(h)
        self._handles.clear()

    def __call__(self, a, b, out=None):
        cp = self.cp
        dt = a.dtype
        if a.ndim < 2 or b.ndim < 2 or dt not in _GEMM or b.dtype != dt \
                or (out is not None and out.dtype != dt):
            return cp.matmul(a, b, out=out)  # other dtypes: CuPy (never in a captured float step)
        if out is None:
            shape = np.broadcast_shapes(a.shape[:-2], b.shape[:-2]) + (a.shape[-2], b.shape[-1])
            out = cp.empty(shape, dt)
        calls = gemm_calls(a.shape, element_strides(a), b.shape, element_strides(b), out.shape,
                           element_strides(out))
        if calls is None:  # a strided operand: contiguous copies (a copy kernel, capturable)
            a, b = cp.ascontiguousarray(a), cp.ascontiguousarray(b)
            calls = gemm_calls(a.shape, element_strides(a), b.shape, element_strides(b),
                               out.shape, element_strides(out))
        if out.size == 0:
            return out
        if a.shape[-1] == 0:
            out[...] = 0
            return out
        h = self.handle()
        single, batched = (getattr(self.cublas, name) for name in _GEMM[dt])
        size = dt.itemsize
        alpha, beta = self._alpha[dt].ctypes.data, self._beta[dt].ctypes.data
        pa, pb, pc = a.data.ptr, b.data.ptr, out.data.ptr
        for c in calls:
            # cuBLAS's A is our b, its B our a (see the module docstring).
            A, B, C = pb + c.a_offset * size, pa + c.b_offset * size, pc + c.c_offset * size
            if c.batch == 1:
                single(h, c.transa, c.transb, c.m, c.n, c.k, alpha, A, c.lda, B, c.ldb, beta, C,
                       c.ldc)
            else:
                batched(h, c.transa, c.transb, c.m, c.n, c.k, alpha, A, c.lda, c.stride_a, B,
                        c.ldb, c.stride_b, beta, C, c.ldc, c.stride_c, c.batch)
        return out
