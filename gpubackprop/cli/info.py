"""``gpubackprop info``: versions, devices, the active kernel set and why, and compile times."""

import os
import platform
import time

import numpy as np

from gpubackprop.cli.options import Formatter, add_device_options, resolve_device


def add_parser(sub):
    p = sub.add_parser("info", help="versions, devices and the active kernel set",
                       formatter_class=Formatter,
                       description="Print the versions of Python and the libraries, the devices "
                                   "seen, which kernel set\nis active and why, and how long the "
                                   "kernels take to compile on first use.")
    p.set_defaults(func=cmd_info)
    p.add_argument("--no-compile", action="store_true",
                   help="skip measuring the first-use compile time")
    p.add_argument("--ptx", action="store_true",
                   help="compile every CUDA kernel with the real CUDA compiler (NVVM + ptxas for "
                        "sm_80 and sm_90;\nno GPU needed, numba-cuda[cu12]) and print registers per "
                        "thread")
    add_device_options(p, None, "device")


def _version(module_name):
    try:
        from importlib.metadata import version

        return version(module_name)
    except Exception:
        return None


def cmd_info(args):
    from gpubackprop import __version__
    from gpubackprop.backend import (
        KERNEL_SET_IMPLEMENTATIONS,
        cupy_module,
        has_cupy_gpu,
        is_cudasim,
        kernel_set,
        numba_cuda,
    )

    rows = [("gpubackprop", __version__),
            ("python", f"{platform.python_version()} ({platform.python_implementation()}, "
                       f"{platform.machine()})"),
            ("numpy", np.__version__)]
    import numba

    rows.append(("numba", numba.__version__))
    rows.append(("numba-cuda", _version("numba-cuda") or "not installed"))
    # Core dependencies that decide numerics: SciPy's BLAS runs the CPU recurrent loops' GEMMs
    # (threadpoolctl sets its threads), ml_dtypes gives NumPy bfloat16 (bf16, BF16 safetensors).
    for name in ("scipy", "threadpoolctl", "ml_dtypes"):
        rows.append((name, _version(name) or "not installed"))
    cp = cupy_module()
    rows.append(("cupy", getattr(cp, "__version__", "?") if cp is not None else "not installed"))
    rows.append(("nvmath-python", _version("nvmath-python") or "not installed"))
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"{k:<{width}}  {v}")

    print()
    cuda = numba_cuda()
    gpu = has_cupy_gpu()
    if gpu:
        try:
            props = cp.cuda.runtime.getDeviceProperties(cp.cuda.Device().id)
            name = props["name"].decode() if isinstance(props["name"], bytes) else props["name"]
            print(f"GPU: {name} (device {cp.cuda.Device().id} of "
                  f"{cp.cuda.runtime.getDeviceCount()})")
        except Exception:
            print("GPU: yes")
    else:
        reasons = []
        if cp is None:
            reasons.append("CuPy is not installed")
        if cuda is None:
            reasons.append("numba.cuda cannot be imported")
        if not reasons:
            reasons.append("CuPy/Numba see no CUDA device" if not is_cudasim() else
                           "the simulator is on (NUMBA_ENABLE_CUDASIM=1)")
        print(f"GPU: none ({'; '.join(reasons)})")
    print(f"CUDA simulator: {'on (device cuda runs in Numba simulator)' if is_cudasim() else 'off'}")
    from gpubackprop.cuda_graph import graphs_info

    print(f"CUDA graphs: {graphs_info()}")
    if gpu:
        from gpubackprop.backend import tf32_enabled

        tf32 = "TF32 allowed (CUPY_TF32 or NVIDIA_TF32_OVERRIDE set)" if tf32_enabled() else \
            "full float32 (TF32 off)"
        print(f"float32 GEMMs: {tf32}")
    print(f"CPU: {os.cpu_count()} cores, Numba threads {numba.config.NUMBA_NUM_THREADS}")

    device, why = resolve_device(args.device)
    name = kernel_set(device, args.kernels)
    kind = KERNEL_SET_IMPLEMENTATIONS[name][2] + (" (simulated)" if name == "fused-cuda" and
                                                  is_cudasim() else "")
    print(f"kernel set: {args.kernels} ({kind}) on {device}, because --device {args.device}: "
          f"{why}")
    from gpubackprop.kernels import info

    for k, v in info.describe(device, args.kernels).items():
        print(f"  {k}: {v}")
    if not args.no_compile:
        # The first step of a typical model comes first: it pays for exactly the kernels such a
        # model uses (compiled, or loaded from Numba's on-disk cache), as a user's first step does.
        first, later = _compile_time(device, args.kernels)
        print(f"first training step: {first:.2f} s (relu MLP 16-16-4, Adam, batch 32: compiling "
              f"or loading its kernels); a later step takes {later * 1e3:.2f} ms")
        if args.kernels == "fused":
            for dtype in ("float32", "float64"):
                seconds = info.compile_time(device, dtype)
                print(f"the MLP kernels ({dtype}: dense, loss, optimizers; serial and parallel): "
                      f"{seconds:.2f} s to compile, or to load from Numba's on-disk cache")
            print("the other kernels (conv, Winograd, pooling, normalization, dropout, recurrent, "
                  "embedding, attention, precision) compile on first use")
    if args.ptx:
        _print_ptx_report()
    return 0


def _print_ptx_report():
    """Registers per thread of every CUDA kernel, from ptxas (no GPU needed)."""
    from gpubackprop.backend import is_cudasim

    if is_cudasim():
        raise RuntimeError("--ptx: the CUDA simulator is on (NUMBA_ENABLE_CUDASIM=1); it compiles nothing")
    try:
        from gpubackprop.kernels.cuda import ptx
    except ImportError as e:
        raise RuntimeError(f"--ptx: needs numba-cuda ({e})") from None
    if ptx.ptxas_path() is None:
        raise RuntimeError("--ptx: ptxas not found (pip install 'numba-cuda[cu12]')")
    reports = ptx.compile_all()
    print()
    print(f"CUDA kernels through NVVM + ptxas ({len(reports)} compilations; registers per thread):")
    print(ptx.register_table(reports))
    dirty = [r for r in reports if not r.clean]
    print("spills / stack / local memory: " + (", ".join(f"{r.name} ({r.dtype}, {r.arch})"
                                                       for r in dirty) if dirty else "none"))


def _compile_time(device, kernels):
    """Seconds of the first and of a later training step of a tiny model (both dtypes' kernels
    compile on first use; float32 is the default one measured)."""
    import gpubackprop as gb

    model = gb.Sequential([gb.Dense(16, 16, activation="relu"), gb.Dense(16, 4)], device=device,
                          kernels=kernels)
    X = np.random.default_rng(0).normal(size=(32, 16))
    y = np.arange(32) % 4
    loss, opt = gb.SoftmaxCrossEntropy(), gb.Adam(1e-3)
    t0 = time.perf_counter()
    gb.train_step(model, loss, opt, X, y)
    first = time.perf_counter() - t0
    t0 = time.perf_counter()
    for _ in range(5):
        gb.train_step(model, loss, opt, X, y)
    return first, (time.perf_counter() - t0) / 5

