"""The recurrent cell ops: the reference against plain per-unit loops, the fused CPU set against
the reference (float32 and float64, ragged sizes), and their argument checks."""

import numpy as np
import pytest
import recurrent_cases as rc

from gpubackprop.kernels.cpu import CpuOps
from gpubackprop.kernels.reference import ReferenceOps

SIZES = [(1, 1), (3, 5), (7, 13), (2, 33)]


@pytest.fixture(scope="module")
def ref():
    return ReferenceOps(np)


@pytest.fixture(scope="module")
def cpu():
    return CpuOps(np)


def _cases():
    for op in rc.OPS:
        for act in (("tanh", "relu") if op.startswith("rnn") else ("tanh",)):
            yield pytest.param(op, act, id=f"{op}-{act}" if op.startswith("rnn") else op)


@pytest.mark.parametrize("op,activation", list(_cases()))
def test_reference_matches_the_equations(ref, rng, op, activation):
    for N, H in SIZES[:3]:
        a = rc.random_args(rng, op, N, H, "float64")
        expected = rc.naive(op, a, activation)
        rc.call(ref, op, a, activation)
        for name, want in expected.items():
            np.testing.assert_allclose(a[name], want, rtol=1e-12, atol=1e-12,
                                       err_msg=f"{op} {name} ({N}x{H})")


@pytest.mark.parametrize("dtype", rc.DTYPES)
@pytest.mark.parametrize("op,activation", list(_cases()))
def test_fused_cpu_matches_reference(cpu, ref, rng, op, activation, dtype):
    for N, H in SIZES:
        rc.check_against_reference(cpu, ref, np.ascontiguousarray, rng, op, N, H, dtype,
                                   activation)


@pytest.mark.parametrize("ops_name", ["reference", "cpu"])
def test_cell_argument_errors(ref, cpu, rng, ops_name):
    ops = ref if ops_name == "reference" else cpu
    a = rc.random_args(rng, "lstm_cell", 3, 4, "float64")
    bad = dict(a, c=np.zeros((3, 5)))
    with pytest.raises(ValueError, match=r"c: expected shape \(3, 4\) .*got shape \(3, 5\)"):
        rc.call(ops, "lstm_cell", bad)
    bad = dict(a, gates=np.zeros((3, 12)))
    with pytest.raises(ValueError, match=r"gates: expected shape \(3, 16\) \(batch 3, 4 x hidden"):
        rc.call(ops, "lstm_cell", bad)
    bad = dict(a, b_hh=np.zeros(4))
    with pytest.raises(ValueError, match=r"b_hh: expected shape \(16,\)"):
        rc.call(ops, "lstm_cell", bad)
    g = rc.random_args(rng, "rnn_cell", 2, 3, "float64")
    with pytest.raises(ValueError, match="nonlinearity: expected one of"):
        rc.call(ops, "rnn_cell", g, "sigmoid")


def test_fused_cpu_checks_dtype_and_contiguity(cpu, rng):
    a = rc.random_args(rng, "gru_cell", 3, 4, "float64")
    with pytest.raises(TypeError, match="h: expected dtype float64"):
        rc.call(cpu, "gru_cell", dict(a, h=a["h"].astype(np.float32)))
    with pytest.raises(ValueError, match="gx: expected a C-contiguous array"):
        rc.call(cpu, "gru_cell", dict(a, gx=np.asfortranarray(a["gx"])))
