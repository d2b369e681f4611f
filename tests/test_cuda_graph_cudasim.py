"""A graph run of the CUDA kernel set (its ``*_values`` kernels, StepValues' advance kernel) in
Numba's simulator, through the host capture backend: the same bits as the eager CUDA-set run.

Runs in its own process under NUMBA_ENABLE_CUDASIM=1 (there cuda_graph='auto' runs eagerly).
"""

import functools

import pytest

from gpubackprop.backend import is_cudasim

pytestmark = pytest.mark.cudasim

if not is_cudasim():
    pytest.skip("needs NUMBA_ENABLE_CUDASIM=1 (set before import)", allow_module_level=True)

import test_cuda_graph as tg  # noqa: E402

from gpubackprop import cuda_graph as cg  # noqa: E402

sim_mlp = functools.partial(tg.mlp, device="cuda")


@pytest.mark.parametrize("opt", ["adamw-clip", "rmsprop"])
def test_graph_run_of_the_cuda_set_equals_its_eager_run(opt):
    kw = dict(epochs=2, batch_size=32)  # 3 batches an epoch, the last of 6 rows
    eager = tg.run("off", opt, sim_mlp, **kw)
    graphs = tg.run("host", opt, sim_mlp, **kw)
    tg.assert_same_run(eager, graphs)
    # warm-up 1: one eager step of the full shape and one of the ragged one, then replays
    assert graphs[3].events.count("replay") == 6 - 2


def test_auto_runs_eagerly_in_the_simulator():
    assert "simulator" in cg.graphs_unavailable()
    assert cg.resolve("auto", sim_mlp()) is None
    with pytest.raises(ValueError, match=r"'on' cannot capture .*Numba's CUDA simulator"):
        cg.resolve("on", sim_mlp())


def test_graph_run_of_a_cnn_in_the_cuda_set():
    import numpy as np

    import gpubackprop as gb

    X = np.random.default_rng(3).normal(size=(20, 1, 6, 6))
    y = np.random.default_rng(4).integers(0, 3, 20)

    def cnn():
        return gb.Sequential([gb.Conv2d(1, 2, 3, padding=1), gb.BatchNorm2d(2),
                              gb.Activation("relu"), gb.MaxPool2d(2), gb.Flatten(),
                              gb.Dropout(0.3), gb.Dense(18, 3)],
                             input_shape=(1, 6, 6), device="cuda", seed=2)
    kw = dict(epochs=2, batch_size=8)  # 3 batches an epoch, the last of 4 rows
    graphs = tg.run("host", "adamw-clip", cnn, X, y, **kw)
    tg.assert_same_run(tg.run("off", "adamw-clip", cnn, X, y, **kw), graphs)
    assert graphs[3].events.count("replay") == 6 - 2


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the skipped steps' inf, as on a GPU
def test_graph_run_of_a_16_bit_mlp_in_the_cuda_set():
    """fp16 on the CUDA set (16-bit device arrays between the Dense layers, the 16-bit weight
    copy, the loss scaler's kernels with skipped steps) through the host capture backend."""
    import numpy as np

    model16 = functools.partial(tg.mlp16, "fp16", device="cuda")
    kw = dict(epochs=2, batch_size=32)  # 3 batches an epoch, the last of 6 rows
    graphs = tg.run("host", "adamw-clip", model16, **kw)
    tg.assert_same_run(tg.run("off", "adamw-clip", model16, **kw), graphs)
    assert graphs[3].events.count("replay") == 6 - 2
    model = graphs[0]
    assert [layer.W.dtype for layer in model.dense_layers()] == [np.float16] * 3
    assert model.loss_scaler.scale < 2.0**24  # the first steps overflowed and were skipped
