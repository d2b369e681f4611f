"""The conv and pooling families of the fused CUDA set (kernels/cuda/conv.py, pooling.py) against the
NumPy reference.

Runs in its own process under Numba's CUDA simulator, on NumPy arrays; where a real GPU with CuPy
exists, the same checks run on CuPy arrays (marked ``gpu``). The simulator runs every CUDA thread in
Python, so the sizes are tiny, but every kernel runs on 2 blocks of 32 threads over more elements than
threads: several blocks, the grid-stride loop and ragged tails.
"""

import numpy as np
import pytest

from gpubackprop.backend import has_cupy_gpu, is_cudasim

pytestmark = pytest.mark.cudasim

if not (is_cudasim() or has_cupy_gpu()):
    pytest.skip("needs NUMBA_ENABLE_CUDASIM=1 (set before import) or a CUDA GPU with CuPy",
                allow_module_level=True)

import conv_cases as cc  # noqa: E402
import kernel_cases as kc  # noqa: E402

from gpubackprop.kernels.cuda import THREADS  # noqa: E402
from gpubackprop.kernels.cuda.conv import CHANNEL_CHUNK_PER_THREAD, channel_chunks  # noqa: E402

CONV_CASES = cc.CONV_CASES
POOL_CASES = cc.POOL_CASES


@pytest.mark.parametrize("dtype", cc.DTYPES)
@pytest.mark.parametrize("case", CONV_CASES, ids=[cc.case_id(c) for c in CONV_CASES])
def test_im2col_col2im(ops, dev, rng, case, dtype):
    cc.check_im2col_col2im(ops, dev, rng, case, dtype)


@pytest.mark.parametrize("dtype", cc.DTYPES)
@pytest.mark.parametrize("activation", kc.ALL_ACTIVATIONS)
def test_channel_bias_act(ops, dev, rng, dtype, activation):
    cc.check_channel_bias_act(ops, dev, rng, (2, 3, 13), dtype, activation)
    if not kc.saves_input(activation):  # the gelus' backward needs Z, so A cannot overwrite it
        cc.check_channel_bias_act(ops, dev, rng, (1, 2, 5), dtype, activation, in_place=True)
        cc.check_channel_bias_act(ops, dev, rng, (1, 2, 5), dtype, activation, in_place="view")


@pytest.mark.parametrize("dtype", cc.DTYPES)
def test_channel_bias_grad(ops, dev, rng, dtype):
    # 5 channels on 2 blocks (grid-stride over channels), N·L > THREADS (several entries a thread);
    # then N·L large enough for 2 and 3 chunks a channel (a partial sum a chunk, then the chunks).
    per_chunk = CHANNEL_CHUNK_PER_THREAD * THREADS
    for shape in [(1, 1, 1), (3, 5, THREADS // 2 + 1), (0, 2, 3), (2, 3, per_chunk + 7),
                  (3, 2, per_chunk + 1)]:
        cc.check_channel_bias_grad(ops, dev, rng, shape, dtype)


def test_channel_chunks():
    per_chunk = CHANNEL_CHUNK_PER_THREAD * THREADS
    assert [channel_chunks(m) for m in (0, 1, 2 * per_chunk - 1, 2 * per_chunk + 14, 3 * per_chunk - 3)] \
        == [1, 1, 1, 2, 2]
    assert channel_chunks(10**9) == 64


@pytest.mark.parametrize("data", ["normal", "ties", "nan", "-inf"])
@pytest.mark.parametrize("dtype", cc.DTYPES)
@pytest.mark.parametrize("case", POOL_CASES, ids=[cc.case_id(c) for c in POOL_CASES])
def test_max_pool(ops, dev, rng, case, dtype, data):
    cc.check_max_pool(ops, dev, rng, case, dtype, data)


@pytest.mark.parametrize("count_include_pad", [True, False])
@pytest.mark.parametrize("dtype", cc.DTYPES)
@pytest.mark.parametrize("case", POOL_CASES, ids=[cc.case_id(c) for c in POOL_CASES])
def test_avg_pool(ops, dev, rng, case, dtype, count_include_pad):
    cc.check_avg_pool(ops, dev, rng, case, dtype, count_include_pad)


def test_errors(ops, dev):
    cc.check_errors(ops, dev)


@pytest.mark.parametrize("dtype", cc.DTYPES)
def test_random_geometries(ops, dev, rng, dtype):
    for case in cc.random_cases(np.random.default_rng(7), 15):
        cc.check_im2col_col2im(ops, dev, rng, case, dtype)
        if cc.poolable(case):
            cc.check_max_pool(ops, dev, rng, case, dtype, "ties")
            cc.check_avg_pool(ops, dev, rng, case, dtype, False)
