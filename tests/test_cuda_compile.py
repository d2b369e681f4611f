"""Every CUDA kernel through the real compiler, with no GPU: NVVM to PTX, ptxas to SASS.

For each registered kernel body, each signature it is launched with (float32 and float64, each
label dtype) and each of sm_80 and sm_90: it must compile and assemble, use no spill, stack or
local memory, and a float32 kernel may do float64 arithmetic only where its docstring names the
float64 accumulator as deliberate (``DELIBERATE_FLOAT64`` below). The registers per thread are
printed at the end of the run. Needs ``numba-cuda[cu12]`` (NVVM and ptxas wheels): ``make test``
installs it and sets GPUBACKPROP_REQUIRE_PTXAS=1, so there a missing compiler fails instead of
skipping.
"""

import inspect
import os

import numpy as np
import pytest

from gpubackprop.backend import is_cudasim

if is_cudasim():
    pytest.skip("the simulator replaces numba.cuda's compiler: runs in the non-simulator process",
                allow_module_level=True)

from gpubackprop.kernels.cuda import ptx  # noqa: E402
from gpubackprop.kernels.cuda.launch import REGISTRY, kernel_body  # noqa: E402

HAVE_PTXAS = ptx.ptxas_path() is not None
if not HAVE_PTXAS and os.environ.get("GPUBACKPROP_REQUIRE_PTXAS") != "1":
    pytest.skip("needs numba-cuda[cu12] (NVVM and ptxas)", allow_module_level=True)

# float32 kernels that do float64 arithmetic on purpose: each docstring says "Deliberate float64".
DELIBERATE_FLOAT64 = {
    "_softmax_ce": "row sum of exponentials",
    "_sq_partial": "sum of squares, per block",
    "_sq_finish": "sum of the block partials",
    "_clip_finish": "sum of the block partials",
    "_group_stats": "BatchNorm mean and variance of a channel",
    "_bn_grad_sums": "BatchNorm sums of dY and dY·x̂ of a channel",
    "_ln_row_sums": "LayerNorm mean and variance of a row, and its backward sums",
    "_ln_dx_cols": "LayerNorm parameter-gradient partials over row chunks",
    "_ln_param_finish": "LayerNorm sum of the row-chunk partials",
}

BODIES = ptx.load_all_families()
REPORTS = []  # printed by conftest's terminal summary


def test_every_kernel_module_registers_its_bodies():
    assert len(BODIES) >= 12
    names = [b.__name__ for b in BODIES]
    assert len(set(names)) == len(names), "two kernel bodies share a name"


@pytest.mark.parametrize("body", BODIES, ids=[b.__name__ for b in BODIES])
def test_kernel_compiles_without_spills_or_stray_float64(body):
    name = body.__name__
    deliberate = name in DELIBERATE_FLOAT64
    if deliberate:
        assert "Deliberate float64" in (inspect.getdoc(body) or ""), \
            f"{name}: listed as a deliberate float64 accumulator, but its docstring does not say so"
    for dtype, label_dtype in ptx.signatures(body):
        for arch in ptx.ARCHES:
            r = ptx.compile_body(body, dtype, label_dtype, arch)
            REPORTS.append(r)
            where = f"{name} ({dtype}{'/' + label_dtype.name if label_dtype else ''}, {r.arch})"
            assert r.clean, (f"{where}: {r.spill_stores} B spill stores, {r.spill_loads} B spill "
                             f"loads, {r.stack_frame} B stack, {r.local_bytes} B local memory")
            assert 0 < r.registers <= 255, f"{where}: {r.registers} registers"
            if dtype == np.float32 and not deliberate:
                assert r.float64_ops == 0, (f"{where}: {r.float64_ops} float64 instructions in a "
                                            f"float32 kernel (a Python float literal, or host math "
                                            f"done in every thread?)")


def test_deliberate_list_names_real_kernels():
    assert set(DELIBERATE_FLOAT64) <= {b.__name__ for b in BODIES}


def test_a_float64_literal_in_a_float32_kernel_is_caught():
    from gpubackprop.kernels.cuda.launch import cuda

    def _broken_scale(x):
        for i in range(cuda.grid(1), x.size, cuda.gridsize(1)):
            x[i] = x[i] * 0.1  # 0.1 is a float64: the product is computed in float64

    def _fixed_scale(x):
        for i in range(cuda.grid(1), x.size, cuda.gridsize(1)):
            x[i] = x[i] * x.dtype.type(0.1)

    for body in (_broken_scale, _fixed_scale):
        kernel_body("void({t}[::1])")(body)
    try:
        f32 = np.dtype(np.float32)
        assert ptx.compile_body(_broken_scale, f32).float64_ops > 0
        assert ptx.compile_body(_fixed_scale, f32).float64_ops == 0
    finally:
        del REGISTRY[_broken_scale], REGISTRY[_fixed_scale]
