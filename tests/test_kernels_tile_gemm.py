"""kernels/cpu/tile_gemm.py, the Winograd chunks' small products, against float64 matmul on ragged
sizes (output rows past the blocks of 2 and 4, input rows past the blocks of 4, tiles past the
blocks of TB), on flat buffers at offsets as the chunks lay them out.

Tolerance: each entry is a sum of K products (K the inner size), so its float32 rounding error is
at most about K·u·Σ|a·b| (u = 2⁻²⁴, 2⁻⁵³ in float64); the tests take 4·K·u·Σ|a·b| entry by entry,
where a wrong product or a missed or doubled term is off by the size of a term."""

import numpy as np
import pytest

from gpubackprop.kernels.cpu import tile_gemm

U = {np.float32: 2.0 ** -24, np.float64: 2.0 ** -53}
# (m, k, P): one of everything, odd rows, inner sizes below, at and past 4, tiles past TB
SHAPES = [(1, 1, 1), (2, 4, 8), (3, 5, 33), (7, 9, 300), (16, 16, 512), (5, 3, tile_gemm.TB + 1),
          (33, 31, 70), (4, 2, 17)]


def _bound(A, B, dtype, k):
    return 4 * k * U[dtype] * (np.abs(A.astype(np.float64)) @ np.abs(B.astype(np.float64)))


def _flat(rng, rows, P, dtype, offset):
    """A flat buffer with a (rows, P) matrix from ``offset`` (rows P apart), NaN around it."""
    flat = np.full(offset + rows * P + 5, np.nan, dtype)
    mat = rng.standard_normal((rows, P)).astype(dtype)
    flat[offset:offset + rows * P] = mat.reshape(-1)
    return flat, mat


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("m,k,P", SHAPES)
def test_nn_is_the_product(rng, dtype, m, k, P):
    """out = A · B (and Aᵀ · B through a transposed view, as dV = Uᵀ · dM), the entries around
    out untouched."""
    A = rng.standard_normal((m, k)).astype(dtype)
    Bflat, B = _flat(rng, k, P, dtype, 3)
    out = np.full(7 + m * P + 4, np.nan, dtype)
    tile_gemm.nn(A, Bflat, np.uint64(3), out, np.uint64(7), np.uint64(P))
    got = out[7:7 + m * P].reshape(m, P)
    assert np.isnan(out[:7]).all() and np.isnan(out[7 + m * P:]).all()
    exact = A.astype(np.float64) @ B.astype(np.float64)
    assert (np.abs(got - exact) <= _bound(A, B, dtype, k) + 1e-300).all()
    # the transposed weights: (k, m)ᵀ
    At = np.ascontiguousarray(A.T)
    out2 = np.full(m * P, np.nan, dtype)
    tile_gemm.nn(At.T, Bflat, np.uint64(3), out2, np.uint64(0), np.uint64(P))
    np.testing.assert_array_equal(out2.reshape(m, P), got)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("m,k,P", SHAPES)
def test_nt_is_the_product_with_the_transpose(rng, dtype, m, k, P):
    """out (m, k) = A (m, P) · B (k, P)ᵀ, into a view of a larger array (BP3's dU[k])."""
    Aflat, A = _flat(rng, m, P, dtype, 2)
    Bflat, B = _flat(rng, k, P, dtype, 9)
    big = np.full((3, m, k), np.nan, dtype)
    tile_gemm.nt(Aflat, np.uint64(2), Bflat, np.uint64(9), np.uint64(P), big[1])
    assert np.isnan(big[0]).all() and np.isnan(big[2]).all()
    exact = A.astype(np.float64) @ B.astype(np.float64).T
    assert (np.abs(big[1] - exact) <= _bound(A, B.T, dtype, P) + 1e-300).all()


def test_the_bound_catches_a_wrong_term(rng):
    """The tolerance is tight enough to see one product dropped: the check above can fail."""
    A = rng.standard_normal((4, 8)).astype(np.float32)
    B = rng.standard_normal((8, 40)).astype(np.float32)
    wrong = A[:, 1:].astype(np.float64) @ B[1:].astype(np.float64)
    assert not (np.abs(wrong - A.astype(np.float64) @ B) <= _bound(A, B, np.float32, 8)).all()
