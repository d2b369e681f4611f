"""GEMM rates: each of the MLP step's GEMM shapes alone, and the peak square sgemm."""

import functools

import numpy as np

from gpubackprop.benchmark.mlp import step_gemms
from gpubackprop.benchmark.timing import Contender, Timer, median, sync_for, xp_for

PEAK_GEMM = 1024  # the square sgemm whose rate is "the peak"
QUICK_PEAK_GEMM = 64


def gemm_flops(m, k, n):
    return 2 * m * k * n


def peak_gemm_gflops(timer, device, n=PEAK_GEMM):
    """GFLOP/s of one large square sgemm (xp.matmul with out=): the peak a step is held against."""
    xp = xp_for(device)
    rng = np.random.default_rng(0)
    A, B = (xp.asarray(rng.standard_normal((n, n)).astype(np.float32)) for _ in range(2))
    C = xp.empty((n, n), dtype=np.float32)
    c = Contender("peak", functools.partial(xp.matmul, A, B, out=C), sync_for(device), 1,
                  "numpy", device)
    t = Timer(rounds=max(3, timer.rounds // 2), block_s=timer.block_s, warmup_s=timer.warmup_s,
              quiesce_s=timer.quiesce_s).run([c])["peak"]
    return gemm_flops(n, n, n) / median(t) / 1e9


def gemm_section(timer, devices, shapes, log=print):
    """GFLOP/s of each of the step's GEMM shapes alone (the backend's xp.matmul with out=)."""
    rows = []
    for dev in devices:
        xp = xp_for(dev)
        shapes_seen = []
        for _key, (sizes, batch) in shapes.items():
            for (m, k, n) in step_gemms(sizes, batch):
                if (m, k, n) not in shapes_seen:
                    shapes_seen.append((m, k, n))
        rng = np.random.default_rng(0)
        cs = []
        for (m, k, n) in shapes_seen:
            A = xp.asarray(rng.standard_normal((m, k)).astype(np.float32))
            B = xp.asarray(rng.standard_normal((k, n)).astype(np.float32))
            C = xp.empty((m, n), dtype=np.float32)
            cs.append(Contender(f"{m}x{k}x{n}", functools.partial(xp.matmul, A, B, out=C),
                                sync_for(dev), 1, "gpubackprop", dev))
        times = Timer(rounds=max(3, timer.rounds // 2), block_s=timer.block_s / 2,
                      warmup_s=timer.warmup_s / 3, quiesce_s=0).run(cs)
        for (m, k, n), c in zip(shapes_seen, cs, strict=False):
            t = median(times[c.name])
            rows.append({"device": dev, "m": m, "k": k, "n": n,
                         "gflops": gemm_flops(m, k, n) / t / 1e9, "us": t * 1e6})
        log(f"  {dev} GEMM shapes: " + ", ".join(f"{r['m']}x{r['k']}x{r['n']} {r['gflops']:.0f}"
                                                  for r in rows if r["device"] == dev))
    return rows

