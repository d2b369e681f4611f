"""GEMM from compiled Numba code through NumPy's own OpenBLAS (CBLAS, 64-bit integers).

Numba's ``np.dot`` calls SciPy's BLAS (``scipy.linalg.cython_blas``). NumPy's wheels bundle a
newer OpenBLAS (``libscipy_openblas64_``), which on the 2-core AMD EPYC (Zen 4) VM runs the
recurrent layers' GEMMs faster on one thread, to the same bits (measured, float32, one BLAS thread,
interleaved minima; SciPy's OpenBLAS 0.3.30 against NumPy's 0.3.31):

    (1792x156)ᵀ (1792x512), the LSTM's weight gradient, a chunk    4.38 -> 3.34 ms
    28 x (64x512)(512x128), the LSTM's hidden gradient, a chunk    2.87 -> 2.60 ms
    28 x (64x128)(128x512), the LSTM's hidden GEMM, a chunk        2.87 -> 2.71 ms (W_hhᵀ C-contiguous;
                                                                   an F-contiguous one: 3.21 ms)

``gemm(A, B, out)`` is ``np.dot(A, B, out)`` for 2-D arrays of one float dtype, A and B each C- or
F-contiguous (a transposed view), out C-contiguous: one ``cblas_?gemm`` call (alpha 1, beta 0). The
library is found once, at import, among the BLAS libraries threadpoolctl sees, by its ILP64 CBLAS
symbols, and its functions are given to LLVM under fixed names, so that the kernels that call them
stay cacheable. Where there is none (another NumPy build), those names are Numba ``cfunc``s that
run ``np.dot`` (SciPy's BLAS, as before). ``BLAS_SOURCE`` says which.
"""

import ctypes
import threading

import llvmlite.binding as ll
import numpy as np
from llvmlite import ir
from numba import carray, cfunc, njit, types
from numba.extending import intrinsic, overload
from numba.np.numpy_support import as_dtype

# CBLAS enums (cblas.h).
ROW_MAJOR, NO_TRANS, TRANS = 101, 111, 112
_SYMBOLS = {np.float32: ("scipy_cblas_sgemm64_", "cblas_sgemm64_"),
            np.float64: ("scipy_cblas_dgemm64_", "cblas_dgemm64_")}
_NAMES = {np.float32: "gpubackprop_cblas_sgemm64", np.float64: "gpubackprop_cblas_dgemm64"}


def _signature(ftype):
    """cblas_?gemm(order, transA, transB, m, n, k, alpha, A, lda, B, ldb, beta, C, ldc) with 64-bit
    sizes; pointers passed as uintp (the same registers as a pointer)."""
    i32, i64, p = types.int32, types.int64, types.uintp
    return types.void(i32, i32, i32, i64, i64, i64, ftype, p, i64, p, i64, ftype, p, i64)


@intrinsic
def _as_pointer(typingctx, addr, dtype_of):
    """The address ``addr`` (uintp) as a pointer to the dtype of the array ``dtype_of``."""
    ptr = types.CPointer(dtype_of.dtype)

    def codegen(context, builder, signature, args):
        return builder.inttoptr(args[0], ir.PointerType(context.get_data_type(dtype_of.dtype)))

    return ptr(types.uintp, dtype_of), codegen


def _fallback(dtype):
    """A cfunc with cblas_?gemm's signature that runs np.dot, for the calls ``gemm`` makes (row
    major, alpha 1, beta 0, every leading dimension the matrix's own width)."""
    ftype = types.float32 if dtype == np.float32 else types.float64
    like = np.zeros((1, 1), dtype)

    @cfunc(_signature(ftype), cache=True, error_model="numpy")
    def fallback(order, ta, tb, m, n, k, alpha, A, lda, B, ldb, beta, C, ldc):
        c = carray(_as_pointer(C, like), (m, n))
        a_c, b_c = carray(_as_pointer(A, like), (m, k)), carray(_as_pointer(B, like), (k, n))
        a_t, b_t = carray(_as_pointer(A, like), (k, m)).T, carray(_as_pointer(B, like), (n, k)).T
        if ta == NO_TRANS:  # one np.dot per layout pair, each on C- or F-typed arrays
            if tb == NO_TRANS:
                np.dot(a_c, b_c, c)
            else:
                np.dot(a_c, b_t, c)
        elif tb == NO_TRANS:
            np.dot(a_t, b_c, c)
        else:
            np.dot(a_t, b_t, c)

    return fallback


def _find_numpy_openblas():
    """{dtype: address} of the ILP64 CBLAS GEMMs in a loaded BLAS library (NumPy's), or None."""
    try:
        from threadpoolctl import ThreadpoolController
        paths = [lib.filepath for lib in ThreadpoolController().select(user_api="blas").lib_controllers]
    except Exception:  # noqa: BLE001 (no threadpoolctl, or it cannot read the libraries)
        return None
    for path in paths:
        try:
            lib = ctypes.CDLL(path)
        except OSError:
            continue
        found = {}
        for dtype, names in _SYMBOLS.items():
            for name in names:
                fn = getattr(lib, name, None)
                if fn is not None:
                    found[dtype] = ctypes.cast(fn, ctypes.c_void_p).value
                    break
        if len(found) == len(_SYMBOLS):
            return path, found
    return None


def _register():
    found = _find_numpy_openblas()
    if found is not None:
        path, addresses = found
        for dtype, addr in addresses.items():
            ll.add_symbol(_NAMES[dtype], addr)
        return path
    for dtype in _SYMBOLS:
        ll.add_symbol(_NAMES[dtype], _fallback(dtype).address)
    return "np.dot (SciPy's BLAS)"


BLAS_SOURCE = _register()
_sgemm = types.ExternalFunction(_NAMES[np.float32], _signature(types.float32))
_dgemm = types.ExternalFunction(_NAMES[np.float64], _signature(types.float64))


def gemm(A, B, out):
    """out = A B (see the module docstring); in Python, np.dot."""
    np.dot(A, B, out)


@overload(gemm, jit_options={"cache": True, "error_model": "numpy"})
def _gemm_impl(A, B, out):
    if A.dtype == types.float32:
        call = _sgemm
    elif A.dtype == types.float64:
        call = _dgemm
    else:
        return None
    ftype = as_dtype(A.dtype).type
    one, zero = ftype(1.0), ftype(0.0)

    def impl(A, B, out):
        m, k = A.shape
        n = B.shape[1]
        size = A.itemsize
        if A.strides[1] == size:  # C-contiguous rows (or one column)
            ta, lda = NO_TRANS, max(A.strides[0] // size, max(k, 1))
        else:
            ta, lda = TRANS, max(A.strides[1] // size, max(m, 1))
        if B.strides[1] == size:
            tb, ldb = NO_TRANS, max(B.strides[0] // size, max(n, 1))
        else:
            tb, ldb = TRANS, max(B.strides[1] // size, max(k, 1))
        call(ROW_MAJOR, ta, tb, m, n, k, one, A.ctypes.data, lda, B.ctypes.data, ldb, zero,
             out.ctypes.data, max(n, 1))

    return impl


# ---- BLAS's own threads ------------------------------------------------------------------------
_controller_lock = threading.Lock()
_controller = []


def blas_libraries():
    """threadpoolctl's controller of the BLAS libraries loaded now (NumPy's, which ``gemm`` calls,
    and SciPy's, which Numba's np.dot calls), made once."""
    with _controller_lock:
        if not _controller:
            import scipy.linalg.cython_blas  # noqa: F401 (loads the BLAS that np.dot calls)
            from threadpoolctl import ThreadpoolController

            _controller.append(ThreadpoolController().select(user_api="blas"))
        return _controller[0]


class _OneBlasThread:
    """``one_blas_thread``'s context: each BLAS library's thread count read, set to 1 where it is
    not 1 already, and put back on exit. Direct calls on the controller's libraries: threadpoolctl's
    ``limit`` re-reads every library's info on entry and exit: 11.6 µs a context on the 2-core EPYC
    against 5.0 here (medians), and an LSTM training step enters four."""

    __slots__ = ("_saved",)

    def __enter__(self):
        self._saved = [(lib, lib.num_threads) for lib in blas_libraries().lib_controllers]
        for lib, n in self._saved:
            if n != 1:
                lib.set_num_threads(1)
        return self

    def __exit__(self, *exc):
        for lib, n in self._saved:
            if n != 1:
                lib.set_num_threads(n)
        return False


def one_blas_thread():
    """A context in which BLAS runs on the calling thread only: where the fused set splits the work
    over the cores itself (a recurrent time loop's row chunks, Conv2d's two halves), a threaded
    BLAS inside, or its threads left spinning after a GEMM, would fight that split for the cores."""
    return _OneBlasThread()
