"""Memory of a training step: its peak allocation, and growth over many steps."""

import gc
import tracemalloc

from gpubackprop import backend as backend_mod
from gpubackprop.benchmark.mlp import gpubackprop_contender


def memory_section(devices, shapes, growth_steps=1000, growth_shapes=("S", "T"), log=print):
    """Peak memory a step allocates (tracemalloc on the CPU, the CuPy pool on a GPU), and the
    growth of allocated memory over ``growth_steps`` steps."""
    rows = []
    for dev in devices:
        for key, (sizes, batch) in shapes.items():
            for kernels in ("reference", "fused"):
                c = gpubackprop_contender(sizes, batch, dev, kernels)
                for _ in range(3):  # workspaces, optimizer state, compiled kernels
                    c.step()
                c.sync()
                n = growth_steps if key in growth_shapes else 0
                peak, growth = _memory_of(c, dev, n)
                rows.append({"device": dev, "shape": key, "contender": c.name,
                             "step_peak_bytes": peak, "growth_steps": n,
                             "growth_bytes": growth if n else None,
                             "tool": "cupy memory pool" if dev == "cuda" else "tracemalloc"})
                log(f"  {dev} {key} {c.name}: peak {peak} B a step"
                    + (f", growth over {n} steps {growth} B" if n else ""))
    return rows


def _memory_of(c, device, n):
    if device == "cuda":
        return _cupy_memory_of(c, n)
    gc.collect()
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        base = tracemalloc.get_traced_memory()[0]
        c.step()
        c.sync()
        cur, peak = tracemalloc.get_traced_memory()
        peak -= base
        growth = 0
        if n:
            gc.collect()
            before = tracemalloc.get_traced_memory()[0]
            for _ in range(n):
                c.step()
            c.sync()
            gc.collect()
            growth = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    return int(peak), int(growth)


def _cupy_memory_of(c, n):
    cp = backend_mod.cupy_module()
    pool = cp.get_default_memory_pool()

    class PeakHook(cp.cuda.MemoryHook):
        name = "PeakHook"

        def __init__(self):
            self.used = self.peak = 0

        def malloc_postprocess(self, device_id, size, mem_size, mem_ptr, pmem_id):
            self.used += mem_size
            self.peak = max(self.peak, self.used)

        def free_postprocess(self, device_id, mem_size, mem_ptr, pmem_id):
            self.used -= mem_size

    hook = PeakHook()
    c.sync()
    with hook:
        c.step()
        c.sync()
    peak = hook.peak
    growth = 0
    if n:
        before = pool.used_bytes()
        for _ in range(n):
            c.step()
        c.sync()
        growth = pool.used_bytes() - before
    return int(peak), int(growth)

