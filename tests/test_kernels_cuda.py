"""The fused CUDA kernel set (kernels/cuda.py) against the NumPy reference.

Runs in its own process under Numba's CUDA simulator (``make test-cudasim``), on NumPy arrays;
where a real GPU with CuPy exists, the same checks also run on CuPy arrays (marked ``gpu``).
The simulator runs every CUDA thread in Python, so the sizes here are small, but every kernel is
launched on 2 blocks of 32 threads: several blocks, the grid-stride loop and a ragged tail.
"""

import numpy as np
import pytest

from gpubackprop.backend import has_cupy_gpu, is_cudasim

pytestmark = pytest.mark.cudasim

if not (is_cudasim() or has_cupy_gpu()):
    pytest.skip("needs NUMBA_ENABLE_CUDASIM=1 (set before import) or a CUDA GPU with CuPy",
                allow_module_level=True)

import kernel_cases as kc  # noqa: E402

from gpubackprop.kernels.cuda import THREADS  # noqa: E402

SHAPES = [(1, 1), (7, 13), (33, 70)]  # 2310 elements: 36 passes of the 64-thread grid, ragged


@pytest.mark.parametrize("dtype", kc.DTYPES)
@pytest.mark.parametrize("activation", kc.ALL_ACTIVATIONS)
def test_bias_act_and_backward(ops, dev, rng, dtype, activation):
    for shape in SHAPES:
        kc.check_bias_act(ops, dev, rng, shape, dtype, activation)
        kc.check_act_backward(ops, dev, rng, shape, dtype, activation)


@pytest.mark.parametrize("dtype", kc.DTYPES)
@pytest.mark.parametrize("activation", kc.ALL_ACTIVATIONS)
@pytest.mark.filterwarnings("ignore:invalid value:RuntimeWarning")  # gelu(-inf): NaN
def test_activation(ops, dev, rng, dtype, activation):
    for shape in SHAPES + [(3, 5, 2, 11)]:
        kc.check_activation(ops, dev, rng, shape, dtype, activation)
    kc.check_activation(ops, dev, rng, (3, 23), dtype, activation, in_place=True)
    kc.check_activation(ops, dev, rng, None, dtype, activation, edges=True)


@pytest.mark.parametrize("dtype", kc.DTYPES)
@pytest.mark.parametrize("activation", kc.ALL_ACTIVATIONS)
@pytest.mark.filterwarnings("ignore:invalid value:RuntimeWarning")  # gelu(-inf): NaN
def test_in_place_and_edges(ops, dev, rng, dtype, activation):
    if not kc.saves_input(activation):  # the gelus' backward needs Z, so A cannot overwrite it
        kc.check_bias_act(ops, dev, rng, (3, 23), dtype, activation, in_place=True)
    kc.check_act_backward(ops, dev, rng, (3, 23), dtype, activation, in_place=True)
    kc.check_edges(ops, dev, dtype, activation)


@pytest.mark.parametrize("dtype", kc.DTYPES)
def test_softmax_ce(ops, dev, rng, dtype):
    for shape in SHAPES + [(70, 3)]:  # 70 rows: more rows than threads
        kc.check_softmax_ce(ops, dev, rng, shape, dtype)
    kc.check_softmax_ce(ops, dev, rng, (9, 10), dtype, scale=1e4)
    kc.check_softmax_ce(ops, dev, rng, (9, 10), dtype, in_place=True)


def test_softmax_ce_bad_label_is_memory_safe(ops, dev):
    logits = dev(np.zeros((2, 3), np.float32))
    dl, loss = dev(np.empty((2, 3), np.float32)), dev(np.empty(2, np.float32))
    ops.softmax_ce(logits, dev(np.array([1, 7])), dl, loss)
    loss = kc.to_numpy(loss)
    assert np.isfinite(loss[0]) and np.isnan(loss[1])


@pytest.mark.parametrize("dtype", kc.DTYPES)
def test_bias_grad(ops, dev, rng, dtype):
    for shape in SHAPES + [(0, 5), (5, 3 * THREADS + 7)]:
        kc.check_bias_grad(ops, dev, rng, shape, dtype)


@pytest.mark.parametrize("dtype", kc.DTYPES)
def test_sq_norm_clip_scale(ops, dev, rng, dtype):
    for n in (1, 5, 2 * THREADS * 3 + 11):
        kc.check_sq_norm_clip(ops, dev, rng, n, dtype)


@pytest.mark.parametrize("dtype", kc.DTYPES)
@pytest.mark.parametrize("case", kc.OPTIMIZER_CASES, ids=kc.OPTIMIZER_IDS)
def test_optimizers(ops, dev, rng, dtype, case):
    kc.check_optimizer(ops, dev, rng, 2 * THREADS * 2 + 5, dtype, *case)


def test_unused_momentum_buffer_may_be_none(ops, dev, rng):
    p, g = rng.standard_normal(10), rng.standard_normal(10)
    ref = p - 0.1 * g
    pd = dev(p)
    ops.sgd(pd, dev(g), None, 0.1, 0.0, False, 0.0, dev(np.ones(1)))
    np.testing.assert_allclose(kc.to_numpy(pd), ref, rtol=1e-15)


def test_errors(ops, dev):
    kc.check_errors(ops, dev)


def test_name_and_repr(ops):
    assert ops.name == "fused-cuda"
    assert repr(ops).startswith("CudaOps(xp=")


def test_info():
    from gpubackprop.kernels.info import compile_time, describe

    d = describe("cuda", "fused")
    assert d["set"] == "fused-cuda"
    assert ("simulator" in d["detail"]) == is_cudasim()
    assert compile_time("cuda") > 0
