"""StepValues and the ``*_values`` ops on the CPU sets: the same bits as the host-scalar path."""

import numpy as np
import pytest
import step_values_cases as sc

import gpubackprop as gb
from gpubackprop.kernels.cpu import CpuOps
from gpubackprop.kernels.reference import ReferenceOps
from gpubackprop.step_values import DEVICE_SLOTS, HOST_SLOTS, SLOT, SLOTS, StepValues

CPU_SETS = ["reference", "fused"]


@pytest.mark.parametrize("kernels", CPU_SETS)
@pytest.mark.parametrize("name", list(sc.OPTIMIZERS))
def test_training_with_step_values_same_bits(kernels, name):
    sc.check_train_same_bits("cpu", kernels, name)


def test_training_with_step_values_float64():
    sc.check_train_same_bits("cpu", "fused", "adamw", dtype="float64")


@pytest.mark.parametrize("ops", [ReferenceOps(np), CpuOps(np, num_threads=1)],
                         ids=["reference", "fused-cpu"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_values_ops_same_bits(ops, dtype):
    sc.check_ops_same_bits(ops, np.ascontiguousarray, np.random.default_rng(1), dtype)


@pytest.mark.parametrize("ops", [ReferenceOps(np), CpuOps(np, num_threads=1)],
                         ids=["reference", "fused-cpu"])
def test_step_advance(ops):
    sc.check_step_advance(ops, np.ascontiguousarray)


def test_slots_layout():
    assert SLOTS == HOST_SLOTS + DEVICE_SLOTS
    assert [SLOT[s] for s in SLOTS] == list(range(len(SLOTS)))
    assert {"lr", "lr_c", "sqrt_bc2", "decay", "step"} <= set(HOST_SLOTS)


def test_step_row_is_the_host_arithmetic():
    from gpubackprop.kernels.reference import adam_coefficients

    opt = gb.AdamW(lr=0.01, betas=(0.8, 0.95), weight_decay=0.1)
    lr_c, sqrt_bc2, _, decay = adam_coefficients(0.02, 0.8, 0.95, 0.1, True, 3)
    assert opt.step_row(0.02, 3) == {"lr": 0.02, "lr_c": lr_c, "sqrt_bc2": sqrt_bc2,
                                     "decay": decay}
    assert gb.SGD(lr=0.1).step_row(0.3, 9) == {"lr": 0.3}
    assert gb.Adam(lr=0.1).step_row(0.1, 1)["decay"] == 1.0


def test_fill_set_and_host():
    be = gb.Sequential([gb.Dense(2, 2)], device="cpu").backend
    sv = StepValues(be, rows=3)
    sv.fill([{"lr": 0.5, "step": 4}, {"lr": 0.25}], start=1)
    assert sv.counter[0] == 1 and sv.table[0].tolist() == [0.0] * len(HOST_SLOTS)
    sv.advance()
    assert sv.host()["lr"] == 0.5 and sv.host()["step"] == 4
    sv.advance()
    assert sv.host()["lr"] == 0.25 and sv.host()["step"] == 0  # a missing slot is 0
    sv.set("lr", 2.0)
    assert sv.host()["lr"] == 2.0
    assert "slots=" in repr(sv)


def test_errors():
    be = gb.Sequential([gb.Dense(2, 2)], device="cpu").backend
    with pytest.raises(ValueError, match=r"rows: expected an integer >= 1, got 0"):
        StepValues(be, rows=0)
    sv = StepValues(be, rows=2)
    with pytest.raises(ValueError, match=r"3 rows from row 0 do not fit the table's 2"):
        sv.fill([{}, {}, {}])
    with pytest.raises(ValueError, match=r"'bogus' is not a host slot"):
        sv.fill([{"bogus": 1.0}])
    with pytest.raises(ValueError, match=r"name: expected one of .*, got 'nope'"):
        sv.set("nope", 1.0)
