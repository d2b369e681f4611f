"""Dropout ops: the hash against an independent pure-Python one, the fused CPU set bit for bit
against the reference, the keep rate within statistical bounds, distinct masks per call."""

import math

import norm_cases as nc
import numpy as np
import pytest
from kernel_cases import cpu_ops  # noqa: F401  (the ops fixture: the fused CPU set)
from kernel_cases import host as dev

from gpubackprop.kernels.reference import ReferenceOps
from gpubackprop.kernels.reference.dropout import dropout_key, dropout_params

REF = nc.REF
SHAPES = [(1,), (7, 13), (33, 70), (3, 4, 5, 6)]


def _splitmix_bits(seed, layer, step, i):
    """Written out again from the SplitMix64 definition, on Python ints: the 24 random bits of
    element i."""
    M = 2**64

    def mix(z):
        z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9 % M
        z = (z ^ (z >> 27)) * 0x94D049BB133111EB % M
        return z ^ (z >> 31)

    g = 0x9E3779B97F4A7C15
    k = mix((seed % M + g) % M)
    k = mix(((k ^ (layer % M)) + g) % M)
    k = mix(((k ^ (step % M)) + g) % M)
    return mix((k + (i + 1) * g) % M) >> 40


@pytest.mark.parametrize("seed,layer,step", [(0, 0, 0), (1234, 3, 17), (2**63 + 5, 2**40, 9), (-1, 1, 2)])
def test_reference_mask_against_pure_python(seed, layer, step):
    n = 300
    p = 0.37
    bits = [_splitmix_bits(seed, layer, step, i) for i in range(n)]
    expected = np.array([b / 2**24 >= p for b in bits])
    np.testing.assert_array_equal(REF.dropout_mask((n,), p, seed, layer, step), expected)


def test_threshold_is_exact():
    """keep ⇔ r / 2^24 ≥ p, with r the 24 random bits: p at and next to a multiple of 2^-24."""
    for r in (0, 1, 5, 2**23, 2**24 - 1):
        for p in (r / 2**24, np.nextafter(r / 2**24, 1), np.nextafter(r / 2**24, 0)):
            _, threshold, _ = dropout_params(p, 0, 0, 0)
            assert (r >= threshold) == (r / 2**24 >= p), (r, p)


def test_key_depends_on_every_argument():
    keys = {dropout_key(s, layer, t) for s in range(4) for layer in range(4) for t in range(4)}
    assert len(keys) == 64


@pytest.mark.parametrize("dtype", nc.DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("p", [0.0, 0.1, 0.5, 0.9, 1.0])
def test_fused_cpu_bit_identical(ops, rng, shape, dtype, p):
    nc.check_dropout(ops, dev, rng, shape, dtype, p)


def test_p0_keeps_all_p1_drops_all(ops, rng):
    X = rng.standard_normal((5, 9))
    for o in (ops, REF):
        np.testing.assert_array_equal(o.dropout(X, np.empty_like(X), 0.0, 1, 2, 3), X)
        np.testing.assert_array_equal(o.dropout(X, np.empty_like(X), 1.0, 1, 2, 3), 0 * X)
        assert o.dropout_mask((5, 9), 0.0, 1, 2, 3).all()
        assert not o.dropout_mask((5, 9), 1.0, 1, 2, 3).any()


@pytest.mark.parametrize("dtype", nc.DTYPES)
def test_inverted_scale(rng, dtype):
    """Kept elements are X times 1/(1 − p) rounded to the dtype once, as PyTorch's mask holds it."""
    X = nc.random(rng, 2000, dtype)
    p = 0.3
    Y = REF.dropout(X, np.empty_like(X), p, 5, 0, 1)
    keep = REF.dropout_mask(X.shape, p, 5, 0, 1)
    np.testing.assert_array_equal(Y[keep], X[keep] * np.dtype(dtype).type(1 / (1 - p)))
    assert np.all(Y[~keep] == 0)


@pytest.mark.parametrize("p", [0.05, 0.3, 0.5, 0.8])
def test_keep_rate_within_five_sigma(ops, p):
    n = 1 << 20
    keep = ops.dropout_mask((n,), p, 42, 1, 7)
    q = 1 - math.ceil(p * 2**24) / 2**24  # the exact keep probability
    sigma = math.sqrt(q * (1 - q) / n)
    assert abs(keep.mean() - q) < 5 * sigma
    # Neighbours independent: P(both kept) = q² within 5 sigma (a counter hash that leaks the
    # index into the low bits would fail here).
    both = (keep[:-1] & keep[1:]).mean()
    assert abs(both - q * q) < 5 * math.sqrt(q * q * (1 - q * q) / n) * 2
    # Each of the 24 bits fair: runs of 2^k kept elements show no period.
    blocks = keep[: n - n % 64].reshape(-1, 64).mean(axis=0)
    assert np.all(np.abs(blocks - q) < 5 * math.sqrt(q * (1 - q) / (n // 64)))


def test_masks_differ_per_seed_layer_step(ops):
    n, p = 4096, 0.5
    base = ops.dropout_mask((n,), p, 1, 2, 3)
    for args in ((2, 2, 3), (1, 3, 3), (1, 2, 4), (1, 2, 2), (3, 2, 1)):
        other = ops.dropout_mask((n,), p, *args)
        agree = (other == base).mean()
        assert abs(agree - 0.5) < 5 * math.sqrt(0.25 / n), args  # independent masks agree half the time
    np.testing.assert_array_equal(ops.dropout_mask((n,), p, 1, 2, 3), base)


def test_mask_is_a_function_of_the_flat_index(ops):
    """The same (seed, layer, step) gives the same mask for any shape of the same size."""
    a = ops.dropout_mask((6, 10), 0.4, 9, 9, 9)
    b = ops.dropout_mask((60,), 0.4, 9, 9, 9)
    np.testing.assert_array_equal(a.reshape(-1), b)


def test_reference_on_numpy_warns_nothing():
    with np.errstate(all="raise"):
        ReferenceOps(np).dropout_mask((1000,), 0.5, 2**64 - 1, 2**64 - 1, 2**64 - 1)


def test_errors(ops):
    nc.check_dropout_errors(ops, dev)
    nc.check_dropout_errors(REF, dev, arrays=False)
