"""Checks shared by test_kernels_embedding.py and test_kernels_embedding_cuda.py: the fused
embedding ops against ReferenceOps, bit for bit (every set sums each row's terms in position order,
in the array dtype, so there is nothing to round differently)."""

import numpy as np

from gpubackprop.backend import to_numpy
from gpubackprop.kernels.reference import ReferenceOps

REF = ReferenceOps(np)
DTYPES = [np.float32, np.float64]
INDEX_DTYPES = [np.int32, np.int64]
# (positions, num_embeddings, embedding_dim): one position; a small table hit many times (long
# segments); more positions and rows than 2 simulated blocks of 32 threads; rows never indexed.
SIZES = [(1, 3, 2), (150, 4, 3), (97, 40, 5), (33, 200, 1)]


def random_indices(rng, n, V, index_dtype, padding_idx=None):
    idx = rng.integers(0, V, n)
    if padding_idx is not None and n > 2:
        idx[rng.integers(0, n, n // 3)] = padding_idx  # many padding positions
    return idx.astype(index_dtype)


def check_forward(ops, dev, rng, n, V, D, dtype, index_dtype):
    W = rng.standard_normal((V, D)).astype(dtype)
    idx = random_indices(rng, n, V, index_dtype)
    ref = REF.embedding(W, idx, np.empty((n, D), dtype))
    np.testing.assert_array_equal(ref, W[idx])  # the reference is the plain gather
    got = ops.embedding(dev(W), dev(idx), dev(np.full((n, D), 7, dtype)))
    np.testing.assert_array_equal(to_numpy(got), ref)


def check_backward(ops, dev, rng, n, V, D, dtype, index_dtype, padding_idx, accumulate):
    dY = (rng.standard_normal((n, D)) * 10.0 ** rng.integers(-3, 4, (n, 1))).astype(dtype)
    idx = random_indices(rng, n, V, index_dtype, padding_idx)
    dW0 = rng.standard_normal((V, D)).astype(dtype)
    ref = REF.embedding_backward(dY, idx, dW0.copy(), padding_idx, accumulate)
    got = ops.embedding_backward(dev(dY), dev(idx), dev(dW0.copy()), padding_idx, accumulate)
    np.testing.assert_array_equal(to_numpy(got), ref)
    # The reference is the definition: each row the sum of its dY rows in position order.
    want = dW0.copy() if accumulate else np.zeros_like(dW0)
    for v in range(V):
        s = np.zeros(D, dtype)
        if v != padding_idx:
            for p in np.nonzero(idx == v)[0]:
                s = s + dY[p]
        want[v] = want[v] + s if accumulate else s
    np.testing.assert_array_equal(ref, want)


def check_out_of_range_is_memory_safe(ops, dev, dtype):
    """Indices outside [0, V) (the layer rejects them first): NaN rows forward, no gradient."""
    W = np.arange(6, dtype=dtype).reshape(3, 2)
    idx = np.array([0, 3, -1, 2], np.int64)
    Y = to_numpy(ops.embedding(dev(W), dev(idx), dev(np.zeros((4, 2), dtype))))
    np.testing.assert_array_equal(Y[[0, 3]], W[[0, 2]])
    assert np.isnan(Y[[1, 2]]).all()
    dW = ops.embedding_backward(dev(np.ones((4, 2), dtype)), dev(idx), dev(np.zeros((3, 2), dtype)))
    np.testing.assert_array_equal(to_numpy(dW), [[1, 1], [0, 0], [1, 1]])


def check_errors(ops, dev):
    import pytest

    W, Y = dev(np.zeros((3, 2))), dev(np.zeros((4, 2)))
    with pytest.raises(TypeError, match=r"idx: expected a 1-D int32 or int64 array, got float64"):
        ops.embedding(W, dev(np.zeros(4)), Y)
    with pytest.raises(ValueError, match=r"idx: expected 4 positions, got shape \(5,\)"):
        ops.embedding(W, dev(np.zeros(5, np.int64)), Y)
    with pytest.raises(ValueError, match=r"Y: expected \(positions, 2\), got shape \(4, 3\)"):
        ops.embedding(W, dev(np.zeros(4, np.int64)), dev(np.zeros((4, 3))))
    with pytest.raises(TypeError, match=r"dW: expected dtype float32 \(the dtype of dY\)"):
        ops.embedding_backward(dev(np.zeros((4, 2), np.float32)), dev(np.zeros(4, np.int64)), W)
