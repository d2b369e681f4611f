"""Masked softmax ops: the reference against the formula, the fused CPU set against the reference
(serial and with its parallel kernels forced), on ragged rows with masks and fully masked rows."""

import attention_cases as ac
import numpy as np
import pytest
from kernel_cases import cpu_ops  # noqa: F401  (the ops fixture: the fused CPU set)
from kernel_cases import host as dev

from gpubackprop.kernels.reference import ReferenceOps


@pytest.fixture
def rng():
    return np.random.default_rng(19)


@pytest.mark.parametrize("with_mask", [False, True])
@pytest.mark.parametrize("dtype", ac.DTYPES)
def test_forward_equals_reference(ops, rng, dtype, with_mask):
    for R, L in ac.SHAPES:
        ac.check_forward(ops, dev, rng, R, L, dtype, with_mask)


@pytest.mark.parametrize("dtype", ac.DTYPES)
def test_backward_equals_reference(ops, rng, dtype):
    for R, L in ac.SHAPES:
        ac.check_backward(ops, dev, rng, R, L, dtype)


def test_nan_propagates(ops):
    ac.check_nan_propagates(ops, dev)
    ac.check_nan_propagates(ReferenceOps(np), dev)


def test_errors(ops):
    ac.check_errors(ops, dev)
    ac.check_errors(ReferenceOps(np), dev)
