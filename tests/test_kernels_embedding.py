"""Embedding ops: the fused CPU set bit for bit against the reference (the gather, and the
deterministic scatter-add of the weight gradient, serial and with its parallel kernel forced)."""

import embedding_cases as ec
import numpy as np
import pytest
from kernel_cases import cpu_ops  # noqa: F401  (the ops fixture: the fused CPU set)
from kernel_cases import host as dev


@pytest.fixture
def rng():
    return np.random.default_rng(19)


@pytest.mark.parametrize("index_dtype", ec.INDEX_DTYPES)
@pytest.mark.parametrize("dtype", ec.DTYPES)
def test_forward_equals_reference(ops, rng, dtype, index_dtype):
    for n, V, D in ec.SIZES:
        ec.check_forward(ops, dev, rng, n, V, D, dtype, index_dtype)


@pytest.mark.parametrize("accumulate", [False, True])
@pytest.mark.parametrize("padding_idx", [None, 0, 2])
@pytest.mark.parametrize("index_dtype", ec.INDEX_DTYPES)
@pytest.mark.parametrize("dtype", ec.DTYPES)
def test_backward_equals_reference_bit_for_bit(ops, rng, dtype, index_dtype, padding_idx, accumulate):
    for n, V, D in ec.SIZES:
        ec.check_backward(ops, dev, rng, n, V, D, dtype, index_dtype,
                          None if padding_idx is not None and padding_idx >= V else padding_idx,
                          accumulate)


@pytest.mark.parametrize("dtype", ec.DTYPES)
def test_out_of_range_indices_are_memory_safe(ops, dtype):
    ec.check_out_of_range_is_memory_safe(ops, dev, dtype)
    ec.check_out_of_range_is_memory_safe(ec.REF, dev, dtype)


def test_errors(ops):
    ec.check_errors(ops, dev)
    ec.check_errors(ec.REF, dev)
