"""One list of backends for every test, parametrized; a backend that is absent says why."""

import sys

import numpy as np
import pytest

from gpubackprop.backend import has_cupy_gpu, is_cudasim

pytest_plugins = ["cuda_target"]  # the CUDA kernel test files' target/ops/dev fixtures


def _lock_simulated_shared_arrays():
    """numba-cuda's simulator finds a block's shared array by the calling line, allocating it on
    first use without a lock: two threads of a block that both miss each allocate their own, and a
    block reduction then drops a thread's share (seen as a rare wrong softmax row once the switch
    interval below made thread switches frequent). The same lookup, under a lock."""
    import threading

    from numba.cuda.simulator.kernelapi import FakeCUDAShared

    original, lock = FakeCUDAShared.array, threading.Lock()

    def array(self, shape, dtype, alignment=None):
        if shape == 0 or alignment is not None or not isinstance(dtype, (type, np.dtype)):
            return original(self, shape, dtype, alignment)  # dynamic memory, Numba types: as before
        frame = sys._getframe(1)
        caller = (frame.f_code.co_filename, frame.f_lineno)
        with lock:
            found = self._allocations.get(caller)
            if found is None:
                found = self._allocations[caller] = np.empty(shape, dtype)
        return found

    FakeCUDAShared.array = array


if is_cudasim():
    # The simulator runs each CUDA thread as a Python thread, and a thread waiting at a barrier
    # (cuda.syncthreads) gives the GIL up only every switch interval: 5 ms by default, which made
    # a block reduction take seconds. 0.1 ms keeps the simulated barriers ~20x faster.
    sys.setswitchinterval(1e-4)
    _lock_simulated_shared_arrays()

# (device, kernels): the reference set and the fused set on every device there is.
BACKENDS = [("cpu", "reference"), ("cpu", "fused")]
GPU_BACKENDS = [("cuda", "reference"), ("cuda", "fused")]


def backend_params():
    params = [pytest.param(b, id="-".join(b)) for b in BACKENDS]
    reason = "needs a CUDA GPU with CuPy"
    if is_cudasim():
        reason += " (the simulator runs the cudasim tests)"
    for b in GPU_BACKENDS:
        marks = [] if has_cupy_gpu() else [pytest.mark.skip(reason=reason)]
        params.append(pytest.param(b, id="-".join(b), marks=marks))
    return params


@pytest.fixture(params=backend_params())
def backend_spec(request):
    """(device, kernels) for every available backend."""
    return request.param


@pytest.fixture
def rng():
    return np.random.default_rng(1234)


def pytest_collection_modifyitems(config, items):
    # The gpu marker means "a real GPU": skip it where there is none, with the reason.
    if has_cupy_gpu():
        return
    skip = pytest.mark.skip(reason="needs a real CUDA GPU with CuPy")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def pytest_terminal_summary(terminalreporter):
    # Registers per thread of every CUDA kernel, when the compile check ran in this process.
    import sys

    module = sys.modules.get("test_cuda_compile")
    if module is not None and module.REPORTS:
        from gpubackprop.kernels.cuda.ptx import register_table

        terminalreporter.section("CUDA kernels: registers per thread (ptxas -v)")
        terminalreporter.write_line(register_table(module.REPORTS))
