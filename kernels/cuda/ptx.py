"""The real CUDA compiler on any machine: every registered kernel body to PTX, assembled by ptxas.

``numba.cuda.compile_ptx`` runs NVVM without a GPU or driver (with ``numba-cuda[cu12]``
installed), and ``ptxas -v`` from the same wheels reports what a kernel costs on the device:
registers per thread, spills, stack and local memory. ``float64_ops`` counts float64 arithmetic
instructions in the PTX, which in a float32 kernel means a constant or an expression promoted by
accident (a Python float literal, ``1.0 - x`` of a float64 argument in every thread).

Used by tests/test_cuda_compile.py (every kernel, every signature, sm_80 and sm_90) and by
``gpubackprop info --kernels``.
"""

import importlib
import os
import pkgutil
import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass

import numpy as np

from gpubackprop.kernels.cuda.launch import HALF_DTYPES, LABEL_DTYPES, REGISTRY, cuda, signature

ARCHES = ((8, 0), (9, 0))
FLOAT_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))
_F64_ARITH = re.compile(r"^\s*(?:add|sub|mul|div|fma|mad|sqrt|rsqrt|rcp|neg|abs|min|max|ex2|lg2|sin|"
                        r"cos|tanh|copysign)(?:\.[a-z0-9]+)*\.f64\b", re.MULTILINE)


@dataclass
class KernelReport:
    """What ptxas says of one kernel body compiled for one signature and architecture."""

    name: str
    dtype: str
    label_dtype: str | None
    arch: str
    registers: int
    spill_stores: int
    spill_loads: int
    stack_frame: int
    local_bytes: int
    float64_ops: int

    @property
    def clean(self):
        """No spill, no stack frame, no local memory."""
        return not (self.spill_stores or self.spill_loads or self.stack_frame or self.local_bytes)


def load_all_families():
    """Import every module of the CUDA set, so that REGISTRY holds every kernel body."""
    import gpubackprop.kernels.cuda as pkg

    for info in pkgutil.iter_modules(pkg.__path__):
        importlib.import_module(f"{pkg.__name__}.{info.name}")
    return dict(REGISTRY)


def ptxas_path():
    """ptxas from the nvidia-cuda-nvcc wheel (numba-cuda[cu12]), else from PATH; None if absent."""
    try:
        import nvidia.cuda_nvcc as nvcc

        for folder in nvcc.__path__:
            path = os.path.join(folder, "bin", "ptxas")
            if os.path.exists(path):
                return path
    except ImportError:
        pass
    return shutil.which("ptxas")


def signatures(body):
    """Every (float dtype, label dtype) a body is launched with."""
    if "{h}" in REGISTRY[body]:  # the 16-bit storage bodies: float32 arithmetic, both storages
        return [(np.dtype(np.float32), np.dtype(h)) for h in HALF_DTYPES]
    if "{t}" not in REGISTRY[body]:  # float32 only (the loss scaler, the 16-bit rounding)
        return [(np.dtype(np.float32), None)]
    labels = [np.dtype(x) for x in LABEL_DTYPES] if "{l}" in REGISTRY[body] else [None]
    return [(dt, lt) for dt in FLOAT_DTYPES for lt in labels]


def compile_body(body, dtype, label_dtype=None, arch=(9, 0), ptxas=None):
    """Compile to PTX with NVVM and assemble with ``ptxas -v``; a ``KernelReport``."""
    ptx, _ = cuda.compile_ptx(body, signature(body, dtype, label_dtype), cc=arch)
    ptxas = ptxas or ptxas_path()
    if ptxas is None:
        raise RuntimeError("ptxas: not found (pip install 'numba-cuda[cu12]')")
    sm = f"sm_{arch[0]}{arch[1]}"
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "kernel.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        done = subprocess.run([ptxas, f"-arch={sm}", "-v", src, "-o", os.path.join(tmp, "k.cubin")],
                              capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"ptxas failed on {body.__name__} ({dtype}, {sm}):\n{done.stderr}")
    info = done.stderr

    def number(pattern):
        m = re.search(pattern, info)
        return int(m.group(1)) if m else 0

    return KernelReport(
        name=body.__name__, dtype=dtype.name, label_dtype=None if label_dtype is None else label_dtype.name,
        arch=sm, registers=number(r"Used (\d+) registers"),
        spill_stores=number(r"(\d+) bytes spill stores"), spill_loads=number(r"(\d+) bytes spill loads"),
        stack_frame=number(r"(\d+) bytes stack frame"), local_bytes=number(r"(\d+) bytes lmem"),
        float64_ops=len(_F64_ARITH.findall(ptx)))


def compile_all(arches=ARCHES):
    """A report for every registered body, signature and architecture."""
    ptxas = ptxas_path()
    reports = []
    for body in load_all_families():
        for dt, lt in signatures(body):
            for arch in arches:
                reports.append(compile_body(body, dt, lt, arch, ptxas))
    return reports


def register_table(reports):
    """Registers per thread by kernel, dtype and architecture, as text."""
    rows = {}
    for r in reports:
        key = (r.name, r.dtype + (f"/{r.label_dtype}" if r.label_dtype else ""))
        rows.setdefault(key, {})[r.arch] = r.registers
    arches = sorted({r.arch for r in reports})
    lines = [f"{'kernel':<18} {'dtype':<16} " + " ".join(f"{a:>6}" for a in arches)]
    for (name, dt), regs in rows.items():
        lines.append(f"{name:<18} {dt:<16} " + " ".join(f"{regs.get(a, '-'):>6}" for a in arches))
    return "\n".join(lines)
