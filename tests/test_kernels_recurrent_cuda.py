"""The recurrent cell and time-loop ops of the CUDA set against the reference, under Numba's CUDA
simulator (``NUMBA_ENABLE_CUDASIM=1``, own process) or on a real GPU with CuPy. Sizes are tiny (the
simulator runs a Python thread per CUDA thread) but need both blocks of the 64-thread grid and a
ragged grid-stride tail."""

import numpy as np
import pytest

from gpubackprop.backend import has_cupy_gpu, is_cudasim

pytestmark = pytest.mark.cudasim

if not (is_cudasim() or has_cupy_gpu()):
    pytest.skip("needs NUMBA_ENABLE_CUDASIM=1 (set before import) or a CUDA GPU with CuPy",
                allow_module_level=True)

import recurrent_cases as rc  # noqa: E402

import gpubackprop as gb  # noqa: E402
from gpubackprop.kernels.reference import ReferenceOps  # noqa: E402

SIZES = [(1, 1), (5, 13)]  # 65 units: both blocks of 32, then one more round of the grid-stride loop


def _cases():
    for op in rc.OPS:
        for act in (("tanh", "relu") if op.startswith("rnn") else ("tanh",)):
            yield pytest.param(op, act, id=f"{op}-{act}" if op.startswith("rnn") else op)


@pytest.mark.parametrize("dtype", rc.DTYPES)
@pytest.mark.parametrize("op,activation", list(_cases()))
def test_cuda_cell_matches_reference(target, rng, op, activation, dtype):
    ops, dev = target
    for N, H in SIZES:
        rc.check_against_reference(ops, ReferenceOps(np), dev, rng, op, N, H, dtype, activation)


def _steps_cases():
    for op in rc.STEPS_OPS:
        for act in (("tanh", "relu") if op.startswith("rnn") else ("tanh",)):
            yield pytest.param(op, act, id=f"{op}-{act}" if op.startswith("rnn") else op)


@pytest.mark.parametrize("reverse", [False, True], ids=["forward", "reverse"])
@pytest.mark.parametrize("op,activation", list(_steps_cases()))
def test_cuda_steps_match_reference(target, rng, op, activation, reverse):
    """The time loops of the CUDA set (a GEMM and a cell kernel a step) against the reference."""
    ops, dev = target
    for T, N, H in [(1, 1, 1), (2, 5, 13)]:
        if "backward" in op:
            for state_grad in (True, False):
                rc.check_steps_against_reference(ops, ReferenceOps(np), dev, rng, op, T, N, H,
                                                 "float64", activation, reverse, state_grad)
        else:
            for keep in ((None,) if op.startswith("rnn") else (None, 1)):
                rc.check_steps_against_reference(ops, ReferenceOps(np), dev, rng, op, T, N, H,
                                                 "float32", activation, reverse, keep=keep)


def test_cuda_cell_checks_shapes(target, rng):
    ops, dev = target
    a = {k: dev(v) for k, v in rc.random_args(rng, "gru_cell_backward", 2, 3, "float32").items()}
    a["dgh"] = dev(np.zeros((2, 6), np.float32))
    with pytest.raises(ValueError, match=r"dgh: expected shape \(2, 9\)"):
        rc.call(ops, "gru_cell_backward", a)


@pytest.mark.parametrize("make", [lambda: gb.RNN(3, 4, num_layers=2, nonlinearity="relu"),
                                  lambda: gb.LSTM(3, 4, num_layers=2),
                                  lambda: gb.GRU(3, 4, batch_first=False),
                                  lambda: gb.LSTM(3, 4, num_layers=2, bidirectional=True, dropout=0.5),
                                  lambda: gb.GRU(3, 4, bidirectional=True, batch_first=False)],
                         ids=["rnn-relu", "lstm", "gru-seq-major", "bilstm2-dropout", "bigru-seq-major"])
def test_layer_run_on_the_cuda_set_equals_the_reference(rng, make):
    """The whole layer (GEMMs, cell kernels, BP3/BP4; both directions and the dropout masks between
    layers where it has them) on the CUDA set, float64, with states."""
    N, T = 2, 3
    results = []
    for device, kernels in (("cuda", "fused"), ("cpu", "reference")):
        layer = make()
        model = gb.Sequential([layer], input_shape=(T, 3), device=device, kernels=kernels,
                              dtype="float64", seed=0)
        be = model.backend
        assert be.ops.name == ("fused-cuda" if device == "cuda" else "reference")
        r = np.random.default_rng(5)
        x_shape = (N, T, 3) if layer.batch_first else (T, N, 3)
        dirs = 2 if layer.bidirectional else 1
        X, dout = r.normal(size=x_shape), r.normal(size=(*x_shape[:2], 4 * dirs))
        hs = [be.to_device(r.normal(size=(layer.num_layers * dirs, N, 4))) for _ in range(4)]
        lstm = isinstance(layer, gb.LSTM)
        model.zero_grads()
        out, state_n, backward = layer.run(be.to_device(X), (hs[0], hs[1]) if lstm else hs[0],
                                           train=True)
        dX, dstate = backward(be.to_device(dout), (hs[2], hs[3]) if lstm else hs[2])
        flat = [out, *(state_n if lstm else (state_n,)), dX, *(dstate if lstm else (dstate,))]
        results.append([np.array(be.to_host(a)) for a in flat]
                       + [np.array(be.to_host(model.flat_grads))])
    for got, want in zip(*results, strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)
