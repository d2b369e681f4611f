"""kernels/cuda/cublas.py without a GPU: the row-major -> column-major mapping of every GEMM shape
the layers use, checked by running the planned cuBLAS calls through a NumPy model of column-major
(strided-batched) GEMM on the operands' raw buffers; and nvmath-python's bindings that the module
calls, by name and argument count (nvmath imports without a GPU)."""

import ctypes
import inspect
import types

import numpy as np
import pytest
from numpy.lib.stride_tricks import as_strided

from gpubackprop.kernels.cuda import cublas


def _view(rng, shape, layout, pad=3, batch_broadcast=()):
    """A view of shape ``shape`` into a fresh flat buffer of small integers (exact products):
    layout "row" (row-major matrices, rows padded) or "col" (a transposed view: column-major
    matrices, padded); batch axes contiguous after the matrices, or stride 0 where listed in
    ``batch_broadcast``. Returns (view, flat buffer)."""
    *lead, r, c = shape
    if layout == "row":
        s0, s1 = c + pad, 1
        mat = r * (c + pad)
    else:
        s0, s1 = 1, r + pad
        mat = c * (r + pad)
    strides, span = [], mat
    for i in reversed(range(len(lead))):
        strides.insert(0, 0 if i in batch_broadcast else span)
        span *= 1 if i in batch_broadcast else lead[i]
    flat = rng.integers(-4, 5, span + 8).astype(np.float64)
    elems = (*strides, s0, s1)
    return as_strided(flat, shape, [e * flat.itemsize for e in elems]), flat


def _check(rng, a_shape, b_shape, a_layout="row", b_layout="row", a_bcast=(), b_bcast=(),
           c_pad=0):
    a, a_flat = _view(rng, a_shape, a_layout, batch_broadcast=a_bcast)
    b, b_flat = _view(rng, b_shape, b_layout, batch_broadcast=b_bcast)
    expected = np.matmul(a, b)
    c, c_flat = _view(rng, expected.shape, "row", pad=c_pad)
    c_flat[...] = np.nan
    calls = cublas.gemm_calls(a.shape, cublas.element_strides(a), b.shape,
                              cublas.element_strides(b), c.shape, cublas.element_strides(c))
    assert calls is not None
    for call in calls:
        cublas.emulate(call, b_flat, a_flat, c_flat)  # cuBLAS's A is our b
    np.testing.assert_array_equal(c, expected)
    return calls


DENSE = [  # (a, b) as the Dense layer's GEMMs: X Wᵀ, Δᵀ X, Δ W (W: (n_out, n_in))
    ((9, 6), (6, 4), "row", "col"),   # forward: X @ W.T (a transposed view)
    ((4, 9), (9, 6), "col", "row"),   # BP3: dZ.T @ X
    ((9, 4), (4, 6), "row", "row"),   # BP2: dZ @ W
    ((1, 6), (6, 4), "row", "col"),   # one sample
    ((9, 1), (1, 4), "row", "row"),   # an outer product (k = 1)
    ((9, 6), (6, 1), "row", "col"),   # one output
]


@pytest.mark.parametrize("a_shape,b_shape,la,lb", DENSE)
@pytest.mark.parametrize("c_pad", [0, 2])
def test_dense_gemms(a_shape, b_shape, la, lb, c_pad):
    calls = _check(np.random.default_rng(0), a_shape, b_shape, la, lb, c_pad=c_pad)
    assert len(calls) == 1 and calls[0].batch == 1


def test_transposes_chosen_by_layout():
    (call,) = _check(np.random.default_rng(1), (5, 3), (3, 7), "row", "col")
    # cuBLAS's A is our B: a transposed view needs op T; our row-major A is op N.
    assert (call.transa, call.transb, call.m, call.n, call.k) == (cublas.OP_T, cublas.OP_N, 7, 5, 3)


def test_batched_and_broadcast():
    rng = np.random.default_rng(2)
    # Recurrent/attention-like: (N, T, D) @ (N, D, E), both layouts.
    (call,) = _check(rng, (3, 5, 4), (3, 4, 6), "row", "col")
    assert call.batch == 3
    # A weight broadcast over the batch (stride 0).
    (call,) = _check(rng, (1, 5, 4), (3, 4, 6), "row", "row", a_bcast=(0,))
    assert call.batch == 3 and call.stride_b == 0
    # The conv's grouped GEMM: W (G, Cog, K) against cols (n, G, K, L): W broadcast over the
    # samples, one strided-batched call per sample over the groups.
    calls = _check(rng, (2, 3, 4), (5, 2, 4, 6), "row", "row")
    assert len(calls) >= 1 and sum(c.batch for c in calls) == 10
    # The conv's BP3: dZ (n, G, Cog, L) @ cols (n, G, K, L) transposed.
    _check(rng, (5, 2, 3, 6), (5, 2, 6, 4), "row", "col")


def test_random_shapes():
    rng = np.random.default_rng(3)
    for _ in range(60):
        nb = int(rng.integers(0, 3))
        batch = tuple(int(x) for x in rng.integers(1, 4, nb))
        m, k, n = (int(x) for x in rng.integers(1, 6, 3))
        a_b = tuple(1 if rng.random() < 0.3 else s for s in batch)
        b_b = tuple(1 if rng.random() < 0.3 else s for s in batch)
        la, lb = rng.choice(["row", "col"], 2)
        _check(rng, (*a_b, m, k), (*b_b, k, n), la, lb,
               a_bcast=tuple(i for i, s in enumerate(a_b) if s == 1 and batch[i] > 1),
               b_bcast=tuple(i for i, s in enumerate(b_b) if s == 1 and batch[i] > 1),
               c_pad=int(rng.integers(0, 2)))


def test_strided_inner_axis_needs_a_copy():
    a = np.zeros((4, 10))[:, ::2]  # inner stride 2
    b = np.zeros((5, 3))
    assert cublas.gemm_calls(a.shape, cublas.element_strides(a), b.shape,
                             cublas.element_strides(b), (4, 3), (3, 1)) is None


def test_shape_errors():
    with pytest.raises(ValueError, match=r"out: expected shape \(\.\.\., 4, 3\)"):
        cublas.gemm_calls((4, 5), (5, 1), (5, 3), (3, 1), (4, 4), (4, 1))
    with pytest.raises(ValueError, match=r"expected arrays of 2 or more axes"):
        cublas.gemm_calls((4,), (1,), (4, 3), (3, 1), (3,), (1,))
    with pytest.raises(ValueError, match=r"does not broadcast"):
        cublas.gemm_calls((2, 4, 5), (20, 5, 1), (3, 5, 3), (15, 3, 1), (3, 4, 3), (12, 3, 1))


def _arity(fn):
    try:
        return len(inspect.signature(fn).parameters)
    except (TypeError, ValueError):  # a Cython function without a signature: its docstring's
        first = (fn.__doc__ or "").splitlines()[0]
        inside = first[first.index("(") + 1:first.index(")")]
        return len([p for p in inside.split(",") if p.strip()])


def test_nvmath_bindings_exist_with_the_argument_counts_used():
    c = pytest.importorskip("nvmath.bindings.cublas")
    for name, n in cublas.BINDINGS.items():
        assert hasattr(c, name), f"nvmath.bindings.cublas.{name} missing"
        assert _arity(getattr(c, name)) == n, name
    assert int(c.Operation.N) == cublas.OP_N and int(c.Operation.T) == cublas.OP_T
    for attr in ("HOST",):
        assert hasattr(c.PointerMode, attr)
    assert hasattr(c.Math, "DEFAULT_MATH") and hasattr(c.Math, "TF32_TENSOR_OP_MATH")


# ---- CublasMatmul end to end on the CPU: fake CuPy arrays (NumPy memory) and fake bindings that
# run the column-major model on the memory their pointers address ----------------------------------

class _DevArray(np.ndarray):
    """A NumPy array that answers ``.data.ptr`` as a CuPy array does."""

    @property
    def data(self):
        return types.SimpleNamespace(ptr=self.ctypes.data)


class _Stream:
    def __init__(self, ptr, capturing=False):
        self.ptr, self.capturing = ptr, capturing

    def is_capturing(self):
        return self.capturing


class _FakeCupy:
    def __init__(self):
        self.stream = _Stream(7)
        self.cuda = types.SimpleNamespace(get_current_stream=lambda: self.stream)
        self.matmul_calls = 0

    def empty(self, shape, dtype):
        return np.empty(shape, dtype).view(_DevArray)

    def ascontiguousarray(self, a):
        return np.ascontiguousarray(a).view(_DevArray)

    def matmul(self, a, b, out=None):
        self.matmul_calls += 1
        return np.matmul(a, b, out=out)


def _flat(ptr, dtype, extent):
    ct = ctypes.c_float if dtype == np.float32 else ctypes.c_double
    return np.ctypeslib.as_array((ct * extent).from_address(ptr))


class _FakeBindings:
    """nvmath.bindings.cublas's names used by CublasMatmul, with cuBLAS's semantics on host memory."""

    PointerMode = types.SimpleNamespace(HOST=0, DEVICE=1)
    Math = types.SimpleNamespace(DEFAULT_MATH=0, TF32_TENSOR_OP_MATH=3)

    def __init__(self):
        self.log = []

    def create(self):
        self.log.append(("create",))
        return 1000 + len(self.log)

    def destroy(self, h):
        self.log.append(("destroy", h))

    def set_stream(self, h, s):
        self.log.append(("set_stream", h, s))

    def set_workspace(self, h, ptr, size):
        self.log.append(("set_workspace", h, size))

    def set_pointer_mode(self, h, mode):
        self.log.append(("set_pointer_mode", h, mode))

    def set_math_mode(self, h, mode):
        self.log.append(("set_math_mode", h, mode))

    def _gemm(self, dtype, h, ta, tb, m, n, k, alpha, A, lda, sa, B, ldb, sb, beta, C, ldc, sc,
              batch):
        ct = ctypes.c_float if dtype == np.float32 else ctypes.c_double
        assert ct.from_address(alpha).value == 1 and ct.from_address(beta).value == 0
        ext_a = ((m - 1) + (k - 1) * lda if ta == cublas.OP_N else (k - 1) + (m - 1) * lda) + 1
        ext_b = ((k - 1) + (n - 1) * ldb if tb == cublas.OP_N else (n - 1) + (k - 1) * ldb) + 1
        ext_c = (m - 1) + (n - 1) * ldc + 1
        last = batch - 1
        call = cublas.GemmCall(ta, tb, m, n, k, lda, ldb, ldc, 0, 0, 0, batch, sa, sb, sc)
        cublas.emulate(call, _flat(A, dtype, ext_a + last * sa), _flat(B, dtype, ext_b + last * sb),
                       _flat(C, dtype, ext_c + last * sc))
        self.log.append(("gemm", h, batch))

    def sgemm(self, h, ta, tb, m, n, k, alpha, A, lda, B, ldb, beta, C, ldc):
        self._gemm(np.float32, h, ta, tb, m, n, k, alpha, A, lda, 0, B, ldb, 0, beta, C, ldc, 0, 1)

    def dgemm(self, h, ta, tb, m, n, k, alpha, A, lda, B, ldb, beta, C, ldc):
        self._gemm(np.float64, h, ta, tb, m, n, k, alpha, A, lda, 0, B, ldb, 0, beta, C, ldc, 0, 1)

    def sgemm_strided_batched(self, h, ta, tb, m, n, k, alpha, A, lda, sa, B, ldb, sb, beta, C,
                              ldc, sc, batch):
        self._gemm(np.float32, h, ta, tb, m, n, k, alpha, A, lda, sa, B, ldb, sb, beta, C, ldc,
                   sc, batch)

    def dgemm_strided_batched(self, h, ta, tb, m, n, k, alpha, A, lda, sa, B, ldb, sb, beta, C,
                              ldc, sc, batch):
        self._gemm(np.float64, h, ta, tb, m, n, k, alpha, A, lda, sa, B, ldb, sb, beta, C, ldc,
                   sc, batch)


def _dev(rng, shape, dtype, transposed=False):
    x = rng.integers(-4, 5, shape).astype(dtype)
    if transposed:  # a transposed view of a contiguous array, as W.T
        x = np.ascontiguousarray(np.swapaxes(x, -1, -2)).view(_DevArray)
        return np.swapaxes(x, -1, -2)
    return x.view(_DevArray)


FAKE_CASES = [((9, 6), (6, 4), False, True), ((4, 9), (9, 6), True, False),
              ((9, 4), (4, 6), False, False), ((1, 6), (6, 4), False, True),
              ((3, 5, 4), (3, 4, 6), False, True), ((2, 3, 4), (5, 2, 4, 6), False, False),
              ((5, 2, 3, 6), (5, 2, 6, 4), False, True)]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("a_shape,b_shape,ta,tb", FAKE_CASES)
def test_cublas_matmul_end_to_end_on_fake_bindings(dtype, a_shape, b_shape, ta, tb):
    rng = np.random.default_rng(4)
    cp, c = _FakeCupy(), _FakeBindings()
    mm = cublas.CublasMatmul(cp, c)
    a, b = _dev(rng, a_shape, dtype, ta), _dev(rng, b_shape, dtype, tb)
    out = cp.empty(np.matmul(a, b).shape, dtype)
    assert mm(a, b, out) is out
    np.testing.assert_array_equal(out, np.matmul(np.asarray(a), np.asarray(b)))
    assert cp.matmul_calls == 0
    names = [e[0] for e in c.log]
    # One handle for the stream, bound to it, given its workspace, host pointer mode and no TF32,
    # all before the first GEMM.
    assert names[:5] == ["create", "set_stream", "set_workspace", "set_pointer_mode",
                         "set_math_mode"]
    assert c.log[1][2] == 7 and c.log[2][2] == cublas.WORKSPACE_BYTES and c.log[4][2] == 0
    assert set(names[5:]) == {"gemm"}
    mm(a, b, out)  # the handle is reused
    assert names.count("create") == 1 and [e[0] for e in c.log].count("create") == 1
    mm.close()
    assert c.log[-1][0] == "destroy"


def test_cublas_matmul_copies_strided_operands_and_falls_back():
    rng = np.random.default_rng(5)
    cp, c = _FakeCupy(), _FakeBindings()
    mm = cublas.CublasMatmul(cp, c, tf32=True)
    a = _dev(rng, (4, 10), np.float32)[:, ::2]  # inner stride 2: copied first
    b = _dev(rng, (5, 3), np.float32)
    out = mm(a, b)
    np.testing.assert_array_equal(out, np.asarray(a) @ np.asarray(b))
    assert [e[2] for e in c.log if e[0] == "set_math_mode"] == [3]  # TF32 when asked
    z = mm(_dev(rng, (3, 0), np.float32), _dev(rng, (0, 2), np.float32))  # k = 0: zeros
    np.testing.assert_array_equal(z, np.zeros((3, 2)))
    mm(_dev(rng, (3, 4), np.int64), _dev(rng, (4, 2), np.int64))  # other dtypes: CuPy's matmul
    assert cp.matmul_calls == 1


def test_no_handle_is_made_during_capture():
    cp, c = _FakeCupy(), _FakeBindings()
    cp.stream = _Stream(9, capturing=True)
    mm = cublas.CublasMatmul(cp, c)
    rng = np.random.default_rng(6)
    with pytest.raises(RuntimeError, match=r"no handle for this stream yet; run one eager step"):
        mm(_dev(rng, (2, 3), np.float32), _dev(rng, (3, 2), np.float32))
