"""The benchmark command: its parser, ``run`` (the selected sections, as the JSON file holds them)
and ``main``."""

import argparse
import sys
import time

from gpubackprop.benchmark import contenders
from gpubackprop.benchmark.contenders import LR, MOMENTUM, configure_torch
from gpubackprop.benchmark.environment import blas_threads, devices_available, environment
from gpubackprop.benchmark.gemm import PEAK_GEMM, QUICK_PEAK_GEMM, gemm_section
from gpubackprop.benchmark.memory import memory_section
from gpubackprop.benchmark.mlp import (
    QUICK_SHAPES,
    SCALING_BASE,
    SCALING_BATCHES,
    SCALING_WIDTHS,
    SHAPES,
    scaling_section,
    throughput_section,
)
from gpubackprop.benchmark.networks import NETWORKS, QUICK_NETWORKS, network_section
from gpubackprop.benchmark.ops import OP_SHAPES, ops_section
from gpubackprop.benchmark.timing import Timer, median

SECTIONS = ("throughput", *NETWORKS, "gemm", "ops", "scaling", "memory")


def build_parser():
    p = argparse.ArgumentParser(
        prog="gpubackprop bench",
        description="Training-step throughput against PyTorch and scikit-learn, GEMM limit, fused "
                    "vs reference ops, scaling and memory; interleaved, medians over rounds.")
    p.add_argument("--quick", action="store_true",
                   help="tiny sizes and few rounds (seconds; for tests, not for numbers)")
    p.add_argument("--device", default="all", choices=("all", "cpu", "cuda"),
                   help="devices to measure (default: every available one)")
    p.add_argument("--sections", default=",".join(SECTIONS),
                   help=f"comma-separated subset of {','.join(SECTIONS)} (networks: "
                        f"{', '.join(f'{k} {n.title}' for k, n in NETWORKS.items())})")
    p.add_argument("--shapes", default="L,S,T", help="comma-separated subset of L,S,T")
    p.add_argument("--rounds", type=int, default=None, help="timed rounds (default 11; quick 2)")
    p.add_argument("--out", default=None,
                   help="folder for <machine-type>.json/.md/.png (default: print only)")
    p.add_argument("--name", default=None,
                   help="file name stem (default: the machine type, and the sections when only "
                        "some run, so that a partial run leaves the full results alone)")
    p.add_argument("--no-torch", action="store_true", help="leave PyTorch out")
    p.add_argument("--no-sklearn", action="store_true", help="leave scikit-learn out")
    p.add_argument("--no-plot", action="store_true", help="no PNG")
    return p


def run(args, log=print):
    """Run the selected sections; returns the results dict (what the JSON file holds)."""
    from gpubackprop import bench_report

    sections = [s.strip() for s in args.sections.split(",") if s.strip()]
    bad = [s for s in sections if s not in SECTIONS]
    if bad:
        raise ValueError(f"sections: expected a subset of {SECTIONS}, got {bad}")
    keys = [k.strip() for k in args.shapes.split(",") if k.strip()]
    bad = [k for k in keys if k not in SHAPES]
    if bad:
        raise ValueError(f"shapes: expected a subset of {tuple(SHAPES)}, got {bad}")
    devices = devices_available(args.device)
    if args.quick:
        shapes = {k: QUICK_SHAPES[k] for k in keys}
        timer = Timer(rounds=args.rounds or 2, block_s=0.005, warmup_s=0.01, quiesce_s=0.0)
        op_shapes, batches, widths, growth = ((8, 16), (16, 32)), (1, 8), (8, 16), 20
        networks, peak_n, split_steps = QUICK_NETWORKS, QUICK_PEAK_GEMM, 2
    else:
        shapes = {k: SHAPES[k] for k in keys}
        timer = Timer(rounds=args.rounds or 11)
        op_shapes, batches, widths, growth = OP_SHAPES, SCALING_BATCHES, SCALING_WIDTHS, 1000
        networks, peak_n, split_steps = NETWORKS, PEAK_GEMM, 20
    if args.rounds is not None and args.rounds < 1:
        raise ValueError(f"rounds: expected a positive integer, got {args.rounds}")
    with_torch = not args.no_torch
    if with_torch:
        configure_torch(blas_threads())
    results = {"environment": environment(devices), "quick": bool(args.quick),
               "method": {"rounds": timer.rounds, "block_s": timer.block_s,
                          "warmup_s": timer.warmup_s, "quiesce_s": timer.quiesce_s,
                          "prime_calls": timer.prime_calls, "lr": LR, "momentum": MOMENTUM, "dtype": "float32"},
               "shapes": {k: {"sizes": list(s), "batch": b} for k, (s, b) in shapes.items()}}
    if with_torch and contenders.torch_module() is None:
        log("PyTorch is not installed: its rows say so (pip install torch==2.13.0 for the CPU build)")
    t_start = time.perf_counter()
    if "throughput" in sections:
        log("throughput (samples/s), interleaved:")
        results["throughput"] = throughput_section(timer, devices, shapes, with_torch,
                                                   not args.no_sklearn, log)
    peaks = {}  # the peak sgemm rate per device, measured once for every network
    for key, net in networks.items():
        if key in sections:
            log(f"{net.title} (samples/s), interleaved:")
            results[key] = network_section(timer, devices, net, with_torch, peak_n, split_steps,
                                           peaks=peaks, log=log)
    if "gemm" in sections:
        log("GEMM shapes (GFLOP/s):")
        results["gemm"] = gemm_section(timer, devices, shapes, log)
    if "ops" in sections:
        log("elementwise ops (GB/s), fused over reference:")
        results["ops"] = ops_section(timer, devices, op_shapes, log=log)
    if "scaling" in sections:
        log("scaling (samples/s):")
        scale_timer = Timer(rounds=max(2, timer.rounds // 2), block_s=timer.block_s,
                            warmup_s=timer.warmup_s, quiesce_s=timer.quiesce_s)
        base = (QUICK_SHAPES if args.quick else SHAPES)[SCALING_BASE]
        results["scaling"] = scaling_section(scale_timer, devices, batches, widths, with_torch,
                                             base, log)
    if "memory" in sections:
        log("memory:")
        results["memory"] = memory_section(devices, shapes, growth, tuple(shapes), log)
    busy = [b for t in (timer, locals().get("scale_timer")) if t is not None for b in t.busy
            if b is not None]
    results["method"]["busy_before_blocks"] = {
        "median": median(busy) if busy else None, "max": max(busy) if busy else None,
        "over_threshold": sum(b > timer.max_busy for b in busy), "blocks": len(busy),
        "threshold": timer.max_busy}
    results["seconds"] = time.perf_counter() - t_start
    results["sections"] = [s for s in SECTIONS if s in sections]
    results["markdown"] = bench_report.markdown(results)
    return results


def main(argv=None):
    """Command-line entry point (``gpubackprop bench``); returns the exit status."""
    from gpubackprop import bench_report

    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    try:
        results = run(args)
    except ValueError as e:
        print(f"gpubackprop bench: {e}", file=sys.stderr)
        return 2
    print()
    print(results["markdown"])
    if args.out:
        name = args.name
        if name is None and results["sections"] != list(SECTIONS):
            name = "-".join([results["environment"]["machine_type"], *results["sections"]])
        paths = bench_report.write(results, args.out, name, plot_png=not args.no_plot)
        print("wrote " + ", ".join(paths))
    return 0
