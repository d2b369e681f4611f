"""Winograd F(2x2, 3x3) against im2col + GEMM on the CPU: Conv2d layers alone and whole networks.

    OMP_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1 NUMBA_NUM_THREADS=1 .venv/bin/python bench/winograd_cpu.py
    .venv/bin/python bench/winograd_cpu.py --layers vgg2,res16 --nets vgg --rounds 11

Each contender's time is the process's CPU time (``time.process_time``) per step, interleaved
rounds, medians: on a machine that others load, CPU time moves far less than wall time, but it
counts every thread's time, so it compares like with like only with one thread (the first line).
The networks run against their PyTorch twins (gpubackprop.benchmark.networks) with torch at one
thread too. The full benchmark (wall time, the configured threads) is ``python -m bench``.
"""

import argparse
import time

import numpy as np

import gpubackprop as gb
from gpubackprop.layers.model import walk

# name: (batch, C_in, C_out, H = W), 3x3 convolutions with padding 1 (the VGG-style net's and the
# resnet preset's layers, then shapes around the selection rule)
LAYERS = {"vgg2": (64, 32, 32, 32), "vgg3": (64, 32, 64, 16), "res16": (64, 16, 16, 32),
          "res32": (64, 32, 32, 16), "64@8": (64, 64, 64, 8), "16@16": (64, 16, 16, 16),
          "16-32@8": (64, 16, 32, 8), "8-16@32": (64, 8, 16, 32), "3-32@32": (64, 3, 32, 32)}


def interleaved(steps, rounds, min_s=0.05):
    """{name: median CPU seconds per call} of the callables ``steps``, rounds rotated."""
    for f in steps.values():
        f()
    t0 = time.process_time()
    next(iter(steps.values()))()
    reps = max(1, int(min_s / max(1e-4, time.process_time() - t0)))
    names, times = list(steps), {k: [] for k in steps}
    for r in range(rounds):
        for k in names[r % len(names):] + names[:r % len(names)]:
            t0 = time.process_time()
            for _ in range(reps):
                steps[k]()
            times[k].append((time.process_time() - t0) / reps)
    return {k: float(np.median(v)) for k, v in times.items()}


def layer_steps(N, ci, co, H):
    steps, chosen = {}, None
    rng = np.random.default_rng(0)
    X = rng.standard_normal((N, ci, H, H)).astype(np.float32)
    dY = rng.standard_normal((N, co, H, H)).astype(np.float32)
    for winograd in (False, True):
        layer = gb.Conv2d(ci, co, 3, padding=1)
        layer.winograd = winograd
        model = gb.Sequential([layer], input_shape=(ci, H, H), dtype="float32", seed=0)
        Xd = model.backend.to_device(X)

        def step(layer=layer, Xd=Xd):
            _, backprop = layer.forward(Xd, train=True)
            backprop(dY)
        steps["winograd" if winograd else "gemm"] = step
        if winograd:
            chosen = layer._winograd_pays()
    return steps, chosen


def network_steps(name):
    from gpubackprop.benchmark import contenders
    from gpubackprop.benchmark.networks import (
        NETWORKS,
        network_contender,
        network_plan,
        torch_network_contender,
    )

    net = NETWORKS[name]
    p = network_plan(net)
    on, off = network_contender(p, net.batch), network_contender(p, net.batch)
    for layer in walk(off.model):
        if isinstance(layer, gb.Conv2d):
            layer.winograd = False
    used = [f"{la.in_channels}->{la.out_channels} on {la.output_shape[1]}x{la.output_shape[2]}"
            for la in walk(on.model) if isinstance(la, gb.Conv2d) and la._winograd()]
    steps = {"winograd": on.step, "gemm": off.step}
    if contenders.torch_module() is not None:
        contenders.torch_module().set_num_threads(1)
        steps["pytorch"] = torch_network_contender(p, net.batch, model=on.model).step
    return net, steps, used


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--layers", default=",".join(LAYERS), help="comma-separated, of: "
                        + ", ".join(LAYERS) + " ('' for none)")
    parser.add_argument("--nets", default="vgg,resnet", help="comma-separated networks of "
                        "gpubackprop.benchmark.networks ('' for none)")
    parser.add_argument("--rounds", type=int, default=9)
    args = parser.parse_args(argv)
    for name in filter(None, args.layers.split(",")):
        N, ci, co, H = LAYERS[name]
        steps, chosen = layer_steps(N, ci, co, H)
        t = interleaved(steps, args.rounds)
        print(f"{name:8s} {ci:3d}->{co:3d} on {H}x{H}, batch {N}: im2col+GEMM {1e3 * t['gemm']:7.2f} ms, "
              f"Winograd {1e3 * t['winograd']:7.2f} ms, gemm/winograd {t['gemm'] / t['winograd']:.2f} "
              f"(auto takes Winograd: {chosen})", flush=True)
    for name in filter(None, args.nets.split(",")):
        net, steps, used = network_steps(name)
        t = interleaved(steps, args.rounds)
        print(f"{net.title}, batch {net.batch}; Winograd layers: {', '.join(used) or 'none'}")
        for k, v in t.items():
            ratio = f", x PyTorch {t['pytorch'] / v:.2f}" if "pytorch" in t else ""
            print(f"  {k:9s} {1e3 * v:7.2f} ms/step{ratio}")
        print(f"  gemm/winograd step {t['gemm'] / t['winograd']:.2f}", flush=True)


if __name__ == "__main__":
    main()
