"""kernels/cuda/cublas.py without a GPU: the row-major -> column-major mapping of every GEMM shape
the layers use, checked by running the planned cuBLAS calls through a NumPy model of column-major
(strided-batched) GEMM on the operands' raw buffers; and nvmath-python's bindings that the module
calls, by name and argument count (nvmath imports without a GPU)."""

import inspect

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
