"""The direct convolution against im2col + GEMM on the CPU: Conv2d layers alone and the LeNet-5 step.

    OMP_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1 NUMBA_NUM_THREADS=1 \
        .venv/bin/python bench/direct_conv_cpu.py --cpu
    .venv/bin/python bench/direct_conv_cpu.py --rounds 11

Interleaved rounds (rotated order), medians. ``--cpu`` clocks the process's CPU time (robust on a
loaded machine, like for like only with one thread); else wall time, each block after the CPUs are
at most 15% busy (up to 3 s), as the benchmark runner waits. Layers: forward + backward with ReLU,
batch 128, ``Conv2d.direct`` True against False. Step: LeNet-5 (gpubackprop.benchmark.networks),
the direct path on both conv layers, on the "auto" choice (both, since the 5-wide kernels are
register-blocked), on neither, and on both with the bias and ReLU as separate passes.
"""

import argparse
import time

import numpy as np

from gpubackprop.benchmark.networks import NETWORKS, network_contender, network_plan
from gpubackprop.benchmark.timing import _busy_fraction, _cpu_times
from gpubackprop.layers import Sequential
from gpubackprop.layers.conv import Conv2d

# name: (C_in, C_out, k, padding, H = W): LeNet-5's two layers, then shapes around the rule
LAYERS = {"lenet1": (1, 6, 5, 2, 28), "lenet2": (6, 16, 5, 0, 14), "3-16@32": (3, 16, 5, 2, 32),
          "8-16@14": (8, 16, 5, 0, 14), "6-32@14": (6, 32, 5, 0, 14), "3-32@32k3": (3, 32, 3, 1, 32)}


def interleaved(steps, rounds, clock, min_s=0.2):
    """{name: [seconds per call, a round]} of the callables ``steps``, rounds rotated."""
    for f in steps.values():
        f()
    names, out = list(steps), {k: [] for k in steps}
    for r in range(rounds):
        for k in names[r % len(names):] + names[:r % len(names)]:
            if clock is time.perf_counter:
                for _ in range(30):
                    a = _cpu_times()
                    time.sleep(0.1)
                    if (_busy_fraction(a, _cpu_times()) or 0) <= 0.15:
                        break
            t, n = clock(), 0
            while clock() - t < min_s:
                steps[k]()
                n += 1
            out[k].append((clock() - t) / n)
    return out


def layer_step(case, direct, rng):
    ci, co, k, p, h = case
    layer = Conv2d(ci, co, k, padding=p, activation="relu")
    layer.direct = direct
    model = Sequential([layer], device="cpu", dtype="float32", kernels="fused", input_shape=(ci, h, h))
    X = rng.standard_normal((128, ci, h, h)).astype(np.float32)
    dY = np.ones((128, *model.output_shape), np.float32)

    def step():
        model.zero_grads()
        _, backprop = model.forward(X, train=True)
        backprop(dY)

    return step


def lenet_step(choice, fuse=True):
    """The LeNet-5 step with ``Conv2d.direct`` = ``choice`` on both layers; ``fuse`` False runs the
    direct layers' bias, ReLU, its derivative and BP4 as separate passes."""
    c = network_contender(network_plan(NETWORKS["lenet5"]), 128)
    convs = [layer for _, layer in c.model.leaves() if isinstance(layer, Conv2d)]
    for layer in convs:
        layer.direct = choice
    if fuse:
        return c.step
    ops = c.model.backend.ops

    def step():
        ops.direct_activations = ()  # (an instance attribute: the class's stays)
        try:
            c.step()
        finally:
            del ops.direct_activations

    return step


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--cpu", action="store_true", help="CPU time (use with one thread)")
    args = ap.parse_args()
    clock = time.process_time if args.cpu else time.perf_counter
    rng = np.random.default_rng(0)
    for name, case in LAYERS.items():
        res = interleaved({"direct": layer_step(case, True, rng),
                           "gemm": layer_step(case, False, rng)}, args.rounds, clock)
        d, g = np.array(res["direct"]), np.array(res["gemm"])
        print(f"{name:10s} direct {np.median(d) * 1e3:6.2f} ms  im2col+GEMM {np.median(g) * 1e3:6.2f}"
              f" ms  gemm/direct {np.median(g / d):.2f}")
    res = interleaved({"both": lenet_step(True), "auto": lenet_step("auto"),
                       "neither": lenet_step(False), "both, unfused": lenet_step(True, fuse=False)},
                      args.rounds, clock)
    for k, v in res.items():
        print(f"LeNet-5 step, direct on {k:13s} {np.median(v) * 1e3:6.2f} ms")


if __name__ == "__main__":
    main()
